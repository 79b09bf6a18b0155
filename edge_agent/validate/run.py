"""Running a model over labelled DICOM through the daemon's own path, and what comes of it.

The card and engine are loaded exactly as the daemon loads them (load_card, create_engine) and every file
is decoded and preprocessed by the daemon's worker function (load_instance_prepared), so the scores are the
ones the daemon would give. With ``drift_reference``, the inputs' signals and scores become the card's
``drift_reference`` (edge_agent/drift.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from edge_agent.config import ModelDeployment
from edge_agent.drift import Observation, build_reference, observation
from edge_agent.errors import DecodeError
from edge_agent.inference.card import ModelCard, load_card, write_drift_reference
from edge_agent.inference.factory import create_engine
from edge_agent.inference.preprocess import Prepared, load_instance_prepared
from edge_agent.validate.labels import dicom_values, read_labels, subgroup_columns
from edge_agent.validate.report import ValidationReport, against_card, write_reports
from edge_agent.validate.stats import (
    GroupReport,
    ValidationInputError,
    group_report,
    positive_group_report,
    roc_curve,
)

logger = logging.getLogger(__name__)


def score_all(
    card: ModelCard, data_dir: Path, rows: list[dict[str, str]], max_batch: int, threads: int
) -> tuple[list[float | None], list[tuple[str, str]], list[Observation]]:
    """Scores per row (max over frames, like the daemon's aggregation), the rows that failed to decode, and
    one drift observation per frame."""
    engine = create_engine(card, ModelDeployment(max_batch=max_batch, intra_op_threads=threads))
    engine.load()
    scores: list[float | None] = [None] * len(rows)
    failures: list[tuple[str, str]] = []
    observations: list[Observation] = []
    pending: list[tuple[int, Prepared]] = []

    def flush() -> None:
        batch = np.stack([p.tensor for _, p in pending])
        out = engine.infer(batch)
        for (row_index, prepared), frame_scores in zip(pending, out.scores, strict=True):
            score = float(frame_scores[0])
            previous = scores[row_index]
            scores[row_index] = score if previous is None else max(previous, score)
            observations.append(observation(prepared, frame_scores))
        pending.clear()

    try:
        for i, row in enumerate(rows):
            try:
                frames = load_instance_prepared(data_dir / row["file"], card)
            except DecodeError as exc:
                failures.append((row["file"], str(exc)))
                continue
            except OSError as exc:
                failures.append((row["file"], f"cannot read: {exc.strerror}"))
                continue
            for prepared in frames:
                pending.append((i, prepared))
                if len(pending) >= max_batch:
                    flush()
        if pending:
            flush()
    finally:
        engine.close()
    return scores, failures, observations


def validate(
    model_dir: Path,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    subgroups: list[str] | None = None,
    drift_reference: bool = False,
    reference_data: str | None = None,
) -> ValidationReport:
    """Run ``model_dir``'s model over the labelled DICOM and write report.json, report.md and roc.png.

    With ``drift_reference``, also write the inputs' drift reference into the model's card (``reference_data``
    says what the data is; by default the labels file and folder).
    """
    started = time.monotonic()
    card = load_card(model_dir)
    if len(card.labels) != 1:
        raise ValidationInputError(f"{card.name}: validate supports one-label models; this one has {len(card.labels)}")
    label = card.labels[0]
    threshold = float(card.thresholds[label])
    rows = read_labels(labels_csv, data_dir)
    csv_cols, dicom_keys = subgroup_columns(rows, subgroups)
    scores, failures, observations = score_all(card, data_dir, rows, min(card.batch.max, 8), 0)
    if failures:
        logger.warning(
            "validate: %d of %d files could not be decoded; they are listed in the report", len(failures), len(rows)
        )
    kept = [i for i, s in enumerate(scores) if s is not None]
    if not kept:
        raise ValidationInputError(f"{labels_csv}: none of the {len(rows)} files could be decoded")
    s = np.array([scores[i] for i in kept], dtype=np.float64)
    y = np.array([rows[i]["label"] == "1" for i in kept], dtype=bool)
    overall = group_report("all", "all", s, y, threshold, bootstrap, seed)
    attrs = [dicom_values(data_dir / rows[i]["file"], dicom_keys) for i in kept]
    groups: list[GroupReport] = []
    for column in [*csv_cols, *dicom_keys]:
        values = np.array([rows[i][column] if column in csv_cols else attrs[k][column] for k, i in enumerate(kept)])
        for value in sorted(set(values.tolist())):
            mask = values == value
            if y[mask].all() and (~y).any():
                groups.append(positive_group_report(column, value, s, y, mask, threshold, bootstrap, seed))
            else:
                groups.append(group_report(column, value, s[mask], y[mask], threshold, bootstrap, seed))
    report = ValidationReport(
        card.name,
        card.version,
        label,
        threshold,
        len(kept),
        failures,
        overall,
        groups,
        roc_curve(s, y),
        [(rows[i]["file"], int(rows[i]["label"]), float(s[k])) for k, i in enumerate(kept)],
        bootstrap,
        round(time.monotonic() - started, 1),
        statement=card.statement,
        against_card=against_card(card, overall),
    )
    write_reports(report, out_dir)
    if drift_reference:
        reference = build_reference(
            observations,
            data=reference_data or f"the images listed in {_shown(labels_csv)} (folder {_shown(data_dir)})",
            command=f"edge-agent validate {card.name} {_shown(data_dir)} --labels {_shown(labels_csv)} "
            "--drift-reference",
            model_sha256=card.sha256,
        )
        report.files["card"] = str(write_drift_reference(model_dir, reference))
        logger.info("validate: drift reference from %d images written into %s", len(observations), report.files["card"])
    logger.info(
        "validate: %s %s on %d images: AUC %s, sensitivity %s, specificity %s",
        card.name,
        card.version,
        len(kept),
        overall.auc.text(),
        overall.sensitivity.text(),
        overall.specificity.text(),
    )
    return report


def _shown(path: Path) -> str:
    """A path as the command that made a reference would name it: relative to the working folder when inside it."""
    resolved = path.resolve()
    here = Path(os.getcwd()).resolve()
    return str(resolved.relative_to(here)) if resolved.is_relative_to(here) else str(path)
