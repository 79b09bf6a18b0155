"""The DICOM receiver: a Storage SCP on asyncio that streams each dataset straight into the spool.

One event loop, in its own thread, serves every connection (``asyncio.Protocol``): no thread per
association and no polling. The DICOM Upper Layer is parsed incrementally as bytes arrive (PS3.8):
association requests are read and answered straight from bytes (acse.py), C-STORE/C-ECHO command
sets are small and parsed here, and P-DATA fragments of a dataset are written to a temp file in the
spool as they come, so memory per association is bounded by what one ``recv`` returns, whatever a
peer declares.

Durability: a Success is answered only once the instance's data is fsynced, its name is in a fsynced
directory and its journal row is committed (PS3.4 Annex B.2.3). Instances that finish arriving
together, on any association, are committed together: one directory fsync and one journal commit per
group (``_Committer``). What can be done before a Success is needed is done as the bytes arrive: the
content's digest, the start of the data's writeback, the next instance's temp file. The journal
commit does not wait for its own fsync: the spool file, named with a digest of its content, is the
record of truth, and after a power cut the daemon records again the files whose rows were lost
(journal.py, ``Housekeeping.adopt_at_start``).

What a peer cannot do (each a test in tests/test_scp_limits.py): declare a PDU longer than
``max_pdu_bytes`` (aborted at the header), send a dataset over ``max_dataset_bytes`` or a Deflated one
that inflates past it (0xA700), hold a slot without associating (``acse_timeout_seconds``), stay silent
in an association (``network_timeout_seconds``), open more than ``max_connections_per_host`` or, with
others, ``max_pending_connections`` connections. Above the pipeline's bound on instances waiting for
inference the answer is 0xA700 (back-pressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import _STORAGE_CLASSES

from edge_agent import tlsutil
from edge_agent.config import DicomConfig
from edge_agent.dicom import acse, digest, status
from edge_agent.dicom.header import InstanceMeta, check_sop_class, read_meta, read_meta_head
from edge_agent.dicom.hosts import HostMatcher
from edge_agent.dicom.spool import Spool, ToPlace, start_writeback
from edge_agent.errors import EdgeAgentError
from edge_agent.journal import Journal, Recorded
from edge_agent.logs import RepeatedLog
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())

# Every syntax our decoders (pydicom + pylibjpeg) read, in our order of preference when a peer proposes
# several in one context. Instances are stored as received, so a compressed syntax costs nothing here.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
# The command set is always Implicit VR Little Endian; Verification needs nothing else.
_ECHO_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)

IMPLEMENTATION_CLASS_UID = "2.25.186402343521405396389318725146318722217"
IMPLEMENTATION_VERSION = "EDGE_AGENT_1"

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, reason).
_RJ_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
_RJ_NO_REASON = (0x01, 0x02, 0x01)  # permanent, service-provider (ACSE), no reason given
_RJ_VERSION = (0x01, 0x02, 0x02)  # permanent, service-provider (ACSE), protocol version not supported
_RJ_STOPPING = (0x02, 0x03, 0x01)  # transient, service-provider (presentation), temporary congestion
_RJ_BUSY = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded
# A-ABORT source 2 (service-provider): reasons 1 unrecognised PDU, 2 unexpected PDU, 6 invalid parameter.
_ABORT_UNRECOGNISED, _ABORT_UNEXPECTED, _ABORT_INVALID = 0x01, 0x02, 0x06

# An A-ASSOCIATE-RQ with 128 contexts of 10 long syntaxes is ~90 KB.
_MAX_ASSOCIATE_RQ = 256 * 1024
_MAX_COMMAND_BYTES = 64 * 1024
# A P-DATA PDU may carry a few bytes of item headers beyond the announced maximum (PS3.8 D.1 counts the
# PDVs only in some readings); tolerate that much, no more.
_PDU_SLACK = 64
# How much of each dataset's start is kept in memory to read the header without reading the file again.
_HEAD_BYTES = 256 * 1024
_INFLATE_STEP = 1 << 20
# Writeback of a dataset being received is started every this many bytes, and at its end.
_WRITEBACK_BYTES = 1 << 20
# Temp files created ahead of the C-STOREs that will use them.
_SPARE_FILES = 2
_SWEEP_SECONDS = 0.5
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CMD_STORE_RQ, _CMD_ECHO_RQ, _CMD_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_NO_DATASET = 0x0101

_CANNOT_UNDERSTAND = status.Answer(status.CANNOT_UNDERSTAND, status.OUTCOME_CANNOT_UNDERSTAND)

OnStored = Callable[[InstanceMeta, Recorded], None]
Admission = Callable[[], "str | None"]
OnReleased = Callable[[frozenset[int]], None]


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol: the association is aborted (A-ABORT)."""

    def __init__(self, message: str, reason: int = _ABORT_INVALID) -> None:
        super().__init__(message)
        self.reason = reason


# -- the wire format ---------------------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _abort_pdu(source: int, reason: int) -> bytes:
    return _pdu(0x07, bytes((0, 0, source, reason)))


def _reject_pdu(result: int, source: int, reason: int) -> bytes:
    return _pdu(0x03, bytes((0, result, source, reason)))


_RELEASE_RP = _pdu(0x06, b"\0\0\0\0")


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
    body += _element(0x0800, _us(_NO_DATASET))
    body += _element(0x0900, _us(status_code))
    if sop_instance is not None:
        body += _element(0x1000, sop_instance.encode("ascii"))
    command = _element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return _pdu(0x04, pdv)


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


def _cmd_int(cmd: dict[int, bytes], elem: int) -> int | None:
    raw = cmd.get(elem)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def _cmd_uid(cmd: dict[int, bytes], elem: int) -> str | None:
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


