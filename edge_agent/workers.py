"""The preprocessing worker pool: CPU work (decode, window, resize) off the event loop and off the GIL.

Worker processes, not threads, by default: pydicom is Python and holds the GIL, so in threads the
decoding of one study takes turns with the receiver for it. Each worker has two pipes of its own, one
for its calls and one for its results, and the event loop drives both: it writes a call straight to an
idle worker's pipe and reads the result as the worker's pipe becomes readable. No thread stands between
them (``concurrent.futures.ProcessPoolExecutor`` has two, a call queue's feeder and a manager, and each
call crossed both on its way out and the manager on its way back).

A worker runs one call at a time, and the pool knows which: so a process pool's two failure modes are
handled without guessing.

- A worker that dies (a decoder fault on a hostile file, the OOM killer) fails nothing else: the pool
  starts a new worker in its place, and the call it was running runs again alone, in a worker of its
  own; if that one dies too, the call fails with DecodeError. A worker that dies while it warms up
  turns the warm-up off for the workers after it.
- A daemon killed with SIGKILL cannot tell its workers to stop: each worker asks the kernel for SIGKILL
  when its parent dies (``PR_SET_PDEATHSIG``), and one whose call pipe closes (the pool shut down)
  returns.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import hashlib
import itertools
import logging
import mmap
import multiprocessing
import multiprocessing.util
import os
import pickle
import secrets
import signal
import struct
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent.children import die_with_parent
from edge_agent.errors import DecodeError
from edge_agent.logs import child_logging

logger = logging.getLogger(__name__)

T = TypeVar("T")


# How long warm_up waits for every worker to have started (imported, warmed up) before it lets calls come.
WORKER_START_SECONDS = 60.0

# A worker that dies before it has started (a broken install, memory too short to import) is started again
# after a pause that doubles each time, up to this; calls wait for it meanwhile.
WORKER_RESTART_MAX_SECONDS = 30.0

# Work nobody waits on (a finding's overlay picture) runs on a thread of its own at this niceness, so that
# on a box with few cores it takes CPU from preprocessing and inference only when they leave some.
LOW_PRIORITY_NICENESS = 10
_low_priority: ThreadPoolExecutor | None = None
_low_priority_made = threading.Lock()  # with a thread pool, several workers may ask for it at once


def lower_this_thread(by: int = LOW_PRIORITY_NICENESS) -> None:
    """Raise the calling thread's niceness by ``by`` (up to 19); threads it starts later inherit it.

    On Linux niceness belongs to a thread: only this thread is lowered, never the process. Where it cannot be
    lowered (another system, a seccomp profile), it runs as it was.
    """
    if by <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + by))


def _below_the_main_thread() -> None:
    """Lower the calling thread to LOW_PRIORITY_NICENESS below this process's main thread, whichever thread started
    it (one of a thread pool's, itself lowered by inference_niceness, would otherwise pass its own on)."""
    with contextlib.suppress(OSError, AttributeError):
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + LOW_PRIORITY_NICENESS)
        lower_this_thread(target - os.getpriority(os.PRIO_PROCESS, 0))


