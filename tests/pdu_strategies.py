"""Hypothesis strategies for what a peer can put on a DICOM connection (PS3.8 9.3), for tests/test_scp_fuzz.py.

Each strategy draws a ``Wire``: the bytes a peer sends, cut into the pieces it sends them in, and how it ends:
``eof`` (it half-closes), ``release`` (it sends an A-RELEASE-RQ) or ``wait`` (it waits for the receiver to end the
association). They reach the receiver's states in turn:
``before_association`` (garbage, PDU headers of any type and length, A-ASSOCIATE-RQs built item by item with
broken lengths, odd AE titles and odd presentation contexts, mutated real requests), ``in_association`` (an
accepted association, then a sequence of P-DATA and other PDUs, each valid or broken) and ``c_stores`` (valid
C-STORE commands whose datasets are random, truncated or bit-flipped real instances).
"""

from __future__ import annotations

import functools
import itertools
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import pydicom
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
)

from tests.dicomfiles import CT_SMALL, MR_SMALL_BIG_ENDIAN, dataset_bytes
from tests.ul import (
    ABORT_PDU,
    RELEASE_RQ_PDU,
    VERIFICATION,
    associate_rq,
    command_set,
    echo_command,
    element,
    pdata,
    store_command,
)

CT, MR = str(CTImageStorage), str(MRImageStorage)
ELE, IVR, DEFL, EBE = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian),
                       str(DeflatedExplicitVRLittleEndian), str(ExplicitVRBigEndian))
# The contexts every association here proposes; each is accepted.
CONTEXTS = [(1, CT, ELE), (3, CT, IVR), (5, VERIFICATION, IVR), (7, CT, DEFL), (9, MR, EBE)]
STORE_CONTEXTS = {1: (CT, "ele"), 3: (CT, "ivr"), 7: (CT, "deflated"), 9: (MR, "ebe")}
# A peer that waits for the receiver costs up to a timeout (0.5 s) or a linger (2 s): drawn less often.
ENDINGS = ("eof", "release", "eof", "release", "wait")


@dataclass(frozen=True)
class Wire:
    """What one connection sends: ``chunks`` in order, then its ``ending`` (see the module docstring)."""

    chunks: tuple[bytes, ...]
    ending: str
    datasets: tuple[bytes, ...] = ()  # c_stores only: the dataset of each C-STORE, each of which must be answered

    def __repr__(self) -> str:
        # Short: a failing example is also written out whole, in the corpus format (see ``corpus_text``).
        size = sum(map(len, self.chunks))
        shown = [c.hex() for c in self.chunks] if size <= 2048 else f"{len(self.chunks)} pieces, {size} bytes"
        return f"Wire(ending={self.ending!r}, stores={len(self.datasets)}, chunks={shown})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis's printer would list every field
        p.text(repr(self))

    def corpus_text(self, comment: str) -> str:
        """The format tests/test_scp_fuzz.py's ``load_corpus`` reads."""
        pieces = "\n--\n".join("\n".join(c.hex()[i : i + 96] for i in range(0, len(c) * 2, 96)) for c in self.chunks)
        return f"# {comment}\n# ending: {self.ending}\n{pieces}\n"


@functools.cache
def datasets() -> dict[str, tuple[bytes, str, str]]:
    """Real instances as encoded on the wire in each store context's syntax: (bytes, SOP class, SOP instance)."""
    ct = pydicom.dcmread(CT_SMALL)
    ele = dataset_bytes(CT_SMALL)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ct)
    mr = pydicom.dcmread(MR_SMALL_BIG_ENDIAN, stop_before_pixels=True)
    ct_ids, mr_ids = (str(ct.SOPClassUID), str(ct.SOPInstanceUID)), (str(mr.SOPClassUID), str(mr.SOPInstanceUID))
    return {"ele": (ele, *ct_ids), "ivr": (buf.getvalue(), *ct_ids), "deflated": (deflate(ele), *ct_ids),
            "ebe": (dataset_bytes(MR_SMALL_BIG_ENDIAN), *mr_ids)}


def deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def pdu(pdu_type: int, body: bytes, length: int | None = None, reserved: int = 0) -> bytes:
    return struct.pack(">BBI", pdu_type, reserved, len(body) if length is None else length) + body


def pdv(context_id: int, control: int, data: bytes, item_length: int | None = None) -> bytes:
    return struct.pack(">IBB", len(data) + 2 if item_length is None else item_length, context_id, control) + data