# -- one instance on its way in -------------------------------------------------------------------------


@dataclass
class _Store:
    """A C-STORE being received: its temp file, or the answer it will get without one."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    calling_aet: str
    called_aet: str
    max_bytes: int
    refused: status.Answer | None = None
    refusal: str = ""
    path: Path | None = None
    fd: int = -1
    capacity: int = 0  # the file's size when taken: a slot's (spool.py), written over in place, or 0
    size: int = 0  # dataset bytes received (as sent, deflated or not)
    meta_bytes: int = 0  # the preamble and File Meta written before them
    head: bytearray = field(default_factory=bytearray)
    inflater: Any = None
    inflated: int = 0
    started: float = field(default_factory=time.perf_counter)
    # The dataset's digest (as received, deflated or not; digest.py), taken as the bytes arrive: the sender is
    # busy sending the next fragment meanwhile, and the file is never read back.
    hasher: Any = field(default_factory=digest.hasher)
    unflushed: int = 0  # bytes written since the last writeback was started

    def write(self, chunk: memoryview) -> None:
        if self.refused is not None:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.refuse(status.SPOOL_FULL, f"the dataset is larger than dicom.max_dataset_bytes ({self.max_bytes})")
            return
        if self.inflater is not None:
            self._inflate(chunk)
        elif len(self.head) < _HEAD_BYTES:
            self.head += chunk[: _HEAD_BYTES - len(self.head)]
        self.hasher.update(chunk)
        try:
            view = chunk
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.refuse(status.SPOOL_FULL if full else status.RECEIVE_FAILED,
                        f"writing it to the spool failed ({os.strerror(exc.errno or 0)})")
            return
        self.unflushed += len(chunk)
        if self.unflushed >= _WRITEBACK_BYTES:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Start writing what was received to the disk now, so that the fsync behind Success finds less to do."""
        if self.fd >= 0 and self.unflushed:
            self.unflushed = 0
            start_writeback(self.fd)

    def _inflate(self, chunk: memoryview) -> None:
        # Inflated in steps of 1 MiB: a small Deflated dataset that inflates to gigabytes is counted, and
        # refused, without ever holding more than one step of it.
        data: bytes = bytes(chunk)
        try:
            while data and self.refused is None:
                out = self.inflater.decompress(data, _INFLATE_STEP)
                self.inflated += len(out)
                if len(self.head) < _HEAD_BYTES:
                    self.head += out[: _HEAD_BYTES - len(self.head)]
                if self.inflated > self.max_bytes:
                    self.refuse(status.SPOOL_FULL, "the Deflated dataset inflates past dicom.max_dataset_bytes "
                                f"({self.max_bytes})")
                data = self.inflater.unconsumed_tail
        except zlib.error:
            self.refuse(_CANNOT_UNDERSTAND, "the Deflated dataset does not inflate")

    def refuse(self, answer: status.Answer, why: str) -> None:
        if self.refused is None:
            self.refused, self.refusal = answer, why
            self.discard()

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


@dataclass
class _Result:
    answer: status.Answer
    meta: InstanceMeta | None = None
    recorded: Recorded | None = None


