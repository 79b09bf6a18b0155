"""The preprocessing worker pool: CPU work (decode, window, resize) off the event loop and off the GIL.

Worker processes, not threads, by default: pydicom is Python and holds the GIL, so in threads the
decoding of one study takes turns with the receiver's association threads. A process pool has two
failure modes that threads do not, and both are handled here:

- a worker that crashes (a decoder fault on a hostile file) breaks the whole pool
  (``BrokenProcessPool``): the pool is rebuilt, the call that killed its worker is found and fails
  alone, and the other calls that were in flight run again, all at once, on the new pool;
- a daemon killed with SIGKILL cannot tell its workers to stop, and they would live on as orphans
  (multiprocessing workers hold both ends of their call queue, so they never see EOF): each worker
  asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import secrets
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DecodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1

# A call that was in flight when this many pools broke runs alone even if no worker was seen dying with it:
# a crash outside the tracked part of a call (unpickling its arguments) leaves no trace in the call table,
# and without this bound such a call would break pool after pool.
MAX_POOL_BREAKS_PER_CALL = 2

# How long to wait, after a pool broke, for the kernel to report its dead worker as ended (normally at once).
VERDICT_WAIT_SECONDS = 2.0

_IDLE = 0  # the call id in the row of a worker that is running nothing; real call ids start at 1
_STARTING = -1  # ... and in the row of a worker still in its initializer (warming up)

# How long warm_up waits for every worker to have started (imported, warmed up) before it lets calls come.
WORKER_START_SECONDS = 60.0

# In a worker process: the pool's call table and this worker's row in it (see _CallTable).
_worker_table: Any = None
_worker_row = -1


# Work nobody waits on (a finding's overlay picture) runs on a thread of its own at this niceness, so that
# on a box with few cores it takes CPU from preprocessing and inference only when they leave some.
LOW_PRIORITY_NICENESS = 10
_low_priority: ThreadPoolExecutor | None = None
_low_priority_made = threading.Lock()  # with a thread pool, several workers may ask for it at once


def _lower_this_thread() -> None:
    # On Linux niceness belongs to a thread: only the low-priority thread is lowered, never the process.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + LOW_PRIORITY_NICENESS))


def at_low_priority(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on this process's low-priority thread (made on first use), waiting for its result.

    Picklable, for a worker pool: ``pool.run(at_low_priority, fn, ...)``. Where threads cannot be lowered,
    ``fn`` runs at normal priority all the same.
    """
    global _low_priority
    with _low_priority_made:
        if _low_priority is None:
            _low_priority = ThreadPoolExecutor(max_workers=1, thread_name_prefix="low-priority",
                                               initializer=_lower_this_thread)
        pool = _low_priority
    return pool.submit(fn, *args).result()


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: be killed when the daemon dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
    # SIGTERM/SIGINT are the daemon's to handle; a worker finishes its item and is stopped by the pool.
    # It also keeps a broken pool's other workers alive through the pool's SIGTERM (CPython 3.11), so that
    # _CallTable.culprits can tell them from the one that died before it kills them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_worker(parent_pid: int, table: Any, row: int | _RowTicket, warm: Callable[[], object] | None) -> None:
    """Worker initializer: die with the daemon, take this worker's row of the pool's call table, warm up."""
    global _worker_table, _worker_row
    _die_with_parent(parent_pid)
    # The daemon passes a _RowTicket, which arrives here as an int. A pool starts no more workers than its
    # size (no max_tasks_per_child), so rows do not run out; if they did, the worker would go untracked.
    if isinstance(row, int) and 2 * row + 1 < len(table):
        table[2 * row + 1] = _STARTING
        table[2 * row] = os.getpid()
        _worker_table, _worker_row = table, row
    if warm is not None:
        _run_warm_up(warm)
    if _worker_table is not None:
        _worker_table[2 * _worker_row + 1] = _IDLE


def _run_warm_up(warm: Callable[[], object]) -> None:
    """``warm()``, whose failure leaves the worker cold but working: an initializer that raised would break
    the pool for every call."""
    try:
        warm()
    except Exception as exc:  # any failure: the worker serves its calls cold
        logger.warning("a preprocessing worker's warm-up failed (%s); it starts cold", type(exc).__name__)


class _RowTicket:
    """In a pool's initargs, unpickles as a new row number in each worker: 0, 1, 2, ...

    The spawn context pickles a worker's arguments when it starts that worker, once per worker. A shared
    counter would need a lock, and a multiprocessing lock is a named semaphore that is unlinked when the
    daemon drops it, which a worker still starting up after ``shutdown(wait=False)`` then fails to open.
    """

    def __init__(self) -> None:
        self._rows = itertools.count()

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        return int, (next(self._rows),)


