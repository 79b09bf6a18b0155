"""The pipeline when the receiver's hand-over and the journal race a series' completion.

The receiver commits an instance on its own thread and hands it to the pipeline (``on_stored``) two loop hops
later, so a completion can close the series with an instance in its list whose hand-over has not come yet. Each
test injects that ordering deterministically: the instance is committed inside the completion's ``close_series``
(just before its transaction) and handed over at a chosen later point. The journal errors are injected into the
journal's own calls. Harness and helpers: tests/test_pipeline.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest

import edge_agent.pipeline as pipeline_module
from edge_agent.dicom.header import InstanceMeta, read_meta
from edge_agent.errors import JournalError
from edge_agent.journal import Recorded, SeriesState
from edge_agent.pipeline import Pipeline
from tests.dicomfiles import make_ct_series
from tests.test_pipeline import Harness, harness, until


class LateHandOver:
    """Commits ``paths`` into the series inside the first ``close_series`` call, in one transaction as the receiver's
    committer thread would just before the completion's, and holds their hand-over until ``deliver``."""

    def __init__(self, h: Harness, *paths: Path) -> None:
        self.h = h
        self.paths = paths
        self.stored: list[tuple[InstanceMeta, Recorded]] = []
        real_close = h.journal.close_series

        def close_series(*args: Any) -> Any:
            if not self.stored:
                self._commit()
            return real_close(*args)

        h.journal.close_series = close_series  # type: ignore[method-assign]

    def _commit(self) -> None:
        group = []
        for n, path in enumerate(self.paths):
            incoming = self.h.tmp / f"late-{n}.dcm"
            incoming.write_bytes(path.read_bytes())
            meta = read_meta(incoming, "MODALITY", "EDGE_AGENT")
            group.append((meta, *self.h.spool.store(incoming)))
        recorded = self.h.journal.record_instances(group)
        for rec in recorded:
            assert not rec.reopened  # committed while the series was still open: it is in the closing list
            if rec.replaced_spool_name is not None:
                self.h.spool.remove(rec.replaced_spool_name)
        self.stored = [(meta, rec) for (meta, _, _), rec in zip(group, recorded, strict=True)]

    @property
    def recorded(self) -> Recorded | None:
        """The last instance committed, once it is."""
        return self.stored[-1][1] if self.stored else None

    def deliver(self, pipe: Pipeline) -> None:
        """The hand-overs, in one step of the loop, as the receiver makes them."""
        assert self.stored
        for meta, rec in self.stored:
            pipe.on_stored(meta, rec)


def spy_preprocess(pipe: Pipeline, events: list[tuple[str, str]]) -> None:
    """Record the spool name of every instance the pipeline starts to decode."""
    real = pipe._preprocess

    async def preprocess(loaded: Any, spool_name: str, *args: Any, **kwargs: Any) -> Any:
        events.append(("decode", spool_name))
        return await real(loaded, spool_name, *args, **kwargs)

    pipe._preprocess = preprocess  # type: ignore[method-assign]


