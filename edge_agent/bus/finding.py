"""The finding: a versioned JSON document, its message id and its subject. Pure: no I/O.

A finding names patient data (UIDs, accession number) because its subscribers need them; that is
why it travels only as a message payload and never appears in a log line, a subject or a header.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from edge_agent import __version__

# 1.1: heatmap.image; 1.2: instances_received/inferred/failed and failed_instance_uids; 1.3: pseudonymised,
# heatmap.url, timings.stage_seconds filled (additive changes)
SCHEMA_VERSION = "1.3"
PRIORITIES = ("urgent", "routine")

_NOT_SUBJECT_CHAR = re.compile(r"[^A-Za-z0-9_-]")
# Fields joined into a message id; the unit separator cannot occur in a UID or a model name,
# so ("1.2", "3") and ("1.23", "") can never join to the same text.
_ID_SEPARATOR = "\x1f"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    backend: str


@dataclass(frozen=True, kw_only=True)
class LabelResult:
    """The series-level result for one label; the driving instance/frame is the one with the top score."""

    label: str
    score: float
    threshold: float
    # Decided once, by triage, in the precision the model computes in: recomputing it here in float64
    # called a float32 score of 0.7 at threshold 0.7 urgent and not positive (issue 8, defect 11).
    positive: bool
    driving_instance_uid: str
    driving_frame: int = 0  # 0-based frame index; 0 for single-frame instances


@dataclass(frozen=True, kw_only=True)
class Heatmap:
    """Where the model looked for one label: a box in fractions of the image (0..1, x right, y down)."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    peak: float
    driving_instance_uid: str
    driving_frame: int = 0
    # The heat map as a PNG, relative to the agent's state directory (model-input geometry), if stored.
    image: str | None = None
    # The heat map over the driving image in its own geometry, stamped NOT FOR DIAGNOSTIC USE, if stored.
    overlay: str | None = None


@dataclass(frozen=True, kw_only=True)
class Timings:
    """Wall-clock times (Unix seconds) of the series' journey, and seconds spent per stage."""

    received_first: float
    received_last: float
    completed: float
    inferred: float
    published_at: float | None = None
    stage_seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FindingInput:
    """Everything a finding is made of.

    ``sop_instance_uids`` are the instances the result covers (inferred); ``failed_instance_uids`` those held
    that could not be decoded or inferred; ``instances_received`` every instance of the series the agent took
    responsibility for, in any revision (defaults to covered + failed). ``instances_received`` greater than
    covered + failed means earlier instances were released before this revision (see the README).
    """

    site: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: Sequence[str]
    accession_number: str
    calling_ae_title: str
    called_ae_title: str
    modality: str
    body_part: str
    route: str
    model: ModelInfo
    labels: Sequence[LabelResult]
    priority: str
    heatmap: Heatmap | None
    revision: int
    timings: Timings
    produced_at: float
    agent_host: str
    failed_instance_uids: Sequence[str] = ()
    instances_received: int | None = None
    # The identifiers above are keyed pseudonyms (edge_agent.privacy), not the DICOM values.
    pseudonymised: bool = False


def rfc3339(unix_seconds: float) -> str:
    """Unix seconds -> RFC 3339 UTC with milliseconds, e.g. 2026-01-31T12:00:00.123Z."""
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_id(series_uid: str, model: str, model_version: str, revision: int, opened: float) -> str:
    """The deterministic Nats-Msg-Id of a finding: sha256 hex, so it carries no readable UID.

    ``opened``: when the journal opened this revision of the series (its ``received_first``). A series whose rows
    were pruned (``housekeeping.prune_after_days``) and that arrives again starts at revision 0 once more; without
    it, its finding would take the id of the earlier one, which subscribers de-duplicate by and which names the
    heat-map files."""
    text = _ID_SEPARATOR.join((series_uid, model, model_version, str(revision), repr(float(opened))))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _token(value: str) -> str:
    return _NOT_SUBJECT_CHAR.sub("_", value) or "unknown"


def subject(prefix: str, site: str, modality: str, model: str) -> str:
    """``{prefix}.{site}.{modality}.{model}``, each token reduced to [A-Za-z0-9_-]; empty -> 'unknown'."""
    prefix_tokens = [_token(t) for t in prefix.split(".")]
    return ".".join([*prefix_tokens, _token(site), _token(modality), _token(model)])


