"""Receiver processes: the Storage SCP of scp.py run in ``dicom.receiver_processes`` processes of its own.

Why: with CT routed and several associations at once, the daemon's process is held to one core, its threads
taking turns under one interpreter lock, and most of its work per instance is the receiver's (its loop,
placing files, recording them). A receiver process takes that work with its own interpreter.

How. The daemon's process listens and accepts: the limits on connections (per host, and those waiting to
associate) stay in one place and exact. It hands each accepted socket to the ready receiver process with the
fewest connections, over a Unix socket (SCM_RIGHTS), and the process serves it with ``scp.Receiver``:
negotiation, datasets streamed into the spool, made durable, recorded in the journal (its own connection to
the same SQLite database) and answered. What the daemon needs to know comes back on a pipe, in one batch per
turn of the process's loop: each stored instance's record (for the pipeline), each released association's
series, the connections' ends, the receiver's metrics and its log records (logged again by the daemon, so
they keep its format). The association cap holds across processes through a shared array in which each
process keeps its own count (two processes that accept at the same moment may pass it by one each); the
back-pressure gate goes the other way, sent to every process when the pipeline's reason changes (each may
accept a few instances more than a receiver in the daemon's process would, while the change is on its way).

A receiver process answers Success once the instance is durable and recorded, as the receiver in the daemon's
process does; its record reaches the pipeline just after (it cannot make the answer a failure, as a failed
hand-over in the daemon's process does: a hand-over that fails is logged, and the journalled instance is taken
up by the pipeline's resume at the next start).

Not ``SO_REUSEPORT`` (one listening socket per process): the kernel would spread connections by a hash of
their addresses, the per-host and pending limits would hold per process only, and the connections waiting on
a process that dies would be reset.

A receiver process that dies (a crash, the OOM killer) loses nothing it acknowledged: its associations are
reset, their unanswered instances are sent again by their senders, and a file it had placed but not recorded
is an orphan that the next start removes. The daemon starts a new one (after 0.5 s, doubling up to 30 s while
they keep dying) and meanwhile hands connections to the others, or refuses them when none is ready. Each
process is killed by the kernel when the daemon dies (``PR_SET_PDEATHSIG``), and stops when its control
socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from edge_agent.children import die_with_parent
from edge_agent.config import DicomConfig
from edge_agent.dicom.header import InstanceMeta
from edge_agent.dicom.incoming import describe
from edge_agent.dicom.scp import (
    _BACKLOG,
    Admission,
    ConnectionGate,
    OnReleased,
    OnStored,
    Receiver,
    ServedOnALoop,
    _Connection,
    cannot_listen,
)
from edge_agent.dicom.spool import Spool
from edge_agent.errors import EdgeAgentError
from edge_agent.journal import Journal
from edge_agent.logs import RepeatedLog, child_logging
from edge_agent.metrics import Metrics
from edge_agent.records import Recorded

logger = logging.getLogger(__name__)

_CONTROL_BYTES = 4096  # a control message (a connection's token, a gate's reason, stop) is far smaller
_START_SECONDS = 60.0  # a receiver process imports, opens the journal and says it is ready within this
_RESTART_SECONDS, _RESTART_MAX_SECONDS = 0.5, 30.0
_STEADY_SECONDS = 30.0  # a process that lived this long was not crash-looping: the next restart waits 0.5 s
_ADMISSION_SECONDS = 0.05  # the gate is also looked at this often (it reopens as inference catches up)
_ACCEPT_BATCH = 64
# The metrics a receiver process may move in the daemon's registry (what scp.Receiver counts).
_METRICS = frozenset({"received_bytes", "stage_seconds", "spool_free_bytes", "associations", "instances"})
_METHODS = frozenset({"inc", "observe", "set"})


# -- in the daemon's process ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Child:
    index: int
    process: Any = None  # multiprocessing's Process
    control: socket.socket | None = None
    events: Any = None  # the read end of its pipe
    ready: bool = False
    handed: int = 0  # since the daemon started, by this process and those it replaced
    started_at: float = 0.0
    restart_seconds: float = _RESTART_SECONDS
    started: asyncio.Future[None] | None = None
    stopped: asyncio.Future[tuple[int, int]] | None = None
    tokens: set[int] = field(default_factory=set)  # the connections it has open now


@dataclass(eq=False)
class _Handed:
    """A connection handed to a receiver process."""

    child: _Child
    peer: str
    associated: bool = False


class ReceiverProcesses(ServedOnALoop):
    """``scp.Receiver``'s interface (start, stop, port, accepting, active_associations), served by processes.

    ``on_stored`` and ``on_released`` run on this object's own thread, as the receiver's do on its.
    """

    _THREAD = "dicom-accept"

    def __init__(self, config: DicomConfig, spool: Spool, journal: Journal, metrics: Metrics,
                 on_stored: OnStored, *, admission: Admission | None = None,
                 on_released: OnReleased | None = None) -> None:
        super().__init__(config)
        self._spool = spool
        self._journal_path = journal.path
        self._metrics = metrics
        self._on_stored = on_stored
        self._admission = admission
        self._on_released = on_released
        self._count = config.receiver_processes
        self._ctx = multiprocessing.get_context("spawn")
        self._associations = self._ctx.RawArray("i", self._count)
        self._children = [_Child(i) for i in range(self._count)]
        self._gate = ConnectionGate(config)
        self._tokens: dict[int, _Handed] = {}
        self._next_token = itertools.count(1)
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._accepting = False
        self._closing = False
        self._reason: str | None = None  # the gate's reason as last sent to the processes
        self._tasks: list[asyncio.Task[None]] = []
        self._repeated = RepeatedLog(logger)
        spool.share_free_files()
        journal.share_with_processes()

    # -- lifecycle --

    def _how_served(self) -> str:
        return f", in {self._count} receiver processes"

    async def _open(self) -> None:
        cfg = self.config
        wanted: list[tuple[int, bool]] = []
        if cfg.tls is None or not cfg.tls.only:
            wanted.append((cfg.port, False))
        if cfg.tls is not None:
            wanted.append((cfg.tls.port, True))
        for port, tls in wanted:
            try:
                sock = _listen(cfg.host, port)
            except OSError as exc:
                raise cannot_listen(cfg.host, port, tls, exc) from exc
            self._listeners.append((sock, tls))
            self._ports.append(int(sock.getsockname()[1]))
        for child in self._children:
            self._spawn(child)
        starting = [c.started for c in self._children if c.started is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*starting), _START_SECONDS)
        except TimeoutError:
            raise EdgeAgentError(f"a DICOM receiver process did not start within {_START_SECONDS:g} s") from None
        loop = asyncio.get_running_loop()
        self._accepting = True
        for sock, tls in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock, tls)
        self._tasks = [loop.create_task(self._watch_admission())]

    @property
    def accepting(self) -> bool:
        return self._loop is not None and self._accepting and any(c.ready for c in self._children)

    def active_associations(self) -> int:
        return sum(self._associations)

    def pids(self) -> list[int]:
        """The receiver processes' pids (those running now)."""
        return [c.process.pid for c in self._children if c.process is not None and c.process.is_alive()]

    def connections_handed(self) -> list[int]:
        """How many connections each receiver process (by index) has been handed since the start."""
        return [c.handed for c in self._children]

    async def _close(self, timeout_seconds: float) -> tuple[int, int]:
        self._accepting = False
        self._closing = True
        loop = asyncio.get_running_loop()
        for task in self._tasks:
            task.cancel()
        for sock, _ in self._listeners:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()  # a new peer gets "connection refused" and tries later
        self._listeners = []
        waiting = []
        for child in self._children:
            if child.process is not None and child.stopped is not None and self._send(child, ("stop", timeout_seconds)):
                waiting.append(child.stopped)
        finished = aborted = 0
        if waiting:
            done, _ = await asyncio.wait(waiting, timeout=timeout_seconds + _START_SECONDS / 6)
            for fut in done:
                if not fut.cancelled() and fut.exception() is None:
                    f, a = fut.result()
                    finished, aborted = finished + f, aborted + a
        for child in self._children:
            await self._reap(child, 5.0)
        return finished, aborted

    def _after_loop(self) -> None:
        self._spool.close()

    # -- the processes --

    def _spawn(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        events_in, events_out = self._ctx.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        process = self._ctx.Process(
            target=_receiver_main, name=f"edge-agent-receiver-{child.index}", daemon=True,
            args=(child.index, self._count, self.config, self._spool.root, self._spool.min_free_bytes,
                  self._journal_path, theirs, events_out, self._associations, os.getpid(), level))
        try:
            process.start()
        finally:
            theirs.close()
            events_out.close()
        ours.setblocking(False)
        child.process, child.control, child.events = process, ours, events_in
        child.ready, child.started_at = False, time.monotonic()
        child.started, child.stopped = loop.create_future(), loop.create_future()
        self._associations[child.index] = 0
        loop.add_reader(events_in.fileno(), self._read_events, child)

    def _read_events(self, child: _Child) -> None:
        try:
            items = pickle.loads(child.events.recv_bytes())
        except (EOFError, OSError):
            self._lost(child)
            return
        except Exception as exc:  # a message that does not unpickle: the process is not one of ours any more
            logger.error("DICOM receiver process %d sent what cannot be read (%s)", child.index, type(exc).__name__)
            self._kill(child)
            self._lost(child)
            return
        for item in items:
            try:
                self._on_event(child, item)
            except Exception as exc:
                logger.error("handling a DICOM receiver process's %s failed (%s)", item[0], type(exc).__name__)
        self._check_admission()

    def _on_event(self, child: _Child, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "stored":
            meta, recorded = cast(InstanceMeta, item[1]), cast(Recorded, item[2])
            self._on_stored(meta, recorded)
        elif kind == "released":
            if self._on_released is not None:
                self._on_released(item[1])
        elif kind == "associated":
            handed = self._tokens.get(item[1])
            if handed is not None and not handed.associated:
                handed.associated = True
                self._gate.associated()
        elif kind == "closed":
            handed = self._tokens.pop(item[1], None)
            if handed is not None:
                handed.child.tokens.discard(item[1])
                self._gate.forget(handed.peer, handed.associated)
        elif kind == "metric":
            _, name, labels, method, value = item
            if name in _METRICS and method in _METHODS:
                metric = getattr(self._metrics, name)
                getattr(metric.labels(**labels) if labels else metric, method)(value)
        elif kind == "log":
            _, level, name, message = item
            logging.getLogger(name).log(level, "%s", message)
        elif kind == "ready":
            child.ready = True
            self._send(child, ("admission", self._reason))
            if child.started is not None and not child.started.done():
                child.started.set_result(None)
        elif kind == "failed":
            if child.started is not None and not child.started.done():
                child.started.set_exception(EdgeAgentError(f"a DICOM receiver process could not start: {item[1]}"))
            else:
                logger.error("a DICOM receiver process could not start: %s", item[1])
        elif kind == "stopped" and child.stopped is not None and not child.stopped.done():
            child.stopped.set_result((item[1], item[2]))

    def _lost(self, child: _Child) -> None:
        """The process's pipe closed: it exited (or is about to). Forget its connections; start a new one."""
        loop = asyncio.get_running_loop()
        was_ready = child.ready
        child.ready = False
        for token in child.tokens:
            handed = self._tokens.pop(token)
            self._gate.forget(handed.peer, handed.associated)
        child.tokens.clear()
        self._associations[child.index] = 0
        if child.stopped is not None and not child.stopped.done():
            child.stopped.set_result((0, 0))
        if child.started is not None and not child.started.done():
            child.started.set_exception(EdgeAgentError("a DICOM receiver process exited while starting"))
            if not self._accepting:
                self._detach(child)
                return  # the daemon's start fails with it
        if self._closing:
            self._detach(child)
            return
        process = child.process
        if process is not None:
            process.join(1.0)
        code = process.exitcode if process is not None else None
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if time.monotonic() - child.started_at > _STEADY_SECONDS:
            child.restart_seconds = _RESTART_SECONDS
        wait = child.restart_seconds
        child.restart_seconds = min(wait * 2, _RESTART_MAX_SECONDS)
        logger.error("DICOM receiver process %d ended (%s)%s; a new one starts in %.1f s", child.index, how,
                     "; its associations were reset and their senders will send again" if was_ready else "", wait)
        self._detach(child)
        child.process = None
        loop.call_later(wait, self._respawn, child)

    def _respawn(self, child: _Child) -> None:
        if self._closing or child.process is not None:
            return
        try:
            self._spawn(child)
        except Exception as exc:
            logger.error("cannot start a DICOM receiver process (%s)", type(exc).__name__)
            asyncio.get_running_loop().call_later(child.restart_seconds, self._respawn, child)

    async def _reap(self, child: _Child, timeout_seconds: float) -> None:
        process = child.process
        if process is not None:
            await asyncio.to_thread(process.join, timeout_seconds)
            if process.is_alive():
                logger.warning("DICOM receiver process %d did not stop; killing it", child.index)
                self._kill(child)
                await asyncio.to_thread(process.join, 5.0)
        self._detach(child)

    @staticmethod
    def _kill(child: _Child) -> None:
        if child.process is not None and child.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signal.SIGKILL)

    @staticmethod
    def _detach(child: _Child) -> None:
        """Stop reading the process's pipe and close both its channels."""
        if child.events is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(child.events.fileno())
        for channel in (child.control, child.events):
            if channel is not None:
                with contextlib.suppress(OSError):
                    channel.close()
        child.control = child.events = None
        child.ready = False

    def _send(self, child: _Child, message: tuple[Any, ...], fd: int | None = None) -> bool:
        if child.control is None:
            return False
        data = pickle.dumps(message)
        try:
            if fd is None:
                child.control.send(data)
            else:
                socket.send_fds(child.control, [data], [fd])
        except OSError:  # gone (its pipe's end says so too), or too busy to take more now
            return False
        return True

    # -- connections --

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: said, and tried again on the next wake-up
                self._repeated.warning("accept", "cannot accept a DICOM connection (%s)", exc.strerror or exc)
                return
            try:
                self._hand_over(sock, str(address[0]) if address else "?", tls)
            finally:
                sock.close()  # the process has its own copy now (or the connection was refused)

    def _hand_over(self, sock: socket.socket, peer: str, tls: bool) -> None:
        why = "the receiver is stopping" if not self._accepting else self._gate.admit(peer)
        if why is None:
            ready = sorted((c for c in self._children if c.ready), key=lambda c: len(c.tokens))
            for child in ready:
                token = next(self._next_token)
                self._tokens[token] = _Handed(child, peer)
                if self._send(child, ("conn", token, tls), sock.fileno()):
                    child.tokens.add(token)
                    child.handed += 1
                    return
                del self._tokens[token]
            self._gate.forget(peer, False)
            why = "no DICOM receiver process is ready"
        self._metrics.associations.labels(outcome="refused_connection").inc()
        self._repeated.warning("connection", "connection refused: %s", why)
        with contextlib.suppress(OSError):  # a reset, as the receiver's own refusal is
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    # -- back-pressure --

    def _check_admission(self) -> None:
        if self._admission is None:
            return
        reason = self._admission()
        if reason != self._reason:
            self._reason = reason
            for child in self._children:
                if child.ready:
                    self._send(child, ("admission", reason))

    async def _watch_admission(self) -> None:
        while True:
            await asyncio.sleep(_ADMISSION_SECONDS)
            self._check_admission()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (the first address the host name gives)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# -- in a receiver process -----------------------------------------------------------------------------------


class _Events:
    """What a receiver process tells the daemon, sent in one batch per turn of its loop (and at the end)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._lock = threading.Lock()
        self._items: list[tuple[Any, ...]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = False
        self.broken = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, *item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._due or self._loop is None:
                return
            self._due = True
        with contextlib.suppress(RuntimeError):  # the loop has closed: the last flush sends it
            self._loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self._lock:
            items, self._items, self._due = self._items, [], False
            if not items or self.broken:
                return
            try:
                self._pipe.send_bytes(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:
                self.broken = True  # the daemon is gone; the control socket says so to the main thread

    def send_now(self, *item: Any) -> None:
        self.post(*item)
        self.flush()


class _RemoteMetric:
    def __init__(self, events: _Events, name: str, labels: dict[str, str] | None = None) -> None:
        self._events, self._name, self._labels = events, name, labels

    def labels(self, **labels: str) -> _RemoteMetric:
        return _RemoteMetric(self._events, self._name, labels)

    def inc(self, amount: float = 1.0) -> None:
        self._events.post("metric", self._name, self._labels, "inc", amount)

    def observe(self, value: float) -> None:
        self._events.post("metric", self._name, self._labels, "observe", value)

    def set(self, value: float) -> None:
        self._events.post("metric", self._name, self._labels, "set", value)


class _RemoteMetrics:
    """The receiver's metrics, moved in the daemon's registry."""

    def __init__(self, events: _Events) -> None:
        self._events = events

    def __getattr__(self, name: str) -> _RemoteMetric:
        if name not in _METRICS:
            raise AttributeError(name)
        return _RemoteMetric(self._events, name)


class _ForwardLogs(logging.Handler):
    def __init__(self, events: _Events) -> None:
        super().__init__()
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._events.post("log", record.levelno, record.name, record.getMessage())
        except Exception:
            self.handleError(record)


class _ProcessReceiver(Receiver):
    """``scp.Receiver`` in a receiver process: handed its connections, counting its associations in the array
    the processes share, and telling the daemon of each connection's end."""

    _announce = False

    def __init__(self, config: DicomConfig, spool: Spool, journal: Journal, events: _Events, index: int,
                 associations: Any, admission: Admission) -> None:
        super().__init__(config, spool, journal, cast(Metrics, _RemoteMetrics(events)),
                         lambda meta, recorded: events.post("stored", meta, recorded), admission=admission,
                         on_released=lambda series: events.post("released", series))
        self._events = events
        self._index = index
        self._shared = associations
        self._tls: ssl.SSLContext | None = None

    async def _listen(self) -> None:
        if self.config.tls is not None:
            self._tls = self._tls_context()

    def adopt(self, sock: socket.socket, tls: bool, token: int) -> None:
        """From another thread: serve ``sock``, a connection the daemon accepted."""
        loop = self._loop
        if loop is None or loop.is_closed():
            sock.close()
            self._events.post("closed", token, False)
            return
        asyncio.run_coroutine_threadsafe(self._adopt(sock, tls, token), loop)

    async def _adopt(self, sock: socket.socket, tls: bool, token: int) -> None:
        loop = asyncio.get_running_loop()

        def connection() -> _Connection:
            conn = _Connection(self, tls)
            conn.token = token
            return conn

        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(
                connection, sock, ssl=self._tls if tls else None,
                ssl_handshake_timeout=self.config.acse_timeout_seconds if tls else None)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            # Never became a connection here (a TLS handshake that failed or timed out, a peer gone already).
            self._repeated.warning("handshake", "DICOM TLS connection closed before it began (%s)",
                                   type(exc).__name__)
            sock.close()
            self._events.post("closed", token, False)

    def _associations_now(self) -> int:
        return sum(self._shared)

    def _associated(self, conn: _Connection) -> None:
        super()._associated(conn)
        self._shared[self._index] = self._gate.associations
        self._events.post("associated", conn.token)

    def _forget(self, conn: _Connection) -> None:
        super()._forget(conn)
        self._shared[self._index] = self._gate.associations
        self._events.post("closed", conn.token, conn.associated)


def _receiver_main(index: int, count: int, config: DicomConfig, spool_root: Path, min_free_bytes: int,
                   journal_path: Path, control: socket.socket, pipe: Any, associations: Any, parent_pid: int,
                   log_level: int) -> None:
    """A receiver process: serve the connections the control socket brings until it says stop, or closes."""
    die_with_parent(parent_pid)
    events = _Events(pipe)
    child_logging(_ForwardLogs(events), log_level)
    gate: list[str | None] = [None]
    try:
        spool = Spool(spool_root, min_free_bytes, taker=(index, count))
        journal = Journal(journal_path)
        journal.share_with_processes()
        receiver = _ProcessReceiver(config, spool, journal, events, index, associations, lambda: gate[0])
        receiver.start()
    except Exception as exc:
        events.send_now("failed", describe(exc))
        return
    assert receiver._loop is not None
    events.attach(receiver._loop)
    events.send_now("ready")
    timeout = 0.0
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, _CONTROL_BYTES, 1)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break  # the daemon is gone, or done with us
        message = pickle.loads(data)
        if message[0] == "conn" and fds:
            receiver.adopt(socket.socket(fileno=fds[0]), message[2], message[1])
        elif message[0] == "admission":
            gate[0] = message[1]
        elif message[0] == "stop":
            timeout = float(message[1])
            break
        for fd in fds[1:] if message[0] == "conn" else fds:
            os.close(fd)  # not asked for
    finished, aborted = receiver.stop(timeout)
    events.flush()
    events.send_now("stopped", finished, aborted)
    journal.close()

