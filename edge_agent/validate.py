"""A model over a folder of labelled DICOM, through the daemon's own path, with honest uncertainty.

``validate`` loads the card and engine exactly as the daemon does (load_card, load_instance,
create_engine), scores every instance listed in a labels CSV, and reports sensitivity and
specificity at the card's threshold and ROC AUC, each with a bootstrap 95% confidence interval,
overall and per subgroup (label CSV columns and a short allow-list of DICOM attributes). It writes
report.json, report.md and roc.png (a small PNG drawn with numpy and zlib).

Subgroups never read patient attributes: only the DICOM keywords in ``DICOM_SUBGROUPS`` are
allowed, so a report cannot carry names, IDs or UIDs from the files.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from edge_agent.config import ModelDeployment
from edge_agent.errors import DecodeError, EdgeAgentError
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.inference.engine import create_engine
from edge_agent.inference.preprocess import load_instance
from edge_agent.png import encode_png

logger = logging.getLogger(__name__)

# Device and acquisition attributes only: none of them identifies a patient or a study.
DICOM_SUBGROUPS = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "Modality",
        "ViewPosition",
        "PhotometricInterpretation",
        "BodyPartExamined",
        "BitsStored",
        "Rows",
        "Columns",
        "PresentationIntentType",
    }
)
DEFAULT_DICOM_SUBGROUPS = ("Manufacturer", "ViewPosition", "PhotometricInterpretation", "Modality")
# A CSV column with more distinct values than this is an identifier or a measurement, not a subgroup.
MAX_SUBGROUP_VALUES = 20
# A numeric column with more distinct values than this is a measurement: bin it in the CSV instead.
MAX_NUMERIC_VALUES = 8
_NOT_SUBGROUPS = frozenset({"file", "label"})
# Never broken down by default, whatever their cardinality: they may identify people (ask for them by name).
_IDENTIFIER_HINTS = ("patient", "uid", "accession", "name", "birth")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class ValidationInputError(EdgeAgentError, ValueError):
    """The labels CSV or the requested subgroups are not usable."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its bootstrap 95% interval; None where undefined (e.g. no positives)."""

    value: float | None
    low: float | None
    high: float | None

    def text(self, digits: int = 3) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass(frozen=True, slots=True)
class GroupReport:
    """Metrics for all images (column "all") or one subgroup (column = value)."""

    column: str
    value: str
    n: int
    positives: int
    negatives: int
    sensitivity: Estimate
    specificity: Estimate
    auc: Estimate
    # A subgroup that only positives have (nodule size, type, location) is scored against every
    # negative image: its AUC then says how well those lesions stand out from normal images.
    against_all_negatives: bool = False


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """What ``validate`` found; also written as report.json / report.md / roc.png in ``out_dir``."""

    model: str
    version: str
    label: str
    threshold: float
    images: int
    failures: list[tuple[str, str]]
    overall: GroupReport
    subgroups: list[GroupReport]
    roc: list[tuple[float, float]]
    cases: list[tuple[str, int, float]]  # (file as in the CSV, label, score) for every decoded file
    bootstrap: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    statement: str | None = None
    # The card's own figures next to these (metric, card, measured, same to 3 decimals); empty if it has none.
    against_card: list[tuple[str, float | None, float | None, bool]] = field(default_factory=list)

    @property
    def reproduces_card(self) -> bool | None:
        """True when every figure the card states was measured again here, to 3 decimals; None without any."""
        return all(same for *_, same in self.against_card) if self.against_card else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = [{"file": f, "reason": r} for f, r in self.failures]
        out["cases"] = [{"file": f, "label": y, "score": s} for f, y, s in self.cases]
        out["against_card"] = [
            {"metric": m, "card": c, "measured": v, "same": same} for m, c, v, same in self.against_card
        ]
        out["reproduces_card"] = self.reproduces_card
        return out


# ---------------------------------------------------------------------------------------------------
# Pure statistics
# ---------------------------------------------------------------------------------------------------


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from (0, 0) to (1, 1), one per distinct score."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return []
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]  # last index of each distinct score
    points = [(0.0, 0.0)] + [(float(fp[i] / n_neg), float(tp[i] / n_pos)) for i in last]
    return points


