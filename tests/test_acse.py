"""The receiver's own A-ASSOCIATE-RQ reader and A-ASSOCIATE-AC writer, against pynetdicom's codecs."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import _STORAGE_CLASSES

from edge_agent.dicom.acse import AssociateRequest, MalformedRequest, encode_associate_ac, parse_associate_rq

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"]


def _request(contexts: int = 128, *, calling: str = "MODALITY", called: str = "EDGE_AGENT",
             max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom writes it, with every user information sub-item a peer may send."""
    prim = A_ASSOCIATE()
    prim.application_context_name = UID("1.2.840.10008.3.1.1.1")
    prim.calling_ae_title, prim.called_ae_title = calling, called
    ctxs = []
    for i, uid in enumerate(list(_STORAGE_CLASSES.values())[:contexts]):
        ctx = build_context(uid, SYNTAXES[: 1 + i % 3])
        ctx.context_id = 2 * i + 1
        ctxs.append(ctx)
    prim.presentation_context_definition_list = ctxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_length
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID("1.2.3.4.5")
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PEER_1"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 4
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = UID(str(ctxs[0].abstract_syntax)), True, False
    user = UserIdentityNegotiation()
    user.user_identity_type, user.primary_field = 1, b"operator"
    prim.user_information = [ml, impl, version, window, role, user]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def test_a_request_reads_as_pynetdicom_reads_it() -> None:
    raw = _request()
    rq = parse_associate_rq(raw[6:])
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    prim = theirs.to_primitive()
    assert rq.calling_ae == "MODALITY" and rq.called_ae == "EDGE_AGENT"
    assert rq.protocol_version == theirs.protocol_version == 1
    assert rq.application_context == str(prim.application_context_name)
    assert rq.max_length == 16384
    assert [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes)) for c in rq.contexts] == [
        (pc.context_id, str(pc.abstract_syntax), [str(ts) for ts in pc.transfer_syntax])
        for pc in prim.presentation_context_definition_list]
    assert len(rq.contexts) == 128


def test_an_answer_reads_back_in_pynetdicom() -> None:
    rq = parse_associate_rq(_request(contexts=3, calling="CT01", called="EDGE")[6:])
    results = [(1, 0x00, SYNTAXES[0]), (3, 0x03, SYNTAXES[0]), (5, 0x04, SYNTAXES[1])]
    raw = encode_associate_ac(rq, results, application_context="1.2.840.10008.3.1.1.1", max_length=1 << 20,
                              implementation_uid="2.25.1", implementation_version="EDGE_AGENT_1")
    assert struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    prim = ac.to_primitive()
    # The AE title fields are echoed as sent (PS3.8 9.3.3.2).
    assert raw[10:26] == b"EDGE".ljust(16) and raw[26:42] == b"CT01".ljust(16)
    assert str(prim.application_context_name) == "1.2.840.10008.3.1.1.1"
    got = [(pc.context_id, pc.result, str(pc.transfer_syntax[0])) for pc in
           prim.presentation_context_definition_results_list]
    assert got == results
    (ml,) = [i for i in prim.user_information if isinstance(i, MaximumLengthNotification)]
    (impl,) = [i for i in prim.user_information if isinstance(i, ImplementationClassUIDNotification)]
    (version,) = [i for i in prim.user_information if isinstance(i, ImplementationVersionNameNotification)]
    assert ml.maximum_length_received == 1 << 20
    assert str(impl.implementation_class_uid) == "2.25.1"
    assert version.implementation_version_name == "EDGE_AGENT_1"


def _body(items: bytes, calling: bytes = b"MODALITY".ljust(16), called: bytes = b"EDGE".ljust(16)) -> bytes:
    return struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


APP = _item(0x10, b"1.2.840.10008.3.1.1.1")
USER = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
CT = _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, b"1.2.840.10008.5.1.4.1.1.2") + _item(0x40, b"1.2.840.10008.1.2"))


def test_the_smallest_request_that_reads() -> None:
    rq = parse_associate_rq(_body(APP + CT + USER))
    assert isinstance(rq, AssociateRequest)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, "1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2",))]
    # A context without its Abstract Syntax sub-item reads, with none (the receiver refuses that context alone).
    bare = _item(0x20, bytes((3, 0, 0, 0)) + _item(0x40, b"1.2.840.10008.1.2"))
    assert parse_associate_rq(_body(APP + bare + USER)).contexts[0].abstract_syntax == ""


@pytest.mark.parametrize(("body", "why"), [
    (_body(APP + CT + USER)[:60], "fixed fields"),
    (_body(APP + CT + USER)[:-2], "past its container"),
    (_body(APP + CT), "User Information"),
    (_body(CT + USER), "Application Context"),
    (_body(APP + CT + USER + _item(0x60, b"x")), "type 0x60"),
    (_body(APP + _item(0x20, b"\x01\x00") + USER), "shorter than its fixed fields"),
    (_body(APP + _item(0x20, bytes(4) + _item(0x51, b"x")) + USER), "sub-item of type 0x51"),
    (_body(APP + CT + _item(0x50, _item(0x51, b"\x00\x01"))), "not 4 bytes"),
    (_body(APP + CT + _item(0x50, _item(0x99, b""))), "sub-item of type 0x99"),
    (_body(APP + CT + USER, calling=bytes(16)), "empty or holds control characters"),
    (_body(APP + CT + USER, calling=b" " * 16), "empty or holds control characters"),
    (_body(APP + CT + USER, called=b"EDGE\\X".ljust(16)), "empty or holds control characters"),
    (_body(APP + CT + USER, called="ÉDGE".encode("latin-1").ljust(16)), "not ASCII"),
    (_body(_item(0x10, b"1.2\xff") + CT + USER), "not ASCII"),
])
def test_a_malformed_request_is_named(body: bytes, why: str) -> None:
    with pytest.raises(MalformedRequest, match=why):
        parse_associate_rq(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=200))
def test_any_bytes_read_or_are_malformed(noise: bytes, cut: int) -> None:
    # Whatever a peer sends, the reader answers with a request or MalformedRequest, nothing else.
    for body in (noise, _body(APP + CT + USER)[:cut] + noise, _body(APP + noise + USER)):
        with contextlib.suppress(MalformedRequest):
            parse_associate_rq(body)
