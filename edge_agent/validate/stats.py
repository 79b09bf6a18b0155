"""The statistics of a validation: ROC AUC and curve, rates at a threshold, bootstrap intervals. Pure: no I/O.

The training recipe (engines/cxr-nodule/recipe) chooses its threshold and reports its controls with these
same functions, so the card's figures and ``edge-agent validate``'s are computed one way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import EdgeAgentError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class ValidationInputError(EdgeAgentError, ValueError):
    """The labels CSV, the requested subgroups or the cases are not usable."""


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


def threshold_for_specificity(scores: npt.ArrayLike, labels: npt.ArrayLike, target: float) -> float:
    """The lowest threshold (score >= threshold is positive) whose specificity is at least ``target``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    negatives = np.sort(s[~y])[::-1]
    if negatives.size == 0:
        raise ValidationInputError("cannot choose a threshold without negative cases")
    allowed_flags = math.floor((1.0 - target) * negatives.size + 1e-9)
    # Every negative from index allowed_flags down must fall below: the threshold sits just above that one.
    threshold = float(np.nextafter(negatives[allowed_flags], np.inf))
    # Round up so that the value written to a card (6 decimals) still clears every negative it must.
    return math.ceil(threshold * 1e6) / 1e6


def rates(scores: FloatArray, labels: BoolArray, threshold: float) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) at ``threshold`` (score >= threshold is positive); None without the class."""
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
    sens, spec = rates(s, y, threshold)
    auc = roc_auc(s, y)
    rng = np.random.default_rng(seed)
    sens_s: list[float] = []
    spec_s: list[float] = []
    auc_s: list[float] = []
    for _ in range(resamples if s.size else 0):
        idx = rng.integers(0, s.size, s.size)
        bs, by = s[idx], y[idx]
        a, b = rates(bs, by, threshold)
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
    labels: BoolArray,
    threshold: float,
    resamples: int,
    seed: int,
) -> GroupReport:
    """Sensitivity, specificity and AUC of one group of cases, with bootstrap intervals."""
    sens, spec, auc = bootstrap_estimates(scores, labels, threshold, resamples, seed)
    n_pos = int(labels.sum())
    return GroupReport(column, value, int(labels.size), n_pos, int(labels.size) - n_pos, sens, spec, auc)


def positive_group_report(
    column: str,
    value: str,
    scores: FloatArray,
    labels: BoolArray,
    mask: BoolArray,
    threshold: float,
    resamples: int,
    seed: int,
) -> GroupReport:
    """A subgroup of positives only, scored against all negatives (specificity is then the overall one)."""
    keep = mask | ~labels
    g = group_report(column, value, scores[keep], labels[keep], threshold, resamples, seed)
    return replace(g, n=int(mask.sum()), against_all_negatives=True)
