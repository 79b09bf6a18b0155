"""The preprocessing worker pool: CPU work (decode, window, resize) off the event loop and off the GIL.

Worker processes, not threads, by default: pydicom is Python and holds the GIL, so in threads the
decoding of one study takes turns with the receiver's association threads. A process pool has two
failure modes that threads do not, and both are handled here:

- a worker that crashes (a decoder fault on a hostile file) breaks the whole pool
  (``BrokenProcessPool``): the pool is rebuilt and only that instance fails;
- a daemon killed with SIGKILL cannot tell its workers to stop, and they would live on as orphans
  (multiprocessing workers hold both ends of their call queue, so they never see EOF): each worker
  asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from edge_agent.errors import DecodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: be killed when the daemon dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
    # SIGTERM/SIGINT are the daemon's to handle; a worker finishes its item and is stopped by the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _warm() -> int:
    import edge_agent.dicom.pixels  # noqa: F401  (importing pydicom and numpy is the warm-up)

    return os.getpid()


class WorkerPool:
    """Runs CPU-bound functions in worker processes (or threads), rebuilding the pool if a worker dies."""

    def __init__(self, workers: int, processes: bool = True, on_crash: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.processes = processes
        self._on_crash = on_crash
        self._executor = self._make()
        self._quarantine = asyncio.Lock()

    def _make(self) -> Executor:
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="preprocess")
        # spawn: forking this process (threads, sockets, an ONNX Runtime session) would copy state that is
        # not safe to copy; forkserver on CPython 3.11 leaves server and workers holding each other's pipes.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        )

    async def warm_up(self) -> None:
        """Start every worker now rather than on the first study."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, _warm) for _ in range(self.workers)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker.

        When a worker dies, every call in flight on that pool fails with BrokenProcessPool. The pool is
        rebuilt, and each of those calls is tried again alone, one at a time, in a single-worker pool of
        its own: the instance that kills its worker there is the culprit and fails with DecodeError; the
        others that only shared the pool with it succeed.
        """
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            return await loop.run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            if self._executor is executor:
                logger.error("a preprocessing worker died; starting a new pool of %d workers", self.workers)
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._make()
                if self._on_crash is not None:
                    self._on_crash()
        async with self._quarantine:
            alone = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            try:
                return await loop.run_in_executor(alone, fn, *args)
            except BrokenProcessPool:
                if self._on_crash is not None:
                    self._on_crash()
                raise DecodeError("a preprocessing worker died while decoding this instance") from None
            finally:
                alone.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