def _tracked(call_id: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker with ``call_id`` in this worker's row for as long as it runs."""
    table = _worker_table
    if table is None:
        return fn(*args)
    table[2 * _worker_row + 1] = call_id
    try:
        return fn(*args)
    finally:
        table[2 * _worker_row + 1] = _IDLE


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


def _open_worker(pid: int) -> int | None:
    """A pidfd for our worker ``pid``, or None if it has been reaped (the pid may since name another process)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # WNOWAIT: the pool reaps its own
    except ChildProcessError:  # not our child: our worker was reaped and its pid reused
        os.close(fd)
        return None
    return fd


def _has_ended(fd: int) -> bool:
    try:
        return os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # the pool has reaped it since the pidfd was opened
        return True


def _ended_rows(rows: Iterable[int], fds: dict[int, int]) -> set[int]:
    """Those of ``rows`` whose worker has ended (no pidfd: it was reaped already)."""
    return {row for row in rows if row not in fds or _has_ended(fds[row])}


@dataclass(slots=True, eq=False)
class _CallTable:
    """Which call each worker of one process pool is running, in memory the workers share with the daemon.

    Two int64 per worker: its pid, and the id of the call it is running (``_IDLE`` between calls). Each
    worker writes only its own row (see _RowTicket) and the daemon only reads, so no lock guards the table.
    """

    rows: Any

    def workers(self) -> list[tuple[int, int]]:
        """(row, pid) of every worker started so far."""
        return [(row, int(self.rows[2 * row])) for row in range(len(self.rows) // 2) if self.rows[2 * row]]

    def running(self, row: int) -> int:
        return int(self.rows[2 * row + 1])

    def started(self) -> int:
        """How many workers have left their initializer (and are serving calls)."""
        return sum(1 for row, _ in self.workers() if self.running(row) != _STARTING)

    def culprits(self) -> frozenset[int]:
        """After the pool broke: the calls whose worker died while running them. Then stops the other workers.

        Blocks (run it in a thread) until a busy worker has ended, at most VERDICT_WAIT_SECONDS: the pool
        notices a death when the worker's pipes close, a moment before the kernel reports it as ended. A
        worker that ended with its row still naming a call died inside that call; a worker still alive, or
        whose row moved on, was running an innocent call (CPython 3.11 only sends it SIGTERM, which workers
        ignore). A crash outside any call (while unpickling one) finds no culprit here, and
        MAX_POOL_BREAKS_PER_CALL bounds what follows. A worker that ended while still in its initializer
        (warming up) adds ``_STARTING`` to the set.

        The survivors are then killed: their calls have already failed with the pool, and left alone they
        would run calls still queued in the broken pool, then block forever handing back a result larger
        than a pipe's buffer that nobody reads (with the pool's manager thread waiting on them).
        """
        if sys.platform != "linux":
            return frozenset()  # no pidfds: no culprit is named, and MAX_POOL_BREAKS_PER_CALL isolates
        # Rows naming a call, and those of workers still in their initializer (_STARTING), running no call.
        busy = {row: call for row in range(len(self.rows) // 2) if (call := self.running(row)) != _IDLE}
        fds = {row: fd for row, pid in self.workers() if (fd := _open_worker(pid)) is not None}
        try:
            if busy and not _ended_rows(busy, fds):
                # A pidfd reads ready when its process has ended.
                select.select([fds[row] for row in busy], [], [], VERDICT_WAIT_SECONDS)
            dead = _ended_rows(busy, fds)
            found = frozenset(call for row, call in busy.items() if row in dead and self.running(row) == call)
            for fd in fds.values():
                if not _has_ended(fd):
                    with contextlib.suppress(ProcessLookupError):  # it ended since
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
            return found
        finally:
            for fd in fds.values():
                os.close(fd)


@dataclass(slots=True, eq=False)
class _Pool:
    executor: Executor
    calls: _CallTable | None  # None for a thread pool, which cannot break
    # Set when the pool broke: the calls whose worker died running them (one verdict, awaited by every call).
    verdict: asyncio.Future[frozenset[int]] | None = None


class WorkerPool:
    """Runs CPU-bound functions in worker processes (or threads), rebuilding the pool if a worker dies."""

    def __init__(self, workers: int, processes: bool = True, on_crash: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.processes = processes
        self._on_crash = on_crash
        self._warm_work: Callable[[], object] | None = None  # run by each worker as it starts (warm_up)
        self._called = False  # whether run() has been called: the pool's workers may have started
        self._pool = self._make(workers)
        self._quarantine = asyncio.Lock()
        self._call_ids = itertools.count(_IDLE + 1)
        # For logs and tests: calls run again on the shared pool after it broke under them, and calls run
        # again alone because their worker died while running them (or their pools kept breaking).
        self.retried_calls = 0
        self.isolated_runs = 0

    def _make(self, workers: int, warm: bool = True) -> _Pool:
        if not self.processes:
            return _Pool(ThreadPoolExecutor(workers, thread_name_prefix="preprocess"), None)
        # spawn: forking this process (threads, sockets, an ONNX Runtime session) would copy state that is
        # not safe to copy; forkserver on CPython 3.11 leaves server and workers holding each other's pipes.
        ctx = multiprocessing.get_context("spawn")
        # Shared memory must reach a spawned worker at its start (initargs), not with each call.
        calls = _CallTable(ctx.RawArray(ctypes.c_int64, 2 * workers))
        executor = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker,
            initargs=(os.getpid(), calls.rows, _RowTicket(), self._warm_work if warm else None),
        )
        return _Pool(executor, calls)

    async def warm_up(self, work: Callable[[], object] | None = None) -> None:
        """Start every worker now rather than on the first study, each running ``work`` (picklable) first.

        ``work`` runs in every worker of the pool as it starts, so also in the workers of a pool rebuilt
        after a crash (not in the lone worker that runs a suspect call again); with a thread pool, once. If
        it raises, the worker logs it and serves its calls all the same. Called after the pool has run calls,
        it leaves the running workers as they are, and only pools made from then on warm up.
        """
        loop = asyncio.get_running_loop()
        if work is not None:
            self._warm_work = work
            if self.processes and not self._called:
                # A pool starts its workers on its first calls, and this one has had none: made again now, its
                # workers get ``work`` in their initializer.
                unused, self._pool = self._pool, self._make(self.workers)
                unused.executor.shutdown(wait=False)
            elif not self.processes:
                await loop.run_in_executor(self._pool.executor, _run_warm_up, work)
        # As many calls as workers start every worker (a pool starts one for a call that finds none idle), but
        # a worker that started first may run them all while the others still import and warm up: wait for
        # every worker to have started, through the call table, where each says when it has. If the pool broke
        # under these calls (a warm-up that kills its worker), start the pool that replaced it.
        deadline = loop.time() + WORKER_START_SECONDS
        for _ in range(MAX_POOL_BREAKS_PER_CALL + 1):
            pool = self._pool
            await asyncio.gather(*(self.run(_warm) for _ in range(self.workers)))
            if pool is not self._pool:
                continue
            while pool is self._pool and pool.calls is not None and pool.calls.started() < self.workers:
                if loop.time() > deadline:
                    logger.warning("preprocessing workers still starting after %.0f s; going on",
                                   WORKER_START_SECONDS)
                    return
                await asyncio.sleep(0.01)
            return

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker.

        When a worker dies, every call in flight on that pool fails with BrokenProcessPool. The pool is
        rebuilt, and the call table says which call each worker was running: the call whose worker died
        under it runs again alone, in a single-worker pool of its own, where killing its worker again makes
        it fail with DecodeError. Every other call (queued, or running in a worker that lived) runs again on
        the rebuilt pool straight away, alongside the others.
        """
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        self._called = True
        breaks = 0
        if any(isinstance(a, SentOnce) for a in args):
            fn, args = _with_values, (fn, *args)
        while True:
            pool = self._pool
            try:
                if pool.calls is None:
                    return await loop.run_in_executor(pool.executor, fn, *args)
                return await loop.run_in_executor(pool.executor, _tracked, call_id, fn, *args)
            except BrokenProcessPool:
                breaks += 1
                culprits = await self._after_break(pool)
                if call_id in culprits:
                    logger.warning("preprocessing call %d was running in the worker that died", call_id)
                    return await self._run_alone(call_id, fn, *args)
                if breaks >= MAX_POOL_BREAKS_PER_CALL:
                    logger.warning("preprocessing call %d was in flight when %d pools broke", call_id, breaks)
                    return await self._run_alone(call_id, fn, *args)
                self.retried_calls += 1

    async def _after_break(self, broken: _Pool) -> frozenset[int]:
        """Replace the broken pool (once: the first of its failed calls to get here does it); its culprits."""
        if broken.verdict is None:
            logger.error("a preprocessing worker died; starting a new pool of %d workers", self.workers)
            broken.executor.shutdown(wait=False, cancel_futures=True)
            self._pool = self._make(self.workers)
            if self._on_crash is not None:
                self._on_crash()
            assert broken.calls is not None  # only process pools break
            # An executor future, not a task of this call: a cancelled caller must not take the verdict with it.
            broken.verdict = asyncio.get_running_loop().run_in_executor(None, broken.calls.culprits)
        culprits = await asyncio.shield(broken.verdict)
        if _STARTING in culprits and self._warm_work is not None:
            # The warm-up kills its worker (the OOM killer, a fault): every pool would break as it starts. The
            # pool made above still warms up (and breaks once more if calls reach it); the ones after it do not.
            logger.warning("a preprocessing worker died while warming up; workers start cold from now on")
            self._warm_work = None
        return culprits

    async def _run_alone(self, call_id: int, fn: Callable[..., T], *args: Any) -> T:
        """Run a suspected call alone: if its worker dies again it was the cause, and fails with DecodeError.

        It runs again rather than failing at once because a worker can also die of something outside the
        call (the kernel's OOM killer, an operator's kill); then the call succeeds here.
        """
        loop = asyncio.get_running_loop()
        async with self._quarantine:
            self.isolated_runs += 1
            logger.info("running preprocessing call %d again, alone", call_id)
            alone = self._make(1, warm=False)
            try:
                return await loop.run_in_executor(alone.executor, fn, *args)
            except BrokenProcessPool:
                if self._on_crash is not None:
                    self._on_crash()  # a second real crash, of the single worker
                raise DecodeError("a preprocessing worker died while decoding this instance") from None
            finally:
                alone.executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._pool.executor.shutdown(wait=False, cancel_futures=True)
