"""A dynamic batcher per model, like Triton's: gather up to max_batch items, waiting at most max_queue_delay_ms.

Items from urgent routes are taken first. The engine call runs in an executor, never on the event loop,
and one batch is in flight at a time: while it runs, the next batch fills.

Each engine call has a deadline, the model's ``infer_timeout_seconds``. A call that misses it fails its batch
with EngineTimeoutError, and ``problem`` says so until the call returns. The call itself cannot be stopped
(see ``_overdue``), so while it is out, later batches are not sent to the engine: they fail at once with
EngineTimeoutError too, rather than queue behind a call that may never return. Callers treat that error as
transient and try again later; the first batch formed after the call returns runs as usual.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge_agent.config import DEFAULT_INFER_TIMEOUT_SECONDS
from edge_agent.errors import EngineError, EngineTimeoutError
from edge_agent.inference.engine import Engine, EngineOutput, FloatArray, SliceResult
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Item:
    x: FloatArray
    future: asyncio.Future[SliceResult]
    enqueued_at: float = field(default_factory=time.perf_counter)
    # Set when its batch runs: the seconds it waited for the batch to start, and the batch's engine call.
    queue_seconds: float = 0.0
    infer_seconds: float = 0.0


class Batcher:
    """Collects single images into batches for one model's engine."""

    def __init__(
        self,
        model: str,
        engine: Engine,
        max_batch: int,
        max_queue_delay_ms: float,
        metrics: Metrics,
        executor: concurrent.futures.Executor,
        infer_timeout_seconds: float = DEFAULT_INFER_TIMEOUT_SECONDS,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")
        if not infer_timeout_seconds > 0:
            raise ValueError("infer_timeout_seconds must be positive")
        self.model = model
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue_delay_seconds = max_queue_delay_ms / 1000.0
        self.metrics = metrics
        self.executor = executor
        self.infer_timeout_seconds = infer_timeout_seconds
        self._urgent: deque[_Item] = deque()
        self._routine: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._queue_gauge = metrics.queue_depth.labels(queue=f"batch:{model}")
        self._batch_hist = metrics.batch_size.labels(model=model)
        self._infer_hist = metrics.inference_seconds.labels(model=model)
        self._stage_queue = metrics.stage_seconds.labels(stage="queue")
        self._stage_infer = metrics.stage_seconds.labels(stage="infer")
        self._timeouts = metrics.engine_timeouts.labels(model=model)
        # While an engine call that missed its deadline is still out: when it started (time.monotonic()).
        self._overdue_since: float | None = None
        # While the executor's thread is inside the engine's call: when it went in (time.monotonic()). Set and
        # cleared by that thread itself, so it holds even after the call's future was given up on.
        self._in_engine_since: float | None = None
        self.batches = 0  # engine calls made; for logs and tests

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        return len(self._urgent) + len(self._routine)

    @property
    def problem(self) -> str | None:
        """Why this model cannot infer now, for health reports: set while an engine call is overdue."""
        if self._overdue_since is None:
            return None
        seconds = time.monotonic() - self._overdue_since
        return f"engine {self.model}: an inference call has not returned for {seconds:.0f} s"

    @property
    def in_engine_seconds(self) -> float | None:
        """How long the engine's current call has run, or None when no call is in the engine."""
        since = self._in_engine_since
        return None if since is None else time.monotonic() - since

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the background task that forms and runs batches."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.model} was already started")
        self._task = asyncio.create_task(self._run(), name=f"batcher:{self.model}")

    async def stop(self, timeout_seconds: float | None = None) -> bool:
        """Stop taking items, run what is queued, and wait for the background task to end; at most
        ``timeout_seconds`` when given. Returns False when it gave up waiting.

        If this is cancelled (a drain timeout) or gives up, the task is cancelled and what is still queued
        fails with EngineError, so no caller waits forever. An engine call already running goes on in its
        thread (nothing can stop it): ``in_engine_seconds`` says so until it returns.
        """
        self._stopping = True
        self._wakeup.set()
        task = self._task
        if task is None:
            self._fail_pending("the batcher was never started")
            return True
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_seconds)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            return False
        task.result()  # what the task raised, if anything, reaches the caller
        return True

    def _abandon(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        self._fail_pending("the batcher was stopped before this item ran")

    async def submit(self, x: FloatArray, urgent: bool = False) -> SliceResult:
        """Queue one image [C, H, W]; wait for its result. EngineError if the engine fails."""
        result, _, _ = await self.submit_timed(x, urgent)
        return result

    async def submit_timed(self, x: FloatArray, urgent: bool = False) -> tuple[SliceResult, float, float]:
        """Like ``submit``, with the seconds the image waited in the queue and its batch's engine call took."""
        if self._stopping or not self.running:
            raise EngineError(f"{self.model}: the batcher is not running")
        if x.dtype != np.float32 or tuple(x.shape) != self.engine.input_shape:
            raise EngineError(
                f"{self.model}: input is {x.dtype}{list(x.shape)}, expected float32{list(self.engine.input_shape)}"
            )
        item = _Item(x, asyncio.get_running_loop().create_future())
        (self._urgent if urgent else self._routine).append(item)
        self._queue_gauge.set(self.pending)
        self._wakeup.set()
        result = await item.future
        return result, item.queue_seconds, item.infer_seconds

    def _take(self) -> list[_Item]:
        items: list[_Item] = []
        for queue in (self._urgent, self._routine):
            while queue and len(items) < self.max_batch:
                item = queue.popleft()
                if not item.future.done():  # the caller may have given up (cancelled)
                    items.append(item)
        self._queue_gauge.set(self.pending)
        return items

    def _oldest(self) -> float:
        return min(q[0].enqueued_at for q in (self._urgent, self._routine) if q)

    async def _run(self) -> None:
        while True:
            if not self.pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Triton's rule: the delay counts from the oldest queued item, so an item waits at most
            # max_queue_delay before its batch starts (unless the engine is busy with the previous one).
            while self.pending < self.max_batch and not self._stopping:
                remaining = self._oldest() + self.max_queue_delay_seconds - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except TimeoutError:
                    break
            # Not kept in a local: a finished batch's images must not stay in memory while the next one fills
            # (issue 9: the pipeline bounds the decoded images held per model, and they must really be gone).
            await self._run_batch(self._take())

    async def _run_batch(self, items: list[_Item]) -> None:
        if not items:
            return
        if self._overdue_since is not None:
            # The engine is still in a call that missed its deadline. Engines need not take a second call
            # while one runs (a TensorRT execution context does not), and this one may never return: fail
            # the batch now rather than have it queue behind that call.
            self._fail(items, EngineTimeoutError(f"{self.problem}; this batch was not run"))
            return
        started = time.perf_counter()
        for item in items:
            item.queue_seconds = started - item.enqueued_at
            self._stage_queue.observe(item.queue_seconds)
        n = len(items)
        self._batch_hist.observe(n)
        call: asyncio.Future[EngineOutput] | None = None
        try:
            batch = np.stack([item.x for item in items])
            loop = asyncio.get_running_loop()
            call_started = time.monotonic()
            call = loop.run_in_executor(self.executor, self._infer, batch)
            # asyncio.wait, not wait_for: the call's future must outlive the deadline to say when it returns,
            # and an engine's own TimeoutError must not pass for a missed deadline.
            done, _ = await asyncio.wait((call,), timeout=self.infer_timeout_seconds)
            if not done:
                self._overdue(call, call_started)
                raise EngineTimeoutError(
                    f"{self.model}: the engine call did not return within {self.infer_timeout_seconds:g} s"
                )
            out = call.result()
            if out.scores.shape[0] != n or (out.heatmap is not None and out.heatmap.shape[0] != n):
                raise EngineError(f"{self.model}: engine returned {out.scores.shape[0]} results for {n} inputs")
        except asyncio.CancelledError:
            if call is not None:
                call.cancel()
            # stop() gave up waiting (drain timeout): say so to the callers instead of leaving them hanging.
            self._fail(items, EngineError(f"{self.model}: the batcher was stopped during inference"))
            raise
        except Exception as exc:
            # The batcher survives: this batch's callers get the error, the next batch runs as usual.
            error = exc if isinstance(exc, EngineError) else EngineError(f"{self.model}: engine call failed: {exc!r}")
            logger.error("model %s: engine call for a batch of %d failed: %s", self.model, n, error)
            self._fail(items, error)
            return
        finally:
            self.batches += 1
        elapsed = time.perf_counter() - started
        self._infer_hist.observe(elapsed)
        for i, item in enumerate(items):
            self._stage_infer.observe(elapsed)
            item.infer_seconds = elapsed
            if not item.future.done():
                heat = None if out.heatmap is None else out.heatmap[i].copy()
                item.future.set_result(SliceResult(out.scores[i].copy(), heat))

    def _infer(self, batch: FloatArray) -> EngineOutput:
        """The engine's call, in the executor's thread."""
        self._in_engine_since = time.monotonic()
        try:
            return self.engine.infer(batch)
        finally:
            self._in_engine_since = None

    def _overdue(self, call: asyncio.Future[EngineOutput], call_started: float) -> None:
        """An engine call missed its deadline: count it, and report a problem until it returns.

        The thread running it cannot be killed: Python cannot stop a thread, and a call blocked in a CUDA
        driver or a native kernel would not notice if it could. It holds its executor thread until it returns.
        """
        self._overdue_since = call_started
        self._timeouts.inc()
        logger.error(
            "model %s: an engine call has not returned within %g s; batches fail until it does",
            self.model,
            self.infer_timeout_seconds,
        )
        call.add_done_callback(self._returned)

    def _returned(self, call: asyncio.Future[EngineOutput]) -> None:
        if not call.cancelled():
            call.exception()  # retrieved: its batch has failed already, and asyncio would log it as unretrieved
        if self._overdue_since is not None:
            logger.warning(
                "model %s: the overdue engine call returned after %.1f s",
                self.model,
                time.monotonic() - self._overdue_since,
            )
        self._overdue_since = None

    def _fail(self, items: list[_Item], error: EngineError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_pending(self, reason: str) -> None:
        self._fail(self._take_all(), EngineError(f"{self.model}: {reason}"))

    def _take_all(self) -> list[_Item]:
        items = [*self._urgent, *self._routine]
        self._urgent.clear()
        self._routine.clear()
        self._queue_gauge.set(0)
        return items
