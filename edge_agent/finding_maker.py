"""A routed series' result as a finding: the finding's inputs and its heat-map PNGs. No journal, no bus."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.bus import finding as findings
from edge_agent.bus.pseudonym import pseudonymise
from edge_agent.config import AgentConfig
from edge_agent.inference.card import ModelCard
from edge_agent.inference.preprocess import resize
from edge_agent.metrics import Metrics
from edge_agent.overlay import OverlayText, write_overlay
from edge_agent.png import write_png
from edge_agent.records import SeriesRow
from edge_agent.series import Coverage
from edge_agent.triage import LabelResult, SeriesResult
from edge_agent.workers import at_low_priority

if TYPE_CHECKING:
    from edge_agent.pipeline import LoadedModel

logger = logging.getLogger(__name__)


def finding_input(
    config: AgentConfig,
    host: str,
    row: SeriesRow,
    route: str,
    loaded: LoadedModel,
    result: SeriesResult,
    slice_refs: list[tuple[str, int]],
    covered: list[str],
    failed: list[str],
    inferred_at: float,
    shown: LabelResult | None,
    image: str | None,
    stage_seconds: Mapping[str, float] | None = None,
    overlay: str | None = None,
) -> findings.FindingInput:
    """Everything the finding of one series revision is made of (covered and failed instances included),
    with its identifiers pseudonymised when ``privacy.pseudonymise`` is on."""
    labels = []
    for r in result.labels:
        uid, frame = slice_refs[r.index]
        labels.append(
            findings.LabelResult(
                label=r.label, score=r.score, threshold=r.threshold, positive=r.positive,
                driving_instance_uid=uid, driving_frame=frame,
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
            overlay=overlay,
        )
    card = loaded.card
    coverage = Coverage(max(row.received_count, len(covered) + len(failed)), len(covered), len(failed))
    inp = findings.FindingInput(
        site=config.site,
        study_instance_uid=row.study_uid,
        series_instance_uid=row.series_uid,
        sop_instance_uids=covered,
        failed_instance_uids=failed,
        instances_received=coverage.received,
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
            stage_seconds=dict(stage_seconds or {}),  # see stages.py: the maximum over the series' instances
        ),
        produced_at=time.time(),
        agent_host=host,
    )
    pseudonymiser = config.privacy.pseudonymiser
    return inp if pseudonymiser is None else pseudonymise(inp, pseudonymiser)



async def store_heatmap(
    config: AgentConfig, metrics: Metrics, shown: LabelResult | None, card: ModelCard, msg_id: str
) -> str | None:
    """Write the shown label's heat map as a PNG for viewers; its name is the finding id, never a UID."""
    if not config.heatmaps.enabled or shown is None or shown.heatmap is None:
        return None
    name = f"heatmaps/{msg_id}.png"
    path = config.state_dir / name
    height, width = card.preprocessing.resize
    try:
        await asyncio.to_thread(_write_heatmap, path, shown.heatmap, height, width)
    except OSError as exc:
        # The finding matters more than its picture: publish it without the image.
        metrics.heatmap_write_errors.inc()
        logger.warning("heat map not stored (%s); the finding goes out without it",
                       exc.strerror or type(exc).__name__)
        return None
    return name



def overlay_name(msg_id: str) -> str:
    """Where a finding's overlay lies, relative to the state directory."""
    return f"heatmaps/{msg_id}.overlay.png"


async def store_overlay(
    config: AgentConfig,
    metrics: Metrics,
    run: Callable[..., Awaitable[Any]],
    shown: LabelResult,
    card: ModelCard,
    msg_id: str,
    source: Path,
    frame: int,
) -> str | None:
    """Write the shown label's heat map over its driving image (``overlay.py``) beside the bare map.

    The pipeline calls it once the finding is queued (the finding already names ``overlay_name``): a failure
    is counted and logged, and the finding's overlay is then missing (404 on the daemon's HTTP port).

    ``run`` runs a function in the worker pool (decoding is CPU work); ``source`` is the driving instance's
    spool file and ``frame`` its frame. Returns the overlay's name, relative to the state directory.
    """
    if shown.heatmap is None:
        return None
    name = overlay_name(msg_id)
    text = OverlayText(card.name + " " + card.version, shown.label, shown.score, shown.threshold)
    box = None if shown.box is None else shown.box.fraction
    try:
        # Nobody waits on the picture: drawn at low priority, so that on a box with few cores the next
        # instance's preprocessing and inference are not slowed by it.
        await run(at_low_priority, write_overlay, config.state_dir / name, source, frame, card.preprocessing,
                  shown.heatmap, box, text)
    except Exception as exc:
        # As for the bare map: the finding goes out without the picture. The error's kind only: a decoder's
        # message could quote the file.
        metrics.heatmap_write_errors.inc()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        logger.warning("heat-map overlay not stored (%s); its finding has only the bare map", reason)
        return None
    return name


def shown_label(result: SeriesResult) -> LabelResult | None:
    """The label whose heat map a viewer is shown: the highest-scoring positive one, else the highest."""
    with_maps = [r for r in result.labels if r.heatmap is not None]
    return max(with_maps, key=lambda r: (r.positive, r.score)) if with_maps else None


def _write_heatmap(path: Path, heatmap: np.ndarray, height: int, width: int) -> None:
    grey = np.clip(resize(np.asarray(heatmap, dtype=np.float32), height, width), 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.round(grey * 255).astype(np.uint8))


