"""When is a series complete? The timers that apply ``series.count_says_complete`` and the quiet time.

DICOM has no "end of series" message: a modality sends instances over one or more associations
and stops. A series is complete when a trustworthy count says so (``series.count_says_complete``),
or else when no instance has arrived for the route's quiet time.

The assembler only keeps time. It calls ``on_due(series_id)`` on the loop, synchronously; the
caller (the pipeline) starts the completion in a task it owns and awaits at shutdown, so that there
is exactly one owner of every completion (issue 8, defect 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def due_at(last_received: float, quiet_seconds: float, count_complete: bool) -> float:
    """The clock time at which the series becomes complete if nothing else arrives."""
    return last_received if count_complete else last_received + quiet_seconds


class Assembler:
    """One timer per open series, re-armed by every stored instance; calls ``on_due`` when due.

    Timers are ``loop.call_at`` handles, not tasks: a 2000-slice CT re-arms one handle 2000 times
    instead of creating 2000 sleeping tasks. Every method must be called on the event loop's thread.
    """

    def __init__(self, on_due: Callable[[int], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._on_due = on_due
        self._clock = clock
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._closed = False

    def touch(self, series_id: int, quiet_seconds: float, count_complete: bool = False, *,
              last_received: float | None = None) -> None:
        """An instance of the series was stored: (re-)arm its completion timer.

        ``last_received`` (in this assembler's clock; default: now) is for series resumed from the
        journal after a restart, so that their quiet time is not started over: construct the
        assembler with ``clock=time.time`` to pass the journal's wall-clock times.
        """
        if self._closed:
            # Shutting down: the instance is in the journal and the series is resumed on the next start.
            logger.debug("assembler closed; series %d left for the next start", series_id)
            return
        now = self._clock()
        last = now if last_received is None else last_received
        self.arm(series_id, due_at(last, quiet_seconds, count_complete) - now)

    def arm(self, series_id: int, delay_seconds: float) -> None:
        """Call ``on_due(series_id)`` after ``delay_seconds`` (replacing any timer the series had)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        old = self._timers.pop(series_id, None)
        if old is not None:
            old.cancel()
        # The loop's own clock schedules; ours only measures how far away the due time is.
        self._timers[series_id] = loop.call_at(loop.time() + max(0.0, delay_seconds), self._due, series_id)

    def forget(self, series_id: int) -> None:
        """Stop watching a series (it completed, or failed)."""
        handle = self._timers.pop(series_id, None)
        if handle is not None:
            handle.cancel()

    def armed(self, series_id: int) -> bool:
        return series_id in self._timers

    def open_count(self) -> int:
        """Series with an armed timer (still receiving, or waiting for a retry)."""
        return len(self._timers)

    def _due(self, series_id: int) -> None:
        self._timers.pop(series_id, None)
        self._on_due(series_id)

    def close(self) -> None:
        """Disarm every timer; nothing is due any more (what was open is resumed at the next start)."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