def threshold_for_sensitivity(scores: npt.ArrayLike, labels: npt.ArrayLike, target: float) -> float:
    """The highest threshold (score >= threshold is positive) whose sensitivity is at least ``target``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    positives = np.sort(s[y])
    if positives.size == 0:
        raise ValidationInputError("cannot choose a threshold without positive cases")
    allowed_misses = math.floor((1.0 - target) * positives.size + 1e-9)
    threshold = float(positives[allowed_misses])
    # Round down so that the value written to a card (6 decimals) still keeps every counted positive.
    return math.floor(threshold * 1e6) / 1e6


def _rates(scores: FloatArray, labels: npt.NDArray[np.bool_], threshold: float) -> tuple[float | None, float | None]:
    flagged = scores >= threshold
    n_pos, n_neg = int(labels.sum()), int(labels.size - labels.sum())
    sens = float((flagged & labels).sum() / n_pos) if n_pos else None
    spec = float((~flagged & ~labels).sum() / n_neg) if n_neg else None
    return sens, spec


def _interval(samples: list[float], value: float | None) -> Estimate:
    if value is None or not samples:
        return Estimate(value, None, None)
    low, high = np.percentile(np.asarray(samples), [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def bootstrap_estimates(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float, resamples: int, seed: int
) -> tuple[Estimate, Estimate, Estimate]:
    """(sensitivity, specificity, AUC), each with a percentile bootstrap 95% interval over cases."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    sens, spec = _rates(s, y, threshold)
    auc = roc_auc(s, y)
    rng = np.random.default_rng(seed)
    sens_s: list[float] = []
    spec_s: list[float] = []
    auc_s: list[float] = []
    for _ in range(resamples if s.size else 0):
        idx = rng.integers(0, s.size, s.size)
        bs, by = s[idx], y[idx]
        a, b = _rates(bs, by, threshold)
        if a is not None:
            sens_s.append(a)
        if b is not None:
            spec_s.append(b)
        if auc is not None:
            c = roc_auc(bs, by)
            if c is not None:
                auc_s.append(c)
    return _interval(sens_s, sens), _interval(spec_s, spec), _interval(auc_s, auc)


