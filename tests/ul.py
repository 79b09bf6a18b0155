"""A DICOM Upper Layer peer spoken by hand (PS3.8), for tests that must send what no well-behaved SCU would.

The PDUs are built here byte by byte, except the A-ASSOCIATE-RQ, which pynetdicom's codec encodes.
"""

from __future__ import annotations

import socket
import struct

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

VERIFICATION = "1.2.840.10008.1.1"
# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# After one of these the association is over: the requestor closes the connection (PS3.8 Sta13).
FINAL_PDUS = frozenset({ASSOCIATE_RJ, RELEASE_RP, ABORT})
RELEASE_RQ_PDU = struct.pack(">BBI", RELEASE_RQ, 0, 4) + b"\0\0\0\0"
ABORT_PDU = struct.pack(">BBI", ABORT, 0, 4) + b"\0\0\0\0"


def associate_rq(calling: str = "PEER", contexts: list[tuple[int, str, str]] | None = None,
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU, encoded by pynetdicom's codec."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "EDGE_AGENT"
    for cid, abstract, syntax in contexts or [(1, str(CTImageStorage), str(ExplicitVRLittleEndian))]:
        pc = PresentationContext()
        pc.context_id = cid
        pc.abstract_syntax = abstract
        pc.transfer_syntax = [syntax]
        prim.presentation_context_definition_list.append(pc)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    prim.user_information = [max_length, impl]
    return bytes(A_ASSOCIATE_RQ(prim).encode())


def element(elem: int, value: bytes, group: int = 0x0000) -> bytes:
    """One Implicit VR Little Endian element, padded to even length."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, elem, len(value)) + value


def command_set(body: bytes) -> bytes:
    """A command set: its Command Group Length, then ``body``."""
    return element(0x0000, struct.pack("<I", len(body))) + body


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set that announces a dataset."""
    return command_set(
        element(0x0002, sop_class.encode()) + element(0x0100, struct.pack("<H", 0x0001))
        + element(0x0110, struct.pack("<H", message_id)) + element(0x0700, struct.pack("<H", 0))
        + element(0x0800, struct.pack("<H", 0)) + element(0x1000, sop_instance.encode()))


def echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (no dataset)."""
    return command_set(
        element(0x0002, VERIFICATION.encode()) + element(0x0100, struct.pack("<H", 0x0030))
        + element(0x0110, struct.pack("<H", message_id)) + element(0x0800, struct.pack("<H", 0x0101)))


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", P_DATA, 0, len(pdv)) + pdv


def response_status(pdu_body: bytes) -> int | None:
    """The Status (0000,0900) of a DIMSE response carried whole in one P-DATA-TF body, or None."""
    if len(pdu_body) < 6:
        return None
    command, pos = pdu_body[6:], 0
    while pos + 8 <= len(command):
        _, elem, length = struct.unpack_from("<HHI", command, pos)
        if elem == 0x0900 and length == 2 and pos + 10 <= len(command):
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    return None


class RawPeer:
    """A TCP peer that speaks the Upper Layer by hand."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout_seconds: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_seconds,
                                             source_address=(source, 0))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU, or None when the receiver closed the connection."""
        head = self._read(6)
        if head is None:
            return None
        length = struct.unpack(">I", head[2:6])[0]
        body = self._read(length)
        return (head[0], body) if body is not None else None

    def _read(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            out += chunk
        return out

    def associate(self, **kw: object) -> None:
        self.send(associate_rq(**kw))  # type: ignore[arg-type]
        pdu = self.read_pdu()
        assert pdu is not None and pdu[0] == ASSOCIATE_AC, pdu

    def store(self, dataset: bytes, sop_class: str, sop_instance: str, context_id: int = 1,
              fragment: int = 16000) -> int:
        """C-STORE ``dataset`` (already encoded in the context's syntax); the response's status."""
        self.send(pdata(context_id, 0x03, store_command(sop_class, sop_instance)))
        for i in range(0, max(len(dataset), 1), fragment):
            last = i + fragment >= len(dataset)
            self.send(pdata(context_id, 0x02 if last else 0x00, dataset[i : i + fragment]))
        pdu = self.read_pdu()
        assert pdu is not None and pdu[0] == P_DATA, pdu
        status = response_status(pdu[1])
        assert status is not None, "no Status in the response"
        return status

    def echo(self, context_id: int) -> int:
        """C-ECHO on ``context_id``; the response's status."""
        self.send(pdata(context_id, 0x03, echo_command()))
        pdu = self.read_pdu()
        assert pdu is not None and pdu[0] == P_DATA, pdu
        status = response_status(pdu[1])
        assert status is not None, "no Status in the response"
        return status

    def release(self) -> None:
        self.send(RELEASE_RQ_PDU)
        pdu = self.read_pdu()
        assert pdu is not None and pdu[0] == RELEASE_RP, pdu

    def closed_within(self, seconds: float) -> bool:
        """True if the receiver closes the connection (after any PDUs it sends) within ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            while True:
                if self.read_pdu() is None:
                    return True
        except TimeoutError:
            return False
