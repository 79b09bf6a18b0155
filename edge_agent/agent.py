"""Wires the parts together: startup -> main loop -> shutdown, signals and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.bus.publisher import Publisher
from edge_agent.config import AgentConfig, ModelDeployment, PoolKind, Priority, Retention
from edge_agent.dicom.header import InstanceMeta
from edge_agent.dicom.receivers import ReceiverProcesses
from edge_agent.dicom.scp import Receiver
from edge_agent.dicom.spool import Spool
from edge_agent.drift import Drift
from edge_agent.errors import ConfigError, EdgeAgentError, EngineError, EngineTimeoutError, StateDirLockedError
from edge_agent.gpu_metrics import GpuMetrics
from edge_agent.housekeeping import Housekeeping
from edge_agent.http import HttpServer
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.inference.engine import Engine
from edge_agent.inference.factory import create_engine, resolve_precision
from edge_agent.inference.plan_cache import PlanUnavailable
from edge_agent.inference.preprocess import warm_up
from edge_agent.inference.verify import DEFAULT_TOLERANCE, synthetic_inputs, verify_engine
from edge_agent.journal import Journal, Recorded, SeriesState
from edge_agent.metrics import Metrics
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.status import DriftStatus, collect
from edge_agent.systemd import Notifier
from edge_agent.workers import WorkerPool, lower_this_thread

logger = logging.getLogger(__name__)

TICK_SECONDS = 1.0
# Time spent making the spool's kept empty files (dicom/spool.py, FREE_FILES) at start and per idle tick: a
# study that starts arriving meanwhile waits for little, and a start is not held up by a slow file system.
_REFILL_SECONDS = 0.05
# At a stop, how long a model's batcher may take to finish the engine call in hand (after the pipeline's drain,
# nobody waits for its results): at most this, or the model's own infer_timeout_seconds if shorter.
_ENGINE_STOP_SECONDS = 5.0
# At start, how long each of a model's load, warm-up and check may take, in multiples of its infer_timeout_seconds
# (30 s by default: two minutes for a plan's deserialisation or a warm-up that would take a normal batch 30 ms).
_ENGINE_START_TIMEOUTS = 4.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_FILE = "edge-agent.lock"

T = TypeVar("T")


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this process: an exclusive flock held until the returned fd is closed.

    Two daemons on one state_dir would each sweep the other's in-flight spool files as orphans and write
    one journal. The kernel drops the lock when the process dies, however it dies: no stale lock to clean.
    Raises StateDirLockedError, having changed nothing, when another process holds it.
    """
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StateDirLockedError(f"state_dir {state_dir} is in use by another edge-agent (pid {holder})") from None
    except BaseException:
        os.close(fd)
        raise
    # The pid is for the message above only: the lock, not the file's content, says who holds the directory.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
        self.receiver: Receiver | ReceiverProcesses | None = None
        self.publisher: Publisher | None = None
        self.pipeline: Pipeline | None = None
        # Input and score drift per model (issue 10); ``drift.snapshot()`` is what /status shows.
        self.drift: Drift | None = None
        # What /status shows as each model's drift: a callable returning {model: {...}}, called on the loop.
        self.drift_status: DriftStatus | None = None
        self.http: HttpServer | None = None
        self.housekeeping: Housekeeping | None = None
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._state_dir_lock: int | None = None
        self.models: dict[str, LoadedModel] = {}
        self._engines: list[Engine] = []
        # Engines (by id) with a call still running that nothing can stop (a wedged GPU or driver), found at start
        # or at the stop: the process must then end without joining that call's thread.
        self._stuck_engines: set[int] = set()
        # Models whose engine could not be made ready here (no plan for this GPU, verify failed, ...): the reason.
        self.engine_problems: dict[str, str] = {}
        self.gpu_metrics: GpuMetrics | None = None
        if any(config.deployment(n).backend != "onnxruntime" for n in config.model_names()):
            self.gpu_metrics = GpuMetrics(self.metrics.registry)
        self._pixel_pool = WorkerPool(
            config.pipeline.preprocess_workers,
            processes=config.pipeline.preprocess_pool == PoolKind.PROCESS,
            on_crash=self.metrics.worker_crashes.inc,
            niceness=config.pipeline.inference_niceness,
        )
        # Engines are loaded on these threads, so that the threads a runtime starts for itself (ONNX Runtime's
        # intra-op pool) inherit their niceness. A model that an urgent route names runs at the daemon's own
        # priority instead: a chest CR's inference during a CT flood is not held below the receiver.
        urgent = {r.model for r in config.routes if r.priority == Priority.URGENT}
        self._urgent_models = {name for name in config.model_names() if name in urgent}
        self._engine_pool = ThreadPoolExecutor(max(1, len(config.model_names()) - len(self._urgent_models)),
                                               thread_name_prefix="engine", initializer=lower_this_thread,
                                               initargs=(config.pipeline.inference_niceness,))
        self._urgent_engine_pool = ThreadPoolExecutor(max(1, len(self._urgent_models)),
                                                      thread_name_prefix="engine-urgent")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_tick = time.monotonic()
        self._spool_writable = False
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
        # Before anything in state_dir is opened: a second daemon must leave the running one's files alone.
        self._state_dir_lock = lock_state_dir(cfg.state_dir)
        cards = {name: load_card(cfg.model_repository / name) for name in cfg.model_names()}
        # The preprocessing workers start now and warm up while the journal is checked and the models load: a
        # worker's start (a new interpreter importing numpy, OpenCV and pydicom, then a synthetic image prepared for
        # each model, so that the first studies do not pay for its memory and caches being made) is the longest
        # step of a start.
        warm = functools.partial(warm_up, [(c.preprocessing, c.input_shape[0]) for c in cards.values()])
        warming = asyncio.ensure_future(self._pixel_pool.warm_up(warm))
        try:
            await self._start(cards, warming)
        finally:
            warming.cancel()  # ended already, unless the start stopped before the workers were needed
            await asyncio.gather(warming, return_exceptions=True)

    async def _start(self, cards: dict[str, ModelCard], warming: asyncio.Future[None]) -> None:
        cfg = self.config
        self.journal = Journal(cfg.state_dir / "journal.sqlite3")
        clean = await asyncio.to_thread(self.journal.begin_run)
        if not clean:
            # An unclean stop (SIGKILL, power cut): the broker may have acknowledged findings it had not yet
            # written to disk. Publish those again; the stream's duplicate window drops what it kept.
            again = await asyncio.to_thread(self.journal.outbox.republish_recent, cfg.bus.republish_window_seconds)
            self.metrics.republished.inc(again)
            if again:
                logger.warning("the last run did not stop cleanly: publishing %d recently acknowledged finding(s) "
                               "again (a PubAck is not an fsync)", again)
        self.spool = Spool(cfg.state_dir / "spool", cfg.spool.min_free_bytes)
        self.housekeeping = Housekeeping(cfg, self.journal, self.spool, self.metrics)
        # Before the receiver starts, so that an instance being received cannot look like an orphan.
        await asyncio.to_thread(self.housekeeping.put_back_at_start)
        if not clean:
            await asyncio.to_thread(self.housekeeping.adopt_at_start)
        self.housekeeping.remove_orphans_at_start()
        # The files the first instances will be written to, made now (for at most 0.2 s; idle ticks make the
        # rest) rather than while a study arrives.
        await asyncio.to_thread(self.spool.refill, within_seconds=_REFILL_SECONDS * 4)
        await self._load_models(cards)
        if self.engine_problems:
            # Without every engine, series routed to the missing one could not be finished: stay up, say why on
            # /readyz and in the systemd STATUS, and leave DICOM unanswered until the operator fixes it. Nothing
            # will be decoded: the workers that were starting go.
            self._pixel_pool.shutdown()
            await self._serve_not_ready()
            return
        await warming  # every worker has started and warmed up
        self.publisher = Publisher(cfg.bus, self.journal, self.metrics, on_acked=self._on_acked)
        await self.publisher.start()
        spool = self.spool
        self.drift = Drift({name: loaded.card for name, loaded in self.models.items()}, cfg.drift, self.metrics)
        self.drift_status = self.drift.snapshot
        self.pipeline = Pipeline(
            cfg, self.journal, spool.path, self.metrics, self.models, self._pixel_pool, self.publisher.wake,
            drift=self.drift,
        )
        resumed_open, resumed_complete = await self.pipeline.resume()
        if resumed_open or resumed_complete:
            logger.info("resumed %d open and %d complete series from the journal", resumed_open, resumed_complete)
        http = await self._start_http()
        kind = ReceiverProcesses if cfg.dicom.receiver_processes > 1 else Receiver
        self.receiver = kind(cfg.dicom, spool, self.journal, self.metrics, self._stored_from_thread,
                             admission=self.pipeline.admission, on_released=self._released_from_thread)
        self.receiver.start()
        self._spool_writable = spool.writable()
        self.housekeeping.update_gauges()
        ready, reasons = self.readiness()
        logger.info(
            "edge-agent ready=%s: DICOM %s:%d AE %s, HTTP %s:%d, models %s, findings %s",
            ready,
            cfg.dicom.host,
            cfg.dicom.port,
            cfg.dicom.ae_title,
            cfg.http.host,
            http.port,
            ", ".join(self.models) or "none",
            "pseudonymised (privacy.pseudonymise)" if cfg.privacy.pseudonymise else "with DICOM identifiers",
        )
        # READY=1 means start-up is over, whatever the readiness: a full disk at boot must not become a
        # start time-out and a restart loop. Readiness for traffic is /readyz (and the STATUS line).
        self.notifier.ready(self._status_line(ready, reasons))

    async def _start_http(self) -> HttpServer:
        self.http = http = self._http_server()
        try:
            await http.start()
        except OSError as exc:  # a port taken, an address not on this box: said in one line, as for DICOM
            raise EdgeAgentError(f"cannot listen for HTTP on {self.config.http.host}:{self.config.http.port}: "
                                 f"{exc.strerror or exc} (is another service using the port? see http.host / "
                                 "http.port)") from exc
        return http

    async def _serve_not_ready(self) -> None:
        await self._start_http()
        self._spool_writable = self.spool is not None and self.spool.writable()
        if self.housekeeping is not None:
            self.housekeeping.update_gauges()
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
            # Disk and database work (releases, sweeps, the spool probe, counts) runs in a thread: a slow disk
            # must not hold up the loop, which hands instances over and answers /healthz. Housekeeping counts
            # and logs its own errors; none of them ends the daemon.
            await self._until_forced(asyncio.to_thread(self._housekeeping), None, "housekeeping")
            try:
                self.readiness()
            except (EdgeAgentError, OSError) as exc:
                logger.error("readiness check failed: %s", exc)
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
            unfinished = await self._until_forced(
                self.pipeline.drain(cfg.pipeline.drain_timeout_seconds), 0, "the pipeline's drain"
            )
        pending = 0
        if self.publisher is not None:
            # A second signal cuts the flush and the connection's drain short: what is left stays in the outbox.
            pending = await self.publisher.stop(cfg.pipeline.drain_timeout_seconds, force=self.force_exit)
        if self.pipeline is not None:
            await self.pipeline.close()
        for name, loaded in self.models.items():
            await loaded.batcher.stop(min(_ENGINE_STOP_SECONDS, cfg.deployment(name).infer_timeout_seconds))
            seconds = loaded.batcher.in_engine_seconds
            if seconds is not None:
                self._stuck_engines.add(id(loaded.batcher.engine))
                logger.error(
                    "model %s: an engine call is still running after %.0f s and cannot be stopped (a wedged GPU or "
                    "driver?); exiting without waiting for it, and its series resume at the next start",
                    name,
                    seconds,
                )
        for engine in self._engines:
            if id(engine) not in self._stuck_engines:  # one in a call keeps what the call uses until the process ends
                engine.close()
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pixel_pool.shutdown()
        self._engine_pool.shutdown(wait=False, cancel_futures=True)
        self._urgent_engine_pool.shutdown(wait=False, cancel_futures=True)
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
            try:
                self.journal.end_run()
            except EdgeAgentError as exc:
                logger.error("cannot mark the stop clean (the next start re-publishes recent findings): %s", exc)
            self.journal.close()
        if self._state_dir_lock is not None:
            os.close(self._state_dir_lock)  # releases the flock
            self._state_dir_lock = None

    async def _until_forced(self, aw: Awaitable[T], default: T, what: str) -> T:
        """Await ``aw`` unless a second signal comes first; then cancel it and return ``default``."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        forced = asyncio.ensure_future(self.force_exit.wait())
        waiting: set[asyncio.Future[Any]] = {task, forced}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.warning("second signal: forced exit, not waiting for %s", what)
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

    # -- health and status ------------------------------------------------------------------------

    def _http_server(self) -> HttpServer:
        cfg = self.config
        return HttpServer(cfg.http.host, cfg.http.port, self.metrics.registry, self.health, self.readiness,
                          status=self.status, heatmap_dir=cfg.state_dir / "heatmaps")

    async def status(self) -> dict[str, Any]:
        """The document GET /status answers (edge_agent/status.py)."""
        return await collect(self)

    def uptime_seconds(self) -> float:
        return time.monotonic() - self._started_monotonic

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
            elif self.models[name].batcher.problem is not None:
                reasons.append(str(self.models[name].batcher.problem))  # a hung engine call
        if (workers := self._pixel_pool.problem) is not None:
            reasons.append(workers)  # instances would only pile up behind the preprocessing
        if not self._spool_writable:
            reasons.append("spool not writable")
        elif self.spool is not None and not self.spool.has_room():
            reasons.append("spool below its free-space watermark (spool.min_free_bytes)")
        if self.pipeline is not None and (refusing := self.pipeline.admission()) is not None:
            reasons.append(refusing)  # back-pressure: new instances get 0xA700
        if self.should_exit.is_set():
            reasons.append("shutting down")
        self._ready = not reasons
        self.metrics.ready.set(1 if self._ready else 0)
        broker = self.publisher.connected if self.publisher is not None else False
        return self._ready, {"ready": self._ready, "reasons": reasons, "broker_connected": broker}

    # -- parts ------------------------------------------------------------------------------------

    async def _load_models(self, cards: dict[str, ModelCard]) -> None:
        for name in self.config.model_names():
            deployment = self.config.deployment(name)
            card = cards[name]
            try:
                card = card.with_operating_point(deployment.operating_point)
            except ValueError as exc:
                raise ConfigError([(f"models.{name}.operating_point", str(exc))]) from None
            started = time.perf_counter()
            try:
                engine = create_engine(card, deployment, self.config.state_dir)
                self._engines.append(engine)
                await self._engine_step(name, "load", engine, engine.load)
                await self._engine_step(name, "warm-up", engine, engine.warm_up)
                if deployment.verify_at_start:
                    await self._engine_step(name, "check against ONNX Runtime", engine,
                                            functools.partial(self._verify, card, deployment, engine))
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
                name, engine, deployment.max_batch, deployment.max_queue_delay_ms, self.metrics, self._engines_of(name),
                infer_timeout_seconds=deployment.infer_timeout_seconds,
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

    def _engines_of(self, name: str) -> ThreadPoolExecutor:
        """The threads model ``name`` is loaded and run on: below the receiver, unless an urgent route names it."""
        return self._urgent_engine_pool if name in self._urgent_models else self._engine_pool

    async def _engine_step(self, name: str, what: str, engine: Engine, step: Callable[[], object]) -> None:
        """One start-up call on a model's engine, in the engine pool, bounded: one that does not return in
        ``_ENGINE_START_TIMEOUTS`` times the model's infer_timeout_seconds (a wedged GPU or driver) raises
        EngineTimeoutError, and its thread is left to it."""
        seconds = _ENGINE_START_TIMEOUTS * self.config.deployment(name).infer_timeout_seconds
        call = asyncio.get_running_loop().run_in_executor(self._engines_of(name), step)
        done, _ = await asyncio.wait((call,), timeout=seconds)
        if not done:
            self._stuck_engines.add(id(engine))
            call.add_done_callback(lambda c: c.cancelled() or c.exception())  # whatever it ends with, if ever
            raise EngineTimeoutError(f"engine {name}: its {what} did not return within {seconds:g} s (a wedged GPU or "
                                     "driver?)")
        call.result()

    @property
    def engine_call_left_running(self) -> bool:
        """An engine call that nothing can stop is still running: ``edge-agent serve`` ends the process at once."""
        return bool(self._stuck_engines)

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

    def _released_from_thread(self, series_ids: Iterable[int]) -> None:
        """The receiver calls this when an association is released normally; from any thread.

        Scheduled after the association's last on_stored (one thread, first in first out), so the pipeline
        knows every series named here.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # the quiet time completes the series at the next start
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_released, frozenset(series_ids))

    def _on_released(self, series_ids: frozenset[int]) -> None:
        if self.pipeline is not None and not self.force_exit.is_set():
            self.pipeline.on_released(series_ids)

    async def _on_acked(self, series_id: int) -> None:
        row = await asyncio.to_thread(self.journal.series, series_id) if self.journal is not None else None
        if row is not None:
            self.metrics.stage_seconds.labels(stage="end_to_end").observe(max(0.0, time.time() - row.last_received))
        cfg = self.config.spool
        if self.housekeeping is not None and cfg.retention == Retention.DELETE and cfg.retain_seconds == 0:
            await asyncio.to_thread(self.housekeeping.release_due)

    def _housekeeping(self) -> None:
        """One tick's disk and database work (in a thread); never raises."""
        if self.housekeeping is not None:
            self.housekeeping.tick()
        if self.spool is not None:
            self._spool_writable = self.spool.writable()
            if self.receiver is not None and self.receiver.active_associations() == 0:
                self.spool.refill(within_seconds=_REFILL_SECONDS)