class _Committer:
    """Makes finished instances durable in groups, in two stages on two threads (see the module docstring).

    Stage one reads each header, renames the group into the spool and fsyncs the files and the folder at once;
    stage two records the group in the journal (one commit). A group enters stage two only after its own
    fsyncs, so the journal never names a file that is not on disk; meanwhile the next group is in stage one.
    Each stage takes everything waiting for it as its next group. The threads are plain threads fed by
    queues, and the answers go back with one ``call_soon_threadsafe`` per group: a hop through the event
    loop costs as much as a journal commit here.
    """

    def __init__(self, spool: Spool, journal: Journal) -> None:
        self._spool = spool
        self._journal = journal
        self._to_place: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._to_record: queue.SimpleQueue[_Placed | None] = queue.SimpleQueue()
        self._pending: set[asyncio.Future[_Result]] = set()
        self._threads: list[threading.Thread] = []

    def submit(self, store: _Store) -> asyncio.Future[_Result]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Result] = loop.create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._stage, name="dicom-place", daemon=True,
                                 args=(self._to_place, self._place_group, lambda: self._to_record.put(None))),
                threading.Thread(target=self._stage, name="dicom-journal", daemon=True,
                                 args=(self._to_record, self._record_group, lambda: None))]
            for t in self._threads:
                t.start()
        self._to_place.put(_Waiting(store, fut))
        return fut

    def commit_now(self, store: _Store) -> _Result:
        """Both stages for one instance, on the calling thread; only while ``idle_now``."""
        try:
            ready, results, names = self._place([store])
            self._record([store], ready, results, names)
        except Exception as exc:  # both stages answer their own failures; this is a last resort
            return _Result(status.answer_for(exc))
        return results[0] or _Result(status.RECEIVE_FAILED)

    def idle_now(self) -> bool:
        """Nothing submitted is waiting for its answer (so nothing is ahead of a new instance in the journal)."""
        return not self._pending

    async def idle(self) -> None:
        """Wait until every instance submitted so far has its answer."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    def close(self) -> None:
        threads, self._threads = self._threads, []
        if threads:
            self._to_place.put(None)
            for t in threads:
                t.join()

    @staticmethod
    def _stage(inbox: queue.SimpleQueue[Any], work: Callable[[list[Any]], None], after: Callable[[], None]) -> None:
        """One stage's thread: take everything waiting as one group, until the ``None`` that ends it."""
        stopping = False
        while not stopping:
            group: list[Any] = []
            item = inbox.get()
            while True:
                if item is None:
                    stopping = True
                    break
                group.append(item)
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
            if group:
                work(group)
        after()

    def _place_group(self, items: list[_Waiting]) -> None:
        try:
            ready, results, names = self._place([w.store for w in items])
        except BaseException as exc:  # _place is total; this is a last resort so that no sender hangs
            _answer_all(items, [_Result(status.answer_for(exc))] * len(items))
            return
        self._to_record.put(_Placed(items, ready, results, names))

    def _record_group(self, placed: list[_Placed]) -> None:
        for p in placed:
            try:
                self._record([w.store for w in p.items], p.ready, p.results, p.names)
                results = p.results
            except BaseException as exc:  # _record answers its own failures; this is a last resort
                results = [r if r is not None else _Result(status.answer_for(exc)) for r in p.results]
            _answer_all(p.items, [r if r is not None else _Result(status.RECEIVE_FAILED) for r in results])

    def _place(self, group: list[_Store]) -> tuple[list[tuple[int, InstanceMeta]], list[_Result | None], list[str]]:
        """Stage one: read headers, place and fsync the group. Total: nothing raises."""
        results: list[_Result | None] = [None] * len(group)
        ready: list[tuple[int, InstanceMeta]] = []
        for i, st in enumerate(group):
            try:
                meta = _read_meta(st)
                check_sop_class(meta, st.sop_class)
                ready.append((i, meta))
            except Exception as exc:
                results[i] = _refused(st, exc)
        names: list[str] = []
        if ready:
            try:
                names = self._spool.place([
                    ToPlace(group[i].path, group[i].fd, meta.content_digest,  # type: ignore[arg-type]
                            group[i].meta_bytes + group[i].size, group[i].capacity, group[i].transfer_syntax)
                    for i, meta in ready])
            except Exception as exc:
                for i, _ in ready:
                    results[i] = _refused(group[i], exc)
                ready = []
            for i, _ in ready:
                st = group[i]
                st.path = None  # renamed: it is the spool's now
                with contextlib.suppress(OSError):
                    os.close(st.fd)
                st.fd = -1
        return ready, results, names

    def _record(self, group: list[_Store], ready: list[tuple[int, InstanceMeta]], results: list[_Result | None],
                names: list[str]) -> None:
        """Stage two: one journal commit for the group's placed instances; fills in ``results``."""
        if not ready:
            return
        try:
            recorded = self._journal.record_instances(
                [(meta, name, group[i].meta_bytes + group[i].size) for (i, meta), name in
                 zip(ready, names, strict=True)], durable=False)
        except Exception as exc:
            for (i, _), name in zip(ready, names, strict=True):
                self._remove(name, "an unjournalled spool file")
                results[i] = _refused(group[i], exc)
            return
        for (i, meta), rec in zip(ready, recorded, strict=True):
            if rec.identical:
                # The same content as the instance held (a lost C-STORE-RSP, a PACS re-send): acknowledged,
                # and nothing changes (issue 8, defect 2). The new copy is not referenced.
                self._remove(rec.spool_name, "an unreferenced re-sent copy")
                results[i] = _Result(status.STORED_DUPLICATE, meta, rec)
                continue
            if rec.replaced_spool_name is not None:
                self._remove(rec.replaced_spool_name, "a replaced spool file")
            results[i] = _Result(status.STORED_REPLACED if rec.replaced_spool_name else status.STORED, meta, rec)

    def _remove(self, name: str, what: str) -> None:
        try:
            self._spool.remove(name)
        except OSError as exc:
            # Harmless: the orphan sweep at the next start removes it.
            logger.warning("cannot remove %s: %s", what, exc.strerror)


@dataclass
class _Waiting:
    store: _Store
    future: asyncio.Future[_Result]  # on the receiver's loop


@dataclass
class _Placed:
    items: list[_Waiting]
    ready: list[tuple[int, InstanceMeta]]
    results: list[_Result | None]
    names: list[str]


def _answer_all(items: list[_Waiting], results: list[_Result]) -> None:
    """From a committer thread: settle the group's futures on the receiver's loop, in one hop."""
    pairs = [(w.future, r) for w, r in zip(items, results, strict=True)]
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these any more
        items[0].future.get_loop().call_soon_threadsafe(_settle, pairs)


def _settle(pairs: list[tuple[asyncio.Future[_Result], _Result]]) -> None:
    for fut, result in pairs:
        if not fut.done():
            fut.set_result(result)


def _read_meta(st: _Store) -> InstanceMeta:
    assert st.path is not None
    content = digest.finish(st.hasher)
    whole = (st.inflated if st.inflater is not None else st.size) <= len(st.head)
    syntax = ExplicitVRLittleEndian if st.inflater is not None else st.transfer_syntax
    meta = read_meta_head(bytes(st.head), syntax, st.calling_aet, st.called_aet, content, whole=whole)
    if meta is None:
        meta = read_meta(st.path, st.calling_aet, st.called_aet, content)
    if st.inflater is not None:
        meta = InstanceMeta(**{**meta.__dict__, "transfer_syntax_uid": st.transfer_syntax})
    return meta


def _refused(st: _Store, exc: BaseException) -> _Result:
    st.discard()
    answer = status.answer_for(exc)
    logger.warning("instance refused with 0x%04X: %s", answer.status, _describe(exc))
    return _Result(answer)