def at_low_priority(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on this process's low-priority thread (made on first use), waiting for its result.

    Picklable, for a worker pool: ``pool.run(at_low_priority, fn, ...)``. Where threads cannot be lowered,
    ``fn`` runs at normal priority all the same.
    """
    global _low_priority
    with _low_priority_made:
        if _low_priority is None:
            _low_priority = ThreadPoolExecutor(max_workers=1, thread_name_prefix="low-priority",
                                               initializer=_below_the_main_thread)
        pool = _low_priority
    return pool.submit(fn, *args).result()


# A frame on a worker's pipes: its length (8 bytes, little-endian), then a pickle. A worker's first frame
# says it has started (its pid); after that each frame is the result of the call it was last sent.
_FRAME = struct.Struct("<Q")
_READ_BYTES = 1 << 20


def _read_exactly(fd: int, n: int) -> bytes | None:
    """``n`` bytes from the blocking ``fd``, or None at its end."""
    parts: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, _READ_BYTES))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _write_frame(fd: int, payload: bytes) -> None:
    """One frame to the blocking ``fd``."""
    header = _FRAME.pack(len(payload))
    sent = os.writev(fd, [header, payload])
    left = memoryview(payload)[max(0, sent - len(header)):]
    if sent < len(header):  # a signal cut the write short before the payload; rare enough to send it whole again
        os.write(fd, header[sent:])
    while left:
        left = left[os.write(fd, left):]


def _reply(ok: bool, value: object) -> bytes:
    try:
        return pickle.dumps((ok, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # a result or an error that does not pickle: say so instead
        what = "result" if ok else f"error ({type(value).__name__})"
        error = RuntimeError(f"a preprocessing worker's {what} could not be sent back: {type(exc).__name__}")
        return pickle.dumps((False, error), protocol=pickle.HIGHEST_PROTOCOL)


def lower_this_process(by: int) -> None:
    """Raise the niceness of every thread of this process by ``by`` (up to 19): those started while it was made
    (a BLAS library's pool, started as numpy was imported to read the call's arguments) as well as the main one,
    from which later threads inherit it."""
    if by <= 0:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread alone
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError, AttributeError):  # ended meanwhile, or may not be lowered
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))


def _worker_main(calls: Any, results: Any, parent_pid: int, warm: Callable[[], object] | None,
                 niceness: int = 0) -> None:
    """A worker process: die with the daemon, lower itself by ``niceness``, warm up, say so, then run the calls its
    pipe brings, one at a time, until the pipe closes."""
    die_with_parent(parent_pid)
    # Warnings and errors to stderr (the daemon's journal), with what pydicom says withheld: it quotes UIDs.
    child_logging(logging.StreamHandler(sys.stderr), logging.WARNING)
    lower_this_process(niceness)
    _warm()  # before the worker says it has started: its first call does not wait for pydicom and OpenCV to load
    if warm is not None:
        _run_warm_up(warm)
    calls_fd, results_fd = calls.fileno(), results.fileno()
    _write_frame(results_fd, pickle.dumps(os.getpid()))
    while True:
        header = _read_exactly(calls_fd, _FRAME.size)
        payload = None if header is None else _read_exactly(calls_fd, _FRAME.unpack(header)[0])
        if payload is None:
            return  # the pool has shut down
        try:
            fn, args = pickle.loads(payload)
            reply = _reply(True, fn(*args))
        except Exception as exc:
            reply = _reply(False, exc)
        _write_frame(results_fd, reply)


def _run_warm_up(warm: Callable[[], object]) -> None:
    """``warm()``, whose failure leaves the worker cold but working: a worker that failed to start would serve
    nothing."""
    try:
        warm()
    except Exception as exc:  # any failure: the worker serves its calls cold
        logger.warning("a preprocessing worker's warm-up failed (%s); it starts cold", type(exc).__name__)


class SentOnce(Generic[T]):
    """An argument that calls on a pool pass again and again (a model card): pickled once here, and unpickled
    once per worker process, where it is kept (``value`` there is the same object call after call).

    Passed as itself, a model card costs every call about 80 us to pickle in the daemon and 90 us to
    unpickle in the worker; this way a call carries its 3 KB of bytes and a key. ``WorkerPool.run`` hands
    the function ``value``, in a thread pool as in a process pool.
    """

    def __init__(self, value: T) -> None:
        self.value = value
        self._blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._key = hashlib.blake2b(self._blob, digest_size=16).digest()

    def __reduce__(self) -> tuple[Callable[[bytes, bytes], SentOnce[Any]], tuple[bytes, bytes]]:
        return _received_once, (self._key, self._blob)


# In a worker process: what SentOnce arguments have brought, by key. A handful of models at most; cleared
# if it ever grows past that (a card that changed while the daemon ran), never unbounded.
_received: dict[bytes, SentOnce[Any]] = {}
_RECEIVED_MAX = 64


def _received_once(key: bytes, blob: bytes) -> SentOnce[Any]:
    got = _received.get(key)
    if got is None:
        if len(_received) >= _RECEIVED_MAX:
            _received.clear()
        got = SentOnce.__new__(SentOnce)
        got.value, got._blob, got._key = pickle.loads(blob), blob, key
        _received[key] = got
    return got


def _with_values(fn: Callable[..., T], *args: Any) -> T:
    """``fn`` called with each SentOnce argument's value in its place."""
    return fn(*(a.value if isinstance(a, SentOnce) else a for a in args))


class Arena:
    """Slots of memory shared with the worker processes, each the size of one model input, for preprocessing
    results to come back without a trip through the pool's pipe.

    A CT slice's input (256x256 float32, 256 KiB) sent back as itself is pickled, written through a pipe in
    64 KiB turns, read and unpickled: four copies and a few context switches. Written into a slot, it is one
    copy, and the daemon reads it in place. The memory is a memfd: nothing in /dev/shm to outlive a killed
    daemon. A worker maps it through ``/proc/<daemon>/fd``, once per worker process. The pipeline takes a
    slot for each instance it decodes and gives it back once the instance's batch was run (``take``,
    ``give_back``); with no slot free, or for a second frame, results come back through the pipe as before.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._size = slots * slot_bytes
        self._fd = os.memfd_create("edge-agent-inputs", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, self._size)
            self._map = mmap.mmap(self._fd, self._size)
        except OSError:
            os.close(self._fd)
            raise
        self._free = list(range(slots - 1, -1, -1))
        self._owner = os.getpid()
        # Tells this arena from an earlier one that had the same fd number (a worker keeps its maps).
        self._token = secrets.token_bytes(8)

    def take(self) -> Slot | None:
        """A free slot, or None when every one is in use."""
        if not self._free:
            return None
        return Slot(self._owner, self._fd, self._token, self._size, self._free.pop() * self.slot_bytes,
                    self.slot_bytes)

    def give_back(self, slot: Slot) -> None:
        self._free.append(slot.offset // self.slot_bytes)

    def read(self, slot: Slot, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        """The float32 array of ``shape`` that a worker wrote into ``slot``, in place (valid until given back)."""
        return np.ndarray(shape, np.float32, buffer=self._map, offset=slot.offset)

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Unmap and close (again: nothing)."""
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):  # an array still reads it: the map goes with the last of them
            self._map.close()
        fd, self._fd = self._fd, -1
        os.close(fd)


