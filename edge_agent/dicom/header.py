"""Read what the journal and the router need from a DICOM header, without touching pixel data."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from edge_agent.dicom import fastheader
from edge_agent.dicom.digest import finish, hasher, legacy_hasher
from edge_agent.dicom.quiet import kinds, pydicom_warnings
from edge_agent.dicom.spool import read_mark
from edge_agent.errors import DecodeError

logger = logging.getLogger(__name__)

_REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver reads from a stored instance's header (no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str = ""
    transfer_syntax_uid: str = ""
    accession: str = ""
    modality: str = ""
    body_part: str = ""
    image_type: str = ""  # backslash-joined, as in the data element
    series_description: str = ""
    manufacturer: str = ""
    instance_number: int | None = None
    expected_count: int | None = None  # Images in Acquisition, when the modality says
    calling_aet: str = ""
    called_aet: str = ""
    acquisition_number: int | None = None
    content_digest: str = ""  # of the dataset as encoded (digest.py): what a re-send is compared by


class SopClassMismatchError(DecodeError):
    """The dataset's SOP Class UID is not the one its C-STORE request named."""


def _text(ds: Dataset | fastheader.RawHeader, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset | fastheader.RawHeader, keyword: str) -> int | None:
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


def file_digest(path: Path, *, legacy_sha256: bool = False) -> str:
    """The digest of a stored file's dataset as encoded, File Meta excluded (digest.py).

    ``legacy_sha256`` gives the SHA-256 that spool names carried before BLAKE3, as bare hex.
    """
    if legacy_sha256:
        sha = legacy_hasher()
        _feed_dataset(path, sha.update)
        return sha.hexdigest()
    h = hasher()
    _feed_dataset(path, h.update)
    return finish(h)


def _feed_dataset(path: Path, update: Callable[[bytes], object]) -> None:
    # A file written over a slot ends where its mark says: what follows is the slot's padding (spool.py).
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
        end = stored_end(head)
        if end is not None:
            head = head[:end]
        update(head[dataset_offset(head):])
        pos = len(head)
        while end is None or pos < end:
            chunk = f.read(_HASH_CHUNK_BYTES if end is None else min(_HASH_CHUNK_BYTES, end - pos))
            if not chunk:
                break
            update(chunk)
            pos += len(chunk)


def stored_size(path: Path) -> int:
    """The bytes of the instance a stored file holds: up to its mark's end, or the whole file."""
    with open(path, "rb") as f:
        end = stored_end(f.read(128))
        return os.fstat(f.fileno()).st_size if end is None else end


def stored_end(head: bytes) -> int | None:
    """Where the instance in a stored file that starts with ``head`` ends, when its mark says (a file written
    over a slot, spool.py: padding follows); None for a file that ends with its instance."""
    mark = read_mark(head)
    return None if mark is None else mark[0]


def _read_header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DecodeError("not a DICOM Part 10 file") from None
    except Exception as exc:
        # pydicom's messages may quote element values; only the exception type is safe to repeat.
        raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """pydicom's warnings while it reads a header and its values are converted (which is when a UID that breaks
    the UI rules is warned about, quoted): caught, and only their kinds said."""
    with pydicom_warnings() as caught:
        yield
    if caught:
        logger.debug("header: pydicom warned (%s); read anyway", ", ".join(kinds(caught)))


def read_meta(path: Path, calling_aet: str, called_aet: str, digest: str | None = None) -> InstanceMeta:
    """Read an instance's header (pixel data is not read). Raises DecodeError without patient data."""
    if digest is None:
        digest = file_digest(path)
    with _quietly():
        ds = _read_header(path)
        file_meta = getattr(ds, "file_meta", None)
        syntax = _text(file_meta, "TransferSyntaxUID") if file_meta is not None else ""
        return meta_from_dataset(ds, syntax, calling_aet, called_aet, digest)


def read_stored_meta(path: Path, digest: str) -> InstanceMeta:
    """``read_meta`` of a file the receiver wrote: the AE titles come from its File Meta (Source and Receiving
    Application Entity Title), as the association gave them."""
    with _quietly():
        ds = _read_header(path)
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is None:
            raise DecodeError("no File Meta group")
        return meta_from_dataset(ds, _text(file_meta, "TransferSyntaxUID"),
                                 _text(file_meta, "SourceApplicationEntityTitle"),
                                 _text(file_meta, "ReceivingApplicationEntityTitle"), digest)


# The last element meta_from_dataset reads: a dataset read up to a later tag holds everything it needs.
LAST_TAG_READ = 0x00201002


def read_meta_head(head: bytes, transfer_syntax_uid: str, calling_aet: str, called_aet: str,
                   digest: str, *, whole: bool) -> InstanceMeta | None:
    """The header from the first bytes of a dataset (no File Meta; Explicit or Implicit VR as negotiated).

    ``whole`` says ``head`` is the entire dataset. Otherwise None when the bytes held end before every
    element needed was read (the caller reads the file instead). Raises DecodeError for a bad header.
    """
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    little = transfer_syntax_uid != "1.2.840.10008.1.2.2"
    if little:
        raw = fastheader.read(head, not implicit, whole=whole)
        if raw is not None:
            return meta_from_dataset(raw, transfer_syntax_uid, calling_aet, called_aet, digest)
    with _quietly():
        try:
            ds = read_dataset(BytesIO(head), implicit, little, stop_when=_at_pixel_data)
        except Exception as exc:
            if not whole:
                return None
            raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None
        if not whole:
            tags = [int(t) for t in ds.keys()]  # noqa: SIM118 (iterating a Dataset yields its elements)
            if not tags or max(tags) <= LAST_TAG_READ:
                return None
        return meta_from_dataset(ds, transfer_syntax_uid, calling_aet, called_aet, digest)


def _at_pixel_data(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) >= 0x7FE00010


def meta_from_dataset(ds: Dataset | fastheader.RawHeader, transfer_syntax_uid: str, calling_aet: str, called_aet: str,
                      digest: str) -> InstanceMeta:
    """What the journal and the router need, from a dataset read without pixel data."""
    try:
        missing = [kw for kw in _REQUIRED if not _text(ds, kw)]
        if missing:
            raise DecodeError(f"DICOM header lacks {', '.join(missing)}")
        expected = _int(ds, "ImagesInAcquisition")
        return InstanceMeta(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
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
            content_digest=digest,
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None


def check_request(meta: InstanceMeta, requested_sop_class_uid: str, requested_sop_instance_uid: str) -> bool:
    """Raise SopClassMismatchError if the dataset is not of the SOP class its C-STORE request named. Returns whether
    the dataset is the instance the request named (Affected SOP Instance UID).

    Another instance than the request names is stored, as the dataset says: files whose File Meta names another
    instance than their dataset exist (pydicom's own rtplan.dcm is one), and a PACS forwarding them reads the
    request's UID from that File Meta; refused, the study would never arrive whole.
    """
    if meta.sop_class_uid != str(requested_sop_class_uid).strip():
        raise SopClassMismatchError("the dataset's SOP Class UID differs from the C-STORE request's")
    return meta.sop_instance_uid == str(requested_sop_instance_uid).strip()
