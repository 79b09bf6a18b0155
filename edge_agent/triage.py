"""Per-slice scores -> one series-level triage result. Pure functions, no I/O.

For each label the series score is the maximum over its slices (``aggregation: max``), and the slice
that drove it supplies the heat map and the bounding box of its hottest region. A label is positive
when its score reaches the card's threshold; any positive label makes the series urgent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.config import Priority
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import SliceResult
from edge_agent.inference.preprocess import placement

# The hottest region is the connected area around the peak that is at least this far up from the
# map's minimum to its peak (half maximum above background), so it grows with the lesion, not the map.
REGION_LEVEL = 0.5


@dataclass(frozen=True, slots=True)
class BoundingBox:
    """A box in model-input pixels (max exclusive) and the same box as fractions of the image."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    # (x_min, y_min, x_max, y_max) in [0, 1]: of the original image when the card letterboxes and
    # its size is known, else of the model input (which then is the whole image, resized).
    fraction: tuple[float, float, float, float]
    peak: float  # the heat map's highest value, inside this box

    def as_dict(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.fraction
        return {
            "pixels": {"x_min": self.x_min, "y_min": self.y_min, "x_max": self.x_max, "y_max": self.y_max},
            "fraction": {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1},
            "peak": self.peak,
        }


@dataclass(frozen=True, slots=True)
class LabelResult:
    """The series-level result for one label."""

    label: str
    score: float
    threshold: float
    positive: bool
    index: int  # the caller's index (instance or frame) of the slice that drove the score
    heatmap: npt.NDArray[np.float32] | None  # [h, w] of the driving slice, if the model makes one
    box: BoundingBox | None


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """One model's triage of one series."""

    model: str
    model_version: str
    priority: Priority
    labels: tuple[LabelResult, ...]
    slices: int

    @property
    def positive_labels(self) -> list[str]:
        return [r.label for r in self.labels if r.positive]


def hottest_region(heatmap: npt.NDArray[np.float32]) -> tuple[int, int, int, int]:
    """(row_min, col_min, row_max, col_max), inclusive, of the connected hot area around the peak."""
    h, w = heatmap.shape
    peak_row, peak_col = divmod(int(np.argmax(heatmap)), w)
    peak, low = float(heatmap[peak_row, peak_col]), float(heatmap.min())
    hot = heatmap >= low + REGION_LEVEL * (peak - low)
    seen = np.zeros_like(hot)
    seen[peak_row, peak_col] = True
    todo = deque([(peak_row, peak_col)])
    r0, c0, r1, c1 = peak_row, peak_col, peak_row, peak_col
    while todo:
        r, c = todo.popleft()
        r0, c0, r1, c1 = min(r0, r), min(c0, c), max(r1, r), max(c1, c)
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and hot[nr, nc] and not seen[nr, nc]:
                seen[nr, nc] = True
                todo.append((nr, nc))
    return r0, c0, r1, c1


def bounding_box(
    heatmap: npt.NDArray[np.float32], card: ModelCard, source_shape: tuple[int, int] | None = None
) -> BoundingBox:
    """The box of the heat map's hottest region, in model-input pixels and as fractions of the image."""
    _, in_h, in_w = card.input_shape
    h, w = heatmap.shape
    r0, c0, r1, c1 = hottest_region(heatmap)
    x_min, x_max = (c0 * in_w) // w, -((-(c1 + 1) * in_w) // w)
    y_min, y_max = (r0 * in_h) // h, -((-(r1 + 1) * in_h) // h)
    if card.preprocessing.keep_aspect and source_shape is not None:
        place = placement(source_shape, card.preprocessing)
        left, top, width, height = place.left, place.top, place.width, place.height
    else:
        left, top, width, height = 0, 0, in_w, in_h

    def frac(v: int, origin: int, size: int) -> float:
        return float(min(max((v - origin) / size, 0.0), 1.0))

    fraction = (frac(x_min, left, width), frac(y_min, top, height), frac(x_max, left, width), frac(y_max, top, height))
    return BoundingBox(x_min, y_min, x_max, y_max, fraction, float(heatmap.max()))


def aggregate(
    card: ModelCard,
    slice_results: Sequence[tuple[int, SliceResult]],
    source_shapes: Mapping[int, tuple[int, int]] | None = None,
) -> SeriesResult:
    """Max-aggregate per-slice results into a series result (ties go to the lowest index).

    ``source_shapes`` maps a slice's index to its image's (rows, columns): it lets box fractions refer
    to the original image when the card letterboxes; without it they refer to the model input.
    """
    if not slice_results:
        raise ValueError(f"{card.name}: no slice results to aggregate")
    n_labels = len(card.labels)
    ordered = sorted(slice_results, key=lambda pair: pair[0])
    scores = np.stack([np.asarray(r.scores, dtype=np.float32).reshape(-1) for _, r in ordered])
    if scores.shape[1] != n_labels:
        raise ValueError(f"{card.name}: slice results have {scores.shape[1]} scores, the card has {n_labels} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"{card.name}: a slice result holds a non-finite score")
    results = []
    for j, label in enumerate(card.labels):
        best = int(np.argmax(scores[:, j]))  # argmax returns the first maximum: the lowest index
        index, driver = ordered[best]
        score = float(scores[best, j])
        threshold = float(card.thresholds[label])
        heat = None if driver.heatmap is None else np.asarray(driver.heatmap[j], dtype=np.float32)
        shape = None if source_shapes is None else source_shapes.get(index)
        box = None if heat is None else bounding_box(heat, card, shape)
        # Compare in float32, the precision the model computes in: a score of float32(0.7) reaches 0.7.
        positive = bool(scores[best, j] >= np.float32(threshold))
        results.append(LabelResult(label, score, threshold, positive, index, heat, box))
    priority = Priority.URGENT if any(r.positive for r in results) else Priority.ROUTINE
    return SeriesResult(card.name, card.version, priority, tuple(results), len(ordered))
