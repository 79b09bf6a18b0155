"""Every Prometheus metric of edge-agent, defined in one place.

Naming follows Prometheus practice: base units (seconds, bytes), ``_total`` on counters, and only
bounded label values (stage names, outcomes, model names from the repository). No UID, accession,
AE title or any other value that comes from a DICOM peer ever becomes a label value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from edge_agent import __version__

STAGES = ("receive", "assemble", "preprocess", "queue", "infer", "publish", "end_to_end")

# Every value each outcome label takes, created at start: a counter that first appears at 1 is invisible to
# rate() and increase(), so an alert on it would miss the first refusal after each restart.
ASSOCIATION_OUTCOMES = ("accepted", "rejected_calling_aet", "rejected_host", "rejected_busy", "aborted")
INSTANCE_OUTCOMES = (
    "stored",
    "duplicate",
    "replaced",
    "out_of_resources",
    "backpressure",
    "cannot_understand",
    "processing_failure",
    "decode_failed",
    "inferred",
)
SERIES_OUTCOMES = ("routed", "unrouted", "failed", "partly_failed", "deferred")
PUBLISH_ERROR_REASONS = ("timeout", "no_responders", "error")
OUTBOX_REJECT_REASONS = ("too_large", "permission")
HOUSEKEEPING_STEPS = ("release", "heatmaps", "orphans", "prune", "gauges")
# The findings stream's settings that edge-agent compares with its own (and never changes).
STREAM_SETTINGS = ("subjects", "duplicate_window", "max_age", "storage")

# Latency buckets from 1 ms to 5 min: a CR is tens of ms per stage, a 500-slice CT minutes end to end.
LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """One registry per daemon (tests may run several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("edge_agent_build", "Version of the running edge-agent", registry=r)
        self.build_info.info({"version": __version__})
        self.stage_seconds = Histogram(
            "edge_agent_stage_duration_seconds",
            "Time spent in each pipeline stage",
            ["stage"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.associations = Counter(
            "edge_agent_associations_total",
            "DICOM associations by outcome (accepted, rejected_calling_aet, rejected_host, rejected_busy, aborted)",
            ["outcome"],
            registry=r,
        )
        self.instances = Counter(
            "edge_agent_instances_total",
            "DICOM instances by outcome (stored, duplicate, replaced, out_of_resources, backpressure, "
            "cannot_understand, processing_failure, decode_failed, inferred)",
            ["outcome"],
            registry=r,
        )
        self.received_bytes = Counter(
            "edge_agent_received_bytes_total", "Bytes of DICOM instances written to the spool", registry=r
        )
        self.series = Counter(
            "edge_agent_series_total",
            "Series by outcome (routed, unrouted, failed)",
            ["outcome"],
            registry=r,
        )
        self.findings = Counter(
            "edge_agent_findings_total",
            "Findings by model and outcome (queued, published, duplicate, publish_error)",
            ["model", "outcome"],
            registry=r,
        )
        self.triage = Counter(
            "edge_agent_triage_total",
            "Series-level triage results by model and priority",
            ["model", "priority"],
            registry=r,
        )
        self.batch_size = Histogram(
            "edge_agent_inference_batch_size", "Images per engine call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "edge_agent_inference_compute_seconds",
            "Wall time of one engine call (one batch)",
            ["model"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "edge_agent_queue_depth", "Items waiting per queue (preprocess, and batch:<model>)", ["queue"], registry=r
        )
        self.open_series = Gauge("edge_agent_open_series", "Series still receiving instances", registry=r)
        self.pending_instances = Gauge(
            "edge_agent_pending_instances",
            "Instances received and not yet inferred; at pipeline.max_pending_instances new ones get 0xA700",
            registry=r,
        )
        self.decoded_instances = Gauge(
            "edge_agent_decoded_instances",
            "Instances decoded (or being decoded) and held in memory for the model's engine; the rest wait on "
            "the spool",
            ["model"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "edge_agent_outbox_pending", "Findings in the durable outbox not yet acknowledged by JetStream", registry=r
        )
        self.spool_bytes = Gauge("edge_agent_spool_bytes", "Bytes of DICOM held in the spool", registry=r)
        self.spool_free_bytes = Gauge(
            "edge_agent_spool_free_bytes", "Free bytes on the spool's file system, the slots' bytes included",
            registry=r
        )
        self.spool_slots = Gauge(
            "edge_agent_spool_slots", "Released files kept in the spool for instances to be written over in place",
            registry=r
        )
        self.broker_connected = Gauge(
            "edge_agent_broker_connected", "1 while connected to the NATS server, else 0", registry=r
        )
        self.engine_up = Gauge(
            "edge_agent_engine_up", "1 when the model's engine is loaded and warm", ["model"], registry=r
        )
        self.engine_info = Info(
            "edge_agent_engine", "Model engines loaded (model, version, backend)", ["model"], registry=r
        )
        self.ready = Gauge(
            "edge_agent_ready", "1 when the daemon is ready (SCP bound, engines warm, spool writable)", registry=r
        )
        for outcome in ASSOCIATION_OUTCOMES:
            self.associations.labels(outcome=outcome)
        for outcome in INSTANCE_OUTCOMES:
            self.instances.labels(outcome=outcome)
        for outcome in SERIES_OUTCOMES:
            self.series.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        self.worker_crashes = Counter(
            "edge_agent_preprocess_worker_crashes_total",
            "Preprocessing worker processes that died (each replaced by a new one)",
            registry=r,
        )
        self.publish_errors = Counter(
            "edge_agent_publish_errors_total",
            "Failed publish attempts by reason (timeout, no_responders, error)",
            ["reason"],
            registry=r,
        )
        for reason in PUBLISH_ERROR_REASONS:
            self.publish_errors.labels(reason=reason)
        self.engine_timeouts = Counter(
            "edge_agent_engine_timeouts_total",
            "Engine calls that did not return within the model's infer_timeout_seconds (their batch failed)",
            ["model"],
            registry=r,
        )
        self.housekeeping_errors = Counter(
            "edge_agent_housekeeping_errors_total",
            "Errors in housekeeping by step (release, heatmaps, orphans, prune, gauges); the daemon goes on",
            ["step"],
            registry=r,
        )
        for step in HOUSEKEEPING_STEPS:
            self.housekeeping_errors.labels(step=step)
        self.stream_config_mismatch = Gauge(
            "edge_agent_stream_config_mismatch",
            "1 when the existing findings stream's setting differs from this agent's config (never changed by it)",
            ["setting"],
            registry=r,
        )
        for setting in STREAM_SETTINGS:
            self.stream_config_mismatch.labels(setting=setting)

        self.outbox_rejected = Counter(
            "edge_agent_outbox_rejected_total",
            "Findings the broker refused for good (too_large, permission), parked as rejected; later ones flow",
            ["reason"],
            registry=r,
        )
        for reason in OUTBOX_REJECT_REASONS:
            self.outbox_rejected.labels(reason=reason)
        self.outbox_rejected_rows = Gauge(
            "edge_agent_outbox_rejected_rows", "Findings parked as rejected in the outbox, waiting for an operator",
            registry=r,
        )
        self.heatmap_write_errors = Counter(
            "edge_agent_heatmap_write_errors_total",
            "Heat-map PNGs that could not be written (the finding went out without its image)",
            registry=r,
        )
        self.republished = Counter(
            "edge_agent_findings_republished_total",
            "Findings published again after an unclean stop (acknowledged within bus.republish_window_seconds)",
            registry=r,
        )
        self.drift_psi = Gauge(
            "edge_agent_model_drift_psi",
            "Population stability index of the model's last drift.window_images inputs against its card's "
            "drift_reference, per signal (score, input_mean, input_std, pixel_spacing, manufacturer); above 0.25 "
            "they differ",
            ["model", "signal"],
            registry=r,
        )
        self.drift_window_images = Gauge(
            "edge_agent_model_drift_window_images",
            "Model inputs in the drift window (the index is exported from drift.min_images on)",
            ["model"],
            registry=r,
        )

    def model_loaded(self, model: str) -> None:
        """Create a model's labelled series at load, for the same reason as the outcomes above."""
        for outcome in ("queued", "published", "duplicate", "publish_error"):
            self.findings.labels(model=model, outcome=outcome)
        for priority in ("urgent", "routine"):
            self.triage.labels(model=model, priority=priority)
        self.decoded_instances.labels(model=model)
