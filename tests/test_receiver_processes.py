"""Receiver processes (``dicom.receiver_processes``, edge_agent/dicom/receivers.py), with real sockets and peers.

What holds for the receiver in the daemon's process must hold here too, across processes: every instance
durable, journalled and handed over once; the limits on connections and associations global; the back-pressure
gate in every process; metrics and logs in the daemon's. And what is new: a process that dies is replaced and
loses nothing it acknowledged; a process that cannot start fails the start with a reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent import tlsutil
from edge_agent.config import DicomConfig
from edge_agent.dicom.receivers import ReceiverProcesses
from edge_agent.dicom.spool import Spool
from edge_agent.errors import EdgeAgentError
from edge_agent.journal import Journal
from edge_agent.metrics import Metrics
from tests.certs import CertPaths
from tests.daemon import read_findings
from tests.daemon import storescu as daemon_storescu
from tests.dicomfiles import CT_SMALL, DATA_STORE, StoredLog, free_port, make_ct_series, running_receiver, storescu
from tests.test_scp_tls import _store as tls_store
from tests.test_scp_tls import _tls
from tests.ul import RawPeer, associate_rq

pytestmark = pytest.mark.timeout(120)

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


def _wait(condition: Callable[[], bool], seconds: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {seconds:g} s")
        time.sleep(0.02)


def _slices(series_uid: str, count: int) -> list[tuple[bytes, str, str]]:
    """``count`` CT slices of one series, encoded for an Explicit VR Little Endian context."""
    out = []
    for i in range(count):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), i + 1
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        out.append((buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _context() -> list[tuple[int, str, str]]:
    return [(1, str(pydicom.dcmread(CT_SMALL).SOPClassUID), str(ExplicitVRLittleEndian))]


def test_several_associations_at_once_are_stored_journalled_and_handed_over_once(tmp_path: Path) -> None:
    released: list[frozenset[int]] = []
    with running_receiver(tmp_path, receiver_processes=2, on_released=released.append) as h:
        assert len(h.receiver.pids()) == 2
        series_uid = generate_uid()
        slices = _slices(series_uid, 12)
        statuses: list[int] = []

        def send(part: list[tuple[bytes, str, str]]) -> None:
            peer = RawPeer(h.port)
            try:
                peer.associate(contexts=_context())
                statuses.extend(peer.store(*s) for s in part)
                peer.release()
            finally:
                peer.close()

        threads = [threading.Thread(target=send, args=(slices[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [SUCCESS] * 12
        calls = h.stored.wait_for(12)
        assert sorted(m.sop_instance_uid for m, _ in calls) == sorted(s[2] for s in slices)
        assert len({r.spool_name for _, r in calls}) == 12
        assert len(h.spool_files()) == 12
        [(count,)] = h.journal.read("SELECT COUNT(*) FROM instances")
        assert count == 12
        # The fewest-connections choice spread four associations over both processes.
        assert all(n >= 1 for n in h.receiver.connections_handed())
        _wait(lambda: len(released) == 4, what="four releases")
        assert {s for r in released for s in r} == {calls[0][1].series_id}
        # The receiver's metrics reach the daemon's registry.
        _wait(lambda: h.instances("stored") == 12, what="the stored count")
        assert h.associations("accepted") == 4
        assert h.sample("edge_agent_received_bytes_total") > sum(len(s[0]) for s in slices)
        _wait(lambda: h.receiver.active_associations() == 0, what="no association left")
        assert storescu(h.port, [CT_SMALL]).returncode == 0


def test_the_connection_limits_hold_across_processes(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, receiver_processes=2, max_connections_per_host=3) as h:
        peers.extend(RawPeer(h.port) for _ in range(3))
        assert _reset_at_once(h.port)  # the host has three open, whichever process has them
        assert h.associations("refused_connection") == 1
        # One of the three closes: the host may connect again.
        peers[0].close()
        _wait(lambda: _connects(h.port), what="a new connection accepted")


def _reset_at_once(port: int) -> bool:
    """A new connection is closed without a word (the reset may come before the connect returns)."""
    try:
        peer = RawPeer(port)
    except ConnectionResetError:
        return True
    try:
        return peer.read_pdu() is None
    finally:
        peer.close()


def _connects(port: int) -> bool:
    """A new association is accepted and released (a refused connection may be reset before connect returns)."""
    try:
        peer = RawPeer(port)
    except OSError:
        return False
    try:
        peer.associate(contexts=_context())
        peer.release()
        return True
    except (AssertionError, OSError):
        return False
    finally:
        peer.close()


def test_max_associations_holds_across_processes(tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, receiver_processes=2, max_associations=2) as h:
        for _ in range(2):
            peer = RawPeer(h.port)
            peers.append(peer)
            peer.associate(contexts=_context())
        assert h.receiver.connections_handed() == [1, 1]  # one association in each process
        third = RawPeer(h.port)
        peers.append(third)
        third.send(associate_rq(contexts=_context()))
        pdu = third.read_pdu()
        assert pdu is not None and pdu[0] == 0x03  # A-ASSOCIATE-RJ
        assert pdu[1][1:4] == bytes([0x02, 0x03, 0x02])  # transient, local limit exceeded
        peers[0].release()
        _wait(lambda: _connects(h.port), what="an association once one had ended")


def test_back_pressure_reaches_every_process_and_lifts(tmp_path: Path, peers: list[RawPeer]) -> None:
    gate: list[str | None] = [None]
    with running_receiver(tmp_path, receiver_processes=2, admission=lambda: gate[0]) as h:
        series_uid = generate_uid()
        one, two = RawPeer(h.port), RawPeer(h.port)
        peers.extend([one, two])
        one.associate(contexts=_context())
        two.associate(contexts=_context())
        assert h.receiver.connections_handed() == [1, 1]
        slices = iter(_slices(series_uid, 60))
        assert one.store(*next(slices)) == SUCCESS
        gate[0] = "inference is behind (a test)"
        # Within the gate's polling interval every process refuses, on every association.
        _wait(lambda: one.store(*next(slices)) == OUT_OF_RESOURCES, what="a refusal on the first association")
        _wait(lambda: two.store(*next(slices)) == OUT_OF_RESOURCES, what="a refusal on the second association")
        gate[0] = None
        _wait(lambda: two.store(*next(slices)) == SUCCESS, what="a Success once the gate reopened")
        _wait(lambda: one.store(*next(slices)) == SUCCESS, what="a Success on the first association")
        _wait(lambda: h.instances("backpressure") >= 2, what="the refusals counted")


def test_a_killed_receiver_process_is_replaced_and_loses_nothing_it_acknowledged(
        tmp_path: Path, peers: list[RawPeer], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_receiver(tmp_path, receiver_processes=2) as h:
        series_uid = generate_uid()
        slices = _slices(series_uid, 3)
        one, two = RawPeer(h.port), RawPeer(h.port)
        peers.extend([one, two])
        one.associate(contexts=_context())
        two.associate(contexts=_context())
        assert one.store(*slices[0]) == SUCCESS
        assert two.store(*slices[1]) == SUCCESS
        h.stored.wait_for(2)
        before = h.receiver.pids()
        # The process that holds the first association dies (SIGKILL: no goodbye).
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: "receiver process 0 ended (signal SIGKILL)" in caplog.text, what="the death logged")
        _wait(lambda: len(h.receiver.pids()) == 2 and victim not in h.receiver.pids(), what="a new process")
        # Its association was reset; the other process's association carries on.
        assert one.read_pdu() is None
        assert two.store(*slices[2]) == SUCCESS
        two.release()
        # Nothing acknowledged was lost, nothing counted twice, and the dead process's slot is free again.
        calls = h.stored.wait_for(3)
        assert len(calls) == 3 and len(h.spool_files()) == 3
        _wait(lambda: h.receiver.active_associations() == 0, what="the dead process's association freed")
        for _ in range(2):  # both processes serve again
            assert storescu(h.port, [CT_SMALL]).returncode == 0


def test_logs_of_a_receiver_process_are_the_daemons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_receiver(tmp_path, receiver_processes=2, allowed_calling_aets=["MODALITY"]) as h:
        assert storescu(h.port, [CT_SMALL], calling_aet="INTRUDER").returncode != 0
        _wait(lambda: "association rejected: calling AE not allowed" in caplog.text, what="the rejection logged")
        assert "INTRUDER" not in caplog.text
        _wait(lambda: h.associations("rejected_calling_aet") == 1, what="the rejection counted")


def test_stop_lets_an_association_finish_aborts_a_silent_one_and_leaves_no_process(
        tmp_path: Path, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, receiver_processes=2) as h:
        busy, silent = RawPeer(h.port), RawPeer(h.port)
        peers.extend([busy, silent])
        busy.associate(contexts=_context())
        silent.associate(contexts=_context())
        pids, port = h.receiver.pids(), h.port
        [(data, sop_class, sop_instance)] = _slices(generate_uid(), 1)
        outcome: list[tuple[int, int]] = []
        stopper = threading.Thread(target=lambda: outcome.append(h.receiver.stop(1.5)))
        stopper.start()
        time.sleep(0.3)
        # While it stops, the busy peer finishes its work and releases.
        assert busy.store(data, sop_class, sop_instance) == SUCCESS
        busy.release()
        stopper.join(30)
        assert outcome == [(1, 1)]
        assert silent.read_pdu() == (0x07, silent_abort_body())
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def silent_abort_body() -> bytes:
    return bytes([0, 0, 0x02, 0])  # A-ABORT, source service-provider, reason not specified


def test_tls_through_a_receiver_process(tmp_path: Path, certs: CertPaths, peers: list[RawPeer]) -> None:
    with running_receiver(tmp_path, receiver_processes=2, max_pending_connections=1, acse_timeout_seconds=1.0,
                          **_tls(certs)) as h:
        port = h.receiver.tls_port
        assert port is not None
        assert tls_store(port, tlsutil.client_context(certs.ca_file)) == SUCCESS
        h.stored.wait_for(1)
        # A peer that opens the TLS port and never shakes hands holds the one pending place...
        silent = RawPeer(port)
        peers.append(silent)
        assert _reset_at_once(port)
        # ... until its handshake times out in the receiver process, which gives the place back.
        assert silent.closed_within(10)
        _wait(lambda: tls_store(port, tlsutil.client_context(certs.ca_file)) == SUCCESS, what="a TLS store")


def test_a_receiver_process_that_cannot_start_fails_the_start_with_its_reason(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state" / "journal.db")
    spool = Spool(tmp_path / "spool", 0)
    config = DicomConfig(host="127.0.0.1", port=free_port(), receiver_processes=2)
    # The journal's folder is unusable for the processes (their own connection to it cannot open).
    receivers = ReceiverProcesses(config, spool, journal, Metrics(), StoredLog())
    receivers._journal_path = tmp_path / "not-a-folder" / "journal.db"
    (tmp_path / "not-a-folder").write_text("a file")
    with pytest.raises(EdgeAgentError, match=r"a DICOM receiver process could not start: \w+Error: "):
        receivers.start()
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", config.port), timeout=2):
        raise AssertionError("the port is still open after a failed start")
    assert receivers.pids() == []
    journal.close()


# -- in the daemon ---------------------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(entry.name))
    return out


def _is_receiver(pid: int) -> bool:
    """A child of the daemon with the journal open is a receiver process (preprocessing workers never open it)."""
    with contextlib.suppress(OSError):
        return any(Path(os.readlink(fd)).name.startswith("journal") for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


def test_the_daemon_with_receiver_processes_takes_studies_to_findings_and_stops_them(
        daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon(**{"dicom.receiver_processes": 2}).start()
    assert d.http("/readyz")[0] == 200
    assert d.proc is not None
    receivers = {c for c in _children(d.proc.pid) if _is_receiver(c)}
    assert len(receivers) == 2
    cr = DATA_STORE / "RG1_UNCR.dcm"
    ct = make_ct_series(tmp_path / "ct", 8, images_in_acquisition=True)
    assert daemon_storescu(d.dicom_port, cr).returncode == 0
    assert daemon_storescu(d.dicom_port, *ct).returncode == 0
    findings = read_findings(nats_server.url, 2)
    assert sorted(f["model"]["name"] for f in findings) == ["ct-demo", "cxr-nodule"]
    d.wait_metric("edge_agent_instances_total", 9, outcome="stored")
    assert d.metric("edge_agent_associations_total", outcome="accepted") == 2
    assert d.terminate() == 0
    assert "open at the stop, 2 finished" not in d.log()  # both had ended before the stop
    assert "of the associations open at the stop, 0 finished and 0 were aborted" in d.log()
    assert not any(Path(f"/proc/{pid}").exists() and _is_receiver(pid) for pid in receivers)


def test_receiver_processes_die_with_a_killed_daemon(daemon: Any) -> None:
    d = daemon(**{"dicom.receiver_processes": 2}).start()
    assert d.proc is not None
    receivers = {c for c in _children(d.proc.pid) if _is_receiver(c)}
    assert len(receivers) == 2
    d.kill9()
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in receivers), what="the receivers gone")
