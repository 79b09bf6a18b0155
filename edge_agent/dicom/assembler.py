"""When is a series complete? The rule (pure) and the timers that apply it on the event loop.

DICOM has no "end of series" message: a modality sends instances over one or more associations
and stops. A series is complete when the modality told us how many instances to expect and that
many have arrived, or else when no instance has arrived for a quiet time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


def due_at(last_received: float, quiet_seconds: float, instance_count: int, expected_count: int | None) -> float:
    """The clock time at which the series becomes complete if nothing else arrives."""
    if expected_count is not None and expected_count > 0 and instance_count >= expected_count:
        return last_received
    return last_received + quiet_seconds


def is_complete(now: float, last_received: float, quiet_seconds: float, instance_count: int,
                expected_count: int | None) -> bool:
    """Complete when the expected count is known and reached, or after ``quiet_seconds`` without an instance."""
    return now >= due_at(last_received, quiet_seconds, instance_count, expected_count)


class Assembler:
    """One timer per open series, re-armed by every stored instance; calls ``on_complete`` when due.

    Timers are ``loop.call_at`` handles, not tasks: a 2000-slice CT re-arms one handle 2000 times
    instead of creating 2000 sleeping tasks. Completion callbacks run in tasks this object owns and
    ``close()`` awaits (STYLE.md 4). Every method must be called on the event loop's thread.
    """

    def __init__(self, on_complete: Callable[[int], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_complete = on_complete
        self._clock = clock
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def touch(self, series_id: int, quiet_seconds: float, instance_count: int, expected_count: int | None,
              *, last_received: float | None = None) -> None:
        """An instance of the series was stored: (re-)arm its completion timer.

        ``last_received`` (in this assembler's clock; default: now) is for series resumed from the
        journal after a restart, so that their quiet time is not started over: construct the
        assembler with ``clock=time.time`` to pass the journal's wall-clock times.
        """
        if self._closed:
            # Shutting down: the instance is in the journal and the series is resumed on the next start.
            logger.debug("assembler closed; series %d left for the next start", series_id)
            return
        loop = asyncio.get_running_loop()
        now = self._clock()
        last = now if last_received is None else last_received
        delay_seconds = due_at(last, quiet_seconds, instance_count, expected_count) - now
        old = self._timers.pop(series_id, None)
        if old is not None:
            old.cancel()
        # The loop's own clock schedules; ours only measures how far away the due time is.
        self._timers[series_id] = loop.call_at(loop.time() + max(0.0, delay_seconds), self._due, series_id)

    def forget(self, series_id: int) -> None:
        """Stop watching a series (e.g. it expired or failed); a running completion is not cancelled."""
        handle = self._timers.pop(series_id, None)
        if handle is not None:
            handle.cancel()

    def open_count(self) -> int:
        """Series with an armed timer (still receiving)."""
        return len(self._timers)

    def running_count(self) -> int:
        """Completion callbacks still running."""
        return len(self._tasks)

    def _due(self, series_id: int) -> None:
        self._timers.pop(series_id, None)
        task = asyncio.get_running_loop().create_task(self._complete(series_id), name=f"complete-series-{series_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete(self, series_id: int) -> None:
        try:
            await self._on_complete(series_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The series stays in the journal in its last state; the owner's recovery picks it up.
            # Logged here because nobody else awaits this task's result.
            logger.exception("completing series %d failed", series_id)

    async def close(self, timeout_seconds: float | None = None) -> None:
        """Disarm every timer, wait up to ``timeout_seconds`` for running completions, cancel the rest."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if not self._tasks:
            return
        tasks = set(self._tasks)
        _, pending = await asyncio.wait(tasks, timeout=None if timeout_seconds is None else max(0.0, timeout_seconds))
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("assembler: %d series completions cancelled at shutdown", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

