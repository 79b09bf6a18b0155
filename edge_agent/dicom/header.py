"""Read what the journal and the router need from a DICOM header, without touching pixel data."""

from __future__ import annotations

import logging
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
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None


def check_sop_class(meta: InstanceMeta, requested_sop_class_uid: str) -> None:
    """Raise SopClassMismatchError if the dataset is not of the SOP class its C-STORE request named."""
    if meta.sop_class_uid != str(requested_sop_class_uid).strip():
        raise SopClassMismatchError("the dataset's SOP Class UID differs from the C-STORE request's")