@dataclass(frozen=True)
class Slot:
    """One slot of an Arena, as a worker is told of it (picklable)."""

    owner: int  # the daemon's pid
    fd: int
    token: bytes
    size: int
    offset: int
    length: int

    def write(self, array: npt.NDArray[np.float32]) -> bool:
        """In a worker: copy ``array`` into the slot. False, with nothing written, if it is not float32, does not
        fit, or the arena cannot be mapped here (the daemon's fds out of reach): it then goes back by the pipe."""
        if array.dtype != np.float32 or array.nbytes > self.length:
            return False
        try:
            mapped = _mapped(self.owner, self.fd, self.token, self.size)
        except (OSError, ValueError):
            return False
        np.copyto(np.ndarray(array.shape, np.float32, buffer=mapped, offset=self.offset), array)
        return True


# In a worker process: the daemon's arenas, mapped. One per model; cleared if it ever grows past that.
_maps: dict[tuple[int, int, bytes, int], mmap.mmap] = {}
_MAPS_MAX = 16


def _mapped(owner: int, fd: int, token: bytes, size: int) -> mmap.mmap:
    key = (owner, fd, token, size)
    found = _maps.get(key)
    if found is None:
        if len(_maps) >= _MAPS_MAX:
            _maps.clear()
        own = os.open(f"/proc/{owner}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            found = _maps[key] = mmap.mmap(own, size)
        finally:
            os.close(own)
    return found


def _warm() -> int:
    import edge_agent.inference.preprocess  # noqa: F401  (importing pydicom, numpy and OpenCV is the warm-up)

    return os.getpid()


@dataclass(slots=True, eq=False)
class _Call:
    id: int
    payload: bytes  # pickled (fn, args)
    future: asyncio.Future[Any]


class _Worker:
    """One worker process and the loop's ends of its two pipes (non-blocking)."""

    def __init__(self, warm: Callable[[], object] | None, lone: bool, niceness: int = 0) -> None:
        ctx = multiprocessing.get_context("spawn")
        # spawn: forking this process (threads, sockets, an ONNX Runtime session) would copy state that is not
        # safe to copy. The pipes reach the worker as its arguments; the worker's ends are closed here after.
        calls_in, calls_out = ctx.Pipe(duplex=False)
        results_in, results_out = ctx.Pipe(duplex=False)
        try:
            self.process = ctx.Process(target=_worker_main, name="edge-agent-preprocess",
                                       args=(calls_in, results_out, os.getpid(), warm, niceness))
            self.process.start()
        except BaseException:
            calls_out.close()
            results_in.close()
            raise
        finally:
            calls_in.close()
            results_out.close()
        _started_workers.add(self.process)
        self._calls, self._results = calls_out, results_in
        self.calls_fd, self.results_fd = calls_out.fileno(), results_in.fileno()
        os.set_blocking(self.calls_fd, False)
        os.set_blocking(self.results_fd, False)
        self.warm = warm is not None
        self.lone = lone  # runs one suspect call, then goes
        self.pid: int | None = None  # set when the worker says it has started
        self.call: _Call | None = None  # the call it was sent and has not answered
        self.inbox = bytearray()
        self.outbox: memoryview | None = None  # what is left to write of a call too large for the pipe at once
        self.retired = False  # its call pipe is closed: it ends, and nobody needs to be told

    def close_calls(self) -> None:
        """Close the call pipe: the worker reads its end and returns (closing it again does nothing)."""
        self._calls.close()

    def close_pipes(self) -> None:
        self.close_calls()
        self._results.close()


# Every worker process started and not yet seen ended: stopped at exit (before multiprocessing's own exit
# handler, which waits for every child and would wait forever for one that is busy, or idle and holding its
# pipe open).
_started_workers: weakref.WeakSet[multiprocessing.process.BaseProcess] = weakref.WeakSet()


def _stop_workers_at_exit() -> None:
    for process in list(_started_workers):
        with contextlib.suppress(Exception):  # already ended and reaped, or never fully started
            process.kill()
            process.join(5)


# multiprocessing.util registers its exit handler as it is imported (above); exit handlers run last first.
atexit.register(_stop_workers_at_exit)


class WorkerPool:
    """Runs CPU-bound functions in worker processes (or threads), starting a new worker for one that dies."""

    def __init__(self, workers: int, processes: bool = True, on_crash: Callable[[], None] | None = None,
                 niceness: int = 0) -> None:
        """``niceness``: how much lower than the daemon its workers (processes or threads) run."""
        self.workers = workers
        self.processes = processes
        self.niceness = niceness
        self._on_crash = on_crash
        self._warm_work: Callable[[], object] | None = None  # run by each worker as it starts (warm_up)
        self._threads = None if processes else ThreadPoolExecutor(
            workers, thread_name_prefix="preprocess", initializer=lower_this_thread, initargs=(niceness,))
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that drives the workers' pipes
        self._workers: list[_Worker] = []  # the pool's workers, started or starting (not the lone ones)
        self._idle: list[_Worker] = []  # started, running nothing
        self._queue: collections.deque[_Call] = collections.deque()  # routine calls waiting for a worker
        self._urgent: collections.deque[_Call] = collections.deque()  # urgent ones: dispatched first
        # A thread pool's calls wait here for a thread (the executor's own queue knows no urgency).
        self._thread_busy = 0
        self._thread_waiting: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(), collections.deque())  # urgent, routine
        self._lone: set[_Worker] = set()
        self._isolating: set[asyncio.Task[None]] = set()
        self._quarantine = asyncio.Lock()
        self._call_ids = itertools.count(1)
        self._start_failures = 0  # workers in a row that died before they had started (cold)
        self._restart: asyncio.TimerHandle | None = None
        self._restart_why = ""
        self._closed = False
        # For logs and tests: calls run again alone because their worker died while running them.
        self.isolated_runs = 0

    # -- calls -----------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """``fn(*args)`` in a worker; an ``urgent`` call goes ahead of every routine one still waiting for a worker
        (a chest radiograph's decoding behind a CT series' slices), after the urgent ones before it.

        If the worker dies while it runs the call, the call runs again alone, in a worker started for it
        alone, where a second death makes it fail with DecodeError: a worker can also die of something outside
        the call (the kernel's OOM killer, an operator's kill), and then the call succeeds there. No other call
        is disturbed: a new worker takes the dead one's place.
        """
        if any(isinstance(a, SentOnce) for a in args):
            fn, args = _with_values, (fn, *args)
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the worker pool has been shut down")
        if self._threads is not None:
            await self._thread_turn(loop, urgent)
            try:
                running = self._threads.submit(fn, *args)  # RuntimeError once the pool has shut down meanwhile
            except BaseException:
                self._thread_done()
                raise
            # The turn is held while the thread runs the call, also when the caller stops waiting for it.
            running.add_done_callback(lambda _: self._thread_ended(loop))
            return await asyncio.wrap_future(running, loop=loop)
        payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        self._start_all(loop)
        call = _Call(next(self._call_ids), payload, loop.create_future())
        (self._urgent if urgent else self._queue).append(call)
        self._dispatch()
        # Cancelled here, the call's future is cancelled with it: a queued call is then skipped, and the result
        # of a running one is dropped when it comes.
        result: T = await call.future
        return result

    async def warm_up(self, work: Callable[[], object] | None = None) -> None:
        """Start every worker now rather than on the first study, each running ``work`` (picklable) first.

        ``work`` runs in every worker as it starts, so also in one started in place of a worker that died (not
        in the lone worker that runs a suspect call again); with a thread pool, once. If it raises, the worker
        logs it and serves its calls all the same. Called after the pool has started its workers, it leaves
        them as they are, and only workers started from then on warm up. Returns once every worker has started.
        """
        loop = asyncio.get_running_loop()
        if work is not None:
            self._warm_work = work
        if self._threads is not None:
            if work is not None:
                await loop.run_in_executor(self._threads, _run_warm_up, work)
            return
        self._start_all(loop)
        deadline = loop.time() + WORKER_START_SECONDS
        while sum(1 for w in self._workers if w.pid is not None) < self.workers and not self._closed:
            if loop.time() > deadline:
                logger.warning("preprocessing workers still starting after %.0f s; going on", WORKER_START_SECONDS)
                return
            await asyncio.sleep(0.01)

    def pids(self) -> list[int]:
        """The process ids of the pool's workers, started or starting (none for a thread pool)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def shutdown(self) -> None:
        """Stop the workers: an idle one ends at once (its call pipe closes), a busy or starting one is killed
        (what it would say goes nowhere); calls waiting or running are cancelled."""
        self._closed = True
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            for turns in self._thread_waiting:  # calls waiting for a thread's turn
                while turns:
                    turns.popleft().cancel()
            return
        if self._restart is not None:
            self._restart.cancel()
        for calls in (self._urgent, self._queue):
            while calls:
                calls.popleft().future.cancel()
        for w in [*self._workers, *self._lone]:
            if w.call is not None or w.pid is None:
                with contextlib.suppress(OSError, ValueError):  # ended already
                    w.process.kill()
            self._retire(w)
            self._forget(w)  # multiprocessing reaps it (at its next start, or at exit)
        for task in self._isolating:
            task.cancel()

    # -- the loop's side of the pipes -----------------------------------------------------------

    def _start_all(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
        while len(self._workers) < self.workers and self._restart is None and not self._closed:
            if self._start(lone=False) is None:
                break

    def _start(self, lone: bool) -> _Worker | None:
        """A new worker, its pipes watched by the loop; None (and a retry later) if the system refuses one."""
        assert self._loop is not None
        try:
            w = _Worker(None if lone else self._warm_work, lone, self.niceness)
        except OSError as exc:
            if lone:
                raise
            self._restart_later(f"could not start a preprocessing worker ({type(exc).__name__}: {exc})")
            return None
        self._loop.add_reader(w.results_fd, self._readable, w)
        self._loop.add_reader(w.process.sentinel, self._ended, w)
        (self._lone.add if lone else self._workers.append)(w)
        return w

    @property
    def problem(self) -> str | None:
        """Why no call can run: no worker is up and the next start waits after failed ones (a broken install, no
        memory); None otherwise. Calls wait meanwhile, and run once a worker starts."""
        if self._closed or self._restart is None or any(w.pid is not None for w in self._workers):
            return None
        return f"no preprocessing worker is running: {self._restart_why}"

    def _restart_later(self, why: str) -> None:
        assert self._loop is not None
        self._restart_why = why
        self._start_failures += 1
        delay = min(WORKER_RESTART_MAX_SECONDS, 0.5 * 2 ** (self._start_failures - 1))
        logger.error("%s; starting another in %.1f s", why, delay)
        if self._restart is None:
            self._restart = self._loop.call_later(delay, self._restarted)

    def _restarted(self) -> None:
        self._restart = None
        assert self._loop is not None
        self._start_all(self._loop)

    def _dispatch(self) -> None:
        while (self._urgent or self._queue) and self._idle:
            call = (self._urgent or self._queue).popleft()
            if not call.future.done():  # cancelled while it waited
                self._send(self._idle.pop(), call)

    async def _thread_turn(self, loop: asyncio.AbstractEventLoop, urgent: bool) -> None:
        """Wait until one of the pool's threads is free for this call (urgent calls first)."""
        if self._thread_busy < self.workers and not any(self._thread_waiting):
            self._thread_busy += 1
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._thread_waiting[0 if urgent else 1].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given the turn just before the cancel: pass it on
                self._thread_done()
            raise

    def _thread_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the thread that ran a call (or cancelled it before it ran): hand its turn on, on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for a turn any more
            loop.call_soon_threadsafe(self._thread_done)

    def _thread_done(self) -> None:
        """A thread call has ended: give its thread to the next call waiting, urgent ones first."""
        self._thread_busy -= 1
        for waiting in self._thread_waiting:
            while waiting:
                turn = waiting.popleft()
                if not turn.done():  # else cancelled while it waited
                    self._thread_busy += 1
                    turn.set_result(None)
                    return

    def _send(self, w: _Worker, call: _Call) -> None:
        w.call = call
        data = _FRAME.pack(len(call.payload)) + call.payload
        try:
            sent = os.write(w.calls_fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the worker has ended: its sentinel says so, and its call runs again alone
        if sent < len(data):
            assert self._loop is not None
            w.outbox = memoryview(data)[sent:]
            self._loop.add_writer(w.calls_fd, self._writable, w)

    def _writable(self, w: _Worker) -> None:
        assert self._loop is not None and w.outbox is not None
        try:
            w.outbox = w.outbox[os.write(w.calls_fd, w.outbox):]
        except BlockingIOError:
            return
        except OSError:
            w.outbox = memoryview(b"")
        if not w.outbox:
            w.outbox = None
            self._loop.remove_writer(w.calls_fd)

    def _readable(self, w: _Worker) -> None:
        while True:
            try:
                chunk = os.read(w.results_fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:  # the worker has ended, or is ending: its sentinel will say so
                assert self._loop is not None
                self._loop.remove_reader(w.results_fd)
                break
            w.inbox += chunk
            if len(chunk) < _READ_BYTES:
                break
        while len(w.inbox) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(w.inbox)
            if len(w.inbox) < _FRAME.size + size:
                break
            frame = bytes(w.inbox[_FRAME.size:_FRAME.size + size])
            del w.inbox[:_FRAME.size + size]
            self._frame(w, frame)

    def _frame(self, w: _Worker, frame: bytes) -> None:
        if w.pid is None:
            w.pid = pickle.loads(frame)
            if not w.lone:
                self._start_failures = 0
                self._idle.append(w)
                self._dispatch()
            return
        call, w.call = w.call, None
        if call is not None and not call.future.done():  # else cancelled meanwhile: the result goes nowhere
            try:
                ok, value = pickle.loads(frame)
            except Exception as exc:  # an error type that does not unpickle here
                ok, value = False, RuntimeError(f"a preprocessing worker's reply could not be read: "
                                                f"{type(exc).__name__}")
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        if not w.lone and not w.retired:
            self._idle.append(w)
            self._dispatch()

    def _ended(self, w: _Worker) -> None:
        """The worker's process has ended: take in what it wrote last, then replace it or rerun its call."""
        assert self._loop is not None
        if not w.retired:
            self._readable(w)  # its last result may be waiting in the pipe
        self._forget(w)
        _started_workers.discard(w.process)
        # The sentinel reads ready as the process closes its files, a moment before the kernel can report it
        # as ended: the wait is that moment.
        w.process.join(1.0)
        if w.process.exitcode is None:  # cannot be: a process that closed its files is exiting
            w.process.kill()
            w.process.join()
        code = w.process.exitcode
        w.process.close()
        if w.retired:
            return
        if self._on_crash is not None:
            self._on_crash()
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        call = w.call
        if w.lone:
            if call is not None and not call.future.done():
                call.future.set_exception(DecodeError("a preprocessing worker died while decoding this instance"))
            return
        if w.pid is None and w.warm:
            if self._warm_work is not None:
                # The warm-up kills its worker (the OOM killer, a fault): every worker would die as it starts.
                logger.warning("a preprocessing worker died while warming up; workers start cold from now on")
                self._warm_work = None
            self._start_all(self._loop)
        elif w.pid is None:
            self._restart_later(f"a preprocessing worker died before it started ({how})")
        else:
            logger.error("a preprocessing worker died (%s); starting another", how)
            self._start_all(self._loop)
        if call is not None and not call.future.done():
            logger.warning("preprocessing call %d was running in the worker that died", call.id)
            task = self._loop.create_task(self._run_alone(call))
            self._isolating.add(task)
            task.add_done_callback(self._isolating.discard)

    def _forget(self, w: _Worker) -> None:
        """Stop watching the worker's pipes, close them, and drop it from the pool (its process is left to end)."""
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.remove_reader(w.results_fd)
            self._loop.remove_reader(w.process.sentinel)
            if not w.retired:  # (a retired worker's call pipe is closed: its number may be another file's now)
                self._loop.remove_writer(w.calls_fd)
        if w in self._idle:
            self._idle.remove(w)
        if w in self._workers:
            self._workers.remove(w)
        self._lone.discard(w)
        w.close_pipes()

    def _retire(self, w: _Worker) -> None:
        """Close the worker's call pipe, which ends it after its call; its call (if any) is cancelled."""
        if w.retired:
            return
        w.retired = True
        if w.call is not None:
            w.call.future.cancel()
            w.call = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_writer(w.calls_fd)
        w.close_calls()  # its sentinel says when it has ended
        if w in self._idle:
            self._idle.remove(w)

    async def _run_alone(self, call: _Call) -> None:
        """Run the call whose worker died again, alone, and settle its future with what that gives."""
        async with self._quarantine:
            if call.future.done() or self._closed:
                return
            self.isolated_runs += 1
            logger.info("running preprocessing call %d again, alone", call.id)
            assert self._loop is not None
            alone = _Call(call.id, call.payload, self._loop.create_future())
            try:
                w = self._start(lone=True)
            except OSError as exc:
                call.future.set_exception(exc)
                return
            assert w is not None
            self._send(w, alone)
            try:
                value = await alone.future
            except asyncio.CancelledError:
                call.future.cancel()
                raise
            except Exception as exc:  # the call's own error, or DecodeError when the lone worker died too
                if not call.future.done():
                    call.future.set_exception(exc)
            else:
                if not call.future.done():
                    call.future.set_result(value)
            finally:
                if w in self._lone and not w.retired:  # still running (it has not died): it ends now
                    self._retire(w)

