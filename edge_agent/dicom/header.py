"""Read what the journal and the router need from a DICOM header, without touching pixel data."""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from edge_agent.errors import DecodeError
from edge_agent.journal import InstanceMeta

logger = logging.getLogger(__name__)

_REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID")


class SopClassMismatchError(DecodeError):
    """The dataset's SOP Class UID is not the one its C-STORE request named."""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_HASH_CHUNK_BYTES = 1 << 20
# File Meta elements (always explicit VR little endian) whose length field is 4 bytes after 2 reserved.
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"})


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a Part 10 file whose first bytes are ``head``: after the File Meta group."""
    if head[128:132] != b"DICM":
        raise DecodeError("not a DICOM Part 10 file")
    pos = 132
    while pos + 8 <= len(head):
        group = struct.unpack_from("<H", head, pos)[0]
        if group != 0x0002:
            return pos
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            pos += 12 + struct.unpack_from("<I", head, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
    raise DecodeError("the File Meta group does not end")


def content_sha256(path: Path) -> str:
    """SHA-256 of the dataset as encoded, File Meta excluded.

    The File Meta group is written by the receiving side (pynetdicom names the sender's AE title in it),
    so a PACS re-sending the same instance from another node would differ there, not in the dataset.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
        start = dataset_offset(head)
        digest.update(head[start:])
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(path: Path, calling_aet: str, called_aet: str) -> InstanceMeta:
    """Read an instance's header (pixel data is not read). Raises DecodeError without patient data."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DecodeError("not a DICOM Part 10 file") from None
    except Exception as exc:
        # pydicom's messages may quote element values; only the exception type is safe to repeat.
        raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None
    try:
        missing = [kw for kw in _REQUIRED if not _text(ds, kw)]
        if missing:
            raise DecodeError(f"DICOM header lacks {', '.join(missing)}")
        expected = _int(ds, "ImagesInAcquisition")
        file_meta = getattr(ds, "file_meta", None)
        return InstanceMeta(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            transfer_syntax_uid=_text(file_meta, "TransferSyntaxUID") if file_meta is not None else "",
            accession=_text(ds, "AccessionNumber"),
            modality=_text(ds, "Modality").upper(),
            body_part=_text(ds, "BodyPartExamined").upper(),
            image_type=_text(ds, "ImageType").upper(),
            series_description=_text(ds, "SeriesDescription"),
            manufacturer=_text(ds, "Manufacturer"),
            instance_number=_int(ds, "InstanceNumber"),
            expected_count=expected if expected is not None and expected > 0 else None,
            calling_aet=calling_aet.strip(),
            called_aet=called_aet.strip(),
            acquisition_number=_int(ds, "AcquisitionNumber"),
            content_sha256=content_sha256(path),
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None


def check_sop_class(meta: InstanceMeta, requested_sop_class_uid: str) -> None:
    """Raise SopClassMismatchError if the dataset is not of the SOP class its C-STORE request named."""
    if meta.sop_class_uid != str(requested_sop_class_uid).strip():
        raise SopClassMismatchError("the dataset's SOP Class UID differs from the C-STORE request's")
