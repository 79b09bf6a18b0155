"""`send_files` (the `edge-agent send` client) against the real receiver."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from edge_agent.dicom import status
from edge_agent.dicom.sender import send_files
from tests.dicomfiles import (
    CT_SMALL,
    MR_SMALL_RLE,
    RG3_J2KI,
    RT_DOSE,
    SC_JPEG_LS_NEAR_LOSSLESS,
    dataset_bytes,
    make_ct_series,
    running_receiver,
)
from tests.netutil import free_port


def test_sends_a_directory_tree_as_is_and_skips_what_is_not_dicom(tmp_path: Path) -> None:
    src = tmp_path / "in"
    series = make_ct_series(src / "ct", 4)
    (src / "nested" / "deeper").mkdir(parents=True)
    rle = Path(shutil.copy(MR_SMALL_RLE, src / "nested" / "deeper" / "mr_rle.dcm"))
    j2k = Path(shutil.copy(RG3_J2KI, src / "nested" / "cr_j2k.dcm"))
    (src / "notes.txt").write_text("not DICOM")
    (src / "nested" / "empty.dcm").write_bytes(b"")
    with running_receiver(tmp_path, allowed_calling_aets=["EDGE_SEND"]) as h:
        report = send_files([src], "127.0.0.1", h.port, "EDGE_AGENT")
        assert (report.ok, report.failed, report.skipped) == (6, 0, 2), report
        assert report.errors == []
        skipped = {r.path.name: r.note for r in report.results if r.status is None}
        assert set(skipped) == {"notes.txt", "empty.dcm"}
        assert all(r.status == status.SUCCESS for r in report.results if r.status is not None)
        calls = h.stored.wait_for(6)
        assert h.associations("accepted") == 1  # one association for all of them
        stored = {str(m.sop_instance_uid): h.spool.path(_name(h, rec)) for m, rec in calls}
        for path in [*series, rle, j2k]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out = stored[str(ds.SOPInstanceUID)]
            # Sent byte for byte: no decode, no transcode.
            assert dataset_bytes(out) == dataset_bytes(path)
            assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
                ds.file_meta.TransferSyntaxUID


def test_files_the_peer_refuses_are_counted_failed_with_their_status(tmp_path: Path) -> None:
    # A receiver that takes CT and secondary capture only: the RT dose gets no presentation context.
    ct_and_sc = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"]
    with running_receiver(tmp_path, sop_classes=ct_and_sc) as h:
        report = send_files([RT_DOSE, SC_JPEG_LS_NEAR_LOSSLESS, CT_SMALL, tmp_path / "missing.dcm"],
                            "127.0.0.1", h.port, "EDGE_AGENT")
        by_name = {r.path.name: r for r in report.results}
        assert (report.ok, report.failed, report.skipped) == (1, 3, 0)  # a path that does not exist failed
        assert by_name["rtdose.dcm"].status is None and "no context" in by_name["rtdose.dcm"].note
        assert by_name["JPEGLSNearLossless_16.dcm"].status == status.CANNOT_UNDERSTAND
        assert by_name["JPEGLSNearLossless_16.dcm"].note == "cannot understand"
        assert by_name["CT_small.dcm"].status == status.SUCCESS
        assert by_name["missing.dcm"].note == "no such file"
        text = report.summary()
        assert text.endswith("sent 1, failed 3, skipped 0")
        assert "missing.dcm: no such file" in text
        assert "JPEGLSNearLossless_16.dcm: cannot understand (0xC000)" in text
        assert "CT_small.dcm" not in text


def test_a_rejected_association_fails_every_file_and_says_why(tmp_path: Path) -> None:
    with running_receiver(tmp_path, allowed_calling_aets=["MODALITY"]) as h:
        report = send_files([CT_SMALL, MR_SMALL_RLE], "127.0.0.1", h.port, "EDGE_AGENT", calling_aet="NOT_LISTED")
        assert (report.ok, report.failed, report.skipped) == (0, 2, 0)
        assert len(report.errors) == 1 and "rejected" in report.errors[0]
        assert "Calling AE title not recognised" in report.errors[0]
        assert h.spool_files() == []


# pynetdicom 3.0.4 drops (without closing) its socket when the connection is refused.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_nobody_listening(tmp_path: Path) -> None:
    report = send_files([CT_SMALL], "127.0.0.1", free_port(), "EDGE_AGENT", timeout_seconds=5)
    assert (report.ok, report.failed) == (0, 1)
    assert report.errors and "could not connect" in report.errors[0]


def test_nothing_to_send(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    report = send_files([tmp_path], "127.0.0.1", free_port(), "EDGE_AGENT")
    assert (report.ok, report.failed, report.skipped) == (0, 0, 1)
    assert report.errors == []


def _name(h: object, recorded: object) -> str:
    rows = [r for r in h.journal.instances(recorded.series_id) if r.id == recorded.instance_id]  # type: ignore[attr-defined]
    return str(rows[0].spool_name)


def test_send_of_a_path_that_does_not_exist_exits_1(tmp_path: Path) -> None:
    """A script with a typo in its path must not believe the study went out."""
    result = subprocess.run([sys.executable, "-m", "edge_agent", "send", str(tmp_path / "no-such-study.dcm"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no-such-study.dcm: no such file" in result.stdout
    assert result.stdout.rstrip().endswith("sent 0, failed 1, skipped 0")
