"""Wires the parts together: startup -> main loop -> shutdown, signals and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_agent.bus.publisher import Publisher
from edge_agent.config import AgentConfig, ModelDeployment, PoolKind, Retention
from edge_agent.dicom.receiver import Receiver
from edge_agent.dicom.spool import Spool
from edge_agent.errors import EdgeAgentError, EngineError
from edge_agent.gpu_metrics import GpuMetrics
from edge_agent.http import HttpServer
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.inference.engine import Engine, create_engine, resolve_precision
from edge_agent.inference.plan_cache import PlanUnavailable
from edge_agent.inference.verify import DEFAULT_TOLERANCE, synthetic_inputs, verify_engine
from edge_agent.journal import InstanceMeta, Journal, Recorded, SeriesState
from edge_agent.metrics import Metrics
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.systemd import Notifier
from edge_agent.workers import WorkerPool

logger = logging.getLogger(__name__)

TICK_SECONDS = 1.0
HEATMAP_SWEEP_SECONDS = 600.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Agent:
    """The daemon. ``await Agent(config).run()`` serves until SIGTERM/SIGINT, then drains and exits."""

    def __init__(self, config: AgentConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.notifier = Notifier()
        self.journal: Journal | None = None
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        self.publisher: Publisher | None = None
        self.pipeline: Pipeline | None = None
        self.http: HttpServer | None = None
        self.models: dict[str, LoadedModel] = {}
        self._engines: list[Engine] = []
        # Models whose engine could not be made ready here (no plan for this GPU, verify failed, ...): the reason.
        self.engine_problems: dict[str, str] = {}
        self.gpu_metrics: GpuMetrics | None = None
        if any(config.deployment(n).backend != "onnxruntime" for n in config.model_names()):
            self.gpu_metrics = GpuMetrics(self.metrics.registry)
        self._pixel_pool = WorkerPool(
            config.pipeline.preprocess_workers,
            processes=config.pipeline.preprocess_pool == PoolKind.PROCESS,
            on_crash=self.metrics.worker_crashes.inc,
        )
        self._engine_pool = ThreadPoolExecutor(max(1, len(config.model_names())), thread_name_prefix="engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_tick = time.monotonic()
        self._spool_writable = False
        self._next_heatmap_sweep = 0.0
        self._ready = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the lifecycle, top to bottom -------------------------------------------------------------

    async def run(self, install_signal_handlers: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        if install_signal_handlers:
            self.install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        self.notifier.status("starting")
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(cfg.state_dir / "journal.sqlite3")
        self.spool = Spool(cfg.state_dir / "spool", cfg.spool.min_free_bytes)
        self._remove_orphans()
        await self._load_models()
        if self.engine_problems:
            # Without every engine, series routed to the missing one could not be finished: stay up, say why on
            # /readyz and in the systemd STATUS, and leave DICOM unanswered until the operator fixes it.
            await self._serve_not_ready()
            return
        await self._pixel_pool.warm_up()
        self.publisher = Publisher(cfg.bus, self.journal, self.metrics, on_acked=self._on_acked)
        await self.publisher.start()
        spool = self.spool
        self.pipeline = Pipeline(
            cfg, self.journal, spool.path, self.metrics, self.models, self._pixel_pool, self.publisher.wake
        )
        resumed_open, resumed_complete = self.pipeline.resume()
        if resumed_open or resumed_complete:
            logger.info("resumed %d open and %d complete series from the journal", resumed_open, resumed_complete)
        self.http = HttpServer(cfg.http.host, cfg.http.port, self.metrics.registry, self.health, self.readiness)
        await self.http.start()
        # pynetdicom streams each incoming dataset to a temp file in the process' temp folder. On the spool's
        # file system, storing it is a rename, not a copy (and /tmp may be RAM); a dataset left by an aborted
        # association is then found by the orphan sweep at the next start.
        tempfile.tempdir = str(spool.tmp_dir)
        self.receiver = Receiver(cfg.dicom, spool, self.journal, self.metrics, self._stored_from_thread)
        self.receiver.start()
        self._spool_writable = spool.writable()
        self._update_gauges()
        ready, reasons = self.readiness()
        logger.info(
            "edge-agent ready=%s: DICOM %s:%d AE %s, HTTP %s:%d, models %s",
            ready,
            cfg.dicom.host,
            cfg.dicom.port,
            cfg.dicom.ae_title,
            cfg.http.host,
            self.http.port,
            ", ".join(self.models) or "none",
        )
        # READY=1 means start-up is over, whatever the readiness: a full disk at boot must not become a
        # start time-out and a restart loop. Readiness for traffic is /readyz (and the STATUS line).
        self.notifier.ready(self._status_line(ready, reasons))

    async def _serve_not_ready(self) -> None:
        cfg = self.config
        self.http = HttpServer(cfg.http.host, cfg.http.port, self.metrics.registry, self.health, self.readiness)
        await self.http.start()
        self._spool_writable = self.spool is not None and self.spool.writable()
        self._update_gauges()
        ready, reasons = self.readiness()
        for problem in self.engine_problems.values():
            logger.error("%s", problem)
        self.notifier.ready(self._status_line(ready, reasons))

    async def main_loop(self) -> None:
        interval = TICK_SECONDS
        watchdog = self.notifier.watchdog_interval_seconds()
        if watchdog is not None:
            interval = min(interval, watchdog / 2)
        was_ready = self._ready
        while not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), timeout=interval)
            self._last_tick = time.monotonic()
            try:
                # Disk and database work (releases, the spool probe, counts) runs in a thread: a slow disk
                # must not hold up the loop, which hands instances over and answers /healthz.
                await asyncio.to_thread(self._housekeeping)
                self.readiness()
            except EdgeAgentError as exc:
                logger.error("housekeeping failed: %s", exc)
            healthy, _ = self.health()
            if healthy:
                # WATCHDOG=1 comes from the loop's own tick (STYLE.md 6): if the loop wedges, systemd sees it.
                self.notifier.watchdog()
            if self._ready != was_ready:
                ready, reasons = self.readiness()
                self.notifier.status(self._status_line(ready, reasons))
                if ready:
                    logger.info("ready")
                else:
                    logger.warning("not ready: %s", "; ".join(reasons["reasons"]))
            was_ready = self._ready

    async def shutdown(self) -> None:
        self.notifier.stopping()
        self.notifier.status("draining")
        cfg = self.config
        if self.receiver is not None:
            # Stop accepting first: what arrives now would only wait for the next start.
            await asyncio.to_thread(self.receiver.stop, min(cfg.pipeline.drain_timeout_seconds, 10.0))
        unfinished = 0
        if self.pipeline is not None:
            unfinished = await self._until_forced(self.pipeline.drain(cfg.pipeline.drain_timeout_seconds), 0)
        pending = 0
        if self.publisher is not None:
            flush = 0.0 if self.force_exit.is_set() else cfg.pipeline.drain_timeout_seconds
            pending = await self.publisher.stop(flush)
        if self.pipeline is not None:
            await self.pipeline.close()
        for loaded in self.models.values():
            await loaded.batcher.stop()
        for engine in self._engines:
            engine.close()
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pixel_pool.shutdown()
        self._engine_pool.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            counts = self.journal.counts()
            in_spool = sum(
                n
                for s, n in counts.by_series_state.items()
                if s in (SeriesState.OPEN, SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.FAILED)
            )
            logger.info(
                "shutdown: %d series finished, %d unfinished, %d series left in spool (%d files), "
                "%d findings waiting for the bus",
                self.pipeline.finished_series if self.pipeline else 0,
                unfinished,
                in_spool,
                counts.spool_files,
                pending,
            )
            self.journal.close()

    async def _until_forced(self, aw: Any, default: int) -> int:
        task: asyncio.Task[int] = asyncio.ensure_future(aw)
        forced = asyncio.ensure_future(self.force_exit.wait())
        done, _ = await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.warning("second signal: forced exit, skipping the drain")
        return default

    # -- signals ----------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: int) -> None:
        """First SIGTERM/SIGINT: drain and exit. Second: exit now (what is left resumes next start)."""
        if self.should_exit.is_set():
            self.force_exit.set()
            logger.warning("received %s again: forcing exit", signal.Signals(sig).name)
        else:
            logger.info("received %s: draining (a second signal forces exit)", signal.Signals(sig).name)
        self.should_exit.set()

    def _status_line(self, ready: bool, reasons: dict[str, Any]) -> str:
        if ready:
            return f"serving: {len(self.models)} models"
        return "not ready: " + "; ".join(reasons.get("reasons", []))

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        lag = time.monotonic() - self._last_tick
        ok = lag < max(10.0, 5 * TICK_SECONDS)
        return ok, {"alive": ok, "tick_age_seconds": round(lag, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.receiver is None or not self.receiver.accepting:
            reasons.append("DICOM receiver not listening")
        for name in self.config.model_names():
            if name in self.engine_problems:
                reasons.append(self.engine_problems[name])
            elif name not in self.models:
                reasons.append(f"engine {name} not loaded")
        if not self._spool_writable:
            reasons.append("spool not writable")
        elif self.spool is not None and not self.spool.has_room():
            reasons.append("spool below its free-space watermark (spool.min_free_bytes)")
        if self.should_exit.is_set():
            reasons.append("shutting down")
        self._ready = not reasons
        self.metrics.ready.set(1 if self._ready else 0)
        broker = self.publisher.connected if self.publisher is not None else False
        return self._ready, {"ready": self._ready, "reasons": reasons, "broker_connected": broker}

    # -- parts ------------------------------------------------------------------------------------

    async def _load_models(self) -> None:
        loop = asyncio.get_running_loop()
        for name in self.config.model_names():
            card = load_card(self.config.model_repository / name)
            deployment = self.config.deployment(name)
            started = time.perf_counter()
            try:
                engine = create_engine(card, deployment, self.config.state_dir)
                self._engines.append(engine)
                await loop.run_in_executor(self._engine_pool, engine.load)
                await loop.run_in_executor(self._engine_pool, engine.warm_up)
                if deployment.verify_at_start:
                    await loop.run_in_executor(self._engine_pool, self._verify, card, deployment, engine)
            except EngineError as exc:
                if deployment.backend == "onnxruntime" and not isinstance(exc, PlanUnavailable):
                    raise
                # A GPU engine that cannot be made ready here is an operator's job (build the plan, install
                # TensorRT), not something a restart fixes: report it instead of exiting into a restart loop.
                text = str(exc)
                self.engine_problems[name] = text if text.startswith(f"engine {name}") else f"engine {name}: {text}"
                self.metrics.engine_up.labels(model=name).set(0)
                continue
            if self.gpu_metrics is not None:
                self.gpu_metrics.record_engine(name, engine)
            batcher = Batcher(
                name, engine, deployment.max_batch, deployment.max_queue_delay_ms, self.metrics, self._engine_pool
            )
            await batcher.start()
            self.models[name] = LoadedModel(card, batcher, engine.backend)
            self.metrics.engine_up.labels(model=name).set(1)
            self.metrics.model_loaded(name)
            self.metrics.engine_info.labels(model=name).info({"version": card.version, "backend": engine.backend})
            logger.info(
                "model %s %s loaded on %s and warm in %.2f s",
                name,
                card.version,
                engine.backend,
                time.perf_counter() - started,
            )

    def _verify(self, card: ModelCard, deployment: ModelDeployment, engine: Engine) -> None:
        """The start-up gate: the engine against ONNX Runtime on the CPU; EngineError if they disagree."""
        if engine.backend == "onnxruntime":
            return  # ONNX Runtime on the CPU is the reference: it would be compared with itself
        tolerance = deployment.verify_max_abs_diff or DEFAULT_TOLERANCE[resolve_precision(deployment)]
        inputs = synthetic_inputs(card, max(8, deployment.max_batch))
        report = verify_engine(card, engine, inputs, tolerance=tolerance, batch=deployment.max_batch)
        if not report.passed:
            raise EngineError(f"engine {card.name}: verify failed: {report.summary()}")

    def _stored_from_thread(self, meta: InstanceMeta, recorded: Recorded) -> None:
        """The receiver calls this in an association thread, after the instance is durable."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # journalled: the next start resumes it
        # The loop may close meanwhile: the instance is journalled and resumed at the next start.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_stored, meta, recorded)

    def _on_stored(self, meta: InstanceMeta, recorded: Recorded) -> None:
        if self.pipeline is not None and not self.force_exit.is_set():
            self.pipeline.on_stored(meta, recorded)

    async def _on_acked(self, series_id: int) -> None:
        row = self.journal.series(series_id) if self.journal is not None else None
        if row is not None:
            self.metrics.stage_seconds.labels(stage="end_to_end").observe(max(0.0, time.time() - row.last_received))
        if self.config.spool.retention == Retention.DELETE and self.config.spool.retain_seconds == 0:
            await asyncio.to_thread(self._release_due)

    def _release_due(self) -> None:
        """Delete the spool files of series whose finding was acknowledged longer ago than the retention."""
        assert self.journal is not None and self.spool is not None
        if self.config.spool.retention != Retention.DELETE:
            return
        for sid, names in self.journal.releasable(time.time() - self.config.spool.retain_seconds):
            for name in names:
                self.spool.remove(name)
            self.journal.mark_released(sid)

    def _housekeeping(self) -> None:
        assert self.spool is not None
        self._release_due()
        self._remove_old_heatmaps()
        self._spool_writable = self.spool.writable()
        self._update_gauges()

    def _remove_old_heatmaps(self) -> None:
        # Heat maps are kept for days: listing the folder every tick would be wasted work.
        now = time.monotonic()
        if now < self._next_heatmap_sweep:
            return
        self._next_heatmap_sweep = now + HEATMAP_SWEEP_SECONDS
        folder = self.config.state_dir / "heatmaps"
        if not folder.is_dir():
            return
        cutoff = time.time() - self.config.heatmaps.retain_days * 86400
        for png in folder.glob("*.png"):
            with contextlib.suppress(FileNotFoundError):
                if png.stat().st_mtime < cutoff:
                    png.unlink()

    def _update_gauges(self) -> None:
        assert self.journal is not None and self.spool is not None
        counts = self.journal.counts()
        self.metrics.outbox_pending.set(counts.outbox_pending)
        self.metrics.spool_bytes.set(counts.spool_bytes)
        self.metrics.spool_free_bytes.set(self.spool.free_bytes())

    def _remove_orphans(self) -> None:
        """Files renamed into the spool whose journal row never committed were never acknowledged."""
        assert self.journal is not None and self.spool is not None
        orphans = self.spool.orphans(self.journal.referenced_spool_names())
        for name in orphans:
            self.spool.remove(name)
        if orphans:
            logger.info("removed %d spool files that were never acknowledged to a sender", len(orphans))
