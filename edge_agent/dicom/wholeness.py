"""Whether a received dataset ends where its last element says it does, or is cut short inside one.

A peer can mark a fragment "last" in the middle of a dataset: a sender that died half-way, a proxy that cut the
stream, a bug. The bytes still parse as far as they go, and written over a kept slot (spool.py) the slot's padding
fills in the rest, so a cut-short CT slice could decode as an image of which only the first rows are what was sent.
The receiver answers such a dataset 0xC000 instead of Success (incoming.py): the sender keeps it and can send it
again whole.

The top-level elements are walked by their lengths (sequences and encapsulated pixel data of undefined length by
their items and delimiters), reading the bytes past the kept head from the file only where an element's header
lies there: for a native CT slice, a jump over its Pixel Data from where that element starts. A few bytes after
the last element, too few for an element's header, count as cut short. It judges only what it can read without
doubt (Little or Big Endian, Explicit or Implicit VR); anything unusual (tags out of order, a VR that is not two
capital letters, a UN of undefined length) leaves the dataset unjudged, as before: this catches a stream cut
short, it does not validate DICOM. A dataset that stops exactly between two elements is whole as far as its
bytes tell (its later elements are simply absent; one without its Pixel Data fails at decoding instead).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM_END, _SEQUENCE_END = 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA_TAG = {True: struct.pack("<HH", 0x7FE0, 0x0010), False: struct.pack(">HH", 0x7FE0, 0x0010)}

Read = Callable[[int, int], bytes]  # (offset in the dataset, count) -> up to count bytes from there


class _Unjudged(Exception):
    pass


class _Short(Exception):
    pass


class _Walk:
    # fastheader.py walks the same way over bytes it holds whole, on every instance's hot path; this walk reads its
    # element headers through ``read`` (past the kept head, from the file), and judges ends rather than values.
    def __init__(self, read: Read, size: int, explicit: bool, little: bool) -> None:
        self._read, self._size, self._explicit = read, size, explicit
        self._u16, self._u32 = (struct.Struct("<H").unpack_from, struct.Struct("<I").unpack_from) if little else \
            (struct.Struct(">H").unpack_from, struct.Struct(">I").unpack_from)

    def element(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, value offset) of the element whose header starts at ``pos``."""
        head = self._read(pos, 12)
        if len(head) < 8:
            raise _Short
        tag = self._u16(head, 0)[0] << 16 | self._u16(head, 2)[0]
        if tag >> 16 == 0xFFFE or not self._explicit:
            return tag, None, self._u32(head, 4)[0], pos + 8
        vr = head[4:6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unjudged
        if vr in _LONG_VRS:
            if len(head) < 12:
                raise _Short
            return tag, vr, self._u32(head, 8)[0], pos + 12
        return tag, vr, self._u16(head, 6)[0], pos + 8

    def skip_undefined(self, pos: int) -> int:
        """The offset after the undefined-length value that starts at ``pos``, its delimiter included."""
        depth = 1
        while True:
            tag, vr, length, pos = self.element(pos)
            if tag in (_ITEM_END, _SEQUENCE_END):
                depth -= 1
                if depth == 0:
                    return pos
            elif length == UNDEFINED:
                if vr == b"UN":
                    raise _Unjudged  # its content is Implicit VR whatever the syntax (PS3.5 6.2.2)
                depth += 1
            else:
                pos += length
            if pos > self._size:
                raise _Short

    def top_level(self, pos: int) -> None:
        """Walk the top-level elements from ``pos``: return at the dataset's end; _Short if one runs past it."""
        prev = -1
        while pos < self._size:
            tag, vr, length, pos = self.element(pos)
            if tag <= prev:
                raise _Unjudged
            prev = tag
            if length == UNDEFINED:
                if vr == b"UN":
                    raise _Unjudged
                pos = self.skip_undefined(pos)
            else:
                pos += length
            if pos > self._size:
                raise _Short


def cut_short(read: Read, size: int, head: bytes | bytearray, *, explicit: bool, little: bool) -> bool:
    """True when the ``size``-byte dataset ends inside an element (its last fragment came too early).

    ``head`` is the dataset's first bytes (as many as are kept in memory); ``read`` gives any others.
    """
    walk = _Walk(read, size, explicit, little)
    # Most of a dataset is its Pixel Data, the last top-level element: a walk from it that ends exactly at the
    # dataset's end settles the common case without walking the header (a few microseconds against a hundred for
    # a CT slice's header). Anything else (no Pixel Data, an icon image's ahead of it, the tag's bytes inside an
    # earlier value, a dataset cut short) walks from the start.
    at = head.find(_PIXEL_DATA_TAG[little])
    if at >= 0 and at % 2 == 0:
        try:
            walk.top_level(at)
            return False
        except (_Short, _Unjudged):
            pass
    try:
        walk.top_level(0)
    except _Short:
        return True
    except _Unjudged:
        return False
    return False