def item(item_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body) if length is None else length) + body


# -- building blocks -----------------------------------------------------------------------------------------

# Mostly the right value, now and then any value: a broken length field must be rare enough that what follows
# it gets parsed too.
def _sometimes(value: int, strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.just(value), st.just(value), st.just(value), strategy)


u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
lengths32 = st.one_of(st.integers(0, 64), st.sampled_from([0x3FFFF, 0x40000, 0x40001, 0x10000, 0x10040, 0x10041,
                                                           0x7FFFFFFF, 0xFFFFFFFF]), u32)
context_ids = st.one_of(st.sampled_from([c[0] for c in CONTEXTS]), u8)
controls = st.one_of(st.sampled_from([0x00, 0x01, 0x02, 0x03]), u8)
uids = st.one_of(
    st.sampled_from([CT, MR, VERIFICATION, ELE, IVR, DEFL, EBE, str(JPEGBaseline8Bit), "1.2.840.10008.3.1.1.1",
                     "", "1", "1..2", ".1", "1.2.", "0.00", "1.2.3.4.5.6.7.8.9.0" * 4]),
    st.text(alphabet="0123456789.", max_size=70),
).map(str.encode) | st.binary(max_size=80)
ae_titles = st.one_of(st.sampled_from([b"EDGE_AGENT      ", b"FUZZ            ", b" " * 16, b"\0" * 16]),
                      st.binary(min_size=16, max_size=16))


# Helpers that take ``draw`` rather than strategies: a strategy built with a large ``bytes`` argument gets that
# argument in its repr, which Hypothesis builds for every example it reports.
def mutate(draw: st.DrawFn, base: bytes, max_ops: int = 4, head: int = 2048) -> bytes:
    """``base`` with a few bit flips, byte changes, insertions, deletions or a cut; half aimed at its first bytes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        n = len(data)
        pos = draw(st.one_of(st.integers(0, min(head, n) - 1), st.integers(0, n - 1)))
        kind = draw(st.sampled_from(["flip", "byte", "insert", "delete", "cut"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]) | u8)
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            del data[pos:]
    return bytes(data)


def pieces(draw: st.DrawFn, data: bytes) -> tuple[bytes, ...]:
    """``data`` cut at a few places, so that PDU and PDV headers straddle the receiver's reads."""
    if len(data) < 2:
        return (data,)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=6))))
    bounds = [0, *cuts, len(data)]
    return tuple(data[a:b] for a, b in itertools.pairwise(bounds))


# -- before association ----------------------------------------------------------------------------------------


@st.composite
def _presentation_context(draw: st.DrawFn) -> bytes:
    subs = []
    if draw(st.integers(0, 7)):
        subs.append(item(0x30, draw(uids)))
    for _ in range(draw(st.integers(0, 4))):
        subs.append(item(0x40, draw(uids)))
    if not draw(st.integers(0, 7)):
        subs.append(item(draw(u8), draw(st.binary(max_size=32))))
    body = bytes([draw(_sometimes(1, u8)), 0, draw(_sometimes(0, u8)), 0]) + b"".join(draw(st.permutations(subs)))
    return item(0x20, body, draw(st.one_of(st.none(), st.none(), st.none(), u16)))


@st.composite
def _user_information(draw: st.DrawFn) -> bytes:
    choices = [
        item(0x51, struct.pack(">I", draw(st.sampled_from([0, 1, 4096, 16384, 0xFFFFFFFF]) | u32))),
        item(0x51, draw(st.binary(max_size=8))),
        item(0x52, draw(uids)),
        item(0x55, draw(st.binary(max_size=20))),
        item(0x53, draw(st.binary(min_size=4, max_size=4))),
        item(0x54, struct.pack(">H", len(uid := draw(uids))) + uid + draw(st.binary(min_size=2, max_size=2))),
        item(0x56, draw(st.binary(max_size=40))),
        item(0x58, draw(st.binary(max_size=40))),
        item(draw(u8), draw(st.binary(max_size=40))),
    ]
    subs = draw(st.lists(st.sampled_from(choices), max_size=5))
    return item(0x50, b"".join(subs), draw(st.one_of(st.none(), st.none(), st.none(), u16)))


