"""The dynamic batcher, driving the real ONNX Runtime engine through a counting wrapper."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from edge_agent.config import DEFAULT_CONFIG_PATH, ModelDeployment, load_config, parse_config
from edge_agent.errors import ConfigError, EngineError, EngineTimeoutError
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import load_card
from edge_agent.inference.engine import EngineOutput, SliceResult
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine
from edge_agent.metrics import Metrics

ENGINES = Path(__file__).resolve().parent.parent / "engines"
T = TypeVar("T")


class CountingEngine:
    """The real engine, recording every call; a call can be held at a gate, or made to fail."""

    backend = "onnxruntime"

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.input_shape = inner.input_shape
        self.calls: list[np.ndarray] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail_next = 0

    def load(self) -> None:
        self.inner.load()

    def warm_up(self) -> None:
        self.inner.warm_up()

    def close(self) -> None:
        self.inner.close()

    def infer(self, batch: np.ndarray) -> EngineOutput:
        self.calls.append(batch.copy())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("device lost")
        return self.inner.infer(batch)

    def ids(self) -> list[list[int]]:
        """The image ids (the constant each test image is filled with) of each call, in call order."""
        return [[round(float(x[0, 0, 0])) for x in batch] for batch in self.calls]


@pytest.fixture(scope="module")
def ort_engine() -> Iterator[OnnxRuntimeEngine]:
    eng = OnnxRuntimeEngine(load_card(ENGINES / "ct-demo"), intra_op_threads=1, max_batch=8)
    eng.load()
    yield eng
    eng.close()


def image(value: float) -> np.ndarray:
    return np.full((1, 256, 256), value, np.float32)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (no timed sleeps; the test timeout bounds it)."""
    while not condition():  # noqa: ASYNC110 - a zero sleep only lets the submit tasks run; nothing is timed
        await asyncio.sleep(0)


def run(
    ort_engine: OnnxRuntimeEngine,
    body: Callable[[Batcher, CountingEngine], Awaitable[T]],
    max_batch: int = 8,
    max_queue_delay_ms: float = 0.0,
    metrics: Metrics | None = None,
    infer_timeout_seconds: float = 30.0,
) -> tuple[T, CountingEngine]:
    engine = CountingEngine(ort_engine)

    async def main() -> T:
        with ThreadPoolExecutor(2) as executor:
            batcher = Batcher(
                "ct-demo", engine, max_batch, max_queue_delay_ms, metrics or Metrics(), executor, infer_timeout_seconds
            )
            await batcher.start()
            try:
                return await body(batcher, engine)
            finally:
                if engine.gate is not None:
                    engine.gate.set()
                await batcher.stop()

    return asyncio.run(main()), engine


def test_concurrent_submits_share_engine_calls(ort_engine: OnnxRuntimeEngine) -> None:
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1, 256, 256)).astype(np.float32) for _ in range(16)]
    metrics = Metrics()

    async def body(batcher: Batcher, engine: CountingEngine) -> list[SliceResult]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results, engine = run(ort_engine, body, max_batch=8, max_queue_delay_ms=500.0, metrics=metrics)
    assert [len(c) for c in engine.calls] == [8, 8]
    expected = ort_engine.infer(np.stack(inputs))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.scores, expected.scores[i], rtol=1e-5)
        assert result.heatmap is not None and expected.heatmap is not None
        np.testing.assert_allclose(result.heatmap, expected.heatmap[i], rtol=1e-5)
    sample = metrics.registry.get_sample_value
    assert sample("edge_agent_inference_batch_size_count", {"model": "ct-demo"}) == 2
    assert sample("edge_agent_inference_batch_size_sum", {"model": "ct-demo"}) == 16
    assert sample("edge_agent_inference_compute_seconds_count", {"model": "ct-demo"}) == 2
    assert sample("edge_agent_stage_duration_seconds_count", {"stage": "queue"}) == 16
    assert sample("edge_agent_stage_duration_seconds_count", {"stage": "infer"}) == 16
    assert sample("edge_agent_queue_depth", {"queue": "batch:ct-demo"}) == 0


def test_a_lone_item_waits_about_the_queue_delay(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> float:
        started = time.perf_counter()
        await batcher.submit(image(1.0))
        return time.perf_counter() - started

    elapsed, engine = run(ort_engine, body, max_batch=8, max_queue_delay_ms=100.0)
    assert engine.ids() == [[1]]
    assert 0.1 <= elapsed < 5.0


def test_a_full_batch_does_not_wait_for_the_delay(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> None:
        # With a 60 s delay, only a full batch can finish inside the 10 s bound.
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(image(i)) for i in range(4))), timeout=10)

    _, engine = run(ort_engine, body, max_batch=4, max_queue_delay_ms=60_000.0)
    assert engine.ids() == [[0, 1, 2, 3]]