def _describe(exc: BaseException) -> str:
    """Our own errors carry messages written without patient data; others are named by type only."""
    if isinstance(exc, EdgeAgentError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


# -- one connection ------------------------------------------------------------------------------------

_AWAIT_RQ, _OPEN, _ENDING, _CLOSED = range(4)
# After A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the requestor closes the connection (PS3.8 Sta13); if it does
# not within this long (the ARTIM timer), we do.
_LINGER_SECONDS = 2.0
_PDU_HEADER, _PDU_BODY, _PDV_HEADER, _COMMAND, _DATA = range(5)


class _Connection(asyncio.Protocol):
    """One TCP connection: the Upper Layer state machine, fed incrementally (see the module docstring)."""

    def __init__(self, server: Receiver, tls: bool) -> None:
        self._server = server
        self.tls = tls
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = _AWAIT_RQ
        now = time.monotonic()
        self.opened = self.last_rx = now
        self._mode, self._need, self._buf = _PDU_HEADER, 6, bytearray()
        self._pdu_type = self._pdu_left = self._pdv_left = self._pdv_ctx = self._pdv_ctrl = 0
        self._command = bytearray()
        self._contexts: dict[int, tuple[str, str]] = {}
        self._store: _Store | None = None
        self._busy: asyncio.Future[_Result] | None = None
        self._backlog = bytearray()
        self.calling_aet = self.called_aet = ""
        self.series: set[int] = set()
        self.released = False
        self.associated = False  # counted among the receiver's associations (else among its pending connections)
        self.token = 0  # the accepting process's name for it, in a receiver process (receivers.py)

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        raw = transport.get_extra_info("socket")
        if raw is not None:
            with contextlib.suppress(OSError):
                # Nagle plus delayed ACKs would hold each small C-STORE-RSP for up to 40 ms.
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        why = self._server._admit_connection(self)
        if why is not None:
            self.state = _CLOSED
            self._server._count_association("refused_connection")
            self._server._repeated.warning("connection", "connection refused: %s", why)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self._busy is not None:
            self._backlog += data
            return
        self._feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._store is not None:
            self._store.discard()
            self._store = None
        if self.state == _OPEN and not self.released:
            self._server._count_association("aborted")
            logger.info("association ended without a release (%s)", "reset" if exc is not None else "closed")
        self.state = _CLOSED
        self._server._forget(self)

    # -- the byte stream --

    def _feed(self, data: bytes | bytearray) -> None:
        try:
            self._parse(memoryview(data))
        except ProtocolError as exc:
            self.abort(exc.reason, str(exc))
        except Exception as exc:
            logger.error("DICOM receive failed (%s); aborting the association", _describe(exc))
            self.abort(_ABORT_INVALID, "internal error")

    def _parse(self, mv: memoryview) -> None:
        pos, end = 0, len(mv)
        while pos < end:
            if self.state >= _ENDING:
                return
            if self._busy is not None:
                self._backlog += mv[pos:]
                return
            if self._mode == _DATA:
                take = min(self._pdv_left, end - pos)
                assert self._store is not None
                self._store.write(mv[pos : pos + take])
                pos += take
                self._pdv_left -= take
                self._pdu_left -= take
                if self._pdv_left == 0:
                    self._pdv_done()
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += mv[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                chunk = bytes(self._buf)
                self._buf.clear()
                self._on_chunk(chunk)

    def _expect(self, mode: int, need: int) -> None:
        self._mode, self._need = mode, need
        if need == 0:
            self._on_chunk(b"")

    def _on_chunk(self, chunk: bytes) -> None:
        mode = self._mode
        if mode == _PDU_HEADER:
            self._pdu_type, length = chunk[0], struct.unpack_from(">I", chunk, 2)[0]
            self._on_pdu_header(self._pdu_type, length)
        elif mode == _PDU_BODY:
            self._expect(_PDU_HEADER, 6)
            self._on_pdu(self._pdu_type, chunk)
        elif mode == _PDV_HEADER:
            item_length, self._pdv_ctx, self._pdv_ctrl = struct.unpack(">IBB", chunk)
            self._pdu_left -= 6
            if item_length < 2 or item_length - 2 > self._pdu_left:
                raise ProtocolError("a PDV item does not fit its P-DATA-TF PDU")
            if self._pdv_ctx not in self._contexts:
                raise ProtocolError("a PDV names a presentation context that was not accepted")
            self._pdv_left = item_length - 2
            if self._pdv_ctrl & 0x01:
                if self._store is not None:
                    raise ProtocolError("a command fragment before the dataset of the last C-STORE ended")
                if len(self._command) + self._pdv_left > _MAX_COMMAND_BYTES:
                    raise ProtocolError("a command set longer than 64 KiB")
                self._expect(_COMMAND, self._pdv_left)
            else:
                store = self._store
                if store is None or store.context_id != self._pdv_ctx:
                    raise ProtocolError("dataset fragments without a C-STORE request on their context")
                self._mode = _DATA
                if self._pdv_left == 0:
                    self._pdv_done()
        elif mode == _COMMAND:
            self._command += chunk
            self._pdu_left -= len(chunk)
            self._pdv_left = 0
            self._pdv_done()

    def _pdv_done(self) -> None:
        last, command = bool(self._pdv_ctrl & 0x02), bool(self._pdv_ctrl & 0x01)
        if self._pdu_left > 0:
            self._expect(_PDV_HEADER, 6)
        else:
            self._expect(_PDU_HEADER, 6)
        if last and command:
            raw, self._command = bytes(self._command), bytearray()
            self._on_command(self._pdv_ctx, parse_command(raw))
        elif last:
            self._on_dataset_end()

    def _on_pdu_header(self, pdu_type: int, length: int) -> None:
        if self.state == _AWAIT_RQ:
            if pdu_type != 0x01:
                raise ProtocolError("the first PDU is not an A-ASSOCIATE-RQ", _ABORT_UNEXPECTED)
            if length > _MAX_ASSOCIATE_RQ:
                raise ProtocolError(f"an A-ASSOCIATE-RQ of {length} bytes")
            self._expect(_PDU_BODY, length)
            return
        if pdu_type == 0x04:
            limit = self._server.config.max_pdu_bytes + _PDU_SLACK
            if length > limit:
                self._server._count_association("pdu_too_long")
                raise ProtocolError(f"a P-DATA-TF PDU of {length} bytes, over dicom.max_pdu_bytes "
                                    f"({self._server.config.max_pdu_bytes})")
            if length < 6:
                raise ProtocolError("an empty P-DATA-TF PDU")
            self._pdu_left = length
            self._expect(_PDV_HEADER, 6)
        elif pdu_type in (0x05, 0x06, 0x07):
            if length != 4:
                raise ProtocolError("an A-RELEASE/A-ABORT PDU of the wrong length")
            self._expect(_PDU_BODY, 4)
        elif pdu_type in (0x01, 0x02, 0x03):
            raise ProtocolError("an association PDU inside an association", _ABORT_UNEXPECTED)
        else:
            raise ProtocolError("an unknown PDU type", _ABORT_UNRECOGNISED)

    def _on_pdu(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == 0x01:
            self._on_associate_rq(body)
        elif pdu_type == 0x05:
            if self._store is not None:
                raise ProtocolError("A-RELEASE-RQ in the middle of a dataset", _ABORT_UNEXPECTED)
            self.released = True
            self._write(_RELEASE_RP)
            self._close()
            if self.series:
                self._server._released(self.series)
            self._server._count_association("released")
        elif pdu_type == 0x07:
            logger.info("association aborted by the peer")
            self._close()
        else:
            raise ProtocolError("an unexpected PDU", _ABORT_UNEXPECTED)

    # -- association negotiation --

    def _on_associate_rq(self, body: bytes) -> None:
        server = self._server
        try:
            rq = acse.parse_associate_rq(body)
            calling, called = rq.calling_ae, rq.called_ae
        except acse.MalformedRequest as exc:
            # Any peer can send these at will: counted, and logged once a minute (the reason, never the bytes).
            server._repeated.warning("rejected_malformed", "association rejected: an A-ASSOCIATE-RQ that does not "
                                     "decode (%s)", exc)
            self._reject(_RJ_NO_REASON, "rejected_malformed")
            return
        if not (rq.protocol_version & 0x01):
            self._reject(_RJ_VERSION, "rejected_malformed")
            return
        why = server._check_association(self, calling)
        if why is not None:
            reason, outcome, message = why
            server._repeated.warning(outcome, "association rejected: %s", message)
            self._reject(reason, outcome)
            return
        self.calling_aet, self.called_aet = calling, called
        results: list[tuple[int, int, str]] = []
        for pc in rq.contexts:
            # An item may lack its Abstract Syntax sub-item (PS3.8 9.3.2.2): refused as not supported.
            proposed = list(pc.transfer_syntaxes)
            chosen = server._choose_syntax(pc.abstract_syntax, proposed)
            if isinstance(chosen, int):
                results.append((pc.context_id, chosen, proposed[0] if proposed else ImplicitVRLittleEndian))
            else:
                results.append((pc.context_id, 0x00, chosen))
                self._contexts[pc.context_id] = (pc.abstract_syntax, chosen)
        ac = acse.encode_associate_ac(rq, results, application_context=APPLICATION_CONTEXT,
                                      max_length=server.config.max_pdu_bytes,
                                      implementation_uid=IMPLEMENTATION_CLASS_UID,
                                      implementation_version=IMPLEMENTATION_VERSION)
        self.state = _OPEN
        server._associated(self)
        self._write(ac)

    def _reject(self, reason: tuple[int, int, int], outcome: str) -> None:
        self._server._count_association(outcome)
        self._write(_reject_pdu(*reason))
        self._close()

    # -- DIMSE --

    def _on_command(self, context_id: int, cmd: dict[int, bytes]) -> None:
        field_ = _cmd_int(cmd, 0x0100)
        message_id = _cmd_int(cmd, 0x0110)
        has_dataset = _cmd_int(cmd, 0x0800) != _NO_DATASET
        abstract, syntax = self._contexts[context_id]
        if field_ is None or message_id is None:
            raise ProtocolError("a command set without Command Field or Message ID")
        if field_ == _CMD_ECHO_RQ and not has_dataset:
            self._write(response(context_id, 0x8030, message_id, status.SUCCESS, VERIFICATION, None))
        elif field_ == _CMD_STORE_RQ and has_dataset:
            self._store = self._server._begin_store(self, context_id, message_id, abstract, syntax, cmd)
        elif field_ == _CMD_CANCEL_RQ:
            pass
        elif has_dataset:
            raise ProtocolError(f"a command 0x{field_:04X} this Storage SCP does not serve")
        else:
            self._write(response(context_id, field_ | 0x8000, message_id, 0x0211, abstract, None))

    def _on_dataset_end(self) -> None:
        store, self._store = self._store, None
        assert store is not None
        if store.inflater is not None and not store.inflater.eof:
            # A deflate stream cut short inflates to a prefix that may parse, but no reader takes the file whole.
            store.refuse(_CANNOT_UNDERSTAND, "the Deflated dataset ends inside its deflate stream")
        if store.refused is not None:
            self._answer(store, store.refused)
            return
        store.start_writeback()
        server = self._server
        if server._alone(self):
            # Nobody else to serve: made durable right here, without the two thread hand-overs (about 0.3 ms
            # of an instance's 3 ms on one association).
            self._finish(store, server._committer.commit_now(store))
        else:
            self._busy = server._committer.submit(store)
            self._busy.add_done_callback(
                lambda fut: self._finish(store, _Result(status.RECEIVE_FAILED) if fut.cancelled() else fut.result()))
            self._pause()
        # The next instance's temp file: made while this one is flushed, or while the sender reads the answer.
        server._spare_incoming()

    def _finish(self, store: _Store, result: _Result) -> None:
        try:
            if result.recorded is not None and result.meta is not None:
                if result.answer is not status.STORED_DUPLICATE:
                    self.series.add(result.recorded.series_id)
                self._server._stored(store, result)
            self._answer(store, result.answer)
        finally:
            self._busy = None
            self._resume()

    def _answer(self, store: _Store, answer: status.Answer) -> None:
        self._server._count_instance(answer)
        if store.refused is not None:
            self._server._repeated.warning(f"refused:{answer.outcome}", "instance refused with 0x%04X: %s",
                                      answer.status, store.refusal)
        self._write(response(store.context_id, 0x8001, store.message_id, answer.status, store.sop_class,
                             store.sop_instance))

    # -- plumbing --

    def _pause(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self.state >= _ENDING or self._transport is None or self._transport.is_closing():
            return
        self._transport.resume_reading()
        if self._backlog:
            data, self._backlog = bytes(self._backlog), bytearray()
            self._feed(data)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self, *, stop_reading: bool = False) -> None:
        """Our last PDU is written: wait for the peer to close (Sta13), at most ``_LINGER_SECONDS``.

        ``stop_reading`` (after an abort): take nothing more from a peer that may be flooding us; TCP pushes
        back until the connection is closed.
        """
        if self.state >= _ENDING:
            return
        self.state = _ENDING
        if stop_reading and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        asyncio.get_running_loop().call_later(_LINGER_SECONDS, self.close_now)

    def close_now(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    @property
    def idle(self) -> bool:
        return self._busy is None

    def abort(self, reason: int, why: str) -> None:
        """A-ABORT (service-provider) and close. ``why`` names the protocol fault, never peer data."""
        if self.state >= _ENDING:
            return
        if self.state == _OPEN:
            self._server._count_association("aborted")
        logger.warning("association aborted: %s", why)
        self._write(_abort_pdu(0x02, reason))
        if self._store is not None:
            self._store.discard()
            self._store = None
        self._close(stop_reading=True)


# -- the receiver ----------------------------------------------------------------------------------------



class ConnectionGate:
    """Which connections may come in: per host, waiting to associate, and associations; counts them.

    One owner calls it (a receiver's loop, or the process that accepts for receiver processes).
    """

    def __init__(self, config: DicomConfig) -> None:
        self._config = config
        self._per_host: dict[str, int] = {}
        self.pending = 0
        self.associations = 0

    def admit(self, peer: str) -> str | None:
        """None, counting the connection among ``peer``'s and the pending ones; else why it is refused."""
        cfg = self._config
        if self._per_host.get(peer, 0) >= cfg.max_connections_per_host:
            return f"{cfg.max_connections_per_host} connections already open from one host " \
                   "(dicom.max_connections_per_host)"
        if self.pending >= cfg.max_pending_connections:
            return f"{cfg.max_pending_connections} connections waiting to associate (dicom.max_pending_connections)"
        self._per_host[peer] = self._per_host.get(peer, 0) + 1
        self.pending += 1
        return None

    def associated(self) -> None:
        self.pending -= 1
        self.associations += 1

    def forget(self, peer: str, associated: bool) -> None:
        n = self._per_host.get(peer, 1) - 1
        if n:
            self._per_host[peer] = n
        else:
            self._per_host.pop(peer, None)
        if associated:
            self.associations -= 1
        else:
            self.pending -= 1


_BACKLOG = 128


def cannot_listen(host: str, port: int, tls: bool, exc: OSError) -> EdgeAgentError:
    return EdgeAgentError(
        f"cannot listen for DICOM{' TLS' if tls else ''} on {host}:{port}: {exc.strerror or exc} "
        "(is another DICOM service using the port? see dicom.host / dicom.port / dicom.tls.port)")


class ServedOnALoop:
    """A DICOM front on an event loop of its own thread: the Receiver, and the front of receiver processes
    (receivers.py). Subclasses give ``_open`` (bind, start serving; fills ``_ports``), ``_close`` (drain; returns
    how many associations finished and how many were aborted) and ``_after_loop`` (what is left once the loop
    has ended)."""

    _announce = True  # log where it listens and how it stopped
    _THREAD: str = "dicom-receiver"

    def __init__(self, config: DicomConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ports: list[int] = []
        self._stopping = threading.Lock()

    def start(self) -> None:
        """Bind and serve. Raises EdgeAgentError if a port cannot be bound (or a receiver process cannot start)."""
        self._run_open()
        if self._announce:
            cfg = self.config
            where = ", ".join(f"{cfg.host}:{p}{' (TLS)' if tls else ''}" for p, tls in self._listening())
            logger.info("DICOM receiver listening on %s as %s%s", where, cfg.ae_title, self._how_served())

    def _how_served(self) -> str:
        return ""

    def _listening(self) -> list[tuple[int, bool]]:
        tls = self.config.tls
        out = []
        if tls is None or not tls.only:
            out.append((self._ports[0], False))
        if tls is not None:
            out.append((self._ports[-1], True))
        return out

    def _run_open(self) -> None:
        if self._loop is not None:
            raise EdgeAgentError("the DICOM receiver is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=self._THREAD, daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        except BaseException:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(0.0), loop).result()
            self._shutdown_loop()
            raise

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self, timeout_seconds: float) -> tuple[int, int]:
        raise NotImplementedError

    def _after_loop(self) -> None:
        pass

    @property
    def port(self) -> int:
        """The bound plain TCP port (the TLS port when only TLS is served)."""
        if not self._ports:
            raise EdgeAgentError("the DICOM receiver is not running")
        return self._ports[0]

    @property
    def tls_port(self) -> int | None:
        return self._ports[-1] if self._ports and self.config.tls is not None else None

    def stop(self, timeout_seconds: float) -> tuple[int, int]:
        """Stop accepting, let running associations finish for up to ``timeout_seconds``, then abort the rest.

        Returns how many associations finished and how many were aborted."""
        # A second caller (a second signal, the owner's finally) waits for the first, then finds nothing to do.
        with self._stopping:
            loop = self._loop
            if loop is None:
                return 0, 0
            try:
                finished, aborted = asyncio.run_coroutine_threadsafe(self._close(timeout_seconds), loop).result()
            finally:
                self._shutdown_loop()
            if self._announce:
                logger.info("DICOM receiver stopped: %d associations finished, %d aborted", finished, aborted)
            return finished, aborted

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join()
        if loop is not None:
            loop.close()
        self._after_loop()
        self._loop = self._thread = None
        self._ports = []


class Receiver(ServedOnALoop):
    """The Storage SCP. ``start()`` binds and serves on a loop of its own; ``stop()`` drains.

    A receiver process (receivers.py) runs a subclass that is handed its connections instead of listening.

    ``on_stored(meta, recorded)`` and ``on_released(series_ids)`` run on the receiver's thread: an owner on
    another loop hands them over (``call_soon_threadsafe``). ``admission()`` is asked before each C-STORE's
    dataset is taken: a reason (str) refuses it with 0xA700.
    """

    def __init__(self, config: DicomConfig, spool: Spool, journal: Journal, metrics: Metrics,
                 on_stored: OnStored, *, admission: Admission | None = None,
                 on_released: OnReleased | None = None) -> None:
        super().__init__(config)
        self._spool = spool
        self._journal = journal
        self._metrics = metrics
        self._on_stored = on_stored
        self._admission = admission
        self._on_released = on_released
        self._hosts = HostMatcher(config.calling_aet_hosts)
        self._classes = frozenset(config.sop_classes) if config.sop_classes else STORAGE_SOP_CLASSES
        self._syntaxes = tuple(str(ts) for ts in TRANSFER_SYNTAXES
                               if config.accept_deflate or ts != DeflatedExplicitVRLittleEndian)
        self._servers: list[asyncio.Server] = []
        self._committer = _Committer(spool, journal)
        self._conns: set[_Connection] = set()
        self._gate = ConnectionGate(config)
        self._accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._repeated = RepeatedLog(logger)  # a flood of refusals is not a flood of log lines
        self._spares: list[tuple[Path, int, int]] = []  # temp files created ahead, while the loop waits on fsyncs

    # -- lifecycle --

    async def _open(self) -> None:
        await self._hosts.refresh()
        await self._listen()
        self._accepting = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep()), loop.create_task(self._hosts.run_refresh())]

    async def _listen(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        listeners: list[tuple[int, Any]] = []
        if cfg.tls is None or not cfg.tls.only:
            listeners.append((cfg.port, None))
        if cfg.tls is not None:
            listeners.append((cfg.tls.port, self._tls_context()))
        for port, ctx in listeners:
            try:
                server = await loop.create_server(
                    lambda tls=ctx is not None: _Connection(self, tls), cfg.host, port, reuse_address=True,
                    backlog=_BACKLOG, ssl=ctx, ssl_handshake_timeout=cfg.acse_timeout_seconds if ctx else None)
            except OSError as exc:
                for s in self._servers:
                    s.close()
                raise cannot_listen(cfg.host, port, ctx is not None, exc) from exc
            self._servers.append(server)
            self._ports.append(int(server.sockets[0].getsockname()[1]))

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        assert tls is not None
        return tlsutil.server_context(tls.cert_file, tls.key_file, tls.ca_file, tls.require_client_cert)

    @property
    def accepting(self) -> bool:
        return self._loop is not None and self._accepting

    def active_associations(self) -> int:
        return self._gate.associations

    def _after_loop(self) -> None:
        self._committer.close()
        self._drop_spares()
        self._spool.close()
        self._servers = []

    async def _close(self, timeout_seconds: float) -> tuple[int, int]:
        self._accepting = False
        for server in self._servers:
            server.close()  # a new peer gets "connection refused" and tries later
        for task in self._tasks:
            task.cancel()
        for conn in [c for c in self._conns if c.state == _AWAIT_RQ]:
            conn.abort(0x00, "the receiver is stopping")
        running = [c for c in self._conns if c.state == _OPEN]
        deadline = time.monotonic() + timeout_seconds
        # Associations end on their peers' schedule: look every 20 ms.
        while any(c.state < _ENDING for c in running) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        left = [c for c in running if c.state < _ENDING]
        for conn in left:
            conn.abort(0x00, "the receiver is stopping")
        for conn in list(self._conns):
            conn.close_now()
        # Instances already being committed finish: their senders were not answered and will send again.
        await self._committer.idle()
        await asyncio.sleep(0)
        return len(running) - len(left), len(left)

    async def _sweep(self) -> None:
        """Time out connections that never associate (ARTIM) and associations that go silent."""
        cfg = self.config
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.state == _AWAIT_RQ and now - conn.opened > cfg.acse_timeout_seconds:
                    self._count_association("timed_out")
                    conn.abort(0x00, f"no A-ASSOCIATE-RQ within dicom.acse_timeout_seconds "
                                     f"({cfg.acse_timeout_seconds:g} s)")
                elif conn.state == _OPEN and conn.idle and now - conn.last_rx > cfg.network_timeout_seconds:
                    self._count_association("timed_out")
                    conn.abort(0x00, f"nothing received for dicom.network_timeout_seconds "
                                     f"({cfg.network_timeout_seconds:g} s)")

    # -- called by connections (on the receiver's loop) --

    def _admit_connection(self, conn: _Connection) -> str | None:
        if not self._accepting:
            return "the receiver is stopping"
        why = self._gate.admit(conn.peer)
        if why is None:
            self._conns.add(conn)
        return why

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self._gate.forget(conn.peer, conn.associated)

    def _associations_now(self) -> int:
        """Associations open now, counted against ``max_associations``."""
        return self._gate.associations

    def _check_association(self, conn: _Connection, calling: str) -> tuple[tuple[int, int, int], str, str] | None:
        cfg = self.config
        if not self._accepting:
            return _RJ_STOPPING, "rejected_busy", "the receiver is stopping"
        if cfg.allowed_calling_aets and calling not in cfg.allowed_calling_aets:
            return _RJ_CALLING_AET, "rejected_calling_aet", "calling AE not allowed"
        if not self._hosts.allows(calling, conn.peer):
            return _RJ_CALLING_AET, "rejected_host", "calling AE not allowed from this host"
        if self._associations_now() >= cfg.max_associations:
            return _RJ_BUSY, "rejected_busy", f"{cfg.max_associations} associations already active"
        return None

    def _associated(self, conn: _Connection) -> None:
        conn.associated = True
        self._gate.associated()
        self._count_association("accepted")

    def _choose_syntax(self, abstract: str, proposed: list[str]) -> str | int:
        """The transfer syntax to accept, or the result code of a refused context (0x03, 0x04)."""
        if abstract == VERIFICATION:
            ours: Iterable[str] = (str(ts) for ts in _ECHO_SYNTAXES)
        elif abstract in self._classes:
            ours = self._syntaxes
        else:
            return 0x03  # abstract syntax not supported
        offered = set(proposed)
        return next((ts for ts in ours if ts in offered), 0x04)  # 0x04: transfer syntaxes not supported

    def _begin_store(self, conn: _Connection, context_id: int, message_id: int, abstract: str, syntax: str,
                     cmd: dict[int, bytes]) -> _Store:
        sop_class, sop_instance = _cmd_uid(cmd, 0x0002), _cmd_uid(cmd, 0x1000)
        st = _Store(context_id, message_id, sop_class or abstract, sop_instance or "", syntax, conn.calling_aet,
                    conn.called_aet, self.config.max_dataset_bytes)
        if sop_class is None or sop_instance is None:
            st.refuse(_CANNOT_UNDERSTAND, "a C-STORE request without valid SOP Class and Instance UIDs")
            return st
        if sop_class != abstract:
            st.refuse(_CANNOT_UNDERSTAND, "a C-STORE request whose SOP class is not its presentation context's")
            return st
        if self._admission is not None:
            why = self._admission()
            if why is not None:
                st.refuse(status.BACKPRESSURE, why)
                return st
        free = self._spool.free_bytes()
        self._metrics.spool_free_bytes.set(free)
        if free < self._spool.min_free_bytes:
            st.refuse(status.SPOOL_FULL, f"spool free space below the {self._spool.min_free_bytes} byte watermark")
            return st
        try:
            st.path, st.fd, st.capacity = self._spares.pop() if self._spares else self._spool.open_incoming()
            header = file_meta(sop_class, sop_instance, syntax, conn.calling_aet, conn.called_aet)
            os.write(st.fd, header)
            st.meta_bytes = len(header)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            st.refuse(status.SPOOL_FULL if full else status.RECEIVE_FAILED,
                      f"cannot write to the spool ({os.strerror(exc.errno or 0)})")
            return st
        if syntax == DeflatedExplicitVRLittleEndian:
            st.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return st

    def _alone(self, conn: _Connection) -> bool:
        """``conn`` is the only connection and the committer has nothing in hand: committing an instance on
        the loop would keep no one else waiting (a new peer's connect waits for it, about a millisecond)."""
        return len(self._conns) == 1 and conn in self._conns and self._committer.idle_now()

    def _spare_incoming(self) -> None:
        if len(self._spares) >= _SPARE_FILES or not self._accepting:
            return
        with contextlib.suppress(OSError):  # none made: the next C-STORE makes its own, and says why it fails
            self._spares.append(self._spool.open_incoming())

    def _drop_spares(self) -> None:
        spares, self._spares = self._spares, []
        for path, fd, _ in spares:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()

    def _stored(self, store: _Store, result: _Result) -> None:
        assert result.meta is not None and result.recorded is not None
        self._metrics.received_bytes.inc(store.meta_bytes + store.size)
        receive_seconds = time.perf_counter() - store.started
        self._metrics.stage_seconds.labels(stage="receive").observe(receive_seconds)
        logger.debug("stored instance as %s (%d bytes)", result.recorded.spool_name, store.meta_bytes + store.size)
        if result.answer is status.STORED_DUPLICATE:
            return
        try:
            # The receive figure travels with the instance into its finding (timings.stage_seconds).
            self._on_stored(result.meta, replace(result.recorded, receive_seconds=receive_seconds))
        except Exception as exc:
            # The instance is durable and journalled; only the hand-over failed. A failure status makes the
            # sender retry, and the retry replaces this same row.
            logger.error("instance stored but not handed over (%s); answering 0x%04X", type(exc).__name__,
                         status.RECEIVE_FAILED.status)
            result.answer = status.RECEIVE_FAILED

    def _released(self, series: set[int]) -> None:
        if self._on_released is None:
            return
        try:
            self._on_released(frozenset(series))
        except Exception as exc:
            logger.error("handing over an association's release failed (%s)", type(exc).__name__)

    def _count_association(self, outcome: str) -> None:
        self._metrics.associations.labels(outcome=outcome).inc()

    def _count_instance(self, answer: status.Answer) -> None:
        self._metrics.instances.labels(outcome=answer.outcome).inc()
