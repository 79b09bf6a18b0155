"""Series-level aggregation: max over slices, thresholds, priority, heat map and bounding box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edge_agent.config import Priority
from edge_agent.inference.card import ModelCard, parse_card
from edge_agent.inference.engine import SliceResult
from edge_agent.triage import BoundingBox, aggregate, bounding_box, hottest_region

ENGINES = Path(__file__).resolve().parent.parent / "engines"


def card(keep_aspect: bool = False, **changes: Any) -> ModelCard:
    """A two-label card (bleed at 0.7, fracture at 0.4) on a 256x256 input."""
    raw = yaml.safe_load((ENGINES / "ct-demo" / "model.yaml").read_text())
    raw["labels"] = ["bleed", "fracture"]
    raw["thresholds"] = {"bleed": 0.7, "fracture": 0.4}
    raw["preprocessing"]["keep_aspect"] = keep_aspect
    raw.update(changes)
    return parse_card(raw)


def heat(hot: list[tuple[int, int]], value: float = 0.9, size: int = 16) -> np.ndarray:
    out = np.full((size, size), 0.1, np.float32)
    for r, c in hot:
        out[r, c] = value
    return out


def result(bleed: float, fracture: float, maps: tuple[np.ndarray, np.ndarray] | None = None) -> SliceResult:
    heatmap = None if maps is None else np.stack(maps)
    return SliceResult(np.array([bleed, fracture], np.float32), heatmap)


def test_max_per_label_and_the_slice_that_drove_it() -> None:
    slices = [(0, result(0.2, 0.1)), (1, result(0.8, 0.3)), (2, result(0.5, 0.35))]
    series = aggregate(card(), slices)
    bleed, fracture = series.labels
    assert (bleed.label, bleed.index, fracture.label, fracture.index) == ("bleed", 1, "fracture", 2)
    assert bleed.score == pytest.approx(0.8)
    assert fracture.score == pytest.approx(0.35)
    assert bleed.positive and not fracture.positive
    assert bleed.threshold == pytest.approx(0.7)
    assert fracture.threshold == pytest.approx(0.4)
    assert series.priority is Priority.URGENT
    assert series.positive_labels == ["bleed"]
    assert series.slices == 3
    assert series.model == "ct-demo" and series.model_version == "0.1.0-untrained"


def test_nothing_over_threshold_is_routine() -> None:
    series = aggregate(card(), [(0, result(0.1, 0.1)), (1, result(0.69, 0.39))])
    assert series.priority is Priority.ROUTINE
    assert series.positive_labels == []


def test_a_score_equal_to_its_threshold_is_positive() -> None:
    series = aggregate(card(), [(0, result(0.7, 0.0))])
    assert series.labels[0].positive
    assert series.priority is Priority.URGENT


def test_ties_go_to_the_lowest_index_whatever_the_arrival_order() -> None:
    slices = [(7, result(0.5, 0.2)), (3, result(0.5, 0.2)), (5, result(0.1, 0.2))]
    series = aggregate(card(), slices)
    assert series.labels[0].index == 3
    assert series.labels[1].index == 3


def test_heat_map_and_box_come_from_the_driving_slice() -> None:
    blob = [(r, c) for r in (2, 3, 4) for c in (10, 11, 12)]
    other = [(12, 1)]
    slices = [
        (0, result(0.9, 0.1, (heat(blob), heat(other)))),
        (1, result(0.2, 0.8, (heat(other), heat([(0, 0)])))),
    ]
    series = aggregate(card(), slices)
    bleed, fracture = series.labels
    assert bleed.heatmap is not None
    np.testing.assert_array_equal(bleed.heatmap, heat(blob))
    # Cells are 16x16 input pixels: columns 10-12 -> x 160..208, rows 2-4 -> y 32..80.
    assert bleed.box == BoundingBox(160, 32, 208, 80, (0.625, 0.125, 0.8125, 0.3125), float(np.float32(0.9)))
    assert fracture.index == 1
    assert fracture.box is not None and (fracture.box.x_min, fracture.box.y_min) == (0, 0)
    assert fracture.box.as_dict()["pixels"] == {"x_min": 0, "y_min": 0, "x_max": 16, "y_max": 16}


def test_box_is_the_connected_region_around_the_peak_only() -> None:
    h = heat([(5, 5), (5, 6), (6, 5)], value=0.9)
    h[12:15, 12:15] = 0.8  # a second hot area, not connected to the peak
    h[5, 5] = 1.0
    assert hottest_region(h) == (5, 5, 6, 6)


def test_box_on_a_flat_map_covers_the_image() -> None:
    flat = np.full((16, 16), 0.5, np.float32)
    box = bounding_box(flat, card())
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (0, 0, 256, 256)
    assert box.fraction == (0.0, 0.0, 1.0, 1.0)


def test_letterboxed_box_fractions_refer_to_the_original_image() -> None:
    # A 1000 x 500 (rows x cols) image letterboxed into 256x256 occupies columns 64..192.
    h = heat([(r, c) for r in range(16) for c in (4, 5, 6, 7)])
    box = bounding_box(h, card(keep_aspect=True), source_shape=(1000, 500))
    assert (box.x_min, box.x_max) == (64, 128)
    assert box.fraction == (0.0, 0.0, 0.5, 1.0)
    # Without the source shape the fractions are of the model input.
    assert bounding_box(h, card(keep_aspect=True)).fraction == (0.25, 0.0, 0.5, 1.0)


def test_aggregate_gives_a_letterboxed_box_in_fractions_of_the_driving_image() -> None:
    """Defect 12: the series' box refers to the image of the slice that drove it, not to the model input."""
    h = heat([(r, c) for r in range(16) for c in (4, 5, 6, 7)])
    slices = [(0, result(0.9, 0.1, (h, h))), (1, result(0.2, 0.1, (h, h)))]
    shapes = {0: (1000, 500), 1: (500, 1000)}
    bleed, _ = aggregate(card(keep_aspect=True), slices, shapes).labels
    assert bleed.index == 0 and bleed.box is not None and bleed.box.fraction == (0.0, 0.0, 0.5, 1.0)
    bleed, _ = aggregate(card(keep_aspect=True), slices).labels
    assert bleed.box is not None and bleed.box.fraction == (0.25, 0.0, 0.5, 1.0)


def test_no_heat_map_means_no_box() -> None:
    series = aggregate(card(), [(0, result(0.9, 0.9))])
    assert all(label.heatmap is None and label.box is None for label in series.labels)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no slice results"):
        aggregate(card(), [])
    with pytest.raises(ValueError, match="3 scores, the card has 2 labels"):
        aggregate(card(), [(0, SliceResult(np.zeros(3, np.float32), None))])
    with pytest.raises(ValueError, match="non-finite"):
        aggregate(card(), [(0, result(float("nan"), 0.1))])
