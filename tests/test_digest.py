"""The content digest: BLAKE3 of the dataset as encoded, File Meta excluded, and the SHA-256 from before it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import pydicom
import pytest

from edge_agent.dicom import digest
from edge_agent.dicom.header import dataset_offset, file_digest
from tests.dicomfiles import PYDICOM_FILES


def test_a_file_digest_is_of_the_dataset_whatever_its_file_meta_says(tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    one, two = tmp_path / "one.dcm", tmp_path / "two.dcm"
    ds.file_meta.SourceApplicationEntityTitle = "NODE_A"
    ds.save_as(one, enforce_file_format=True)
    ds.file_meta.SourceApplicationEntityTitle = "NODE_B_OTHER"
    ds.save_as(two, enforce_file_format=True)
    assert one.read_bytes() != two.read_bytes()
    data = one.read_bytes()
    body = data[dataset_offset(data):]
    assert file_digest(one) == file_digest(two) == "blake3:" + blake3.blake3(body).hexdigest()
    assert file_digest(one, legacy_sha256=True) == hashlib.sha256(body).hexdigest()
    # Fed in pieces, as the receiver feeds it while the bytes arrive.
    h = digest.hasher()
    for i in range(0, len(body), 1000):
        h.update(body[i : i + 1000])
    assert digest.finish(h) == file_digest(one)


def test_a_spool_name_carries_16_hex_digits_of_either_kind() -> None:
    hex64 = "0123456789abcdef" * 4
    assert digest.name_part("blake3:" + hex64) == digest.name_part(hex64) == "0123456789abcdef"


@pytest.mark.parametrize("bad", ["", "blake3:", "blake3:" + "ab" * 31, "AB" * 32, "sha256:" + "ab" * 32,
                                 "../" + "ab" * 32, "blake3:" + "ab" * 32 + "00"])
def test_anything_else_is_not_a_digest(bad: str) -> None:
    with pytest.raises(ValueError, match="not a content digest"):
        digest.name_part(bad)