@st.composite
def associate_requests(draw: st.DrawFn) -> bytes:
    """An A-ASSOCIATE-RQ built item by item: any field may be odd, any length wrong, any item missing or repeated."""
    items = []
    if draw(st.integers(0, 7)):
        items.append(item(0x10, draw(st.one_of(st.just(b"1.2.840.10008.3.1.1.1"), uids))))
    items += draw(st.lists(_presentation_context(), max_size=4))
    if draw(st.integers(0, 7)):
        items.append(draw(_user_information()))
    if not draw(st.integers(0, 7)):
        items.append(item(draw(u8), draw(st.binary(max_size=32))))
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    body = (struct.pack(">HH", draw(_sometimes(1, u16)), 0) + draw(ae_titles) + draw(ae_titles)
            + draw(st.binary(min_size=32, max_size=32) | st.just(b"\0" * 32)) + b"".join(items))
    return pdu(0x01, body, draw(st.one_of(st.none(), st.none(), st.none(), lengths32)))


def _valid_request() -> bytes:
    return associate_rq("FUZZ", CONTEXTS)


@st.composite
def before_association(draw: st.DrawFn) -> Wire:
    """Bytes from a peer that has not associated yet."""
    kind = draw(st.sampled_from(["garbage", "header", "request", "mutated", "request+tail"]))
    if kind == "garbage":
        data = draw(st.binary(min_size=1, max_size=2048))
    elif kind == "header":
        data = pdu(draw(u8), draw(st.binary(max_size=512)), draw(lengths32), draw(u8))
    elif kind == "request":
        data = draw(associate_requests())
    elif kind == "mutated":
        data = mutate(draw, _valid_request(), head=512)
    else:
        data = draw(associate_requests()) + draw(st.binary(min_size=1, max_size=256))
    return Wire(pieces(draw, data), draw(st.sampled_from(ENDINGS)))


# -- inside an association ----------------------------------------------------------------------------------


@st.composite
def _command_elements(draw: st.DrawFn) -> bytes:
    """A command set of random elements: known element numbers with any value, unknown ones, other groups."""
    known = {
        0x0002: uids,
        0x0100: st.sampled_from([0x0001, 0x0030, 0x0FFF, 0x0020, 0x8001, 0x0010]).map(lambda v: struct.pack("<H", v))
        | st.binary(max_size=4),
        0x0110: u16.map(lambda v: struct.pack("<H", v)) | st.binary(max_size=4),
        0x0700: st.binary(max_size=4),
        0x0800: st.sampled_from([0x0101, 0x0000, 0x0102]).map(lambda v: struct.pack("<H", v)) | st.binary(max_size=4),
        0x1000: uids,
    }
    parts = []
    for elem in draw(st.lists(st.sampled_from([*known, 0x0000, 0x0120, 0x0900, 0x1030]) | u16, max_size=8)):
        value = draw(known.get(elem, st.binary(max_size=40)))
        group = draw(_sometimes(0x0000, u16))
        raw = element(elem, value, group)
        if not draw(st.integers(0, 9)):
            raw = raw[:4] + struct.pack("<I", draw(lengths32)) + raw[8:]
        parts.append(raw)
    body = b"".join(parts)
    return command_set(body) if draw(st.booleans()) else body


