"""The bytes of the DICOM Upper Layer and DIMSE that the receiver reads and writes (PS3.7, PS3.8): pure functions
and constants, no I/O. Association requests and acceptances are in acse.py."""

from __future__ import annotations

import re
import struct

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "2.25.186402343521405396389318725146318722217"
IMPLEMENTATION_VERSION = "EDGE_AGENT_1"

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, reason).
RJ_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
RJ_NO_REASON = (0x01, 0x02, 0x01)  # permanent, service-provider (ACSE), no reason given
RJ_VERSION = (0x01, 0x02, 0x02)  # permanent, service-provider (ACSE), protocol version not supported
RJ_STOPPING = (0x02, 0x03, 0x01)  # transient, service-provider (presentation), temporary congestion
RJ_BUSY = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded
# A-ABORT source 2 (service-provider): reasons 1 unrecognised PDU, 2 unexpected PDU, 6 invalid parameter.
ABORT_UNRECOGNISED, ABORT_UNEXPECTED, ABORT_INVALID = 0x01, 0x02, 0x06
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CMD_STORE_RQ, CMD_ECHO_RQ, CMD_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol: the association is aborted (A-ABORT)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID) -> None:
        super().__init__(message)
        self.reason = reason



# -- the wire format ---------------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def abort_pdu(source: int, reason: int) -> bytes:
    return pdu(0x07, bytes((0, 0, source, reason)))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return pdu(0x03, bytes((0, result, source, reason)))


RELEASE_RP = pdu(0x06, b"\0\0\0\0")


def _element(tag_element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def response(context_id: int, command_field: int, message_id: int, status_code: int,
             sop_class: str, sop_instance: str | None) -> bytes:
    """A DIMSE response (Implicit VR LE command set, no dataset) as one P-DATA-TF PDU."""
    body = _element(0x0002, sop_class.encode("ascii"))
    body += _element(0x0100, _us(command_field))
    body += _element(0x0120, _us(message_id))
    body += _element(0x0800, _us(NO_DATASET))
    body += _element(0x0900, _us(status_code))
    if sop_instance is not None:
        body += _element(0x1000, sop_instance.encode("ascii"))
    command = _element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return pdu(0x04, pdv)


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (group 0000, Implicit VR Little Endian): element number -> raw value."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("a command set ends inside an element header")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ProtocolError("a command set holds an element outside group 0000 or past its end")
        out[elem] = data[pos : pos + length]
        pos += length
    return out


def cmd_int(cmd: dict[int, bytes], elem: int) -> int | None:
    raw = cmd.get(elem)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def cmd_uid(cmd: dict[int, bytes], elem: int) -> str | None:
    raw = cmd.get(elem)
    if raw is None:
        return None
    text = raw.rstrip(b"\0 ").decode("ascii", "replace")
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str, receiving_aet: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (Explicit VR LE) of the Part 10 file written to the spool.

    The calling and called AE titles go into Source (0002,0016) and Receiving (0002,0018) Application Entity
    Title, so that a file adopted after a power cut (journal.py) is routed as it would have been."""

    def el(elem: int, vr: bytes, value: bytes, pad: bytes = b"\0") -> bytes:
        if len(value) % 2:
            value += pad
        if vr in (b"OB",):
            return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    body = (
        el(0x0001, b"OB", b"\0\1")
        + el(0x0002, b"UI", sop_class.encode("ascii"))
        + el(0x0003, b"UI", sop_instance.encode("ascii"))
        + el(0x0010, b"UI", transfer_syntax.encode("ascii"))
        + el(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + el(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"), b" ")
        + el(0x0016, b"AE", source_aet.encode("ascii", "replace")[:16], b" ")
        + el(0x0018, b"AE", receiving_aet.encode("ascii", "replace")[:16], b" ")
    )
    return b"\0" * 128 + b"DICM" + el(0x0000, b"UL", struct.pack("<I", len(body))) + body

