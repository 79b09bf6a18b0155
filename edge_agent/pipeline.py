"""One routed series' journey: preprocess -> batcher -> triage -> outbox.

Streaming (DESIGN.md): every instance is decoded and inferred as it lands, while the rest of the
series is still arriving. The assembler only decides when the series is complete; then the triage
step aggregates results that are already there, so the delay after the last slice does not grow with
the series' length.

The pipeline is the one owner of a series' in-flight work (issue 8): it holds every instance task and
every completion task, ``drain()`` awaits them all, and ``close()`` cancels what is left. A cancelled
completion is not a failure: the series stays COMPLETE (or OPEN) in the journal and the next start
finishes it. Journal calls run in threads, off the event loop.

It also owns the back-pressure (issue 9, backpressure.py): it counts the instances received and not yet
inferred, which ``admission()`` turns into the receiver's answer, and it decodes an instance only when a slot
of its model is free, so that a slow engine leaves the backlog on the spool rather than in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.backpressure import Admission, Slots
from edge_agent.bus import finding as findings
from edge_agent.bus.pseudonym import finding_message_id
from edge_agent.config import AgentConfig, Route
from edge_agent.dicom.assembler import Assembler
from edge_agent.dicom.header import InstanceMeta
from edge_agent.drift import Drift
from edge_agent.errors import DecodeError, EngineError, JournalError
from edge_agent.finding_maker import finding_input, overlay_name, shown_label, store_heatmap, store_overlay
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import SliceResult
from edge_agent.inference.preprocess import Prepared, load_instance_prepared_into
from edge_agent.journal import InstanceRow, Journal, Recorded, SeriesRow, SeriesState
from edge_agent.logs import set_log_context
from edge_agent.metrics import Metrics
from edge_agent.routing import SeriesFacts, candidate_routes, match_route
from edge_agent.series import count_says_complete, retry_delay_seconds
from edge_agent.stages import InstanceStages, series_stage_seconds
from edge_agent.triage import LabelResult, aggregate
from edge_agent.workers import Arena, SentOnce, Slot, WorkerPool

logger = logging.getLogger(__name__)

# At close, how long preprocessing calls whose instance was cancelled may take to end (they write into shared
# memory the pipeline then unmaps).
CLOSE_WAIT_SECONDS = 5.0

T = TypeVar("T")

# One frame's result and its image's (rows, columns).
Shaped = tuple[SliceResult, tuple[int, int]]


@dataclass
class LoadedModel:
    card: ModelCard
    batcher: Batcher
    backend: str
    # The card as preprocessing calls pass it to the worker pool: pickled once, not once per instance.
    card_for_workers: SentOnce[ModelCard] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.card_for_workers = SentOnce(self.card)


@dataclass
class _InstanceWork:
    """The inference of one instance: a task that yields one result per frame."""

    row: InstanceRow
    task: asyncio.Task[list[Shaped]]
    stages: InstanceStages = field(default_factory=InstanceStages)  # filled in by the task, for the finding


@dataclass
class _SeriesWork:
    series_id: int
    revision: int
    model: str | None  # the model streaming runs on, from the first candidate route
    quiet_seconds: float
    urgent: bool
    complete_on_release: bool  # the route's: an association's release ends the series
    instances: dict[int, _InstanceWork] = field(default_factory=dict)
    # instance id -> (Images in Acquisition, Acquisition Number), for the count rule, and how many instances
    # carry each value (so that each arrival asks the rule in constant time, not in time of the series' size)
    seen: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)
    counts: Counter[int | None] = field(default_factory=Counter)
    acquisitions: Counter[int | None] = field(default_factory=Counter)
    # instance id -> seconds its C-STORE took (this run's arrivals only), kept should its inference start again
    receive_seconds: dict[int, float] = field(default_factory=dict)
    journal_errors: int = 0  # completions in a row that the journal could not record: the back-off's attempt

    def see(self, instance_id: int, expected_count: int | None, acquisition_number: int | None) -> None:
        old = self.seen.get(instance_id)
        if old is not None:
            for counter, value in ((self.counts, old[0]), (self.acquisitions, old[1])):
                counter[value] -= 1
                if counter[value] <= 0:
                    del counter[value]
        self.seen[instance_id] = (expected_count, acquisition_number)
        self.counts[expected_count] += 1
        self.acquisitions[acquisition_number] += 1


@dataclass(frozen=True)
class _Outcome:
    state: SeriesState
    model: str | None = None


class _Interrupted(Exception):
    """Shutdown cancelled the instance work a completion waited for: leave the series for the next start."""


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
        drift: Drift | None = None,
    ) -> None:
        self._config = config
        self._drift = drift  # fed every inferred instance's inputs and scores (issue 10)
        self._journal = journal
        self._spool_path = spool_path
        self._metrics = metrics
        self._models = models
        self._pool = pool
        self._wake_publisher = wake_publisher
        self._work: dict[int, _SeriesWork] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._completing: set[int] = set()  # series with a completion task running
        self._closing = False
        # Wall-clock time, so that a series resumed from the journal keeps the quiet time it already waited.
        self._assembler = Assembler(self._due, clock=time.time)
        self._host = socket.gethostname()
        self._admission = Admission(config.pipeline.max_pending_instances)
        self._pending = 0  # instance tasks not yet ended: received and not yet inferred
        # Decoded instances held per model: the ones being decoded, one batch in the engine and one filling.
        self._slots = {
            name: Slots(config.pipeline.preprocess_workers + 2 * loaded.batcher.max_batch)
            for name, loaded in models.items()
        }
        # With worker processes, one input per decoded instance comes back through shared memory (workers.Arena).
        self._arenas: dict[str, Arena] = {}
        self._calls: set[asyncio.Future[list[Prepared]]] = set()  # worker calls writing into an arena's slot
        if pool.processes:
            try:
                for name, loaded in models.items():
                    self._arenas[name] = Arena(self._slots[name].size, 4 * math.prod(loaded.card.input_shape))
            except OSError as exc:
                logger.warning("no shared memory for preprocessing results (%s); they come back through the "
                               "worker pool's pipe", exc.strerror or type(exc).__name__)
                for arena in self._arenas.values():
                    arena.close()
                self._arenas.clear()
        self.finished_series = 0
        self.interrupted_series = 0

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A journal call, in a thread: its fsyncs must not stall the loop (issue 8, defect 10)."""
        return await asyncio.to_thread(fn, *args)

    # -- admission (issue 9) -------------------------------------------------------------------------

    def admission(self) -> str | None:
        """None when a new instance may be accepted; else why not (no patient data). Safe from any thread.

        The receiver asks before it accepts each instance, and answers 0xA700 when refused. Cheap: it reads
        one attribute that the loop keeps up to date. The count it follows moves on the loop, after the
        receiver hands an instance over, so it may pass the bound by up to one instance per association.
        """
        return self._admission.reason

    @property
    def pending_instances(self) -> int:
        """Instances received (or resumed) and not yet inferred."""
        return self._pending

    def decoded_instances(self, model: str) -> int:
        """Instances of ``model`` decoded (or being decoded) and held in memory for inference."""
        return self._slots[model].held

    def _pending_changed(self, delta: int) -> None:
        self._pending += delta
        self._metrics.pending_instances.set(self._pending)
        if self._admission.update(self._pending):
            if self._admission.reason is not None:
                logger.warning("refusing new instances: %s", self._admission.reason)
            else:
                logger.info("accepting instances again: %d wait for inference", self._pending)

    # -- arrival ---------------------------------------------------------------------------------

    def on_stored(self, meta: InstanceMeta, recorded: Recorded) -> None:
        """Called on the loop for every instance the receiver stored and journalled."""
        if recorded.identical or self._closing:
            return  # nothing changed; or shutting down, and the journal has it for the next start
        work = self._work.get(recorded.series_id)
        if work is None:
            work = self._new_work(recorded.series_id, recorded.revision, SeriesFacts.from_meta(meta))
        elif work.revision != recorded.revision:
            # New data after the series closed: the next revision covers the whole series. Results of the
            # instances still held carry over (same files); the earlier completion finds its revision stale.
            work.revision = recorded.revision
        if recorded.receive_seconds is not None:
            work.receive_seconds[recorded.instance_id] = recorded.receive_seconds
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
            expected_count=meta.expected_count,
            acquisition_number=meta.acquisition_number,
        )
        self._start_instance(work, row)
        self._rearm(work)

    def _rearm(self, work: _SeriesWork, last_received: float | None = None) -> None:
        complete = count_says_complete(len(work.seen), work.counts.keys(), work.acquisitions.keys())
        self._assembler.touch(work.series_id, work.quiet_seconds, complete, last_received=last_received)

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
            complete_on_release=first is not None and first.complete_on_release,
        )
        self._work[series_id] = work
        self._metrics.open_series.set(len(self._work))
        return work

    def _start_instance(self, work: _SeriesWork, row: InstanceRow) -> None:
        work.see(row.id, row.expected_count, row.acquisition_number)
        old = work.instances.get(row.id)
        if old is not None and old.row.spool_name == row.spool_name:
            # The same content (a spool file's name is never reused): a completion started it from the journal's
            # list before the receiver's hand-over came. Started again, its result would be cancelled under the
            # completion waiting for it.
            return
        if old is not None:
            del work.instances[row.id]
            old.task.cancel()  # a re-sent instance with new content replaces the earlier one
        if work.model is None:
            return
        stages = InstanceStages(receive=work.receive_seconds.get(row.id))
        task = asyncio.get_running_loop().create_task(
            self._infer_instance(work.model, work.urgent, row.spool_name, stages)
        )
        # The completion step gathers these results; a task dropped before that (a replaced instance, a
        # re-routed series) must not leave an unretrieved exception behind.
        task.add_done_callback(_retrieve)
        task.add_done_callback(lambda _: self._pending_changed(-1))
        work.instances[row.id] = _InstanceWork(row, task, stages)
        self._pending_changed(+1)

    async def _infer_instance(self, model: str, urgent: bool, spool_name: str, stages: InstanceStages) -> list[Shaped]:
        slots = self._slots[model]
        decoded = self._metrics.decoded_instances.labels(model=model)
        # Decode only when the model has room (issue 9): until then the instance waits on the spool, as a file.
        try:
            async with slots.hold(urgent):
                decoded.set(slots.held)
                return await self._decode_and_infer(model, urgent, spool_name, stages)
        finally:
            decoded.set(slots.held)

    async def _decode_and_infer(self, model: str, urgent: bool, spool_name: str,
                                stages: InstanceStages) -> list[Shaped]:
        loaded = self._models[model]
        arena = self._arenas.get(model)
        slot = arena.take() if arena is not None else None
        call: asyncio.Future[list[Prepared]] | None = None
        try:
            if slot is None:
                inputs = await self._preprocess(loaded, spool_name, None, None, stages, urgent=urgent)
            else:
                # The worker's call runs as a task of its own: if this one is cancelled, the worker may still be
                # writing into the slot, so the slot goes back only once the call has ended too; given back
                # sooner, the next instance's input could be overwritten by this one's.
                call = asyncio.ensure_future(self._preprocess(loaded, spool_name, arena, slot, stages, urgent=urgent))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
                call.add_done_callback(_retrieve)
                inputs = await asyncio.shield(call)
            timed = await asyncio.gather(*(loaded.batcher.submit_timed(p.tensor, urgent=urgent) for p in inputs))
        finally:
            # Here the batch that read the input has run, or this task was cancelled (the batcher's result for
            # it, whatever the slot held by then, goes nowhere) or failed.
            if slot is not None:
                assert arena is not None and call is not None
                if call.done():
                    arena.give_back(slot)
                else:
                    call.add_done_callback(lambda _: arena.give_back(slot))
        stages.frames_inferred((q for _, q, _ in timed), (i for _, _, i in timed))
        results = [r for r, _, _ in timed]
        self._metrics.instances.labels(outcome="inferred").inc()
        if self._drift is not None:
            self._drift.observe(model, inputs, results)
        return [(r, p.source_shape) for r, p in zip(results, inputs, strict=True)]

    async def _preprocess(self, loaded: LoadedModel, spool_name: str, arena: Arena | None, slot: Slot | None,
                          stages: InstanceStages, *, urgent: bool) -> list[Prepared]:
        """Decode and prepare an instance in a worker; the first frame's input in ``slot`` when there is one. An
        urgent route's instance goes ahead of the routine ones waiting for a worker."""
        path = self._spool_path(spool_name)
        started = time.perf_counter()
        waiting = self._metrics.queue_depth.labels(queue="preprocess")
        waiting.inc()
        try:
            inputs, in_slot = await self._pool.run(load_instance_prepared_into, path, loaded.card_for_workers, slot,
                                                   urgent=urgent)
        except DecodeError:
            # A re-sent instance replaces (and deletes) the file an earlier task may still be reading: only a
            # file that is still there failed to decode.
            if path.exists():
                self._metrics.instances.labels(outcome="decode_failed").inc()
            raise
        finally:
            waiting.dec()
        if in_slot:
            assert arena is not None and slot is not None
            inputs[0] = dataclasses.replace(inputs[0], tensor=arena.read(slot, loaded.card.input_shape))
        stages.preprocess = preprocess_seconds = time.perf_counter() - started
        self._metrics.stage_seconds.labels(stage="preprocess").observe(preprocess_seconds)
        return inputs

    def on_released(self, series_ids: Iterable[int]) -> None:
        """Called on the loop when an association was released normally, with the series it stored into.

        A series whose route has ``complete_on_release`` completes now instead of after its quiet time; the
        others are left to their timers. An aborted association never comes here: the quiet time rules.
        """
        if self._closing:
            return
        for series_id in series_ids:
            work = self._work.get(series_id)
            if work is not None and work.complete_on_release:
                # The path the quiet time would take (a completion already running looks again shortly).
                self._assembler.arm(series_id, 0.0)

    # -- resuming after a restart ------------------------------------------------------------------

    async def resume(self) -> tuple[int, int]:
        """Pick up every series the journal holds as open or complete. Returns (open, complete)."""
        open_rows = await self._db(self._journal.series_in, SeriesState.OPEN)
        for s in open_rows:
            work = self._new_work(s.id, s.revision, SeriesFacts.from_row(s))
            for inst in await self._db(self._journal.instances, s.id):
                self._start_instance(work, inst)
            self._rearm(work, last_received=s.last_received)
        complete_rows = await self._db(self._journal.series_in, SeriesState.COMPLETE)
        for s in complete_rows:
            work = self._new_work(s.id, s.revision, SeriesFacts.from_row(s))
            if s.model is not None and s.model in self._models:
                work.model = s.model
            for inst in await self._db(self._journal.instances, s.id):
                self._start_instance(work, inst)
            # A series deferred after a transient failure keeps its back-off across the restart.
            self._assembler.arm(s.id, 0.0 if s.retry_at is None else s.retry_at - time.time())
        return len(open_rows), len(complete_rows)

    # -- completion ---------------------------------------------------------------------------------

    def _due(self, series_id: int) -> None:
        """The assembler's timer fired: complete the series in a task this pipeline owns."""
        work = self._work.get(series_id)
        if work is None or self._closing:
            return
        if series_id in self._completing:
            # A completion is still running (a retry timer raced it): look again shortly.
            self._assembler.arm(series_id, 0.5)
            return
        self._completing.add(series_id)
        task = asyncio.get_running_loop().create_task(
            self._complete(work, work.revision), name=f"complete-series-{series_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._completing.discard(series_id))

    async def _complete(self, work: _SeriesWork, revision: int) -> None:
        set_log_context(series_id=work.series_id)  # this task's own context: every line it logs names the series
        started = time.time()
        outcome: _Outcome | None = None
        try:
            outcome = await self._finish(work, revision, started)
        except (asyncio.CancelledError, _Interrupted):
            # Shutdown: not a failure. The journal holds the series as COMPLETE (or OPEN) at this revision,
            # and the next start finishes it (issue 8, defect 1).
            self.interrupted_series += 1
            logger.info("series %d revision %d: interrupted by shutdown; resumed at the next start",
                        work.series_id, revision)
            return
        except JournalError as exc:
            outcome = self._after_journal_error(work, revision, exc)
        except Exception as exc:  # a series must end in a recorded state, whatever failed
            outcome = await self._fail(work, revision, exc, started)
        else:
            work.journal_errors = 0
        finally:
            if outcome is not None and outcome.state is not SeriesState.COMPLETE and self._work.get(
                work.series_id
            ) is work and work.revision == revision:
                del self._work[work.series_id]
                self._assembler.forget(work.series_id)
                self._cancel(work)
            self._metrics.open_series.set(len(self._work))
        self._metrics.stage_seconds.labels(stage="assemble").observe(max(0.0, time.time() - started))
        if outcome.state is not SeriesState.COMPLETE:
            self.finished_series += 1
        logger.info("series %d revision %d: %s (model %s)", work.series_id, revision, outcome.state.value,
                    outcome.model or "-")

    async def _fail(self, work: _SeriesWork, revision: int, exc: Exception, started: float) -> _Outcome:
        """An unforeseen error: the series is failed for good, its files kept for an operator."""
        logger.error("series %d: processing failed (%s); instances kept in the spool", work.series_id,
                     type(exc).__name__, exc_info=exc)
        note = f"{type(exc).__name__}: {exc}"[:500]
        try:
            await self._db(self._journal.fail_series, work.series_id, revision, work.model, note, started)
        except JournalError as journal_exc:
            # Not even the failure could be recorded: left unrecorded, the series would wait for a restart.
            return self._after_journal_error(work, revision, journal_exc)
        self._metrics.series.labels(outcome="failed").inc()
        return _Outcome(SeriesState.FAILED)

    def _after_journal_error(self, work: _SeriesWork, revision: int, exc: JournalError) -> _Outcome:
        """The journal could not record the completion (a full or failing state disk): nothing changed in it, so
        the series is tried again with the back-off of a transient engine failure. The try is not journalled (the
        journal is what failed); a restart meanwhile finds the series as it was and resumes it."""
        work.journal_errors += 1
        delay = retry_delay_seconds(work.journal_errors)
        self._metrics.series.labels(outcome="deferred").inc()
        logger.warning("series %d revision %d: %s; tried again in %.0f s", work.series_id, revision, exc, delay)
        if self._work.get(work.series_id) is work and work.revision == revision:
            self._assembler.arm(work.series_id, delay)  # (a newer revision has its own timer)
        return _Outcome(SeriesState.COMPLETE, work.model)

    async def _finish(self, work: _SeriesWork, revision: int, started: float) -> _Outcome:
        row, instances = await self._db(self._journal.snapshot, work.series_id)
        if row.revision != revision:
            return _Outcome(row.state)  # re-opened meanwhile; the next revision has its own completion
        if row.state is SeriesState.OPEN:
            closing = await self._db(self._journal.close_series, work.series_id, revision, self._decide)
            if closing is None:
                return _Outcome(SeriesState.OPEN)  # a new instance re-opened it in between
            row, instances = closing.series, closing.instances
            if not closing.routed:
                self._metrics.series.labels(outcome="unrouted").inc()
                return _Outcome(SeriesState.UNROUTED)
        elif row.state is not SeriesState.COMPLETE:
            return _Outcome(row.state)
        assert row.route is not None and row.model is not None
        route = next((r for r in self._config.routes if r.name == row.route), None)
        if work.model != row.model:
            # Streaming ran a different candidate (the slice count ruled it out): run the right model now.
            self._cancel(work)
            work.model = row.model
            work.urgent = route is not None and route.priority == "urgent"
        for inst in instances:
            held = work.instances.get(inst.id)
            if held is None or held.row.spool_name != inst.spool_name:
                # Not started yet, or started on content the instance no longer has: a re-send committed before
                # the series closed whose hand-over (on_stored) has not come yet. The journal's list is what the
                # finding must cover.
                self._start_instance(work, inst)
        loaded = self._models[row.model]
        ordered, done = await self._results(work, revision, instances)
        if work.revision != revision:
            return _Outcome(SeriesState.OPEN)  # new data arrived while inferring; the next revision covers it
        if self._closing and any(isinstance(r, asyncio.CancelledError) for r in done):
            raise _Interrupted
        inferred_at = time.time()
        slices: list[tuple[int, SliceResult]] = []
        shapes: dict[int, tuple[int, int]] = {}
        slice_refs: list[tuple[str, int]] = []
        slice_files: list[str] = []  # the spool file of each slice, for the heat-map overlay
        covered: list[str] = []
        failed: list[str] = []
        covered_stages: list[InstanceStages] = []
        transient: list[tuple[_InstanceWork, BaseException]] = []
        for w, res in zip(ordered, done, strict=True):
            if isinstance(res, EngineError | TimeoutError | asyncio.CancelledError):
                transient.append((w, res))
                continue
            if isinstance(res, BaseException):
                failed.append(w.row.sop_instance_uid)
                continue
            covered.append(w.row.sop_instance_uid)
            covered_stages.append(w.stages)
            for frame, (r, shape) in enumerate(res):
                shapes[len(slice_refs)] = shape
                slices.append((len(slice_refs), r))
                slice_refs.append((w.row.sop_instance_uid, frame))
                slice_files.append(w.row.spool_name)
        if transient:
            return await self._defer(work, row, transient, started)
        if not slices:
            self._metrics.series.labels(outcome="failed").inc()
            note = f"none of the {len(ordered)} instances could be decoded"
            logger.error("series %d: %s; instances kept in the spool", work.series_id, note)
            await self._db(self._journal.fail_series, work.series_id, revision, row.model, note, started)
            return _Outcome(SeriesState.FAILED, row.model)
        result = aggregate(loaded.card, slices, shapes)
        self._metrics.triage.labels(model=row.model, priority=result.priority).inc()
        msg_id = finding_message_id(row.series_uid, row.model, loaded.card.version, revision, row.first_received,
                                    self._config.privacy.pseudonymiser)
        set_log_context(finding_id=msg_id)
        shown = shown_label(result)
        image = await store_heatmap(self._config, self._metrics, shown, loaded.card, msg_id)
        # The overlay (a decode, two resizes and a PNG: about 0.2 s for a large radiograph) is drawn after the
        # finding is queued, not before: the finding names it and it follows within that time.
        # Once the finding is acknowledged the series' spool files may be released at any moment: the overlay
        # reads a hard link to its driving file, made before the finding is queued (one metadata update).
        source = self._overlay_source(slice_files[shown.index]) if image is not None and shown is not None else None
        overlay = overlay_name(msg_id) if source is not None else None
        payload = findings.build_finding(
            finding_input(self._config, self._host, row, row.route, loaded, result, slice_refs, covered, failed,
                          inferred_at, shown, image, stage_seconds=series_stage_seconds(covered_stages),
                          overlay=overlay)
        )
        subject = findings.subject(self._config.bus.subject_prefix, self._config.site, row.modality, row.model)
        queued = False
        try:
            queued = await self._db(
                self._journal.outbox.enqueue, work.series_id, revision, row.model, msg_id, subject,
                findings.encode(payload), started,
            )
        finally:
            if not queued and source is not None:
                with contextlib.suppress(OSError):
                    os.unlink(source)  # no finding names it (a retry makes its own)
        if not queued:
            return _Outcome(SeriesState.OPEN, row.model)
        self._metrics.findings.labels(model=row.model, outcome="queued").inc()
        self._metrics.series.labels(outcome="routed").inc()
        if failed:
            self._metrics.series.labels(outcome="partly_failed").inc()
        self._wake_publisher()
        if source is not None:
            assert shown is not None
            self._after(self._draw_overlay(shown, loaded.card, msg_id, source, slice_refs[shown.index][1]))
        return _Outcome(SeriesState.QUEUED, row.model)

    async def _results(self, work: _SeriesWork, revision: int,
                       instances: list[InstanceRow]) -> tuple[list[_InstanceWork], list[Any]]:
        """Wait for the result of each instance in ``instances`` that has a task (in that order).

        A task replaced while it was waited for (a hand-over that came late: ``_start_instance`` cancels the task
        it replaces) is waited for again in its replacement: its cancellation is not a failure of the instance.
        """
        while True:
            ordered = [work.instances[i.id] for i in instances if i.id in work.instances]
            done = await asyncio.gather(*(w.task for w in ordered), return_exceptions=True)
            if work.revision != revision or all(work.instances.get(w.row.id) is w for w in ordered):
                return ordered, done

    def _overlay_source(self, spool_name: str) -> Path | None:
        """A hard link to a spool file in the spool's tmp folder (swept at start if left), or None if none can be
        made (the finding then names no overlay)."""
        link = self._spool_path(f"tmp/overlay-{secrets.token_hex(12)}.dcm")
        try:
            os.link(self._spool_path(spool_name), link)
        except OSError as exc:
            self._metrics.heatmap_write_errors.inc()
            logger.warning("heat-map overlay skipped: cannot link its image (%s)", exc.strerror)
            return None
        return link

    async def _draw_overlay(self, shown: LabelResult, card: ModelCard, msg_id: str, source: Path, frame: int) -> None:
        try:
            await store_overlay(self._config, self._metrics, self._pool.run, shown, card, msg_id, source, frame)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(source)  # one metadata update, like the link

    def _after(self, work: Coroutine[Any, Any, Any]) -> None:
        """Work that follows a queued finding (its overlay); drained and cancelled with the completions."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _defer(self, work: _SeriesWork, row: SeriesRow, transient: list[tuple[_InstanceWork, BaseException]],
                     started: float) -> _Outcome:
        """Some instances failed for a reason that may pass (the engine): try the series again later."""
        # Only these run again (also after a journal error below); the others' results are kept.
        for w, _ in transient:
            if work.instances.get(w.row.id) is w:
                del work.instances[w.row.id]
        delay = retry_delay_seconds(row.attempts + 1)
        kinds = sorted({type(exc).__name__ for _, exc in transient})
        note = (f"{len(transient)} instance(s) not inferred ({', '.join(kinds)}); "
                f"try {row.attempts + 2} in {delay:.0f} s")
        if not await self._db(self._journal.defer_series, work.series_id, work.revision, row.model or "-", note,
                              time.time() + delay, started):
            return _Outcome(SeriesState.OPEN)
        self._metrics.series.labels(outcome="deferred").inc()
        logger.warning("series %d: %s", work.series_id, note)
        self._assembler.arm(work.series_id, delay)
        return _Outcome(SeriesState.COMPLETE, row.model)

    def _decide(self, row: SeriesRow, instances: list[InstanceRow]) -> tuple[str, str] | None:
        """Routing, run inside the journal's closing transaction (pure: config and the series' facts)."""
        route = match_route(self._config.routes, SeriesFacts.from_row(row), len(instances))
        if route is None or route.model not in self._models:
            return None
        return route.name, route.model

    def _cancel(self, work: _SeriesWork) -> None:
        for w in work.instances.values():
            w.task.cancel()
        work.instances.clear()

    # -- shutdown -----------------------------------------------------------------------------------

    def open_count(self) -> int:
        return len(self._work)

    async def drain(self, timeout_seconds: float) -> int:
        """Wait for every running completion (and any that starts meanwhile) to end. Returns how many did not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel what is in flight; the journal keeps it, and the next start resumes it."""
        self._closing = True
        self._assembler.close()
        tasks: list[asyncio.Task[Any]] = list(self._tasks)
        for work in list(self._work.values()):
            tasks.extend(w.task for w in work.instances.values())
            self._cancel(work)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._work.clear()
        # Calls whose task was cancelled may still be writing into a slot: one decode each, then the maps go. A
        # decode that does not end in time keeps its worker's own map of the memory; closing ours is safe.
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=CLOSE_WAIT_SECONDS)
        for arena in self._arenas.values():
            arena.close()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
