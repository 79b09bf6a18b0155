"""The DICOM receiver: a Storage SCP on asyncio that streams each dataset straight into the spool.

One event loop, in its own thread, serves every connection (``asyncio.Protocol``): no thread per
association and no polling. The DICOM Upper Layer is parsed incrementally as bytes arrive (PS3.8):
association requests are read and answered straight from bytes (acse.py), C-STORE/C-ECHO command
sets are small and parsed here, and P-DATA fragments of a dataset are written to a temp file in the
spool as they come, so memory per association is bounded by what one ``recv`` returns, whatever a
peer declares.

Durability: a Success is answered only once the instance is durable (incoming.py, ``Committer``); the
next instance's temp file is made while this one is flushed. The bytes of the Upper Layer and DIMSE are
built and parsed by pure functions (dimse.py).

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
import functools
import logging
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import replace
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
from edge_agent.dicom import acse, status
from edge_agent.dicom.dimse import (
    ABORT_INVALID,
    ABORT_UNEXPECTED,
    ABORT_UNRECOGNISED,
    APPLICATION_CONTEXT,
    CMD_CANCEL_RQ,
    CMD_ECHO_RQ,
    CMD_STORE_RQ,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    NO_DATASET,
    RELEASE_RP,
    RJ_BUSY,
    RJ_CALLING_AET,
    RJ_NO_REASON,
    RJ_STOPPING,
    RJ_VERSION,
    VERIFICATION,
    ProtocolError,
    abort_pdu,
    cmd_int,
    cmd_uid,
    file_meta,
    parse_command,
    reject_pdu,
    response,
)
from edge_agent.dicom.header import InstanceMeta
from edge_agent.dicom.hosts import HostMatcher
from edge_agent.dicom.incoming import CANNOT_UNDERSTAND, Committer, Incoming, Result, describe
from edge_agent.dicom.spool import Spool
from edge_agent.errors import EdgeAgentError
from edge_agent.journal import Journal, Recorded
from edge_agent.logs import RepeatedLog
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

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



# An A-ASSOCIATE-RQ with 128 contexts of 10 long syntaxes is ~90 KB.
_MAX_ASSOCIATE_RQ = 256 * 1024
_MAX_COMMAND_BYTES = 64 * 1024
# A P-DATA PDU may carry a few bytes of item headers beyond the announced maximum (PS3.8 D.1 counts the
# PDVs only in some readings); tolerate that much, no more.
_PDU_SLACK = 64
# Temp files created ahead of the C-STOREs that will use them.
_SPARE_FILES = 2
_SWEEP_SECONDS = 0.5

OnStored = Callable[[InstanceMeta, Recorded], None]
Admission = Callable[[], "str | None"]
OnReleased = Callable[[frozenset[int]], None]



# -- one connection ------------------------------------------------------------------------------------

_AWAIT_RQ, _OPEN, _ENDING, _CLOSED = range(4)
# After A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the requestor closes the connection (PS3.8 Sta13); if it does
# not within this long (the ARTIM timer), we do.
_LINGER_SECONDS = 2.0
_PDU_HEADER, _PDU_BODY, _PDV_HEADER, _COMMAND, _DATA = range(5)


class _Connection(asyncio.Protocol):
    """One TCP connection: the Upper Layer state machine, fed incrementally (see the module docstring)."""

    def __init__(self, server: Receiver, tls: bool, upgrade: ssl.SSLContext | None = None) -> None:
        self._server = server
        self.tls = tls
        # On the TLS port of a receiver that listens itself: TLS is started once the connection is admitted, so
        # that a connection is counted against the caps from its accept, not only after its handshake.
        self._upgrade = upgrade
        self._handshake: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = _AWAIT_RQ
        now = time.monotonic()
        self.opened = self.last_rx = now
        self._mode, self._need, self._buf = _PDU_HEADER, 6, bytearray()
        self._pdu_type = self._pdu_left = self._pdv_left = self._pdv_ctx = self._pdv_ctrl = 0
        self._command = bytearray()
        self._contexts: dict[int, tuple[str, str]] = {}
        self._store: Incoming | None = None
        self._busy: asyncio.Future[Result] | None = None
        self._backlog = bytearray()
        # The peer is not reading our answers as fast as we write them (asyncio's pause_writing): we read
        # nothing more from it, so that it cannot make us hold its unread answers without end.
        self._unread = False
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
        elif self._upgrade is not None:
            transport.pause_reading()  # the ClientHello waits in the socket for the TLS layer
            self._handshake = asyncio.get_running_loop().create_task(self._start_tls(transport, self._upgrade))

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """The TLS handshake of an admitted connection, within dicom.acse_timeout_seconds; then it is served."""
        try:
            transport = await asyncio.get_running_loop().start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=self._server.config.acse_timeout_seconds)
        except (OSError, ValueError, asyncio.CancelledError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            self._handshake = None
            if not isinstance(exc, asyncio.CancelledError):
                self._server._repeated.warning("handshake", "DICOM TLS connection closed before it began (%s)",
                                               type(exc).__name__)
            raw.abort()
            self.state = _CLOSED
            self._server._forget(self)
            return
        self._handshake = None
        if transport is None or self.state >= _ENDING:
            raw.abort()
            return
        self._transport = transport
        if self._backlog:
            # What came with the end of the handshake (an A-ASSOCIATE-RQ, often), held until there was a TLS
            # transport to answer on.
            data, self._backlog = bytes(self._backlog), bytearray()
            self._feed(data)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self._busy is not None or self._unread or self._handshake is not None:
            self._backlog += data
            return
        self._feed(data)

    def pause_writing(self) -> None:
        # Our answers are piling up unread (above the transport's high-water mark, 64 KiB): stop reading, and so
        # stop answering. A peer that never reads again goes silent to us and is aborted at
        # dicom.network_timeout_seconds; its unread answers are then dropped with the connection (close_now).
        self._unread = True
        self._pause()

    def resume_writing(self) -> None:
        self._unread = False
        if self._busy is None:
            self._resume()

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
            logger.error("DICOM receive failed (%s); aborting the association", describe(exc))
            self.abort(ABORT_INVALID, "internal error")

    def _parse(self, mv: memoryview) -> None:
        pos, end = 0, len(mv)
        while pos < end:
            if self.state >= _ENDING:
                return
            if self._busy is not None or self._unread:
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
                raise ProtocolError("the first PDU is not an A-ASSOCIATE-RQ", ABORT_UNEXPECTED)
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
            raise ProtocolError("an association PDU inside an association", ABORT_UNEXPECTED)
        else:
            raise ProtocolError("an unknown PDU type", ABORT_UNRECOGNISED)

    def _on_pdu(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == 0x01:
            self._on_associate_rq(body)
        elif pdu_type == 0x05:
            if self._store is not None:
                raise ProtocolError("A-RELEASE-RQ in the middle of a dataset", ABORT_UNEXPECTED)
            self.released = True
            self._write(RELEASE_RP)
            self._close()
            if self.series:
                self._server._released(self.series)
            self._server._count_association("released")
        elif pdu_type == 0x07:
            logger.info("association aborted by the peer")
            if self.state == _OPEN:
                self._server._count_association("aborted")
            self._close()
        else:
            raise ProtocolError("an unexpected PDU", ABORT_UNEXPECTED)

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
            self._reject(RJ_NO_REASON, "rejected_malformed")
            return
        if not (rq.protocol_version & 0x01):
            self._reject(RJ_VERSION, "rejected_malformed")
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
        self._write(reject_pdu(*reason))
        self._close()

    # -- DIMSE --

    def _on_command(self, context_id: int, cmd: dict[int, bytes]) -> None:
        field_ = cmd_int(cmd, 0x0100)
        message_id = cmd_int(cmd, 0x0110)
        has_dataset = cmd_int(cmd, 0x0800) != NO_DATASET
        abstract, syntax = self._contexts[context_id]
        if field_ is None or message_id is None:
            raise ProtocolError("a command set without Command Field or Message ID")
        if field_ == CMD_ECHO_RQ and not has_dataset:
            self._write(response(context_id, 0x8030, message_id, status.SUCCESS, VERIFICATION, None))
        elif field_ == CMD_STORE_RQ and has_dataset:
            self._store = self._server._begin_store(self, context_id, message_id, abstract, syntax, cmd)
        elif field_ == CMD_STORE_RQ:
            raise ProtocolError("a C-STORE request that says it has no dataset")
        elif field_ == CMD_CANCEL_RQ:
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
            store.refuse(CANNOT_UNDERSTAND, "the Deflated dataset ends inside its deflate stream")
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
                lambda fut: self._finish(store, Result(status.RECEIVE_FAILED) if fut.cancelled() else fut.result()))
            self._pause()
        # The next instance's temp file: made while this one is flushed, or while the sender reads the answer.
        server._spare_incoming()

    def _finish(self, store: Incoming, result: Result) -> None:
        try:
            if result.recorded is not None and result.meta is not None:
                if result.answer is not status.STORED_DUPLICATE:
                    self.series.add(result.recorded.series_id)
                self._server._stored(store, result)
            self._answer(store, result.answer)
        finally:
            self._busy = None
            self._resume()

    def _answer(self, store: Incoming, answer: status.Answer) -> None:
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
        if self.state >= _ENDING or self._unread or self._transport is None or self._transport.is_closing():
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
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # A close waits for what is written to be read, and a peer that does not read would hold its slot
            # (and that memory) for as long as it keeps the connection: dropped instead.
            transport.abort()
        elif not transport.is_closing():
            transport.close()

    @property
    def idle(self) -> bool:
        return self._busy is None

    def abort(self, reason: int, why: str) -> None:
        """A-ABORT (service-provider) and close. ``why`` names the protocol fault, never peer data."""
        if self.state >= _ENDING:
            return
        if self._handshake is not None:  # no TLS yet to say it in: the connection is dropped
            logger.warning("connection closed during its TLS handshake: %s", why)
            self._handshake.cancel()
            return
        if self.state == _OPEN:
            self._server._count_association("aborted")
        logger.warning("association aborted: %s", why)
        self._write(abort_pdu(0x02, reason))
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
                logger.info("DICOM receiver stopped; of the associations open at the stop, %d finished and %d "
                            "were aborted", finished, aborted)
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
        self._committer = Committer(spool, journal)
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
                # TLS is started by each connection once admitted (_Connection._start_tls), not by the server.
                server = await loop.create_server(functools.partial(_Connection, self, ctx is not None, ctx),
                                                  cfg.host, port, reuse_address=True, backlog=_BACKLOG)
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
            return RJ_STOPPING, "rejected_busy", "the receiver is stopping"
        if cfg.allowed_calling_aets and calling not in cfg.allowed_calling_aets:
            return RJ_CALLING_AET, "rejected_calling_aet", "calling AE not allowed"
        if not self._hosts.allows(calling, conn.peer):
            return RJ_CALLING_AET, "rejected_host", "calling AE not allowed from this host"
        if self._associations_now() >= cfg.max_associations:
            return RJ_BUSY, "rejected_busy", f"{cfg.max_associations} associations already active"
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
                     cmd: dict[int, bytes]) -> Incoming:
        sop_class, sop_instance = cmd_uid(cmd, 0x0002), cmd_uid(cmd, 0x1000)
        st = Incoming(context_id, message_id, sop_class or abstract, sop_instance or "", syntax, conn.calling_aet,
                    conn.called_aet, self.config.max_dataset_bytes)
        if sop_class is None or sop_instance is None:
            st.refuse(CANNOT_UNDERSTAND, "a C-STORE request without valid SOP Class and Instance UIDs")
            return st
        if sop_class != abstract:
            st.refuse(CANNOT_UNDERSTAND, "a C-STORE request whose SOP class is not its presentation context's")
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

    def _stored(self, store: Incoming, result: Result) -> None:
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
