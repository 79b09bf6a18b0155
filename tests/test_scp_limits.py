"""What a hostile or broken peer can do to the receiver, each with a real socket (issue 9, hard limits).

The peers here speak the DICOM Upper Layer byte by byte (``RawPeer``, tests/ul.py), so they can do what no
well-behaved SCU would: declare huge PDUs, trickle, go silent, open many connections, send a Deflated bomb.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE

from tests.dicomfiles import CT_SMALL, RG1_UNCR, SC_DEFLATED, running_receiver, storescu
from tests.ul import VERIFICATION, RawPeer, associate_rq, echo_command, pdata, store_command

pytestmark = pytest.mark.timeout(120)

GIB = 1 << 30


def _ct_dataset(syntax: str = str(ExplicitVRLittleEndian)) -> tuple[bytes, str, str]:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax == str(ImplicitVRLittleEndian)
    write_dataset(buf, ds)
    return buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def _pynetdicom_store(port: int, path: Path, bind: str = "127.0.0.1") -> int | None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT", bind_address=(bind, 0))
    if not assoc.is_established:
        return None
    try:
        answer = assoc.send_c_store(ds)
        return int(answer.Status) if "Status" in answer else None
    finally:
        assoc.release()


# -- PDU lengths -------------------------------------------------------------------------------------------


def test_a_huge_pdu_declared_before_any_association_is_cut_at_its_header(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        sent = 0
        chunk = b"\0" * (1 << 20)
        try:
            peer.send(struct.pack(">BBI", 0x01, 0, int(1.5 * GIB)))
            while sent < 600 * (1 << 20):
                peer.send(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the receiver closed the connection
        finally:
            peer.close()
        # Only what the kernels' socket buffers hold went out before the reset: nothing was buffered for it.
        assert sent < 64 * (1 << 20), f"{sent >> 20} MiB accepted after a 1.5 GiB A-ASSOCIATE-RQ header"
        assert storescu(h.port, [CT_SMALL]).returncode == 0


def test_a_p_data_pdu_over_max_pdu_bytes_is_aborted_at_its_header(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, max_pdu_bytes=65536) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        peer.send(struct.pack(">BBI", 0x04, 0, int(1.5 * GIB)))
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x07  # A-ABORT
        assert peer.closed_within(5)
        assert h.associations("aborted") == 1
        assert h.spool_files() == []
        assert storescu(h.port, [CT_SMALL]).returncode == 0


def test_the_announced_maximum_is_max_pdu_bytes_and_a_pdu_of_that_size_is_taken(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_pdu_bytes=65536) as h:
        cr = pydicom.dcmread(RG1_UNCR)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(cr.SOPClassUID, ExplicitVRLittleEndian)
        ae.maximum_pdu_size = 0
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert assoc.acceptor.maximum_length == 65536
            assert int(assoc.send_c_store(cr).Status) == 0  # 7 MB in 64 KiB PDUs
        finally:
            assoc.release()


# -- dataset sizes ---------------------------------------------------------------------------------------


def test_a_dataset_over_max_dataset_bytes_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_dataset_bytes=1 << 20) as h:
        assert _pynetdicom_store(h.port, RG1_UNCR) == 0xA700  # 7.2 MB
        assert h.spool_files() == []
        assert list((h.spool.root / "tmp").iterdir()) == []
        assert _pynetdicom_store(h.port, CT_SMALL) == 0
        assert len(h.spool_files()) == 1


def _deflate_bomb(inflated_bytes: int) -> tuple[bytes, str, str]:
    """A valid header, then an OB element of zeros: deflated, a few kilobytes that inflate to ``inflated_bytes``."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    head = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = z.compress(head)
    zeros = b"\0" * (1 << 20)
    for _ in range(inflated_bytes >> 20):
        out += z.compress(zeros)
    out += z.flush()
    return out, str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path, peers: list[RawPeer]) -> None:
    bomb, sop_class, sop_instance = _deflate_bomb(256 << 20)
    assert len(bomb) < 1 << 20
    with running_receiver(tmp_path, max_dataset_bytes=16 << 20) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate(contexts=[(1, str(CTImageStorage), str(DeflatedExplicitVRLittleEndian))])
        tracemalloc.start()
        try:
            status = peer.store(bomb, sop_class, sop_instance)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == 0xA700
        assert peak < 24 << 20, f"peak {peak >> 20} MiB while refusing a 256 MiB bomb"
        assert h.spool_files() == []
        assert h.instances("out_of_resources") == 1


