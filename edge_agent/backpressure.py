"""How much received work may wait for inference, and how much of it may be decoded in memory (issue 9).

Two bounds, both counted in instances:

- ``Admission``: instances received and not yet inferred. Above ``limit`` the receiver refuses new instances
  (C-STORE 0xA700, Out of Resources: the sender keeps them and retries later) and /readyz says why; it accepts
  again once the count has fallen to ``resume_at``. The gap keeps a sender that retries at once from flipping
  readiness on every instance, and keeps the engine busy while senders come back. Pure: the owner (the
  pipeline) feeds it the count whenever the count changes, and the receiver only reads ``reason``.
- ``Slots``: instances of one model decoded and held in memory, waiting for or in the engine. An instance takes
  a slot before it is decoded and gives it back when its results are in, so that a slow engine leaves the rest
  on the spool as files, not in memory as arrays. Urgent work takes a free slot before routine work.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Admission:
    """A gate with hysteresis over the count of instances received and not yet inferred."""

    def __init__(self, limit: int, resume_at: int | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.resume_at = limit // 2 if resume_at is None else resume_at
        if not 0 <= self.resume_at < limit:
            raise ValueError("resume_at must be below limit and not negative")
        # Read from other threads (the receiver's association threads): one attribute, replaced whole.
        self.reason: str | None = None

    def update(self, pending: int) -> bool:
        """Apply the current count. Returns True when the gate opened or closed."""
        if self.reason is None and pending >= self.limit:
            self.reason = (
                f"inference is behind: {self.limit} instances received and not yet inferred "
                f"(pipeline.max_pending_instances); new instances get 0xA700 until no more than "
                f"{self.resume_at} wait"
            )
            return True
        if self.reason is not None and pending <= self.resume_at:
            self.reason = None
            return True
        return False


class Slots:
    """An asyncio semaphore whose urgent waiters go before routine ones. Use on the event loop only."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._free = size
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._routine: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> int:
        return self.size - self._free

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in (*self._urgent, *self._routine))

    @asynccontextmanager
    async def hold(self, urgent: bool = False) -> AsyncIterator[None]:
        await self._acquire(urgent)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, urgent: bool) -> None:
        if self._free > 0:  # then nobody waits: _release hands a slot to a waiter before freeing it
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._routine).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted just before the cancellation arrived: hand the slot on
            else:
                granted.cancel()  # _release skips it
            raise

    def _release(self) -> None:
        # A freed slot goes straight to the first waiter (urgent first), never back to the pool while one waits.
        for queue in (self._urgent, self._routine):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1
