"""One routed series' journey: preprocess -> batcher -> triage -> outbox.

Streaming (DESIGN.md): every instance is decoded and inferred as it lands, while the rest of the
series is still arriving. The assembler only decides when the series is complete; then the triage
step aggregates results that are already there, so the delay after the last slice does not grow with
the series' length.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bus import finding as findings
from edge_agent.config import AgentConfig, Route
from edge_agent.dicom.assembler import Assembler
from edge_agent.dicom.pixels import load_instance, resize
from edge_agent.errors import DecodeError, EdgeAgentError
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import SliceResult
from edge_agent.journal import InstanceMeta, InstanceRow, Journal, Recorded, SeriesRow, SeriesState
from edge_agent.metrics import Metrics
from edge_agent.png import write_png
from edge_agent.routing import SeriesFacts, candidate_routes, match_route
from edge_agent.triage import LabelResult, SeriesResult, aggregate
from edge_agent.workers import WorkerPool

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    card: ModelCard
    batcher: Batcher
    backend: str


@dataclass
class _InstanceWork:
    """The inference of one instance: a task that yields one result per frame."""

    row: InstanceRow
    task: asyncio.Task[list[SliceResult]]


@dataclass
class _SeriesWork:
    series_id: int
    revision: int
    model: str | None  # the model streaming runs on, from the first candidate route
    quiet_seconds: float
    urgent: bool
    instances: dict[int, _InstanceWork] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # instance ids stored in this revision, inferred or not


@dataclass(frozen=True)
class _SeriesOutcome:
    state: SeriesState
    model: str | None = None


class Pipeline:
    """Owns the in-flight work of every open series and turns complete series into findings."""

    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        spool_path: Callable[[str], Path],
        metrics: Metrics,
        models: dict[str, LoadedModel],
        pool: WorkerPool,
        wake_publisher: Callable[[], None],
    ) -> None:
        self._config = config
        self._journal = journal
        self._spool_path = spool_path
        self._metrics = metrics
        self._models = models
        self._pool = pool
        self._wake_publisher = wake_publisher
        self._work: dict[int, _SeriesWork] = {}
        self._completing: set[asyncio.Task[None]] = set()
        # Wall-clock time, so that a series resumed from the journal keeps the quiet time it already waited.
        self._assembler = Assembler(self._complete, clock=time.time)
        self._host = socket.gethostname()
        self.finished_series = 0

    # -- arrival ---------------------------------------------------------------------------------

    def on_stored(self, meta: InstanceMeta, recorded: Recorded) -> None:
        """Called on the loop for every instance the receiver stored and journalled."""
        work = self._work.get(recorded.series_id)
        if work is None or work.revision != recorded.revision:
            if work is not None:
                self._cancel(work)
            work = self._new_work(recorded.series_id, recorded.revision, SeriesFacts.from_meta(meta))
        row = InstanceRow(
            id=recorded.instance_id,
            series_id=recorded.series_id,
            sop_instance_uid=meta.sop_instance_uid,
            sop_class_uid=meta.sop_class_uid,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            instance_number=meta.instance_number,
            spool_name=recorded.spool_name,
            size_bytes=0,
            received_at=time.time(),
        )
        self._start_instance(work, row)
        self._assembler.touch(recorded.series_id, work.quiet_seconds, len(work.seen), meta.expected_count)

    def _new_work(self, series_id: int, revision: int, facts: SeriesFacts) -> _SeriesWork:
        routes = candidate_routes(self._config.routes, facts)
        first: Route | None = routes[0] if routes else None
        quiet = self._config.pipeline.default_quiet_seconds
        if first is not None and first.quiet_seconds is not None:
            quiet = first.quiet_seconds
        work = _SeriesWork(
            series_id=series_id,
            revision=revision,
            model=first.model if first is not None and first.model in self._models else None,
            quiet_seconds=quiet,
            urgent=first is not None and first.priority == "urgent",
        )
        self._work[series_id] = work
        self._metrics.open_series.set(len(self._work))
        return work

    def _start_instance(self, work: _SeriesWork, row: InstanceRow) -> None:
        work.seen.add(row.id)
        old = work.instances.pop(row.id, None)
        if old is not None:
            old.task.cancel()  # a re-sent instance replaces the earlier one
        if work.model is None:
            return
        task = asyncio.get_running_loop().create_task(self._infer_instance(work, row.spool_name))
        # The completion step gathers these results; a task dropped before that (a re-sent instance, a
        # re-opened series) must not leave an unretrieved exception behind.
        task.add_done_callback(_retrieve)
        work.instances[row.id] = _InstanceWork(row, task)

    async def _infer_instance(self, work: _SeriesWork, spool_name: str) -> list[SliceResult]:
        assert work.model is not None
        loaded = self._models[work.model]
        path = self._spool_path(spool_name)
        started = time.perf_counter()
        waiting = self._metrics.queue_depth.labels(queue="preprocess")
        waiting.inc()
        try:
            inputs: list[np.ndarray] = await self._pool.run(load_instance, path, loaded.card)
        except DecodeError:
            # A re-sent instance replaces (and deletes) the file an earlier task may still be reading: only a
            # file that is still there failed to decode.
            if path.exists():
                self._metrics.instances.labels(outcome="decode_failed").inc()
            raise
        finally:
            waiting.dec()
        self._metrics.stage_seconds.labels(stage="preprocess").observe(time.perf_counter() - started)
        results = await asyncio.gather(*(loaded.batcher.submit(x, urgent=work.urgent) for x in inputs))
        self._metrics.instances.labels(outcome="inferred").inc()
        return list(results)

    # -- resuming after a restart ------------------------------------------------------------------

    def resume(self) -> tuple[int, int]:
        """Pick up every series the journal holds as open or complete. Returns (open, complete)."""
        open_rows = self._journal.series_in(SeriesState.OPEN)
        for s in open_rows:
            work = self._new_work(s.id, s.revision, SeriesFacts.from_row(s))
            for inst in self._journal.instances(s.id):
                self._start_instance(work, inst)
            self._assembler.touch(
                s.id, work.quiet_seconds, len(work.seen), s.expected_count, last_received=s.last_received
            )
        complete_rows = self._journal.series_in(SeriesState.COMPLETE)
        for s in complete_rows:
            work = self._new_work(s.id, s.revision, SeriesFacts.from_row(s))
            if s.model is not None and s.model in self._models:
                work.model = s.model
            for inst in self._journal.instances(s.id):
                self._start_instance(work, inst)
            self._spawn_complete(s.id)
        return len(open_rows), len(complete_rows)

    # -- completion ---------------------------------------------------------------------------------

    def _spawn_complete(self, series_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._complete(series_id))
        self._completing.add(task)
        task.add_done_callback(self._completing.discard)

    async def _complete(self, series_id: int) -> None:
        work = self._work.get(series_id)
        if work is None:
            return
        started = time.perf_counter()
        try:
            outcome = await self._finish(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a series must end in a recorded state, whatever failed
            logger.exception(
                "series %d: processing failed (%s); instances kept in the spool", series_id, type(exc).__name__
            )
            self._journal.set_series_state(
                series_id, SeriesState.FAILED, revision=work.revision, note=f"{type(exc).__name__}: {exc}"[:500]
            )
            self._metrics.series.labels(outcome="failed").inc()
            outcome = _SeriesOutcome(SeriesState.FAILED)
        finally:
            if self._work.get(series_id) is work:
                del self._work[series_id]
                self._assembler.forget(series_id)
            self._metrics.open_series.set(len(self._work))
        self._metrics.stage_seconds.labels(stage="assemble").observe(time.perf_counter() - started)
        self.finished_series += 1
        logger.info(
            "series %d revision %d: %s (model %s)", series_id, work.revision, outcome.state.value, outcome.model or "-"
        )

    async def _finish(self, work: _SeriesWork) -> _SeriesOutcome:
        row = self._journal.series(work.series_id)
        if row.revision != work.revision:
            return _SeriesOutcome(row.state)  # re-opened meanwhile; the new revision has its own work
        instances = self._journal.instances(work.series_id)
        facts = SeriesFacts.from_row(row)
        route = match_route(self._config.routes, facts, len(instances))
        if route is None or route.model not in self._models:
            self._journal.set_series_state(
                work.series_id, SeriesState.UNROUTED, revision=work.revision, note="no route matched"
            )
            self._metrics.series.labels(outcome="unrouted").inc()
            self._cancel(work)
            return _SeriesOutcome(SeriesState.UNROUTED)
        if not self._journal.set_series_state(
            work.series_id, SeriesState.COMPLETE, revision=work.revision, route=route.name, model=route.model
        ):
            return _SeriesOutcome(SeriesState.OPEN)
        if work.model != route.model:
            # Streaming ran a different candidate (the slice count ruled it out): run the right model now.
            self._cancel(work)
            work.model = route.model
            work.urgent = route.priority == "urgent"
        for inst in instances:
            if inst.id not in work.instances:
                self._start_instance(work, inst)
        job = self._journal.start_job(work.series_id, work.revision, route.model)
        loaded = self._models[route.model]
        ordered = [work.instances[i.id] for i in instances if i.id in work.instances]
        done = await asyncio.gather(*(w.task for w in ordered), return_exceptions=True)
        inferred_at = time.time()
        slices: list[tuple[int, SliceResult]] = []
        slice_refs: list[tuple[str, int]] = []
        failed = 0
        for w, res in zip(ordered, done, strict=True):
            if isinstance(res, BaseException):
                failed += 1
                continue
            for frame, r in enumerate(res):
                slices.append((len(slice_refs), r))
                slice_refs.append((w.row.sop_instance_uid, frame))
        if not slices:
            self._journal.finish_job(job, error=f"none of {len(ordered)} instances could be decoded")
            raise EdgeAgentError(f"none of the {len(ordered)} instances could be decoded or inferred")
        result = aggregate(loaded.card, slices)
        self._metrics.triage.labels(model=route.model, priority=result.priority).inc()
        msg_id = findings.message_id(row.series_uid, route.model, loaded.card.version, work.revision)
        shown = _shown_label(result)
        image = await self._store_heatmap(shown, loaded.card, msg_id)
        payload = findings.build_finding(
            self._finding_input(
                row,
                route.name,
                loaded,
                result,
                slice_refs,
                [i.sop_instance_uid for i in instances],
                inferred_at,
                shown,
                image,
            )
        )
        subject = findings.subject(self._config.bus.subject_prefix, self._config.site, row.modality, route.model)
        queued = self._journal.enqueue_finding(
            work.series_id, work.revision, route.model, msg_id, subject, findings.encode(payload)
        )
        self._journal.finish_job(job, error=None if queued else "series re-opened before the finding was queued")
        if queued:
            self._metrics.findings.labels(model=route.model, outcome="queued").inc()
            self._metrics.series.labels(outcome="routed").inc()
            self._wake_publisher()
            return _SeriesOutcome(SeriesState.QUEUED, route.model)
        return _SeriesOutcome(SeriesState.OPEN, route.model)

    def _finding_input(
        self,
        row: SeriesRow,
        route: str,
        loaded: LoadedModel,
        result: SeriesResult,
        slice_refs: list[tuple[str, int]],
        sop_instance_uids: list[str],
        inferred_at: float,
        shown: LabelResult | None,
        image: str | None,
    ) -> findings.FindingInput:
        labels = []
        for r in result.labels:
            uid, frame = slice_refs[r.index]
            labels.append(
                findings.LabelResult(
                    label=r.label, score=r.score, threshold=r.threshold, driving_instance_uid=uid, driving_frame=frame
                )
            )
        heatmap = None
        if shown is not None and shown.box is not None:
            uid, frame = slice_refs[shown.index]
            x0, y0, x1, y1 = shown.box.fraction
            heatmap = findings.Heatmap(
                label=shown.label,
                x0=x0,
                y0=y0,
                x1=x1,
                y1=y1,
                peak=min(1.0, max(0.0, shown.box.peak)),
                driving_instance_uid=uid,
                driving_frame=frame,
                image=image,
            )
        card = loaded.card
        return findings.FindingInput(
            site=self._config.site,
            study_instance_uid=row.study_uid,
            series_instance_uid=row.series_uid,
            sop_instance_uids=sop_instance_uids,
            accession_number=row.accession,
            calling_ae_title=row.calling_aet,
            called_ae_title=row.called_aet,
            modality=row.modality,
            body_part=row.body_part,
            route=route,
            model=findings.ModelInfo(name=card.name, version=card.version, sha256=card.sha256, backend=loaded.backend),
            labels=labels,
            priority=str(result.priority.value),
            heatmap=heatmap,
            revision=row.revision,
            timings=findings.Timings(
                received_first=row.first_received,
                received_last=row.last_received,
                completed=time.time(),
                inferred=inferred_at,
            ),
            produced_at=time.time(),
            agent_host=self._host,
        )

    async def _store_heatmap(self, shown: LabelResult | None, card: ModelCard, msg_id: str) -> str | None:
        """Write the shown label's heat map as a PNG for viewers; its name is the finding id, never a UID."""
        if not self._config.heatmaps.enabled or shown is None or shown.heatmap is None:
            return None
        name = f"heatmaps/{msg_id}.png"
        path = self._config.state_dir / name
        height, width = card.preprocessing.resize
        try:
            await asyncio.to_thread(_write_heatmap, path, shown.heatmap, height, width)
        except OSError as exc:
            # The finding matters more than its picture: publish it without the image.
            logger.warning("heat map not stored (%s); the finding goes out without it", exc.strerror or exc)
            return None
        return name

    def _cancel(self, work: _SeriesWork) -> None:
        for w in work.instances.values():
            w.task.cancel()
        work.instances.clear()

    # -- shutdown -----------------------------------------------------------------------------------

    def open_count(self) -> int:
        return len(self._work)

    async def drain(self, timeout_seconds: float) -> int:
        """Wait for series that are completing to reach the outbox. Returns how many did not."""
        if self._completing:
            _, pending = await asyncio.wait(set(self._completing), timeout=timeout_seconds)
            return len(pending)
        return 0

    async def close(self) -> None:
        """Cancel what is in flight; the journal keeps it, and the next start resumes it."""
        tasks: list[asyncio.Task[Any]] = []
        for work in list(self._work.values()):
            tasks.extend(w.task for w in work.instances.values())
            self._cancel(work)
        for task in list(self._completing):
            task.cancel()
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._assembler.close()
        self._work.clear()


def _shown_label(result: SeriesResult) -> LabelResult | None:
    """The label whose heat map a viewer is shown: the highest-scoring positive one, else the highest."""
    with_maps = [r for r in result.labels if r.heatmap is not None]
    return max(with_maps, key=lambda r: (r.positive, r.score)) if with_maps else None


def _write_heatmap(path: Path, heatmap: np.ndarray, height: int, width: int) -> None:
    grey = np.clip(resize(np.asarray(heatmap, dtype=np.float32), height, width), 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.round(grey * 255).astype(np.uint8))


def _retrieve(task: asyncio.Task[list[SliceResult]]) -> None:
    if not task.cancelled():
        task.exception()
