"""The pipeline on its own: real journal, spool, worker pool, ONNX Runtime engine and batcher; no network.

Each test drives the same steps the receiver takes for a stored instance (read the header, spool it,
journal it, hand it on) and reads the findings from the journal's outbox.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

import edge_agent.pipeline as pipeline_module
from edge_agent.config import DEFAULT_CONFIG_PATH, parse_config
from edge_agent.dicom.header import read_meta
from edge_agent.dicom.spool import Spool
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import load_card
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine
from edge_agent.inference.preprocess import load_instance_prepared, load_instance_prepared_into
from edge_agent.journal import Journal, Recorded, SeriesState
from edge_agent.metrics import Metrics
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.series import count_says_complete
from edge_agent.workers import WorkerPool
from tests.dicomfiles import make_ct_series
from tests.test_batcher import CountingEngine

ENGINES = Path(__file__).resolve().parent.parent / "engines"
WAIT_SECONDS = 30.0


async def until(condition: Callable[[], bool]) -> None:
    """Poll the journal (the state under test) until ``condition`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    for _ in itertools.count():
        if condition():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Harness:
    def __init__(self, tmp: Path, quiet_seconds: float = 0.2, complete_on_release: bool = False,
                 max_pending_instances: int | None = None) -> None:
        raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
        raw["state_dir"] = str(tmp / "state")
        raw["model_repository"] = str(ENGINES)
        raw["routes"][1]["quiet_seconds"] = quiet_seconds
        raw["routes"][1]["complete_on_release"] = complete_on_release
        if max_pending_instances is not None:
            raw["pipeline"]["max_pending_instances"] = max_pending_instances
        raw["models"] = {"ct-demo": raw["models"]["ct-demo"]}
        raw["routes"] = [raw["routes"][1]]
        self.config = parse_config(raw)
        self.tmp = tmp
        self.journal = Journal(tmp / "state" / "journal.sqlite3")
        self.spool = Spool(tmp / "state" / "spool", 1)
        self.metrics = Metrics()
        self.card = load_card(ENGINES / "ct-demo")
        self.engine = CountingEngine(OnnxRuntimeEngine(self.card, intra_op_threads=1))
        self.engine.load()
        self.executor = ThreadPoolExecutor(1)
        self.woken = 0

    @asynccontextmanager
    async def pipeline(self, processes: bool = False) -> AsyncIterator[Pipeline]:
        batcher = Batcher("ct-demo", self.engine, 8, 2.0, self.metrics, self.executor)
        await batcher.start()
        pool = WorkerPool(1, processes=processes)
        pipe = Pipeline(self.config, self.journal, self.spool.path, self.metrics,
                        {"ct-demo": LoadedModel(self.card, batcher, "onnxruntime")}, pool, self.wake)
        try:
            yield pipe
        finally:
            await pipe.close()
            await batcher.stop(1.0)  # as the daemon's stop: a call still in the engine is not waited for
            pool.shutdown()

    def wake(self) -> None:
        self.woken += 1

    def store(self, pipe: Pipeline | None, path: Path) -> Recorded:
        """What the receiver does for one C-STORE, minus the network."""
        incoming = self.tmp / "incoming.dcm"
        incoming.write_bytes(path.read_bytes())
        meta = read_meta(incoming, "MODALITY", "EDGE_AGENT")
        name, size = self.spool.store(incoming)
        recorded = self.journal.record_instance(meta, name, size)
        if recorded.identical:
            self.spool.remove(name)
        elif pipe is not None:
            pipe.on_stored(meta, recorded)
        return recorded

    def findings(self) -> list[dict[str, Any]]:
        rows = self.journal.read("SELECT payload FROM outbox ORDER BY id")
        return [json.loads(bytes(r[0])) for r in rows]

    async def wait_findings(self, n: int) -> list[dict[str, Any]]:
        await until(lambda: len(self.findings()) >= n)
        return self.findings()

    def close(self) -> None:
        self.journal.close()
        self.executor.shutdown()


@contextmanager
def harness(tmp_path: Path, **kw: Any) -> Iterator[Harness]:
    h = Harness(tmp_path, **kw)
    try:
        yield h
    finally:
        h.close()


def test_a_series_becomes_one_finding_covering_every_instance(tmp_path: Path) -> None:
    slices = make_ct_series(tmp_path / "ct", 4)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert (f["instances_received"], f["instances_inferred"], f["instances_failed"]) == (4, 4, 0)
            assert f["revision"] == 0 and f["schema_version"] == "1.3"
            assert await pipe.drain(5.0) == 0

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_shutdown_during_completion_leaves_the_series_complete_and_the_next_start_finishes_it(
    tmp_path: Path,
) -> None:
    """Defect 1: cancellation is not failure; the finding after restart covers every instance."""
    slices = make_ct_series(tmp_path / "ct", 6)

    async def first_run(h: Harness) -> None:
        h.engine.gate = gate = threading.Event()
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)

            await until(lambda: h.journal.series_in(SeriesState.COMPLETE) != [])
            assert await pipe.drain(0.2) == 1  # the engine is held: the completion cannot finish in time
        gate.set()  # (after close: the held call returns into a stopped batcher)
        assert pipe.interrupted_series == 1

    async def second_run(h: Harness) -> None:
        h.engine.gate = None
        async with h.pipeline() as pipe:
            assert await pipe.resume() == (0, 1)
            [f] = await h.wait_findings(1)
            assert (f["instances_inferred"], f["instances_failed"]) == (6, 0)

    with harness(tmp_path) as h:
        asyncio.run(first_run(h))
        [series] = h.journal.series_in(SeriesState.COMPLETE)
        assert series.note is None and h.findings() == []
        asyncio.run(second_run(h))
        assert h.journal.series(series.id).state is SeriesState.QUEUED


def test_a_late_instance_opens_a_revision_that_covers_the_whole_series(tmp_path: Path) -> None:
    """Defect 2: the 4th slice after a 3-slice finding must not make a finding over that slice alone."""
    slices = make_ct_series(tmp_path / "ct", 4)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices[:3]:
                h.store(pipe, path)
            [first] = await h.wait_findings(1)
            again = h.store(pipe, slices[0])  # an identical re-send: nothing happens
            assert again.identical
            late = h.store(pipe, slices[3])
            assert late.reopened and late.revision == 1
            _, second = await h.wait_findings(2)
            assert first["revision"] == 0 and first["instances_inferred"] == 3
            assert second["revision"] == 1 and second["instances_inferred"] == 4
            assert second["finding_id"] != first["finding_id"]
            assert await pipe.drain(5.0) == 0
            assert len(h.findings()) == 2

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_images_in_acquisition_of_one_per_slice_waits_for_the_quiet_time(tmp_path: Path) -> None:
    """Defect 3: a 2-D MR whose every slice says (0020,1002) = 1 must give one finding, not one per slice."""
    slices = make_ct_series(tmp_path / "mr", 5)
    for path in slices:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = 1
        ds.AcquisitionNumber = 1
        ds.save_as(path, enforce_file_format=True)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert f["instances_inferred"] == 5 and f["revision"] == 0
            assert await pipe.drain(5.0) == 0
            assert len(h.findings()) == 1

    with harness(tmp_path, quiet_seconds=0.5) as h:
        asyncio.run(main(h))


def test_a_trusted_count_completes_before_the_quiet_time(tmp_path: Path) -> None:
    slices = make_ct_series(tmp_path / "ct", 3, images_in_acquisition=True)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)  # the quiet time is an hour: only the count can have ended it
            assert f["instances_inferred"] == 3

    with harness(tmp_path, quiet_seconds=3600.0) as h:
        asyncio.run(main(h))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_slice_that_cannot_be_decoded_is_counted_and_named_in_the_finding(tmp_path: Path, processes: bool) -> None:
    """Defect 5: failed slices do not vanish. With worker processes the inputs come back through shared memory
    (workers.Arena): every slot taken, the failed slice's too, is given back."""
    slices = make_ct_series(tmp_path / "ct", 3)
    ds = pydicom.dcmread(slices[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data: the header still reads
    ds.save_as(slices[1], enforce_file_format=True)
    broken_uid = str(ds.SOPInstanceUID)

    async def main(h: Harness) -> None:
        async with h.pipeline(processes) as pipe:
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert (f["instances_received"], f["instances_inferred"], f["instances_failed"]) == (3, 2, 1)
            assert f["failed_instance_uids"] == [broken_uid] and broken_uid not in f["sop_instance_uids"]
            # The engine was given the slices' real inputs (here all the same pixels), whichever way they came.
            [want] = load_instance_prepared(slices[0], h.card)
            rows = [row for batch in h.engine.calls for row in batch]
            assert len(rows) == 2 and all(np.array_equal(row, want.tensor) for row in rows)
            size = h.config.pipeline.preprocess_workers + 2 * 8  # the model's decode slots (the batcher takes 8)
            free = [a.free for a in pipe._arenas.values()]
            assert free == ([size] if processes else [])

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_without_shared_memory_the_inputs_come_back_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A box whose sandbox refuses memfd_create still infers; it says so once, at start."""
    slices = make_ct_series(tmp_path / "ct", 2)

    def refused(*_: Any) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)

    async def main(h: Harness) -> None:
        async with h.pipeline(processes=True) as pipe:
            assert pipe._arenas == {}
            for path in slices:
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert (f["instances_inferred"], f["instances_failed"]) == (2, 0)

    with harness(tmp_path) as h:
        asyncio.run(main(h))
    assert "no shared memory for preprocessing results (Operation not permitted)" in caplog.text


def slow_load_into(path: Path, card: Any, slot: Any) -> Any:
    """The worker's call, three seconds slower (it runs in a worker process, imported from here)."""
    time.sleep(3.0)
    return load_instance_prepared_into(path, card, slot)


def test_a_cancelled_instance_gives_its_slot_back_only_once_its_worker_call_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given back at the cancellation, the slot could go to the next instance while the cancelled call's worker
    still writes into it: the next instance would be inferred on this one's image."""
    [path] = make_ct_series(tmp_path / "ct", 1)
    monkeypatch.setattr(pipeline_module, "load_instance_prepared_into", slow_load_into)

    async def main(h: Harness) -> None:
        async with h.pipeline(processes=True) as pipe:
            arena = pipe._arenas["ct-demo"]
            size = arena.free
            r = h.store(pipe, path)
            await until(lambda: arena.free == size - 1)  # taken: the call is on its way to a worker
            pipe._work[r.series_id].instances[r.instance_id].task.cancel()
            await asyncio.sleep(0.3)
            assert arena.free == size - 1 and len(pipe._calls) == 1  # the worker is still at it
            await until(lambda: arena.free == size)
            assert not pipe._calls

    with harness(tmp_path, quiet_seconds=3600.0) as h:
        asyncio.run(main(h))


def test_closing_waits_only_so_long_for_a_cancelled_instances_worker_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [path] = make_ct_series(tmp_path / "ct", 1)
    monkeypatch.setattr(pipeline_module, "load_instance_prepared_into", slow_load_into)  # stuck, as on a bad file
    monkeypatch.setattr(pipeline_module, "CLOSE_WAIT_SECONDS", 0.3)

    async def main(h: Harness) -> None:
        async with h.pipeline(processes=True) as pipe:
            arena = pipe._arenas["ct-demo"]
            size = arena.free
            h.store(pipe, path)
            await until(lambda: arena.free == size - 1)
            started = time.monotonic()
            await pipe.close()
            assert time.monotonic() - started < 2.0 and len(pipe._calls) == 1  # the call still runs

    with harness(tmp_path, quiet_seconds=3600.0) as h:
        asyncio.run(main(h))


def test_a_transient_engine_failure_defers_the_series_instead_of_failing_it(tmp_path: Path) -> None:
    """Defect 5: an engine error that fails every slice is retried with back-off, not failed for good."""
    slices = make_ct_series(tmp_path / "ct", 2)

    async def main(h: Harness) -> None:
        h.engine.fail_next = 100  # the device is lost for a while
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)

            await until(lambda: any(s.attempts for s in h.journal.series_in(SeriesState.COMPLETE)))
            [s] = h.journal.series_in(SeriesState.COMPLETE)
            assert "EngineError" in (s.note or "") and h.journal.series_in(SeriesState.FAILED) == []
            h.engine.fail_next = 0  # the device is back
            [f] = await h.wait_findings(1)  # the first retry comes after 2 s
            assert (f["instances_inferred"], f["instances_failed"]) == (2, 0)

    with harness(tmp_path) as h:
        asyncio.run(main(h))


def test_every_slice_undecodable_fails_the_series_visibly(tmp_path: Path) -> None:
    slices = make_ct_series(tmp_path / "ct", 2)
    for path in slices:
        ds = pydicom.dcmread(path)
        ds.PixelData = b"\0\0"
        ds.save_as(path, enforce_file_format=True)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices:
                h.store(pipe, path)

            await until(lambda: h.journal.series_in(SeriesState.FAILED) != [])

    with harness(tmp_path) as h:
        asyncio.run(main(h))
        [s] = h.journal.series_in(SeriesState.FAILED)
        assert "could be decoded" in (s.note or "")
        assert h.metrics.registry.get_sample_value("edge_agent_series_total", {"outcome": "failed"}) == 1
        assert len(h.journal.referenced_spool_names()) == 2  # kept for an operator


def test_resume_after_a_crash_mid_series(tmp_path: Path) -> None:
    """After SIGKILL the journal holds an open series: the next start arms its timer and finishes it."""
    slices = make_ct_series(tmp_path / "ct", 3)

    async def main(h: Harness) -> None:
        for path in slices:
            h.store(None, path)  # stored and journalled, never handed over: the process died
        async with h.pipeline() as pipe:
            assert await pipe.resume() == (1, 0)
            [f] = await h.wait_findings(1)
            assert f["instances_inferred"] == 3

    with harness(tmp_path) as h:
        asyncio.run(main(h))


# -- back-pressure and complete_on_release (issue 9) -------------------------------------------------------


def test_a_flood_past_the_bound_is_refused_waits_on_the_spool_and_is_all_inferred_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the engine held, decoded arrays stop at the model's slots; admission refuses above the bound."""
    slices = make_ct_series(tmp_path / "ct", 40, images_in_acquisition=True)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in slices]
    decoded: list[weakref.ref[Any]] = []
    peak = 0
    lock = threading.Lock()

    decode = pipeline_module.load_instance_prepared_into

    def counting_decode(*args: Any) -> Any:
        nonlocal peak
        inputs, in_slot = decode(*args)
        with lock:
            decoded.extend(weakref.ref(p.tensor) for p in inputs)
            peak = max(peak, sum(r() is not None for r in decoded))
        return inputs, in_slot

    monkeypatch.setattr(pipeline_module, "load_instance_prepared_into", counting_decode)

    async def main(h: Harness) -> None:
        h.engine.gate = gate = threading.Event()
        async with h.pipeline() as pipe:
            slots = h.config.pipeline.preprocess_workers + 2 * 8  # the harness' batcher takes 8
            refused = []
            for path in slices:  # what the receiver does: ask before each instance
                if pipe.admission() is None:
                    h.store(pipe, path)
                else:
                    refused.append(path)
            assert len(refused) == 10 and pipe.pending_instances == 30
            reason = pipe.admission()
            assert reason is not None and "max_pending_instances" in reason
            assert h.metrics.registry.get_sample_value("edge_agent_pending_instances") == 30

            # The engine holds its first batch; the slots fill, and the other instances stay files.
            await until(lambda: len(decoded) >= slots)
            assert pipe.decoded_instances("ct-demo") == slots and len(decoded) == slots

            gate.set()
            await until(lambda: pipe.admission() is None)
            assert pipe.pending_instances <= 15  # accepting again at half the bound
            for path in refused:  # the sender's retry
                assert pipe.admission() is None
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert sorted(f["sop_instance_uids"]) == sorted(uids) and f["instances_failed"] == 0
            await until(lambda: pipe.pending_instances == 0)
            assert h.metrics.registry.get_sample_value("edge_agent_pending_instances") == 0

        assert peak <= slots, f"{peak} decoded arrays were alive at once; the bound is {slots}"

    with harness(tmp_path, quiet_seconds=3600.0, max_pending_instances=30) as h:
        asyncio.run(main(h))


def test_the_release_of_an_association_completes_its_series_without_the_quiet_time(tmp_path: Path) -> None:
    released = make_ct_series(tmp_path / "released", 3)
    still_open = make_ct_series(tmp_path / "open", 2)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in still_open:  # another association, not released (aborted, or still sending)
                h.store(pipe, path)
            ids = {h.store(pipe, path).series_id for path in released}
            pipe.on_released(ids)
            [f] = await h.wait_findings(1)  # the quiet time is an hour: only the release can have ended it
            assert f["instances_inferred"] == 3
            assert f["series_instance_uid"] == pydicom.dcmread(released[0]).SeriesInstanceUID
            assert await pipe.drain(5.0) == 0
            assert pipe.open_count() == 1 and len(h.journal.series_in(SeriesState.OPEN)) == 1

    with harness(tmp_path, quiet_seconds=3600.0, complete_on_release=True) as h:
        asyncio.run(main(h))


def test_a_release_leaves_series_of_routes_without_complete_on_release_to_their_quiet_time(tmp_path: Path) -> None:
    released = make_ct_series(tmp_path / "released", 2)
    counted = make_ct_series(tmp_path / "counted", 2, images_in_acquisition=True)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            ids = {h.store(pipe, path).series_id for path in released}
            pipe.on_released(ids)
            for path in counted:  # completes on its count, after the release was handed over
                h.store(pipe, path)
            [f] = await h.wait_findings(1)
            assert f["series_instance_uid"] == pydicom.dcmread(counted[0]).SeriesInstanceUID
            assert await pipe.drain(5.0) == 0
            assert len(h.findings()) == 1 and pipe.open_count() == 1

    with harness(tmp_path, quiet_seconds=3600.0) as h:
        asyncio.run(main(h))


def test_the_count_rule_sees_a_replaced_instance_once() -> None:
    # The rule's tallies follow each instance's latest values: a re-sent instance moved to the series' one
    # acquisition leaves no trace of its earlier one, so the series completes by count.
    work = pipeline_module._SeriesWork(series_id=1, revision=1, model=None, quiet_seconds=3.0, urgent=False,
                                       complete_on_release=False)
    work.see(1, 3, 1)
    work.see(2, 3, 2)
    work.see(3, 3, 1)
    assert not count_says_complete(len(work.seen), work.counts.keys(), work.acquisitions.keys())
    work.see(2, 3, 1)
    assert dict(work.counts) == {3: 3} and dict(work.acquisitions) == {1: 3}
    assert count_says_complete(len(work.seen), work.counts.keys(), work.acquisitions.keys())
    work.see(3, None, 1)
    assert dict(work.counts) == {3: 2, None: 1}
    assert not count_says_complete(len(work.seen), work.counts.keys(), work.acquisitions.keys())


def test_a_series_seen_again_after_its_rows_were_pruned_gets_another_finding_id(tmp_path: Path) -> None:
    """Days after a series' finding was acknowledged, released and pruned, a PACS forwards it again with a slice
    more: it starts over at revision 0, and its finding must not take the earlier one's id, which subscribers
    de-duplicate by and which names the heat-map files."""
    slices = make_ct_series(tmp_path / "ct", 3)

    async def main(h: Harness) -> None:
        async with h.pipeline() as pipe:
            for path in slices[:2]:
                h.store(pipe, path)
            [first] = await h.wait_findings(1)
            [(outbox_id,)] = h.journal.read("SELECT id FROM outbox")
            h.journal.outbox.ack(outbox_id, 1)
            for _, names in h.journal.claim_releasable(time.time() + 1):
                for name in names:
                    h.spool.remove(name)
            assert h.journal.prune(time.time() + 1)  # (a week on)
            h.store(pipe, slices[2])
            await h.wait_findings(1)
            [second] = h.findings()
        assert (first["revision"], second["revision"]) == (0, 0)
        assert first["series_instance_uid"] == second["series_instance_uid"]
        assert first["finding_id"] != second["finding_id"]
        assert first["heatmap"]["image"] != second["heatmap"]["image"]

    with harness(tmp_path) as h:
        asyncio.run(main(h))