def test_a_real_deflated_instance_is_stored_as_received(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        assert storescu(h.port, [SC_DEFLATED], extra=("-xd",)).returncode == 0
        (stored,) = h.spool_files()
        ds = pydicom.dcmread(stored)
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert ds.SOPInstanceUID == pydicom.dcmread(SC_DEFLATED).SOPInstanceUID
        ((meta, _),) = h.stored.calls
        assert meta.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_deflate_can_be_refused_at_negotiation(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, accept_deflate=False) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.send(associate_rq(contexts=[(1, str(CTImageStorage), str(DeflatedExplicitVRLittleEndian))]))
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x02
        # The AC's presentation context item: result 4, transfer syntaxes not supported.
        at = pdu[1].index(b"\x21\x00")
        assert pdu[1][at + 4] == 1 and pdu[1][at + 6] == 0x04


# -- connections and time ------------------------------------------------------------------------------


def test_silent_connections_do_not_lock_out_an_allowed_sender(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, max_pending_connections=8, max_connections_per_host=4,
                          max_associations=2, acse_timeout_seconds=60) as h:
        for _ in range(40):
            with contextlib.suppress(OSError):  # refused at once, or reset
                peers.append(RawPeer(h.port, source="127.0.0.2"))
        time.sleep(0.5)
        assert h.sample("edge_agent_associations_total", outcome="refused_connection") >= 36
        assert _pynetdicom_store(h.port, CT_SMALL) == 0


def test_one_host_cannot_take_every_pending_slot(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, max_pending_connections=8, max_connections_per_host=4,
                          acse_timeout_seconds=60) as h:
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(10):
                peers.append(RawPeer(h.port, source=source))
        time.sleep(0.5)
        # Each host got its 4; the pending pool (8) is then full, yet the next host is refused only for that.
        assert h.sample("edge_agent_associations_total", outcome="refused_connection") == 12
        for p in peers[:4]:
            p.close()
        time.sleep(0.3)
        assert _pynetdicom_store(h.port, CT_SMALL) == 0


def test_a_connection_that_trickles_its_request_is_closed_at_the_artim_timeout(
        tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, acse_timeout_seconds=1.0) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        rq = associate_rq()
        started = time.monotonic()
        closed = False
        for b in rq:  # one byte every 0.2 s: the whole request would take a minute
            try:
                peer.send(bytes([b]))
            except OSError:
                closed = True
                break
            if peer.closed_within(0.2):
                closed = True
                break
        assert closed and time.monotonic() - started < 10
        assert h.associations("timed_out") == 1
        assert h.associations("accepted") == 0


def test_a_silent_association_is_aborted(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, network_timeout_seconds=1.0) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        peer.sock.settimeout(10)
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x07
        assert h.associations("timed_out") == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_a_peer_that_never_reads_its_answers_is_not_buffered_and_loses_its_slot(tmp_path: Path, peers: list[RawPeer],
                                                                             processes: int) -> None:
    """Requests sent on and on with no answer ever read: the receiver stops reading once 64 KiB of answers wait
    (TCP then pushes back on the peer), aborts the association at the network timeout and drops the connection
    with its unread answers, so that its slot is free again."""
    with running_receiver(tmp_path, network_timeout_seconds=1.0, max_associations=1,
                          receiver_processes=processes) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.associate(contexts=[(1, VERIFICATION, str(ImplicitVRLittleEndian))])
        batch = pdata(1, 0x03, echo_command()) * 1000
        sent = [0]

        def flood() -> None:
            with contextlib.suppress(OSError):  # until the receiver's abort resets the connection
                while sent[0] < 400 * 1024 * 1024:
                    peer.sock.sendall(batch)
                    sent[0] += len(batch)

        flooding = threading.Thread(target=flood, daemon=True)
        flooding.start()
        flooding.join(30)
        assert not flooding.is_alive()
        # The peer could send only what the socket buffers and one read's worth hold: a few MB, not 400.
        assert sent[0] < 32 * 1024 * 1024
        deadline = time.monotonic() + 10
        while h.receiver.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.receiver.active_associations() == 0
        assert h.associations("timed_out") == 1
        other = RawPeer(h.port)  # the one association there is, free again
        peers.append(other)
        other.associate(contexts=[(1, VERIFICATION, str(ImplicitVRLittleEndian))])
        assert other.echo(1) == 0x0000
        other.release()


def test_garbage_before_association_and_unknown_pdus_are_aborted(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert peer.closed_within(5)
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        peer.send(struct.pack(">BBI", 0x09, 0, 4) + b"\0\0\0\0")
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x07
        assert storescu(h.port, [CT_SMALL]).returncode == 0


def test_a_raw_store_and_release(tmp_path: Path, peers: list[RawPeer]) -> None:
    released: list[frozenset[int]] = []
    with running_receiver(tmp_path, on_released=released.append) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        data, sop_class, sop_instance = _ct_dataset()
        assert peer.store(data, sop_class, sop_instance, fragment=1000) == 0
        peer.send(struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0")
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x06
        peer.close()
        _until(lambda: h.associations("released") == 1)
        ((_, recorded),) = h.stored.calls
        assert released == [frozenset({recorded.series_id})]
        assert pydicom.dcmread(h.spool_files()[0]).SOPInstanceUID == sop_instance


def test_an_aborted_association_reports_no_release(tmp_path: Path, peers: list[RawPeer]) -> None:
    released: list[frozenset[int]] = []
    with running_receiver(tmp_path, on_released=released.append) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        data, sop_class, sop_instance = _ct_dataset()
        assert peer.store(data, sop_class, sop_instance) == 0
        peer.send(struct.pack(">BBI", 0x07, 0, 4) + b"\0\0\0\0")
        assert peer.closed_within(5)
        assert len(h.stored.calls) == 1 and released == []
        assert h.associations("aborted") == 1 and h.associations("released") == 0


def test_a_dataset_of_another_instance_than_the_request_names_is_stored_as_the_dataset_says(
        tmp_path: Path, peers: list[RawPeer], caplog: pytest.LogCaptureFixture) -> None:
    """A PACS forwarding a file whose File Meta disagrees with its dataset names the File Meta's instance in its
    request: stored (never refused, or the study would never arrive whole), journalled as the dataset says, and
    said in a log line that names no UID."""
    # Said at WARNING once a minute (an earlier test may have had this minute's), at DEBUG in between.
    caplog.set_level(logging.DEBUG, logger="edge_agent.dicom.incoming")
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        data, sop_class, sop_instance = _ct_dataset()
        requested = generate_uid()
        assert peer.store(data, sop_class, requested) == 0x0000
        (meta, _), = h.stored.wait_for(1)
        assert meta.sop_instance_uid == sop_instance
        peer.release()
    said = [r.getMessage() for r in caplog.records if "another SOP Instance UID" in r.getMessage()]
    assert len(said) == 1 and requested not in said[0] and sop_instance not in said[0]


def test_a_store_request_without_a_dataset_is_aborted(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        _, sop_class, sop_instance = _ct_dataset()
        no_dataset = store_command(sop_class, sop_instance).replace(
            struct.pack("<HHI", 0x0000, 0x0800, 2) + struct.pack("<H", 0),
            struct.pack("<HHI", 0x0000, 0x0800, 2) + struct.pack("<H", 0x0101))
        assert no_dataset != store_command(sop_class, sop_instance)
        peer.send(pdata(1, 0x03, no_dataset))
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x07
        assert h.spool_files() == []


def test_a_dataset_cut_by_a_closed_connection_leaves_nothing(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        peer.associate()
        data, sop_class, sop_instance = _ct_dataset()
        peer.send(pdata(1, 0x03, store_command(sop_class, sop_instance)))
        peer.send(pdata(1, 0x00, data[: len(data) // 2]))
        peer.close()
        _until(lambda: h.associations("aborted") == 1)
        assert h.spool_files() == [] and list((h.spool.root / "tmp").iterdir()) == []
        assert h.stored.calls == []


def test_a_new_command_inside_a_dataset_is_aborted_and_leaves_nothing(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path) as h:
        peer = RawPeer(h.port)
        peers.append(peer)
        peer.associate()
        data, sop_class, sop_instance = _ct_dataset()
        peer.send(pdata(1, 0x03, store_command(sop_class, sop_instance)))
        peer.send(pdata(1, 0x00, data[:1000]))
        peer.send(pdata(1, 0x03, store_command(sop_class, generate_uid(), 2)))
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x07
        assert peer.closed_within(5)
        assert list((h.spool.root / "tmp").iterdir()) == [] and h.spool_files() == []


# -- back-pressure ---------------------------------------------------------------------------------------


def test_back_pressure_answers_out_of_resources_then_resumes(tmp_path: Path) -> None:
    behind = threading.Event()
    behind.set()

    def admission() -> str | None:
        return "1000 instances wait for inference (pipeline.max_pending_instances 1000)" if behind.is_set() else None

    with running_receiver(tmp_path, admission=admission) as h:
        assert _pynetdicom_store(h.port, CT_SMALL) == 0xA700
        assert h.instances("backpressure") == 1
        assert h.spool_files() == []
        behind.clear()
        assert _pynetdicom_store(h.port, CT_SMALL) == 0
        assert len(h.spool_files()) == 1


def _until(cond: object, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
