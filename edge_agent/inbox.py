"""Calls that other threads hand to the event loop, run there in the order they came, with one wake-up for however
many arrive together.

The receiver tells the pipeline of every stored instance from its own thread (or, with receiver processes, from
the thread that reads their pipes). ``loop.call_soon_threadsafe`` writes a byte to the loop's self-pipe for each
call, and the loop wakes, reads it and runs one callback: per instance, a system call on each side and a turn of
the loop, most of it under the interpreter lock the receiver needs too. A group commit hands over the instances
of several associations at once; here they cost one wake-up between them.

Order is kept across everything posted here (an association's release after its last instance): the calls wait in
one list, and the loop takes the whole list at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class LoopInbox:
    """``post(fn, *args)`` from any thread runs ``fn(*args)`` on ``loop``, in the order posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._due = False  # a drain is scheduled and has not yet taken the calls
        # For tests and benches: how many times the loop was woken, for how many calls.
        self.wakeups = 0
        self.calls = 0

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop after every call posted before it.

        Raises RuntimeError when the loop is closed (as ``call_soon_threadsafe`` does); the call is then dropped.
        """
        with self._lock:
            self._calls.append((fn, args))
            if self._due:
                return
            self._due = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                self._calls.clear()
                self._due = False
                raise

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls, self._due = self._calls, [], False
        self.wakeups += 1
        self.calls += len(calls)
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as exc:  # as the loop treats a failed callback: reported, and the rest still run
                self._loop.call_exception_handler({
                    "message": f"exception in a call handed to the event loop ({getattr(fn, '__qualname__', fn)})",
                    "exception": exc,
                })