def test_urgent_items_go_first(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> None:
        engine.gate = threading.Event()
        first = asyncio.create_task(batcher.submit(image(0)))
        await asyncio.to_thread(engine.entered.wait, 30)  # item 0 is inside the engine, held at the gate
        routine = [asyncio.create_task(batcher.submit(image(i))) for i in (1, 2)]
        urgent = [asyncio.create_task(batcher.submit(image(i), urgent=True)) for i in (3, 4)]
        await until(lambda: batcher.pending == 4)
        engine.gate.set()
        await asyncio.gather(first, *routine, *urgent)

    _, engine = run(ort_engine, body, max_batch=2, max_queue_delay_ms=0.0)
    assert engine.ids() == [[0], [3, 4], [1, 2]]


def test_engine_failure_fails_its_batch_and_the_batcher_goes_on(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> SliceResult:
        engine.fail_next = 1
        outcomes = await asyncio.gather(*(batcher.submit(image(i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, EngineError) for o in outcomes)
        assert "engine call failed" in str(outcomes[0]) and "device lost" in str(outcomes[0])
        return await batcher.submit(image(5))

    result, engine = run(ort_engine, body, max_batch=3, max_queue_delay_ms=50.0)
    assert result.scores.shape == (1,)
    assert engine.ids() == [[0, 1, 2], [5]]


def test_engine_error_from_the_real_engine_reaches_the_caller(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> None:
        with pytest.raises(EngineError, match="non-finite scores"):
            await batcher.submit(image(float("nan")))
        await batcher.submit(image(1.0))

    _, engine = run(ort_engine, body, max_batch=1)
    assert len(engine.calls) == 2


def test_stop_drains_what_is_queued(ort_engine: OnnxRuntimeEngine) -> None:
    engine = CountingEngine(ort_engine)

    async def main() -> list[SliceResult]:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("ct-demo", engine, 8, 60_000.0, Metrics(), executor)
            await batcher.start()
            tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(3)]
            await until(lambda: batcher.pending == 3)
            await asyncio.wait_for(batcher.stop(), timeout=10)  # does not wait out the 60 s delay
            assert all(t.done() for t in tasks)
            with pytest.raises(EngineError, match="not running"):
                await batcher.submit(image(9))
            return [t.result() for t in tasks]

    results = asyncio.run(main())
    assert len(results) == 3
    assert engine.ids() == [[0, 1, 2]]


def test_stop_that_times_out_fails_the_waiting_callers(ort_engine: OnnxRuntimeEngine) -> None:
    engine = CountingEngine(ort_engine)
    engine.gate = threading.Event()

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("ct-demo", engine, 1, 0.0, Metrics(), executor)
            await batcher.start()
            in_flight = asyncio.create_task(batcher.submit(image(0)))
            await asyncio.to_thread(engine.entered.wait, 30)
            queued = asyncio.create_task(batcher.submit(image(1)))
            await until(lambda: batcher.pending == 1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.stop(), timeout=0.2)
            for task, reason in ((in_flight, "during inference"), (queued, "before this item ran")):
                with pytest.raises(EngineError, match=reason):
                    await task
            assert engine.gate is not None
            engine.gate.set()  # let the executor's thread finish so the pool can shut down

    asyncio.run(main())


def test_stop_gives_up_on_a_call_still_in_the_engine_and_says_it_is_there_until_it_returns(
    ort_engine: OnnxRuntimeEngine,
) -> None:
    """What the daemon's stop relies on: a bounded stop, and a call that outlives it seen until it really ends."""
    engine = CountingEngine(ort_engine)
    engine.gate = threading.Event()

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("ct-demo", engine, 1, 0.0, Metrics(), executor)
            await batcher.start()
            assert batcher.in_engine_seconds is None
            in_flight = asyncio.create_task(batcher.submit(image(0)))
            await asyncio.to_thread(engine.entered.wait, 30)
            queued = asyncio.create_task(batcher.submit(image(1)))
            await until(lambda: batcher.pending == 1)
            assert await batcher.stop(0.2) is False
            for task, reason in ((in_flight, "during inference"), (queued, "before this item ran")):
                with pytest.raises(EngineError, match=reason):
                    await task
            seconds = batcher.in_engine_seconds
            assert seconds is not None and seconds >= 0.2  # given up on, but still in the engine
            assert engine.gate is not None
            engine.gate.set()
            await asyncio.to_thread(executor.shutdown)  # the call has ended: its thread is done
            assert batcher.in_engine_seconds is None
            assert len(engine.calls) == 1

    asyncio.run(main())


def test_a_stop_within_its_time_runs_what_is_queued(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> list[SliceResult]:
        tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(3)]
        await until(lambda: batcher.pending == 3)
        assert await batcher.stop(30.0) is True
        return [await t for t in tasks]

    results, engine = run(ort_engine, body, max_batch=2)
    assert [r.scores.shape for r in results] == [(1,)] * 3
    assert engine.ids() == [[0, 1], [2]]


def test_a_cancelled_caller_is_skipped(ort_engine: OnnxRuntimeEngine) -> None:
    async def body(batcher: Batcher, engine: CountingEngine) -> None:
        engine.gate = threading.Event()
        first = asyncio.create_task(batcher.submit(image(0)))
        await asyncio.to_thread(engine.entered.wait, 30)
        gone = asyncio.create_task(batcher.submit(image(1)))
        kept = asyncio.create_task(batcher.submit(image(2)))
        await until(lambda: batcher.pending == 2)
        gone.cancel()
        engine.gate.set()
        await asyncio.gather(first, kept)

    _, engine = run(ort_engine, body, max_batch=4)
    assert engine.ids() == [[0], [2]]


def test_bad_submissions_are_engine_errors(ort_engine: OnnxRuntimeEngine) -> None:
    engine = CountingEngine(ort_engine)

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("ct-demo", engine, 4, 0.0, Metrics(), executor)
            with pytest.raises(EngineError, match="not running"):
                await batcher.submit(image(0))
            await batcher.start()
            with pytest.raises(EngineError, match=r"expected float32\[1, 256, 256\]"):
                await batcher.submit(np.zeros((1, 128, 128), np.float32))
            with pytest.raises(EngineError, match="float64"):
                await batcher.submit(np.zeros((1, 256, 256), np.float64))
            await batcher.stop()

    asyncio.run(main())
    assert engine.calls == []


def test_invalid_settings_are_refused(ort_engine: OnnxRuntimeEngine) -> None:
    with ThreadPoolExecutor(1) as executor:
        with pytest.raises(ValueError, match="max_batch"):
            Batcher("ct-demo", CountingEngine(ort_engine), 0, 1.0, Metrics(), executor)
        with pytest.raises(ValueError, match="max_queue_delay_ms"):
            Batcher("ct-demo", CountingEngine(ort_engine), 1, -1.0, Metrics(), executor)


def test_a_hung_engine_call_fails_its_batch_and_is_a_problem_until_it_returns(ort_engine: OnnxRuntimeEngine) -> None:
    metrics = Metrics()
    problems: list[str | None] = []

    async def body(batcher: Batcher, engine: CountingEngine) -> SliceResult:
        engine.gate = threading.Event()  # the engine hangs until the test opens the gate
        with pytest.raises(EngineTimeoutError, match=r"ct-demo: the engine call did not return within 0.05 s") as hung:
            await batcher.submit(image(0))
        assert isinstance(hung.value, EngineError) and isinstance(hung.value, TimeoutError)
        problems.append(batcher.problem)
        # While the call is out, a later batch fails at once instead of queueing behind it.
        with pytest.raises(EngineTimeoutError, match="this batch was not run"):
            await batcher.submit(image(1))
        assert len(engine.calls) == 1
        engine.gate.set()
        await until(lambda: batcher.problem is None)  # cleared when the hung call returns
        return await batcher.submit(image(2))

    result, engine = run(ort_engine, body, max_batch=1, metrics=metrics, infer_timeout_seconds=0.05)
    assert problems[0] is not None
    assert problems[0].startswith("engine ct-demo: an inference call has not returned for ")
    assert problems[0].endswith(" s")
    assert result.scores.shape == (1,)
    assert engine.ids() == [[0], [2]]
    assert metrics.registry.get_sample_value("edge_agent_engine_timeouts_total", {"model": "ct-demo"}) == 1


def test_infer_timeout_is_a_positive_per_model_setting(ort_engine: OnnxRuntimeEngine) -> None:
    assert ModelDeployment().infer_timeout_seconds == 30.0
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert all(config.deployment(name).infer_timeout_seconds == 30.0 for name in config.model_names())
    for bad in (0, -1.0, "30"):
        with pytest.raises(ConfigError, match=r"models\.ct-demo\.infer_timeout_seconds"):
            parse_config({"models": {"ct-demo": {"infer_timeout_seconds": bad}}}, env={})
    with ThreadPoolExecutor(1) as executor, pytest.raises(ValueError, match="infer_timeout_seconds"):
        Batcher("ct-demo", CountingEngine(ort_engine), 1, 1.0, Metrics(), executor, infer_timeout_seconds=0.0)


def test_submit_timed_gives_each_image_its_queue_wait_and_its_batch_call(ort_engine: OnnxRuntimeEngine) -> None:
    metrics = Metrics()

    async def body(batcher: Batcher, engine: CountingEngine) -> list[tuple[SliceResult, float, float]]:
        return await asyncio.gather(*(batcher.submit_timed(image(i)) for i in range(6)))

    timed, engine = run(ort_engine, body, max_batch=3, max_queue_delay_ms=200.0, metrics=metrics)
    assert [len(c) for c in engine.calls] == [3, 3]
    sample = metrics.registry.get_sample_value
    # The same figures the stage histograms got (a finding's stage_seconds is built from them).
    assert sum(q for _, q, _ in timed) == pytest.approx(sample("edge_agent_stage_duration_seconds_sum",
                                                               {"stage": "queue"}))
    assert sum(i for _, _, i in timed) == pytest.approx(sample("edge_agent_stage_duration_seconds_sum",
                                                               {"stage": "infer"}))
    # Images of one batch share its engine call.
    assert len({i for _, _, i in timed[:3]}) == 1 and len({i for _, _, i in timed[3:]}) == 1
    assert all(q >= 0 and i > 0 for _, q, i in timed)