@st.composite
def _store(draw: st.DrawFn) -> bytes:
    """A C-STORE: a valid command, then the dataset whole, cut short, or not at all."""
    cid = draw(st.sampled_from(sorted(STORE_CONTEXTS)))
    sop_class, kind = STORE_CONTEXTS[cid]
    data, _, instance = datasets()[kind]
    out = pdata(cid, 0x03, store_command(sop_class, instance, draw(u16)))
    end = draw(st.sampled_from([len(data), len(data) // 2, 0]) | st.integers(0, len(data)))
    step = draw(st.integers(512, 20000))
    for i in range(0, end, step):
        out += pdata(cid, 0x02 if i + step >= len(data) else 0x00, data[i : min(i + step, end)])
    return out


@st.composite
def _operation(draw: st.DrawFn) -> bytes:
    # Valid operations are drawn more often, so that a sequence gets past its first few PDUs.
    kind = draw(st.sampled_from(["echo", "store", "store", "echo", "store", "fragment", "pdvs", "command", "split",
                                 "cut", "release", "release_rp", "abort", "request", "pdu", "bytes"]))
    if kind == "echo":
        return pdata(draw(st.just(5) | context_ids), draw(st.sampled_from([0x03, 0x01, 0x02])), echo_command(draw(u16)))
    if kind == "store":
        return draw(_store())
    if kind == "fragment":
        return pdata(draw(context_ids), draw(controls) & ~0x01, draw(st.binary(max_size=600)))
    if kind == "pdvs":
        body = b"".join(pdv(draw(context_ids), draw(controls), draw(st.binary(max_size=64)),
                            draw(st.one_of(st.none(), st.none(), u32)))
                        for _ in range(draw(st.integers(0, 4))))
        return pdu(0x04, body, draw(st.one_of(st.none(), st.none(), lengths32)))
    if kind == "command":
        return pdata(draw(context_ids), draw(st.sampled_from([0x03, 0x01])), draw(_command_elements()))
    if kind == "split":
        cmd = store_command(CT, "1.2.3.4", draw(u16)) if draw(st.booleans()) else echo_command(draw(u16))
        at = draw(st.integers(0, len(cmd)))
        return (pdata(draw(context_ids), draw(controls), cmd[:at])
                + pdata(draw(context_ids), draw(controls), cmd[at:]))
    if kind == "cut":
        cmd = store_command(CT, "1.2.3.4", draw(u16))
        return pdata(draw(context_ids), 0x03, cmd[: draw(st.integers(0, len(cmd) - 1))])
    if kind == "release":
        return RELEASE_RQ_PDU
    if kind == "release_rp":
        return pdu(0x06, b"\0\0\0\0")
    if kind == "abort":
        return ABORT_PDU
    if kind == "request":
        return _valid_request()
    if kind == "pdu":
        return pdu(draw(u8), draw(st.binary(max_size=256)), draw(st.one_of(st.none(), lengths32)), draw(u8))
    return draw(st.binary(min_size=1, max_size=256))


@st.composite
def in_association(draw: st.DrawFn) -> Wire:
    """An accepted association, then PDUs of every kind, valid or not, in any order."""
    ops = draw(st.lists(_operation(), min_size=1, max_size=6))
    data = _valid_request() + b"".join(ops)
    return Wire(pieces(draw, data), draw(st.sampled_from(ENDINGS)))


# -- C-STOREs with mutated datasets --------------------------------------------------------------------


@st.composite
def _dataset(draw: st.DrawFn, kind: str) -> bytes:
    base = datasets()[kind][0]
    how = draw(st.sampled_from(["mutated", "cut", "random", "intact", "bomb"] if kind == "deflated"
                               else ["mutated", "cut", "random", "intact"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "cut":
        return base[: draw(st.integers(0, len(base)))]
    if how == "intact":
        return base
    if how == "bomb":
        # A valid start that inflates past dicom.max_dataset_bytes.
        return deflate(datasets()["ele"][0][:2048] + b"\0" * (3 << 20))
    if kind == "deflated" and draw(st.booleans()):
        return deflate(mutate(draw, datasets()["ele"][0]))
    return mutate(draw, base)


def store_wire(stores: list[tuple[int, bytes]], step: int = 16000, split: tuple[int, ...] = ()) -> Wire:
    """An association and a C-STORE of each ``(context id, dataset)`` in fragments of ``step`` bytes, cut into
    pieces at the offsets in ``split``; then a release."""
    out = _valid_request()
    for n, (cid, data) in enumerate(stores):
        sop_class, kind = STORE_CONTEXTS[cid]
        out += pdata(cid, 0x03, store_command(sop_class, datasets()[kind][2], n + 1))
        for i in range(0, max(len(data), 1), step):
            out += pdata(cid, 0x02 if i + step >= len(data) else 0x00, data[i : i + step])
    bounds = [0, *sorted({c for c in split if 0 < c < len(out)}), len(out)]
    return Wire(tuple(out[a:b] for a, b in itertools.pairwise(bounds)), "release", tuple(d for _, d in stores))


@st.composite
def c_stores(draw: st.DrawFn) -> Wire:
    """One or two valid C-STORE commands, each followed by a dataset that may be anything, then a release."""
    stores = []
    for _ in range(draw(st.integers(1, 2))):
        cid = draw(st.sampled_from(sorted(STORE_CONTEXTS)))
        stores.append((cid, draw(_dataset(STORE_CONTEXTS[cid][1]))))
    step = draw(st.integers(16, 32000))
    return store_wire(stores, step, tuple(draw(st.lists(st.integers(1, 1 << 17), max_size=6))))
