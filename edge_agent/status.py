"""``GET /status``: one JSON document that says how the daemon is doing, for ``edge-agent status`` and scripts.

Version and uptime, readiness and its reasons, each model (backend, precision, version, last finding,
drift), the queues, the series by state, the outbox backlog, the spool's free space and the broker
connection. No patient data: counts, times, model names and the daemon's own settings only.

What lives in memory is read on the event loop (it is the loop's to change); what needs the disk (journal
counts, the outbox, ``statvfs`` of the spool) is read in a thread, so a slow disk never holds up the loop.

Drift (issue 10, item 6) comes from a hook: ``Agent.drift_status``, a callable that returns
``{model: {...}}``, called on the event loop (it must be quick and must not block). Each model's dict is
shown as its ``drift`` field as it is; a model the hook does not name gets ``{}``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent import __version__
from edge_agent.bus.connection import redact
from edge_agent.inference.factory import resolve_precision

if TYPE_CHECKING:
    from edge_agent.bus.publisher import Publisher
    from edge_agent.config import AgentConfig
    from edge_agent.dicom.spool import Spool
    from edge_agent.journal import Journal
    from edge_agent.metrics import Metrics
    from edge_agent.outbox import Backlog
    from edge_agent.pipeline import LoadedModel, Pipeline
    from edge_agent.records import Counts

logger = logging.getLogger(__name__)

# model -> that model's drift state, as the drift monitor reports it (shown as given).
DriftStatus = Callable[[], Mapping[str, Mapping[str, Any]]]


class Daemon(Protocol):
    """The parts of a running daemon the status is read from (the Agent)."""

    config: AgentConfig
    metrics: Metrics
    journal: Journal | None
    spool: Spool | None
    publisher: Publisher | None
    pipeline: Pipeline | None
    models: dict[str, LoadedModel]
    engine_problems: dict[str, str]
    started_at: float
    drift_status: DriftStatus | None

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def uptime_seconds(self) -> float: ...


def _time(unix_seconds: float | None) -> str | None:
    if unix_seconds is None:
        return None
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age(unix_seconds: float | None, now: float) -> float | None:
    return None if unix_seconds is None else round(max(0.0, now - unix_seconds), 3)


def _from_disk(daemon: Daemon) -> tuple[Counts | None, Backlog | None, int | None]:
    """The journal's counts, the outbox backlog and the spool's free bytes (in a thread)."""
    counts = backlog = None
    if daemon.journal is not None:
        counts = daemon.journal.counts()
        backlog = daemon.journal.outbox.backlog()
    free = daemon.spool.free_bytes() if daemon.spool is not None else None
    return counts, backlog, free


def _drift(daemon: Daemon) -> Mapping[str, Mapping[str, Any]]:
    if daemon.drift_status is None:
        return {}
    try:
        return daemon.drift_status()
    except Exception as exc:
        # The rest of the status matters more than this part of it.
        logger.exception("status: the drift monitor failed")
        return {name: {"error": f"drift status failed: {type(exc).__name__}"} for name in daemon.config.model_names()}


def _model(daemon: Daemon, name: str, drift: Mapping[str, Any], last_acked: float | None,
           now: float) -> dict[str, Any]:
    deployment = daemon.config.deployment(name)
    loaded = daemon.models.get(name)
    backend = loaded.backend if loaded is not None else deployment.backend
    return {
        "version": loaded.card.version if loaded is not None else None,
        "backend": backend,
        # ONNX Runtime runs the ONNX graph as it is (the bundled models are float32); TensorRT builds a plan in
        # the deployment's precision.
        "precision": resolve_precision(deployment) if backend in ("tensorrt", "tensorrt-rtx") else "fp32",
        "loaded": loaded is not None,
        "problem": daemon.engine_problems.get(name)
        or (loaded.batcher.problem if loaded is not None else f"engine {name} not loaded"),
        "last_finding_at": _time(last_acked),
        "last_finding_age_seconds": _age(last_acked, now),
        "drift": dict(drift),
    }


async def collect(daemon: Daemon) -> dict[str, Any]:
    """The status document (see the module docstring): the loop's state here, the disk's in a thread."""
    cfg = daemon.config
    ready, details = daemon.readiness()
    drift = _drift(daemon)
    pipeline = daemon.pipeline
    batch = {name: loaded.batcher.pending for name, loaded in daemon.models.items()}
    decoded = {name: pipeline.decoded_instances(name) for name in daemon.models} if pipeline is not None else {}
    preprocess = daemon.metrics.registry.get_sample_value("edge_agent_queue_depth", {"queue": "preprocess"})
    publisher = daemon.publisher
    counts, backlog, free = await asyncio.to_thread(_from_disk, daemon)
    now = time.time()
    last_acked = backlog.last_acked_at if backlog is not None else {}
    by_state = dict(sorted(counts.by_series_state.items())) if counts is not None else {}
    oldest = backlog.oldest_pending_at if backlog is not None else None
    return {
        "version": __version__,
        "site": cfg.site,
        "host": socket.gethostname(),
        "now": _time(now),
        "started_at": _time(daemon.started_at),
        "uptime_seconds": round(daemon.uptime_seconds(), 3),
        "ready": ready,
        "reasons": list(details.get("reasons", [])),
        "models": {name: _model(daemon, name, drift.get(name, {}), last_acked.get(name), now)
                   for name in cfg.model_names()},
        "queues": {
            "pending_instances": pipeline.pending_instances if pipeline is not None else 0,
            "max_pending_instances": cfg.pipeline.max_pending_instances,
            "preprocess": int(preprocess or 0),
            "decoded_instances": decoded,
            "batch": batch,
        },
        "series": {"open": by_state.get("open", 0), "by_state": by_state},
        "outbox": {
            "pending": backlog.pending if backlog is not None else 0,
            "rejected": backlog.rejected if backlog is not None else 0,
            "oldest_pending_at": _time(oldest),
            "oldest_pending_age_seconds": _age(oldest, now),
        },
        "spool": {
            "free_bytes": free,
            "min_free_bytes": cfg.spool.min_free_bytes,
            "held_bytes": counts.spool_bytes if counts is not None else 0,
            "held_files": counts.spool_files if counts is not None else 0,
        },
        "broker": {
            "connected": publisher.connected if publisher is not None else False,
            "url": redact(cfg.bus.url),
            "stream": cfg.bus.stream,
        },
    }