def inverted(path: Path, out: Path) -> Path:
    """The same SOP instance with new content (its pixels inverted)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    ds.PixelData = (arr.max() - arr).astype(arr.dtype).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def reference_finding(tmp: Path, files: list[Path]) -> dict[str, Any]:
    """The finding a pipeline makes when ``files`` arrive with no race."""

    async def main(h: Harness) -> dict[str, Any]:
        async with h.pipeline() as pipe:
            for path in files:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            return f

    with harness(tmp) as h:
        return asyncio.run(main(h))


@pytest.mark.parametrize("hand_over", ["while_queueing", "after_the_finding"])
def test_content_replaced_before_the_close_is_inferred_though_its_hand_over_comes_late(
    tmp_path: Path, hand_over: str
) -> None:
    """Before: the finding was built from the replaced content's result, and the new content never
    inferred. The journal's closing list names the new content: the finding must be computed from it."""
    slices = make_ct_series(tmp_path / "ct", 3)
    changed = inverted(slices[1], tmp_path / "changed.dcm")
    expected = reference_finding(tmp_path / "reference", [slices[0], changed, slices[2]])

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            events: list[tuple[str, str]] = []
            spy_preprocess(pipe, events)
            late = LateHandOver(h, changed)
            loop = asyncio.get_running_loop()
            real_enqueue = h.journal.outbox.enqueue

            def enqueue(*args: Any) -> Any:
                events.append(("enqueue", ""))
                if hand_over == "while_queueing":
                    # The hand-over comes after the completion took its instances' results, before it ends.
                    handed = threading.Event()
                    loop.call_soon_threadsafe(lambda: (late.deliver(pipe), handed.set()))
                    assert handed.wait(10)
                return real_enqueue(*args)

            h.journal.outbox.enqueue = enqueue  # type: ignore[method-assign]
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            if hand_over == "after_the_finding":
                late.deliver(pipe)
            await until(lambda: pipe.open_count() == 0)
            assert await pipe.drain(5.0) == 0

            assert late.recorded is not None
            new_name = late.recorded.spool_name
            assert ("decode", new_name) in events[: events.index(("enqueue", ""))]  # inferred before it was queued
            assert len(h.findings()) == 1
            assert h.journal.read("SELECT state, revision FROM series") == [(SeriesState.QUEUED.value, 0)]
            assert f["sop_instance_uids"] == expected["sop_instance_uids"]
            assert f["driving_instance_uid"] == expected["driving_instance_uid"]
            assert [lab["score"] for lab in f["labels"]] == pytest.approx([lab["score"] for lab in expected["labels"]])

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_a_new_instance_handed_over_after_the_completion_started_it_is_not_a_transient_failure(
    tmp_path: Path,
) -> None:
    """Before: the late hand-over cancelled the task the completion waited for; the completion took the
    CancelledError for an engine failure, deferred the series by 2 s and decoded the instance a third time."""
    slices = make_ct_series(tmp_path / "ct", 3)

    async def main(h: Harness) -> None:
        h.engine.gate = gate = threading.Event()  # a busy engine: the completion is still waiting when it comes
        async with h.pipeline() as pipe:
            events: list[tuple[str, str]] = []
            spy_preprocess(pipe, events)
            late = LateHandOver(h, slices[2])
            for path in slices[:2]:
                h.store(pipe, path)
            # The completion closed the series with the third instance in its list and started it ...
            await until(lambda: late.recorded is not None and ("decode", late.recorded.spool_name) in events)
            assert late.recorded is not None
            late.deliver(pipe)  # ... and only then does its hand-over come.
            gate.set()
            [f] = await h.wait_findings(1)
            assert await pipe.drain(5.0) == 0

            assert (f["instances_inferred"], f["instances_failed"]) == (3, 0)
            assert h.journal.read("SELECT state, error FROM jobs") == [("done", None)]
            assert events.count(("decode", late.recorded.spool_name)) == 1
            assert h.metrics.registry.get_sample_value("edge_agent_series_total", {"outcome": "deferred"}) == 0

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_a_completion_waits_for_the_task_that_replaced_the_one_it_started(tmp_path: Path) -> None:
    """Two re-sends of one instance committed together before the close: the journal's list names the second; the
    late hand-over of the first cancels the completion's task, the second's starts it again. The cancellation is
    not an engine failure: the completion uses the replacement's result."""
    slices = make_ct_series(tmp_path / "ct", 3)
    first = inverted(slices[1], tmp_path / "first.dcm")
    second = tmp_path / "second.dcm"
    ds = pydicom.dcmread(slices[1])
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(second, enforce_file_format=True)
    expected = reference_finding(tmp_path / "reference", [slices[0], second, slices[2]])

    async def main(h: Harness) -> None:
        h.engine.gate = gate = threading.Event()  # a busy engine: the completion is still waiting when they come
        async with h.pipeline() as pipe:
            events: list[tuple[str, str]] = []
            spy_preprocess(pipe, events)
            late = LateHandOver(h, first, second)
            for path in slices:
                h.store(pipe, path)
            await until(lambda: late.recorded is not None and ("decode", late.recorded.spool_name) in events)
            late.deliver(pipe)
            gate.set()
            [f] = await h.wait_findings(1)
            assert await pipe.drain(5.0) == 0

            assert (f["instances_inferred"], f["instances_failed"]) == (3, 0)
            assert h.journal.read("SELECT state, error FROM jobs") == [("done", None)]
            assert [lab["score"] for lab in f["labels"]] == pytest.approx([lab["score"] for lab in expected["labels"]])

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_a_journal_error_queueing_the_finding_is_retried_with_back_off_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a momentary journal error (a full state disk) at the outbox failed the series for good."""
    slices = make_ct_series(tmp_path / "ct", 2)
    attempts: list[int] = []

    def retry_delay_seconds(attempt: int) -> float:
        attempts.append(attempt)
        return 0.05

    monkeypatch.setattr(pipeline_module, "retry_delay_seconds", retry_delay_seconds)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            real_enqueue, real_fail = h.journal.outbox.enqueue, h.journal.fail_series
            tries: list[int] = []
            failed: list[int] = []

            def enqueue(*args: Any) -> Any:
                tries.append(1)
                if len(tries) <= 2:
                    raise JournalError("journal: cannot queue a finding: database or disk is full")
                return real_enqueue(*args)

            def fail_series(*args: Any) -> Any:
                failed.append(1)
                return real_fail(*args)

            h.journal.outbox.enqueue = enqueue  # type: ignore[method-assign]
            h.journal.fail_series = fail_series  # type: ignore[method-assign]
            for path in slices:
                h.store(pipe, path)
            await until(lambda: h.journal.series_in(SeriesState.QUEUED, SeriesState.FAILED) != [])
            assert await pipe.drain(5.0) == 0

            assert [s.state for s in h.journal.series_in(SeriesState.QUEUED)] == [SeriesState.QUEUED]
            assert failed == [] and len(tries) == 3 and attempts == [1, 2]
            [f] = h.findings()
            assert (f["revision"], f["instances_inferred"]) == (0, 2)
            assert pipe.open_count() == 0
            assert not list((h.tmp / "state" / "spool" / "tmp").glob("overlay-*"))  # the failed tries' links

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_a_journal_error_recording_a_failure_leaves_the_series_retried_not_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a second journal error, in the failure's own record, escaped the completion: no state, no
    timer, the series stranded until a restart. A genuine failure must still fail the series once it can be
    recorded."""
    slices = make_ct_series(tmp_path / "ct", 2)
    attempts: list[int] = []

    def retry_delay_seconds(attempt: int) -> float:
        attempts.append(attempt)
        return 0.05

    def aggregate(*_: Any) -> Any:
        raise ValueError("a result the triage cannot read")  # permanent: the same on every try

    monkeypatch.setattr(pipeline_module, "retry_delay_seconds", retry_delay_seconds)
    monkeypatch.setattr(pipeline_module, "aggregate", aggregate)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            real_fail = h.journal.fail_series
            tries: list[int] = []

            def fail_series(*args: Any) -> Any:
                tries.append(1)
                if len(tries) == 1:
                    raise JournalError("journal: cannot fail a series: database or disk is full")
                return real_fail(*args)

            h.journal.fail_series = fail_series  # type: ignore[method-assign]
            for path in slices:
                h.store(pipe, path)
            await until(lambda: h.journal.series_in(SeriesState.FAILED) != [])
            assert await pipe.drain(5.0) == 0

            [s] = h.journal.series_in(SeriesState.FAILED)
            assert "ValueError" in (s.note or "") and len(tries) == 2 and attempts == [1]
            assert pipe.open_count() == 0
            assert h.metrics.registry.get_sample_value("edge_agent_series_total", {"outcome": "failed"}) == 1

    with harness(tmp_path) as h:
        asyncio.run(main(h))
