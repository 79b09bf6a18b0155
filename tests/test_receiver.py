"""The DICOM receiver against real peers: dcmtk storescu/echoscu and a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, RTDoseStorage, Verification  # type: ignore[attr-defined]

from edge_agent.config import DicomConfig
from edge_agent.dicom import status
from edge_agent.dicom.header import SopClassMismatchError, read_meta
from edge_agent.dicom.scp import Receiver
from edge_agent.dicom.spool import Spool, SpoolFullError
from edge_agent.errors import DecodeError, EdgeAgentError, JournalError
from edge_agent.metrics import Metrics
from tests.dicomfiles import (
    CT_J2KI,
    CT_SMALL,
    EMRI_SMALL,
    MR_SMALL_BIG_ENDIAN,
    MR_SMALL_IMPLICIT,
    MR_SMALL_J2K_LOSSLESS,
    MR_SMALL_JPEG_LS_LOSSLESS,
    MR_SMALL_RLE,
    RG1_UNCR,
    RG3_J2KI,
    SC_DEFLATED,
    SC_JPEG_BASELINE,
    SC_JPEG_EXTENDED,
    SC_JPEG_LOSSLESS_SV1,
    SC_JPEG_LS_NEAR_LOSSLESS,
    ReceiverHarness,
    dataset_bytes,
    dcmtk_env,
    fill,
    fill_inodes,
    make_ct_series,
    running_receiver,
    storescu,
    tmpfs,
)

# (file, storescu option that proposes the file's own transfer syntax). dcmtk proposes only
# uncompressed syntaxes by default and would transcode (or give up on) compressed files.
STORESCU_CASES = [
    (RG1_UNCR, ()),  # CR chest, Explicit VR LE, 7.2 MB
    (RG3_J2KI, ("-xw",)),  # CR, JPEG 2000
    (CT_J2KI, ("-xw",)),  # CT, JPEG 2000
    (MR_SMALL_J2K_LOSSLESS, ("-xv",)),
    (MR_SMALL_RLE, ("-xr",)),
    (MR_SMALL_BIG_ENDIAN, ("-xb",)),
    (MR_SMALL_IMPLICIT, ("-xi",)),
    (MR_SMALL_JPEG_LS_LOSSLESS, ("-xt",)),
    (SC_JPEG_BASELINE, ("-xy",)),
    (SC_JPEG_EXTENDED, ("-xx",)),
    (SC_JPEG_LOSSLESS_SV1, ("-xs",)),
    (SC_DEFLATED, ("-xd",)),
    (EMRI_SMALL, ()),  # Enhanced MR, multi-frame
]


COMMIT_PATHS = ["alone", "in company"]


@contextlib.contextmanager
def commit_path(h: ReceiverHarness, path: str) -> Iterator[None]:
    """How the receiver makes the instances sent inside durable.

    "alone": each association is the receiver's only connection, so its instances are committed on the loop;
    "in company": another peer's connection stays open (silent), so they go through the two commit threads.
    """
    if path == "alone":
        yield
        assert h.receiver._committer._threads == []
        return
    with socket.create_connection(("127.0.0.1", h.port)):
        deadline = time.monotonic() + 5
        while not h.receiver._conns and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
        assert h.receiver._committer._threads


def _stored_path(h: ReceiverHarness, recorded: Any) -> Path:
    rows = [r for r in h.journal.instances(recorded.series_id) if r.id == recorded.instance_id]
    assert len(rows) == 1
    return Path(h.spool.path(rows[0].spool_name))


def _elements(ds: Dataset) -> list[tuple[Any, Any]]:
    # dcmtk drops group lengths and trailing padding (FFFC,FFFC) when it sends; the rest must arrive unchanged.
    return [(e.tag, e.value) for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC]


def _scu(calling_aet: str = "PYSCU") -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/echoscu", "-aet", "MODALITY", "-aec", "EDGE_AGENT", "127.0.0.1", str(port)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False)


def _store_one(port: int, path: Path) -> int:
    """C-STORE one file with a pynetdicom SCU; returns the status."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = _scu()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _part10(path: Path, meta_sop_class: str, body: bytes, sop_instance: str | None = None) -> Path:
    """A file with a valid preamble and File Meta, then ``body`` as its dataset bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(meta_sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance) if sop_instance else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    from pydicom.filewriter import write_file_meta_info

    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)  # type: ignore[arg-type]
        f.write(body)
    return path


@pytest.fixture(autouse=True)
def _chunked_send() -> Any:
    # The pynetdicom SCU here sends files as they are on disk (the way `edge-agent send` does).
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


@pytest.mark.parametrize(("source", "option"), STORESCU_CASES, ids=[c[0].name for c in STORESCU_CASES])
def test_storescu_instance_lands_intact(tmp_path: Path, source: Path, option: tuple[str, ...]) -> None:
    with running_receiver(tmp_path) as h:
        res = storescu(h.port, [source], extra=("-R", *option))
        assert res.returncode == 0, res.stderr
        ((meta, recorded),) = h.stored.wait_for(1)
        src = pydicom.dcmread(source)
        assert meta.sop_instance_uid == src.SOPInstanceUID
        assert meta.series_uid == src.SeriesInstanceUID
        assert meta.transfer_syntax_uid == src.file_meta.TransferSyntaxUID  # stored as received: no transcode
        assert meta.calling_aet == "MODALITY" and meta.called_aet == "EDGE_AGENT"
        assert recorded.new_series and recorded.replaced_spool_name is None
        stored = _stored_path(h, recorded)
        got = pydicom.dcmread(stored)
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
        assert got.preamble == b"\0" * 128
        assert _elements(got) == _elements(src)
        assert np.array_equal(got.pixel_array, src.pixel_array)
        series = h.journal.series(recorded.series_id)
        assert series.instance_count == 1 and series.modality == src.Modality
        assert h.instances("stored") == 1
        assert h.sample("edge_agent_received_bytes_total") == stored.stat().st_size
        assert h.sample("edge_agent_stage_duration_seconds_count", stage="receive") == 1
        assert h.associations("accepted") == 1


def test_storescu_sends_several_files_on_one_association(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 5, images_in_acquisition=True)
    with running_receiver(tmp_path) as h:
        res = storescu(h.port, files, extra=("-R",))
        assert res.returncode == 0, res.stderr
        calls = h.stored.wait_for(5)
        assert {c[1].series_id for c in calls} == {calls[0][1].series_id}
        assert [c[1].new_series for c in calls] == [True, False, False, False, False]
        assert calls[0][0].expected_count == 5
        assert [r.instance_number for r in h.journal.instances(calls[0][1].series_id)] == [1, 2, 3, 4, 5]
        for path, (_, recorded) in zip(files, calls, strict=True):
            assert _elements(pydicom.dcmread(_stored_path(h, recorded))) == _elements(pydicom.dcmread(path))
        assert len(h.spool_files()) == 5
        assert h.associations("accepted") == 1


def test_pynetdicom_scu_store_is_byte_identical_and_echo_works(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        ae = _scu()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == status.SUCCESS
            assert assoc.send_c_store(CT_SMALL).Status == status.SUCCESS
        finally:
            assoc.release()
        ((meta, recorded),) = h.stored.wait_for(1)
        assert meta.calling_aet == "PYSCU" and meta.modality == "CT"
        assert dataset_bytes(_stored_path(h, recorded)) == dataset_bytes(CT_SMALL)


def test_temp_files_on_the_spool_file_system_are_renamed_into_place(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Datasets are written to temp files in spool.tmp_dir as they arrive, so storing is a rename.
    incoming = tmp_path / "spool" / "tmp"
    incoming.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))
    with running_receiver(tmp_path, spool_root=tmp_path / "spool") as h:
        assert h.spool.tmp_dir == incoming
        res = storescu(h.port, [RG1_UNCR, MR_SMALL_RLE], extra=("-R", "-xr"))
        assert res.returncode == 0, res.stderr
        calls = h.stored.wait_for(2)
        assert _elements(pydicom.dcmread(_stored_path(h, calls[0][1]))) == _elements(pydicom.dcmread(RG1_UNCR))
        assert len(h.spool_files()) == 2
        # Moved; what is left are empty temp files made ahead for the next C-STOREs.
        assert all(p.stat().st_size == 0 for p in incoming.iterdir())
        assert len(list(incoming.iterdir())) <= 2
    assert list(incoming.iterdir()) == []  # the spare temp files go with the receiver


def test_echoscu(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        res = _echoscu(h.port)
        assert res.returncode == 0, res.stderr
        assert h.associations("accepted") == 1
        assert h.spool_files() == []


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_an_identical_resend_is_acknowledged_and_changes_nothing(tmp_path: Path, path: str) -> None:
    """Defect 2: a re-send of the bytes held (a lost C-STORE-RSP) is Success, keeps the first file, hands nothing on."""
    with running_receiver(tmp_path) as h, commit_path(h, path):
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode == 0
        [(_, first)] = h.stored.wait_for(1)
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode == 0
        assert len(h.stored.calls) == 1
        assert [p.name for p in h.spool_files()] == [_stored_path(h, first).name]
        assert h.instances("stored") == 1 and h.instances("duplicate") == 1


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_a_resend_with_new_content_replaces_its_spool_file(tmp_path: Path, path: str) -> None:
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(CT_SMALL)
    ds.ImageComments = "corrected"
    ds.save_as(changed, enforce_file_format=True)
    with running_receiver(tmp_path) as h, commit_path(h, path):
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode == 0
        assert storescu(h.port, [changed], extra=("-R",)).returncode == 0
        _, (_, second) = h.stored.wait_for(2)
        assert second.replaced_spool_name is not None and not second.identical
        assert [p.name for p in h.spool_files()] == [_stored_path(h, second).name]
        assert h.instances("stored") == 1 and h.instances("replaced") == 1


def test_wrong_calling_aet_is_rejected_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_receiver(tmp_path, allowed_calling_aets=["MODALITY"]) as h:
        res = storescu(h.port, [CT_SMALL], calling_aet="INTRUDER", extra=("-R",))
        assert res.returncode != 0
        assert "Called AE Title Not Recognized" in res.stderr or "Calling AE Title Not Recognized" in res.stderr
        assert h.associations("rejected_calling_aet") == 1
        assert h.associations("accepted") == 0
        ae = _scu("INTRUDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive is not None
        assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (0x01, 0x03)
        assert h.associations("rejected_calling_aet") == 2
        # The allowed one still gets in.
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode == 0
        assert h.associations("accepted") == 1
        assert len(h.spool_files()) == 1
    receiver_lines = [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")]
    assert any("calling AE not allowed" in line for line in receiver_lines)
    # The test's own SCU (pynetdicom) logs its AE title; the receiver must not.
    assert not any("INTRUDER" in r.getMessage() for r in caplog.records if r.name.startswith("edge_agent"))


def test_calling_aet_host_rule(tmp_path: Path) -> None:
    with running_receiver(tmp_path, calling_aet_hosts={"MODALITY": ["10.9.8.7"], "LOCALCT": ["127.0.0.1"]}) as h:
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode != 0
        assert h.associations("rejected_host") == 1
        assert storescu(h.port, [CT_SMALL], calling_aet="LOCALCT", extra=("-R",)).returncode == 0
        assert storescu(h.port, [MR_SMALL_RLE], calling_aet="ANYONE", extra=("-R", "-xr")).returncode == 0
        assert h.associations("accepted") == 2
        assert len(h.spool_files()) == 2


def test_every_storage_sop_class_is_accepted_by_default(tmp_path: Path) -> None:
    # A forwarding PACS sends whole studies: an RT dose beside the CT must not fail the transfer.
    with running_receiver(tmp_path) as h:
        ae = _scu()
        ae.add_requested_context(RTDoseStorage)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R FIND: not storage
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert sorted(str(cx.abstract_syntax) for cx in assoc.accepted_contexts) == sorted(
                [RTDoseStorage, CTImageStorage])
            assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == ["1.2.840.10008.5.1.4.1.2.2.1"]
        finally:
            assoc.release()


def test_an_allow_list_of_sop_classes_refuses_the_others_at_negotiation(tmp_path: Path) -> None:
    with running_receiver(tmp_path, sop_classes=[str(CTImageStorage)]) as h:
        ae = _scu()
        ae.add_requested_context(RTDoseStorage)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CTImageStorage]
            assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [RTDoseStorage]
        finally:
            assoc.release()
        only = _scu()
        only.add_requested_context(RTDoseStorage)
        assoc = only.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert not assoc.is_established  # no context accepted: the requestor aborts
        assert h.spool_files() == []


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_garbage_and_incomplete_datasets_are_refused_and_the_next_store_succeeds(tmp_path: Path, path: str) -> None:
    garbage = _part10(tmp_path / "garbage.dcm", CTImageStorage, bytes(range(256)) * 40)
    no_series = Dataset()
    no_series.SOPClassUID = CTImageStorage
    no_series.SOPInstanceUID = generate_uid()
    no_series.Modality = "CT"
    no_series.file_meta = FileMetaDataset()
    no_series.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mismatch = pydicom.dcmread(CT_SMALL)
    mismatch_path = tmp_path / "mismatch.dcm"
    mismatch.file_meta.MediaStorageSOPClassUID = MRImageStorage  # the C-STORE will name MR, the data says CT
    mismatch.save_as(mismatch_path)
    with running_receiver(tmp_path) as h, commit_path(h, path):
        ae = _scu()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(garbage).Status == status.CANNOT_UNDERSTAND
            assert assoc.send_c_store(no_series).Status == status.CANNOT_UNDERSTAND
            assert assoc.send_c_store(mismatch_path).Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
            assert assoc.send_c_store(CT_SMALL).Status == status.SUCCESS
        finally:
            assoc.release()
        assert h.instances("cannot_understand") == 3
        assert h.instances("stored") == 1
        assert len(h.spool_files()) == 1
        # A real file that lacks its Series Instance UID, from dcmtk.
        assert storescu(h.port, [SC_JPEG_LS_NEAR_LOSSLESS], extra=("-R", "-xu")).returncode != 0
        assert h.instances("cannot_understand") == 4
        assert len(h.stored.calls) == 1 and len(h.spool_files()) == 1


def test_spool_below_watermark_answers_out_of_resources(tmp_path: Path) -> None:
    huge = Spool(tmp_path / "probe", 0).free_bytes() * 2 + 10**12
    with running_receiver(tmp_path, min_free_bytes=huge) as h:
        assert storescu(h.port, [CT_SMALL], extra=("-R",)).returncode != 0
        assert _store_one(h.port, CT_SMALL) == status.OUT_OF_RESOURCES
        assert h.instances("out_of_resources") == 2
        assert h.spool_files() == [] and h.stored.calls == []
        assert h.journal.counts().spool_files == 0
        assert h.sample("edge_agent_spool_free_bytes") > 0


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_a_real_enospc_in_the_spool_answers_out_of_resources_and_leaves_nothing(tmp_path: Path, path: str) -> None:
    with (tmpfs("32m", nr_inodes=64) as mnt, running_receiver(tmp_path, spool_root=mnt / "spool") as h,
          commit_path(h, path)):
        assert storescu(h.port, [MR_SMALL_RLE], extra=("-R", "-xr")).returncode == 0
        before = h.spool_files()
        assert fill_inodes(mnt) > 0  # bytes are free, inodes are not: has_room() cannot see it coming
        assert h.spool.has_room(CT_SMALL.stat().st_size)
        # The receiver makes up to two temp files ahead of the C-STOREs that use them: those still succeed.
        answers = [_store_one(h.port, CT_SMALL)]
        while answers[-1] == status.SUCCESS and len(answers) <= 3:
            answers.append(_store_one(h.port, CT_SMALL))
        assert answers[-1] == status.OUT_OF_RESOURCES and len(answers) <= 3, answers
        assert h.instances("out_of_resources") == 1
        assert len(h.spool_files()) == len(before) + len(answers) - 1  # no partial file
        assert h.journal.counts().spool_files == len(answers)


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_a_disk_that_fills_during_a_transfer_answers_out_of_resources_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """ENOSPC while a dataset is arriving: 0xA700, nothing left behind, the association goes on."""
    with (tmpfs("24m") as mnt, running_receiver(tmp_path, spool_root=mnt / "spool", min_free_bytes=1) as h,
          commit_path(h, path)):
        fill(mnt, leave_bytes=3 * 1024 * 1024)
        assert h.spool.has_room(1)  # above the watermark: only the write itself can find the disk full
        assert _store_one(h.port, RG1_UNCR) == status.OUT_OF_RESOURCES  # 7 MB into 3 MB
        assert h.instances("out_of_resources") == 1
        assert list(h.spool.tmp_dir.iterdir()) == [] and h.spool_files() == []
        assert _store_one(h.port, CT_SMALL) == status.SUCCESS  # the same receiver goes on
        (mnt / "filler").unlink()
        assert _store_one(h.port, RG1_UNCR) == status.SUCCESS
        assert h.journal.counts().spool_files == 2


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_a_full_journal_disk_answers_out_of_resources_and_removes_the_spool_file(tmp_path: Path, path: str) -> None:
    with tmpfs("2m") as mnt, running_receiver(tmp_path, journal_path=mnt / "journal.db") as h, commit_path(h, path):
        fill(mnt)
        assert _store_one(h.port, CT_SMALL) == status.OUT_OF_RESOURCES
        assert h.instances("out_of_resources") == 1
        assert h.spool_files() == []  # stored, then removed when the journal commit failed
        assert h.stored.calls == []


@pytest.mark.parametrize("path", COMMIT_PATHS)
def test_on_stored_failure_is_a_processing_failure_but_the_instance_stays_journalled(tmp_path: Path, path: str) -> None:
    journal_calls: list[Any] = []

    def broken(meta: Any, recorded: Any) -> None:
        journal_calls.append(recorded)
        raise RuntimeError("event loop is closed")

    with running_receiver(tmp_path) as h, commit_path(h, path):
        h.receiver._on_stored = broken
        assert _store_one(h.port, CT_SMALL) == status.PROCESSING_FAILURE
        assert h.instances("processing_failure") == 1
        assert len(journal_calls) == 1
        assert len(h.spool_files()) == 1 and h.journal.counts().spool_files == 1


def test_fifty_instances_over_four_concurrent_associations(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 50)
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def send(part: list[Path]) -> None:
        try:
            ae = _scu()
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
            assert assoc.is_established
            try:
                for p in part:
                    rsp = assoc.send_c_store(p)
                    with lock:
                        statuses.append(int(rsp.Status))
            finally:
                assoc.release()
        except BaseException as exc:
            errors.append(exc)

    with running_receiver(tmp_path) as h:
        threads = [threading.Thread(target=send, args=(files[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert statuses == [0] * 50
        calls = h.stored.wait_for(50)
        series_ids = {c[1].series_id for c in calls}
        assert len(series_ids) == 1
        assert sum(c[1].new_series for c in calls) == 1
        assert h.journal.series(series_ids.pop()).instance_count == 50
        assert len(h.spool_files()) == 50
        assert h.instances("stored") == 50
        assert h.associations("accepted") == 4


def test_maximum_associations_rejects_the_next_one(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_associations=1) as h:
        first = _scu()
        first.add_requested_context(Verification)
        a = first.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert a.is_established
        try:
            second = _scu()
            second.add_requested_context(Verification)
            b = second.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
            assert b.is_rejected
            assert h.associations("rejected_busy") == 1
        finally:
            a.release()


def test_stop_lets_a_running_association_finish(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        ae = _scu()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        assert h.receiver.active_associations() == 1
        port = h.port
        stopper = threading.Thread(target=h.receiver.stop, args=(30.0,))
        stopper.start()
        try:
            _wait(lambda: not h.receiver.accepting)
            assert _echoscu(port).returncode != 0  # refused, or rejected if it slipped in before the close
            assert assoc.send_c_store(CT_SMALL).Status == status.SUCCESS
        finally:
            assoc.release()
        stopper.join(30)
        assert not stopper.is_alive()
        assert h.associations("aborted") == 0
        assert len(h.spool_files()) == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_stop_aborts_what_outlives_the_timeout(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        ae = _scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        h.receiver.stop(0.1)
        assert h.receiver.active_associations() == 0
        assoc.join(10)  # the requestor sees the abort
        assert assoc.is_aborted


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        receiver = Receiver(DicomConfig(host="127.0.0.1", port=port), Spool(tmp_path / "spool", 0),
                            _journal(tmp_path), Metrics(), lambda m, r: None)
        with pytest.raises(EdgeAgentError, match=rf"cannot listen for DICOM on 127.0.0.1:{port}"):
            receiver.start()
        assert not receiver.accepting


def test_no_patient_data_or_peer_names_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    src = pydicom.dcmread(CT_SMALL)
    with running_receiver(tmp_path, allowed_calling_aets=["SECRET_CT"]) as h:
        assert storescu(h.port, [CT_SMALL], calling_aet="SECRET_CT", extra=("-R",)).returncode == 0
        assert storescu(h.port, [CT_SMALL], calling_aet="OTHER_SITE", extra=("-R",)).returncode != 0
        assert storescu(h.port, [SC_JPEG_LS_NEAR_LOSSLESS], calling_aet="SECRET_CT", extra=("-R", "-xu")).returncode
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "stored instance" in text and "calling AE not allowed" in text
    for secret in ("SECRET_CT", "OTHER_SITE", str(src.SOPInstanceUID), str(src.SeriesInstanceUID),
                   str(src.StudyInstanceUID), str(src.PatientName), str(src.PatientID)):
        assert secret not in text


# -- the pipeline's hooks: admission (back-pressure) and on_released (complete_on_release), issue 9 --------

# Both receivers take the same hooks: the asyncio one (the harness' default) and the pynetdicom one.


def test_a_refusing_admission_answers_out_of_resources_and_stores_nothing(tmp_path: Path) -> None:
    refusing: list[str] = ["inference is behind"]
    asked = threading.Event()

    def admission() -> str | None:
        asked.set()
        return refusing[0] if refusing else None

    first, second = make_ct_series(tmp_path / "ct", 2)
    with running_receiver(tmp_path, admission=admission) as h:
        assert _store_one(h.port, first) == status.OUT_OF_RESOURCES
        assert storescu(h.port, [second]).returncode != 0  # dcmtk reports the refusal in its exit code
        assert asked.is_set() and h.instances("backpressure") >= 2
        assert h.instances("stored") == 0 and h.stored.calls == []
        assert h.spool_files() == [] and h.journal.counts().spool_files == 0
        assert list(h.spool.tmp_dir.iterdir()) == []

        refusing.clear()  # inference caught up: the sender's retry lands
        assert _store_one(h.port, first) == status.SUCCESS
        assert storescu(h.port, [second]).returncode == 0
        assert h.instances("stored") == 2 and len(h.stored.wait_for(2)) == 2


def _send(port: int, paths: list[Path], *, abort: bool = False) -> list[int]:
    """One association carrying ``paths``, ended by a release (or an abort); the statuses."""
    ae = _scu()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        if abort:
            assoc.abort()
        else:
            assoc.release()


def test_a_release_names_the_series_the_association_stored_into_and_an_abort_names_none(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "a", 2)
    b = make_ct_series(tmp_path / "b", 1)
    aborted = make_ct_series(tmp_path / "aborted", 2)
    last = make_ct_series(tmp_path / "last", 1)
    released: list[set[int]] = []
    cond = threading.Condition()

    def on_released(series_ids: Any) -> None:
        with cond:
            released.append(set(series_ids))
            cond.notify_all()

    def wait_released(count: int) -> list[set[int]]:
        with cond:
            assert cond.wait_for(lambda: len(released) >= count, 30), released
            return list(released)

    with running_receiver(tmp_path, on_released=on_released) as h:
        assert _send(h.port, [*a, *b]) == [status.SUCCESS] * 3
        calls = h.stored.wait_for(3)
        series = {path: recorded.series_id for path, (_, recorded) in zip([*a, *b], calls, strict=True)}
        assert wait_released(1) == [{series[a[0]], series[b[0]]}]

        assert _send(h.port, [a[0]]) == [status.SUCCESS]  # an identical re-send: no new data, nothing to end
        assert _send(h.port, aborted, abort=True) == [status.SUCCESS] * 2
        _wait(lambda: h.receiver.active_associations() == 0)  # the abort has been handled
        assert _send(h.port, last) == [status.SUCCESS]
        calls = h.stored.wait_for(5)
        assert wait_released(2)[1:] == [{calls[-1][1].series_id}]  # neither the re-send nor the abort
        assert len(released) == 2


def _journal(tmp_path: Path) -> Any:
    from edge_agent.journal import Journal

    return Journal(tmp_path / "state" / "journal.db")


def _wait(cond: Any, timeout_seconds: float = 10.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout_seconds, done.set)
    deadline.start()
    try:
        while not cond():
            if done.wait(0.01):
                raise AssertionError("condition not met in time")
    finally:
        deadline.cancel()


# -- the pure parts: status mapping and header reading ----------------------------------------------


@pytest.mark.parametrize(("exc", "expected"), [
    (SpoolFullError(errno.ENOSPC, "full"), (status.OUT_OF_RESOURCES, "out_of_resources")),
    (OSError(errno.ENOSPC, "No space left on device"), (status.OUT_OF_RESOURCES, "out_of_resources")),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), (status.OUT_OF_RESOURCES, "out_of_resources")),
    (OSError(errno.EIO, "Input/output error"), (status.PROCESSING_FAILURE, "processing_failure")),
    (PermissionError(errno.EACCES, "Permission denied"), (status.PROCESSING_FAILURE, "processing_failure")),
    (MemoryError(), (status.OUT_OF_RESOURCES, "out_of_resources")),
    (DecodeError("not a DICOM Part 10 file"), (status.CANNOT_UNDERSTAND, "cannot_understand")),
    (SopClassMismatchError("differs"), (status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "cannot_understand")),
    (JournalError("cannot record instance: database is locked"), (status.PROCESSING_FAILURE, "processing_failure")),
    (RuntimeError("a bug"), (status.PROCESSING_FAILURE, "processing_failure")),
])
def test_answer_for(exc: BaseException, expected: tuple[int, str]) -> None:
    answer = status.answer_for(exc)
    assert (answer.status, answer.outcome) == expected


def test_answer_for_a_journal_on_a_full_disk() -> None:
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            inner.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise JournalError("cannot record instance: database or disk is full") from inner
    except JournalError as exc:
        assert status.answer_for(exc) == status.Answer(status.OUT_OF_RESOURCES, "out_of_resources")
    wrapped = JournalError("cannot record instance")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert status.answer_for(wrapped).status == status.OUT_OF_RESOURCES


def test_status_names() -> None:
    assert status.is_success(0x0000) and status.is_success(0xB000) and status.is_success(0xB007)
    assert not status.is_success(0xA700) and not status.is_success(0xC000) and not status.is_success(0x0110)
    assert status.describe(0xA701) == "out of resources"
    assert status.describe(0xC123) == "cannot understand"
    assert status.describe(0x0122) == "SOP class not supported"
    assert status.describe(0xFE00) == "status 0xFE00"


def test_read_meta(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, 1, images_in_acquisition=True, series_description="Chest 1.0 B30f")
    meta = read_meta(series[0], "SCANNER ", "EDGE_AGENT")
    src = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert meta.sop_instance_uid == src.SOPInstanceUID and meta.series_uid == src.SeriesInstanceUID
    assert meta.study_uid == src.StudyInstanceUID and meta.sop_class_uid == CTImageStorage
    assert meta.transfer_syntax_uid == ExplicitVRLittleEndian
    assert meta.modality == "CT" and meta.image_type == "\\".join(src.ImageType)
    assert meta.series_description == "Chest 1.0 B30f"
    assert meta.instance_number == 1 and meta.expected_count == 1
    assert meta.calling_aet == "SCANNER" and meta.called_aet == "EDGE_AGENT"
    cr = read_meta(RG1_UNCR, "", "")
    assert cr.modality == "CR" and cr.expected_count is None


def test_read_meta_refuses_without_patient_data(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("PatientName=DOE^JANE")
    with pytest.raises(DecodeError, match="not a DICOM Part 10 file") as info:
        read_meta(text, "", "")
    assert "DOE" not in str(info.value)
    with pytest.raises(DecodeError, match="lacks SeriesInstanceUID"):
        read_meta(SC_JPEG_LS_NEAR_LOSSLESS, "", "")
    garbage = _part10(tmp_path / "garbage.dcm", CTImageStorage, b"\x10\x00\x10\x00PN\x08\x00DOE^JANE" + b"\xff" * 64)
    with pytest.raises(DecodeError) as info:
        read_meta(garbage, "", "")
    assert "DOE" not in str(info.value)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(CT_SMALL.read_bytes()[:600])
    with pytest.raises(DecodeError):
        read_meta(truncated, "", "")


def test_read_meta_head_reads_from_the_bytes_held_or_says_it_cannot(tmp_path: Path) -> None:
    from edge_agent.dicom.header import dataset_offset, read_meta, read_meta_head

    raw = CT_SMALL.read_bytes()
    body = raw[dataset_offset(raw[:65536]):]
    syntax = str(pydicom.dcmread(CT_SMALL).file_meta.TransferSyntaxUID)
    whole = read_meta_head(body, syntax, "A", "B", "x", whole=True)
    assert whole == read_meta(CT_SMALL, "A", "B", "x")
    # Cut past every element it reads (the pixel data starts late in the file): the same answer.
    assert read_meta_head(body[: len(body) // 2], syntax, "A", "B", "x", whole=False) == whole
    # Cut before the Series Instance UID: the caller must read the file.
    assert read_meta_head(body[:300], syntax, "A", "B", "x", whole=False) is None
    with pytest.raises(DecodeError):
        read_meta_head(body[:300], syntax, "A", "B", "x", whole=True)
    with pytest.raises(DecodeError):
        read_meta_head(b"\xff" * 64, syntax, "A", "B", "x", whole=True)


def test_malformed_association_requests_are_rejected_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Any peer can send these at will: each is rejected and counted, and the log gets one line a minute that
    # says what was wrong, never the bytes (here an AE title with a control character in it).
    caplog.set_level(logging.DEBUG)
    called, calling = b"EDGE_AGENT".ljust(16), b"BAD\x07TITLE".ljust(16)
    items = (struct.pack(">BBH", 0x10, 0, 21) + b"1.2.840.10008.3.1.1.1"
             + struct.pack(">BBH", 0x50, 0, 8) + struct.pack(">BBHI", 0x51, 0, 4, 16384))
    body = struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items
    with running_receiver(tmp_path) as h:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", h.port), timeout=5) as s:
                s.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
                assert s.recv(6)[0] == 0x03  # A-ASSOCIATE-RJ
        assert h.associations("rejected_malformed") == 3
        assert _store_one(h.port, CT_SMALL) == status.SUCCESS  # served on
    lines = [r for r in caplog.records if r.name.startswith("edge_agent") and "does not decode" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "control characters" in lines[0].getMessage()
    assert not any("BAD" in r.getMessage() for r in caplog.records if r.name.startswith("edge_agent"))