def bootstrap_metrics(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The same estimates as a JSON-ready dict (used by the training recipe for its controls)."""
    y = np.asarray(labels).astype(bool)
    sens, spec, auc = bootstrap_estimates(scores, y, threshold, resamples, seed)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "negatives": int(y.size - y.sum()),
        "threshold": threshold,
        "sensitivity": asdict(sens),
        "specificity": asdict(spec),
        "auc": asdict(auc),
    }


def group_report(
    column: str,
    value: str,
    scores: FloatArray,
    labels: npt.NDArray[np.bool_],
    threshold: float,
    resamples: int,
    seed: int,
) -> GroupReport:
    sens, spec, auc = bootstrap_estimates(scores, labels, threshold, resamples, seed)
    n_pos = int(labels.sum())
    return GroupReport(column, value, int(labels.size), n_pos, int(labels.size) - n_pos, sens, spec, auc)


def positive_group_report(
    column: str,
    value: str,
    scores: FloatArray,
    labels: npt.NDArray[np.bool_],
    mask: npt.NDArray[np.bool_],
    threshold: float,
    resamples: int,
    seed: int,
) -> GroupReport:
    """A subgroup of positives only, scored against all negatives (specificity is then the overall one)."""
    keep = mask | ~labels
    g = group_report(column, value, scores[keep], labels[keep], threshold, resamples, seed)
    return replace(g, n=int(mask.sum()), against_all_negatives=True)


# ---------------------------------------------------------------------------------------------------
# A tiny PNG plot (no plotting dependency)
# ---------------------------------------------------------------------------------------------------


def _line(
    canvas: npt.NDArray[np.uint8],
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    colour: tuple[int, int, int],
    width: int = 1,
    dash: int = 0,
) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for k in range(steps + 1):
        if dash and (k // dash) % 2:
            continue
        t = k / max(steps, 1)
        x, y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
        h = width // 2
        canvas[max(y - h, 0) : y + h + 1, max(x - h, 0) : x + h + 1] = colour


def roc_png(
    points: Sequence[tuple[float, float]], operating_point: tuple[float, float] | None = None, size: int = 400
) -> bytes:
    """A ROC plot as PNG bytes: unit square, chance diagonal, the curve, and the operating point."""
    margin = 30
    side = size - 2 * margin
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * side, margin + (1.0 - tpr) * side

    for t in np.linspace(0.0, 1.0, 11):  # light grid every 0.1
        _line(canvas, *xy(t, 0.0), *xy(t, 1.0), (232, 232, 232))
        _line(canvas, *xy(0.0, t), *xy(1.0, t), (232, 232, 232))
    _line(canvas, *xy(0.0, 0.0), *xy(1.0, 1.0), (160, 160, 160), dash=6)
    for a, b, c, d in ((0, 0, 1, 0), (1, 0, 1, 1), (1, 1, 0, 1), (0, 1, 0, 0)):
        _line(canvas, *xy(a, b), *xy(c, d), (0, 0, 0))
    for (f0, t0), (f1, t1) in itertools.pairwise(points):
        _line(canvas, *xy(f0, t0), *xy(f1, t1), (31, 119, 180), width=3)
    if operating_point is not None:
        x, y = xy(*operating_point)
        canvas[int(y) - 4 : int(y) + 5, int(x) - 4 : int(x) + 5] = (214, 39, 40)
    return encode_png(canvas)


# ---------------------------------------------------------------------------------------------------
# Running a model over labelled DICOM
# ---------------------------------------------------------------------------------------------------


def read_labels(labels_csv: Path, data_dir: Path) -> list[dict[str, str]]:
    """Rows of the labels CSV; needs columns file and label (0/1); files must stay inside ``data_dir``."""
    try:
        with labels_csv.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise ValidationInputError(f"{labels_csv}: cannot read: {exc.strerror}") from None
    missing = [c for c in ("file", "label") if c not in columns]
    if missing:
        raise ValidationInputError(f"{labels_csv}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise ValidationInputError(f"{labels_csv}: no rows")
    root = data_dir.resolve()
    for number, row in enumerate(rows, start=2):
        if row["label"] not in {"0", "1"}:
            raise ValidationInputError(f"{labels_csv}, line {number}: label must be 0 or 1")
        path = (data_dir / row["file"]).resolve()
        if not path.is_relative_to(root):
            raise ValidationInputError(f"{labels_csv}, line {number}: file is outside the data folder")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _default_subgroup(column: str, values: list[str]) -> bool:
    """Whether a CSV column is a subgroup by default: few values, not a measurement, not an identifier."""
    if column in _NOT_SUBGROUPS or any(hint in column.lower() for hint in _IDENTIFIER_HINTS):
        return False
    distinct = set(values)
    if len(distinct) > MAX_SUBGROUP_VALUES:
        return False
    numeric = [v for v in distinct if v.strip()]
    many = len(numeric) > min(MAX_NUMERIC_VALUES, len(values) / 3)
    return not (numeric and all(_is_number(v) for v in numeric) and many)


def _subgroup_columns(rows: list[dict[str, str]], requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(CSV columns, DICOM keywords) to break the results down by."""
    columns = list(rows[0].keys())
    if requested is None:
        csv_cols = [c for c in columns if _default_subgroup(c, [r[c] for r in rows])]
        return csv_cols, [k for k in DEFAULT_DICOM_SUBGROUPS if k not in csv_cols]
    csv_cols, dicom = [], []
    for name in requested:
        if name in columns:
            csv_cols.append(name)
        elif name in DICOM_SUBGROUPS:
            dicom.append(name)
        else:
            raise ValidationInputError(
                f"subgroup {name!r} is neither a labels column nor an allowed DICOM attribute "
                f"({', '.join(sorted(DICOM_SUBGROUPS))})"
            )
    return csv_cols, dicom


def _dicom_values(path: Path, keywords: list[str]) -> dict[str, str]:
    if not keywords:
        return {}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except Exception:
        return dict.fromkeys(keywords, "unreadable")
    return {k: str(ds.get(k, "")).strip() or "(absent)" for k in keywords}


def _score_all(
    card: ModelCard, data_dir: Path, rows: list[dict[str, str]], max_batch: int, threads: int
) -> tuple[list[float | None], list[tuple[str, str]]]:
    """Scores per row (max over frames, like the daemon's aggregation) and the rows that failed to decode."""
    engine = create_engine(card, ModelDeployment(max_batch=max_batch, intra_op_threads=threads))
    engine.load()
    scores: list[float | None] = [None] * len(rows)
    failures: list[tuple[str, str]] = []
    pending: list[tuple[int, npt.NDArray[np.float32]]] = []

    def flush() -> None:
        batch = np.stack([tensor for _, tensor in pending])
        out = engine.infer(batch)
        for (row_index, _), score in zip(pending, out.scores[:, 0], strict=True):
            previous = scores[row_index]
            scores[row_index] = float(score) if previous is None else max(previous, float(score))
        pending.clear()

    try:
        for i, row in enumerate(rows):
            try:
                frames = load_instance(data_dir / row["file"], card)
            except DecodeError as exc:
                failures.append((row["file"], str(exc)))
                continue
            except OSError as exc:
                failures.append((row["file"], f"cannot read: {exc.strerror}"))
                continue
            for tensor in frames:
                pending.append((i, tensor))
                if len(pending) >= max_batch:
                    flush()
        if pending:
            flush()
    finally:
        engine.close()
    return scores, failures


def validate(
    model_dir: Path,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    subgroups: list[str] | None = None,
) -> ValidationReport:
    """Run ``model_dir``'s model over the labelled DICOM and write report.json, report.md and roc.png."""
    started = time.monotonic()
    card = load_card(model_dir)
    if len(card.labels) != 1:
        raise ValidationInputError(f"{card.name}: validate supports one-label models; this one has {len(card.labels)}")
    label = card.labels[0]
    threshold = float(card.thresholds[label])
    rows = read_labels(labels_csv, data_dir)
    csv_cols, dicom_keys = _subgroup_columns(rows, subgroups)
    scores, failures = _score_all(card, data_dir, rows, min(card.batch.max, 8), 0)
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
    attrs = [_dicom_values(data_dir / rows[i]["file"], dicom_keys) for i in kept]
    groups: list[GroupReport] = []
    for column in [*csv_cols, *dicom_keys]:
        values = np.array([rows[i][column] if column in csv_cols else attrs[k][column] for k, i in enumerate(kept)])
        for value in sorted(set(values.tolist())):
            mask = values == value
            if y[mask].all() and (~y).any():
                groups.append(positive_group_report(column, value, s, y, mask, threshold, bootstrap, seed))
            else:
                groups.append(group_report(column, value, s[mask], y[mask], threshold, bootstrap, seed))
    against_card = _against_card(card, overall)
    sens, spec = overall.sensitivity.value, overall.specificity.value
    operating = (1.0 - spec, sens) if sens is not None and spec is not None else None
    curve = roc_curve(s, y)
    report = ValidationReport(
        card.name,
        card.version,
        label,
        threshold,
        len(kept),
        failures,
        overall,
        groups,
        curve,
        [(rows[i]["file"], int(rows[i]["label"]), float(s[k])) for k, i in enumerate(kept)],
        bootstrap,
        round(time.monotonic() - started, 1),
        statement=card.statement,
        against_card=against_card,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "roc": out_dir / "roc.png"}
    report.files.update({k: str(v) for k, v in files.items()})
    files["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    files["markdown"].write_text(markdown(report), encoding="utf-8")
    files["roc"].write_bytes(roc_png(curve, operating))
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


def _against_card(card: ModelCard, overall: GroupReport) -> list[tuple[str, float | None, float | None, bool]]:
    """The card's stated overall figures beside the measured ones (only when the image count matches)."""
    stated = card.validation
    if stated is None:
        return []
    out: list[tuple[str, float | None, float | None, bool]] = [
        ("images", float(stated.images), float(overall.n), stated.images == overall.n),
        ("positives", float(stated.positives), float(overall.positives), stated.positives == overall.positives),
    ]
    for name in ("auc", "sensitivity", "specificity"):
        card_fig = getattr(stated, name)
        measured: Estimate = getattr(overall, name)
        same = (
            card_fig.value is not None
            and measured.value is not None
            and round(card_fig.value, 3) == round(measured.value, 3)
        )
        out.append((name, card_fig.value, measured.value, same))
    return out


def markdown(report: ValidationReport) -> str:
    """The report as a Markdown document."""
    o = report.overall
    lines = [
        f"# Validation of {report.model} {report.version}",
        "",
        f"{report.images} images ({o.positives} positive, {o.negatives} negative); label `{report.label}`, "
        f"threshold {report.threshold:g} (from the model card). 95% intervals: percentile bootstrap over images, "
        f"{report.bootstrap} resamples.",
        "",
        "| metric | value (95% CI) |",
        "|---|---|",
        f"| ROC AUC | {o.auc.text()} |",
        f"| sensitivity at threshold | {o.sensitivity.text()} |",
        f"| specificity at threshold | {o.specificity.text()} |",
        "",
        "![ROC curve](roc.png)",
        "",
    ]
    if report.statement:
        lines[2:2] = [f"**{report.statement}**", ""]
    if report.against_card:
        verdict = "reproduced" if report.reproduces_card else "NOT reproduced"
        lines += [f"## Against the model card: {verdict}", "", "| figure | card | measured | same |"]
        lines.append("|---|---|---|---|")
        for metric, stated, measured, same in report.against_card:
            lines.append(f"| {metric} | {_fmt(stated)} | {_fmt(measured)} | {'yes' if same else 'NO'} |")
        lines.append("")
    lines += [
        "## Subgroups",
        "",
        "| subgroup | n | positive | negative | sensitivity | specificity | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in report.subgroups:
        mark = "*" if g.against_all_negatives else ""
        lines.append(
            f"| {g.column} = {g.value} | {g.n} | {g.positives} | {g.negatives}{mark} | {g.sensitivity.text()} "
            f"| {g.specificity.text()} | {g.auc.text()} |"
        )
    if any(g.against_all_negatives for g in report.subgroups):
        lines += [
            "",
            "\\* a subgroup only positive images have (e.g. nodule size): its positives against every negative image, "
            "so its specificity is the overall one and its AUC says how well those lesions stand out.",
        ]
    if report.failures:
        lines += ["", f"## Files that could not be decoded ({len(report.failures)})", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report.failures]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.3f}"