def _fraction(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return float(value)


def _label(result: LabelResult) -> dict[str, Any]:
    if result.driving_frame < 0:
        raise ValueError(f"label {result.label!r}: driving_frame must be >= 0")
    return {
        "label": result.label,
        "score": _fraction(f"label {result.label!r} score", result.score),
        "threshold": _fraction(f"label {result.label!r} threshold", result.threshold),
        "positive": result.positive,
        "driving_instance_uid": result.driving_instance_uid,
        "driving_frame": result.driving_frame,
    }


def heatmap_url(finding_id: str, overlay: bool = False) -> str:
    """Where the daemon's HTTP port serves a finding's heat-map PNG (http.py), as a path: ``/heatmaps/<id>.png``,
    or the overlay on the image, ``/heatmaps/<id>.overlay.png``."""
    return f"/heatmaps/{finding_id}{'.overlay' if overlay else ''}.png"


def _heatmap(heatmap: Heatmap | None, finding_id: str) -> dict[str, Any] | None:
    if heatmap is None:
        return None
    box = {k: _fraction(f"heatmap {k}", getattr(heatmap, k)) for k in ("x0", "y0", "x1", "y1")}
    if box["x0"] > box["x1"] or box["y0"] > box["y1"]:
        raise ValueError("heatmap box must have x0 <= x1 and y0 <= y1")
    if heatmap.driving_frame < 0:
        raise ValueError("heatmap driving_frame must be >= 0")
    return {
        "label": heatmap.label,
        "bbox": box,
        "peak": _fraction("heatmap peak", heatmap.peak),
        "driving_instance_uid": heatmap.driving_instance_uid,
        "driving_frame": heatmap.driving_frame,
        "image": heatmap.image,
        "overlay": heatmap.overlay,
        # The stored PNGs, for a subscriber: paths on the agent's HTTP address (http.host:http.port).
        "url": heatmap_url(finding_id) if heatmap.image is not None else None,
        "overlay_url": heatmap_url(finding_id, overlay=True) if heatmap.overlay is not None else None,
    }


def _timings(t: Timings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "received_first": rfc3339(t.received_first),
        "received_last": rfc3339(t.received_last),
        "completed": rfc3339(t.completed),
        "inferred": rfc3339(t.inferred),
        "stage_seconds": {},
    }
    if t.published_at is not None:
        out["published_at"] = rfc3339(t.published_at)
    for stage, seconds in t.stage_seconds.items():
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"stage {stage!r}: seconds must be a finite number >= 0")
        out["stage_seconds"][stage] = float(seconds)
    return out


def _driving(labels: Sequence[LabelResult]) -> LabelResult:
    # The instance that drove the finding: the top-scoring positive label, else the top label overall.
    return max(labels, key=lambda r: (r.positive, r.score))


def build_finding(inp: FindingInput) -> dict[str, Any]:
    """Build the JSON-ready finding. Raises ValueError on values the schema would reject."""
    if inp.priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {inp.priority!r}")
    if not inp.labels:
        raise ValueError("a finding needs at least one label result")
    if not inp.sop_instance_uids:
        raise ValueError("a finding needs at least one instance")
    if inp.revision < 0:
        raise ValueError("revision must be >= 0")
    inferred, failed = len(inp.sop_instance_uids), len(inp.failed_instance_uids)
    received = inferred + failed if inp.instances_received is None else inp.instances_received
    if received < inferred + failed:
        raise ValueError("instances_received must count at least the instances inferred and failed")
    finding_id = message_id(inp.series_instance_uid, inp.model.name, inp.model.version, inp.revision,
                            inp.timings.received_first)
    return {
        "schema_version": SCHEMA_VERSION,
        "finding_id": finding_id,
        "site": inp.site,
        "study_instance_uid": inp.study_instance_uid,
        "series_instance_uid": inp.series_instance_uid,
        "sop_instance_uids": list(inp.sop_instance_uids),
        "driving_instance_uid": _driving(inp.labels).driving_instance_uid,
        "accession_number": inp.accession_number,
        "calling_ae_title": inp.calling_ae_title,
        "called_ae_title": inp.called_ae_title,
        "modality": inp.modality,
        "body_part": inp.body_part,
        "route": inp.route,
        "model": {
            "name": inp.model.name,
            "version": inp.model.version,
            "sha256": inp.model.sha256,
            "backend": inp.model.backend,
        },
        "labels": [_label(r) for r in inp.labels],
        "priority": inp.priority,
        "heatmap": _heatmap(inp.heatmap, finding_id),
        "instance_count": received,
        "instances_received": received,
        "instances_inferred": inferred,
        "instances_failed": failed,
        "failed_instance_uids": list(inp.failed_instance_uids),
        "revision": inp.revision,
        "timings": _timings(inp.timings),
        "produced_at": rfc3339(inp.produced_at),
        "agent": {"version": __version__, "host": inp.agent_host},
        "pseudonymised": inp.pseudonymised,
    }


def stamp_published(payload: bytes, published_at: float, queued_at: float) -> bytes:
    """The payload as it is sent: ``timings.published_at`` and ``timings.stage_seconds.publish`` filled in.

    The publish stage is the time the finding waited in the outbox, from its entry (``queued_at``) to this
    send (``published_at``), broker outages included: the PubAck that follows cannot be in the message it
    acknowledges. A retry is stamped again; the stream keeps the first copy it acknowledged (same Nats-Msg-Id).
    A payload that is not a finding is returned as it is.
    """
    try:
        finding = decode(payload)
    except ValueError:
        return payload
    timings = finding.get("timings")
    stages = timings.setdefault("stage_seconds", {}) if isinstance(timings, dict) else None
    if not isinstance(timings, dict) or not isinstance(stages, dict):
        return payload
    timings["published_at"] = rfc3339(published_at)
    stages["publish"] = round(max(0.0, published_at - queued_at), 6)
    return encode(finding)


def encode(finding: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted UTF-8 JSON: the same finding always encodes to the same bytes."""
    return json.dumps(finding, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def decode(data: bytes) -> dict[str, Any]:
    """Parse a finding payload. Raises ValueError if it is not a JSON object."""
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("a finding must be a JSON object")
    return obj


def load_schema() -> dict[str, Any]:
    """The finding's JSON Schema (draft 2020-12), shipped as package data beside this module."""
    text = resources.files("edge_agent.bus").joinpath("finding.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
