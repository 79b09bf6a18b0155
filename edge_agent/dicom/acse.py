"""A-ASSOCIATE-RQ read and A-ASSOCIATE-AC written straight from and to bytes (PS3.8 9.3.2, 9.3.3).

pynetdicom's PDU classes build an object per item and validate every UID through pydicom: about 12 ms for
the 128 presentation contexts dcmtk's storescu proposes by default, on the receiver's loop, for every
association. A PACS that forwards one study per association pays that per study. This reads only what the
Storage SCP answers from (AE titles, application context, presentation contexts, the peer's maximum PDU
length) and is strict about the rest: every length must fit its container, every item type must be one the
standard defines for a request; anything else is ``MalformedRequest`` and the association is rejected.
tests/test_acse.py checks both directions against pynetdicom's codecs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HEADER = 68  # protocol version, reserved, called AE, calling AE, reserved (PS3.8 table 9-11)
_ITEM = struct.Struct(">BBH")
# Items of an A-ASSOCIATE-RQ, and sub-items of its User Information item (PS3.8 9.3.2, annex D.3.3).
_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT, _USER_INFORMATION = 0x10, 0x20, 0x50
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_MAX_LENGTH = 0x51
_USER_SUB_ITEMS = frozenset({0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58})


class MalformedRequest(ValueError):
    """The A-ASSOCIATE-RQ does not parse."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str  # "" when the item has no Abstract Syntax sub-item
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    protocol_version: int
    called_ae_raw: bytes  # the 16 bytes as sent, echoed in the answer
    calling_ae_raw: bytes
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_length: int | None  # the requestor's Maximum Length Received; 0 or None: no limit

    @property
    def called_ae(self) -> str:
        return _ae(self.called_ae_raw)

    @property
    def calling_ae(self) -> str:
        return _ae(self.calling_ae_raw)


def _ae(raw: bytes) -> str:
    """An AE title (PS3.5 table 6.2-1): ASCII, no control characters or backslash, not all spaces."""
    try:
        text = raw.decode("ascii").strip(" ")
    except UnicodeDecodeError:
        raise MalformedRequest("an AE title that is not ASCII") from None
    if not text or any(c < " " or c in "\\\x7f" for c in text):
        raise MalformedRequest("an AE title that is empty or holds control characters")
    return text


def _uid(value: bytes) -> str:
    try:
        return value.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        raise MalformedRequest("a UID that is not ASCII") from None


def _items(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each item between ``start`` and ``end``; lengths must fit exactly."""
    out = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise MalformedRequest("an item header runs past its container")
        kind, _, length = _ITEM.unpack_from(buf, pos)
        pos += 4
        if pos + length > end:
            raise MalformedRequest(f"an item of type 0x{kind:02X} runs past its container")
        out.append((kind, pos, pos + length))
        pos += length
    return out


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The A-ASSOCIATE-RQ whose PDU body (the bytes after the 6-byte PDU header) is ``body``."""
    if len(body) < _HEADER:
        raise MalformedRequest("shorter than an A-ASSOCIATE-RQ's fixed fields")
    version = struct.unpack_from(">H", body, 0)[0]
    called, calling = body[4:20], body[20:36]
    for raw in (called, calling):
        _ae(raw)
    app_context: str | None = None
    contexts: list[ProposedContext] = []
    max_length: int | None = None
    user_info = False
    for kind, start, end in _items(body, _HEADER, len(body)):
        if kind == _APPLICATION_CONTEXT:
            app_context = _uid(body[start:end])
        elif kind == _PRESENTATION_CONTEXT:
            if end - start < 4:
                raise MalformedRequest("a presentation context item shorter than its fixed fields")
            abstract = ""
            syntaxes: list[str] = []
            for sub, s0, s1 in _items(body, start + 4, end):
                if sub == _ABSTRACT_SYNTAX:
                    abstract = abstract or _uid(body[s0:s1])
                elif sub == _TRANSFER_SYNTAX:
                    syntaxes.append(_uid(body[s0:s1]))
                else:
                    raise MalformedRequest(f"a sub-item of type 0x{sub:02X} in a presentation context")
            contexts.append(ProposedContext(body[start], abstract, tuple(syntaxes)))
        elif kind == _USER_INFORMATION:
            user_info = True
            for sub, s0, s1 in _items(body, start, end):
                if sub not in _USER_SUB_ITEMS:
                    raise MalformedRequest(f"a user information sub-item of type 0x{sub:02X}")
                if sub == _MAX_LENGTH:
                    if s1 - s0 != 4:
                        raise MalformedRequest("a Maximum Length sub-item that is not 4 bytes")
                    max_length = struct.unpack_from(">I", body, s0)[0]
        else:
            raise MalformedRequest(f"an item of type 0x{kind:02X} in an A-ASSOCIATE-RQ")
    if app_context is None:
        raise MalformedRequest("no Application Context item")
    if not user_info:
        raise MalformedRequest("no User Information item")
    return AssociateRequest(version, called, calling, app_context, tuple(contexts), max_length)


def _ascii(text: str) -> bytes:
    return text.encode("ascii")  # UIDs in these items are not padded (PS3.8 9.3.2.2.1)


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def encode_associate_ac(rq: AssociateRequest, results: list[tuple[int, int, str]], *, application_context: str,
                        max_length: int, implementation_uid: str, implementation_version: str) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``rq``: ``results`` holds (context id, result, transfer syntax)."""
    items = [_item(_APPLICATION_CONTEXT, _ascii(application_context))]
    for cid, result, syntax in results:
        items.append(_item(0x21, bytes((cid, 0, result, 0)) + _item(_TRANSFER_SYNTAX, _ascii(syntax))))
    user = (_item(_MAX_LENGTH, struct.pack(">I", max_length))
            + _item(0x52, _ascii(implementation_uid))
            + _item(0x55, _ascii(implementation_version)))
    items.append(_item(_USER_INFORMATION, user))
    body = (struct.pack(">HH", 0x0001, 0) + rq.called_ae_raw + rq.calling_ae_raw + bytes(32) + b"".join(items))
    return struct.pack(">BBI", 0x02, 0, len(body)) + body
