"""The few header elements the receiver needs, read straight from the bytes of a Little Endian dataset.

pydicom builds a whole Dataset to read fourteen elements: about 0.9 ms per CT slice, on the receive path of
every instance. This scans top-level elements only (sequences are skipped by their lengths and delimiters)
and stops past the last tag it needs. Anything unusual (Big Endian, a character set other than the default,
Latin-1 or UTF-8, a UN of undefined length, tags out of order, bytes that do not parse) returns None and the
caller reads the header with pydicom: this is a fast path, never a second opinion. tests/test_fastheader.py
checks it against pydicom on every DICOM file the tests have.

``locate`` is the scan itself, for any set of tags: ``dicom/pixels.py`` finds the pixel data and the attributes
that describe it with it.
"""

from __future__ import annotations

import struct
from typing import Any

# keyword -> tag, for what header.meta_from_dataset reads.
TAGS: dict[str, int] = {
    "SpecificCharacterSet": 0x00080005,
    "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "Manufacturer": 0x00080070,
    "SeriesDescription": 0x0008103E,
    "BodyPartExamined": 0x00180015,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "AcquisitionNumber": 0x00200012,
    "InstanceNumber": 0x00200013,
    "ImagesInAcquisition": 0x00201002,
}
_WANTED = frozenset(TAGS.values())
_LAST = max(_WANTED)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED = 0xFFFFFFFF
_ENCODINGS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from


class _Unusual(Exception):
    pass


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, vr or None, value length, value offset) of the element at ``pos``."""
    n = len(buf)
    if pos + 8 > n:
        raise _Unusual
    group, elem = _UNPACK_TAG(buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or not explicit:
        return tag, None, _UNPACK_U32(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unusual
    if vr in _LONG_VRS:
        if pos + 12 > n:
            raise _Unusual
        return tag, vr, _UNPACK_U32(buf, pos + 8)[0], pos + 12
    return tag, vr, _UNPACK_U16(buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int:
    """The offset after the undefined-length value that starts at ``pos`` (its delimiter included)."""
    depth = 1
    while True:
        tag, vr, length, pos = _element(buf, pos, explicit)
        if tag == 0xFFFEE0DD or tag == 0xFFFEE00D:  # sequence / item delimitation
            depth -= 1
            if depth == 0:
                return pos
        elif length == UNDEFINED:
            if vr == b"UN":
                raise _Unusual  # its content is Implicit VR whatever the syntax (PS3.5 6.2.2)
            depth += 1
        else:
            pos += length


def locate(buf: bytes, explicit: bool, wanted: frozenset[int], last: int, *, whole: bool,
           start: int = 0) -> dict[int, tuple[int, int, bytes | None]] | None:
    """(offset, length, VR) of each wanted top-level element's value, scanning from ``start``, or None.

    The VR is the one the element states (None in Implicit VR); the length is ``UNDEFINED`` for a sequence (or
    encapsulated pixel data) of undefined length, which is skipped. The scan ends at the first tag past
    ``last``, or (``whole``: ``buf`` is the entire dataset) at the end of ``buf``. None for anything unusual:
    the caller reads the dataset with pydicom instead.
    """
    out: dict[int, tuple[int, int, bytes | None]] = {}
    pos, n, prev = start, len(buf), -1
    try:
        while pos < n:
            tag, vr, length, pos = _element(buf, pos, explicit)
            if tag <= prev:
                return None
            prev = tag
            if tag > last:
                return out
            if tag in wanted:
                out[tag] = (pos, length, vr)
            if length == UNDEFINED:
                if vr == b"UN":
                    return None
                pos = _skip_undefined(buf, pos, explicit)
                continue
            if pos + length > n:
                return None
            pos += length
    except _Unusual:
        return None
    return out if whole and pos == n else None


def scan(buf: bytes, explicit: bool, *, whole: bool) -> dict[int, bytes] | None:
    """Raw values of the wanted top-level elements, or None (read it with pydicom instead)."""
    found = locate(buf, explicit, _WANTED, _LAST, whole=whole)
    if found is None or any(length == UNDEFINED for _, length, _ in found.values()):
        return None
    return {tag: buf[pos : pos + length] for tag, (pos, length, _) in found.items()}


class RawHeader:
    """``get(keyword)`` over scanned values, as pydicom's Dataset answers it for what meta_from_dataset reads."""

    def __init__(self, values: dict[int, bytes], encoding: str) -> None:
        self._values = values
        self._encoding = encoding

    def get(self, keyword: str) -> Any:
        raw = self._values.get(TAGS[keyword])
        if raw is None:
            return None
        # As pydicom: the value's padding goes, a multi-valued element splits at backslashes (each kept as is).
        text = raw.decode(self._encoding).rstrip("\0 ")
        return text.split("\\") if "\\" in text else text


def encoding_of(charset: bytes) -> str | None:
    """The Python codec for a Specific Character Set value read here, or None for one pydicom must handle."""
    return _ENCODINGS.get(charset.decode("latin-1").strip(" \0"))


def read(buf: bytes, explicit: bool, *, whole: bool) -> RawHeader | None:
    """The header of a Little Endian dataset for meta_from_dataset, or None when pydicom must read it."""
    values = scan(buf, explicit, whole=whole)
    if values is None:
        return None
    encoding = encoding_of(values.get(TAGS["SpecificCharacterSet"], b""))
    if encoding is None:
        return None
    try:
        for raw in values.values():
            raw.decode(encoding)
    except UnicodeDecodeError:
        return None
    return RawHeader(values, encoding)
