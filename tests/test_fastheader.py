"""The receiver's fast header path (dicom/fastheader.py) against pydicom, on every DICOM file the tests have."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from edge_agent.dicom.header import dataset_offset, meta_from_dataset, read_meta_head
from tests.dicomfiles import DATA_STORE, PYDICOM_FILES

HEAD_BYTES = 256 * 1024


def _pydicom_meta(path: Path) -> object:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return meta_from_dataset(ds, str(ds.file_meta.TransferSyntaxUID), "A", "B", "x")


def _files() -> list[Path]:
    out = []
    for path in sorted([*PYDICOM_FILES.glob("*.dcm"), *DATA_STORE.glob("*.dcm")]):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds and "TransferSyntaxUID" in ds.file_meta:
                _pydicom_meta(path)
                out.append(path)
        except Exception:  # files pydicom itself cannot read are not this test's subject
            continue
    return out


FILES = _files()


def test_the_fast_path_agrees_with_pydicom_on_every_file() -> None:
    fast = 0
    for path in FILES:
        raw = path.read_bytes()
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if syntax == "1.2.840.10008.1.2.1.99":  # Deflated: the receiver reads it inflated
            continue
        body = raw[dataset_offset(raw[:65536]) :]
        expected = _pydicom_meta(path)
        for head, whole in ((body, True), (body[:HEAD_BYTES], len(body) <= HEAD_BYTES)):
            from edge_agent.dicom import fastheader

            if fastheader.read(head, syntax != "1.2.840.10008.1.2", whole=whole) is not None:
                fast += 1
            got = read_meta_head(head, syntax, "A", "B", "x", whole=whole)
            if got is not None:
                assert got == expected, path.name
    # The fast path is the rule, not the exception (Big Endian and odd files go to pydicom).
    assert fast >= len(FILES), f"the fast path read {fast} of {2 * len(FILES)} heads"


@pytest.mark.parametrize("cut", [1, 7, 8, 100, 300, 1000])
def test_a_head_cut_anywhere_is_never_misread(cut: int) -> None:
    for path in FILES[:40]:
        raw = path.read_bytes()
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
            continue
        body = raw[dataset_offset(raw[:65536]) :]
        got = read_meta_head(body[:cut], syntax, "A", "B", "x", whole=False)
        assert got is None or got == _pydicom_meta(path), path.name
