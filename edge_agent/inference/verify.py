"""verify-engine: the chosen backend against ONNX Runtime on the CPU, on the same inputs.

A plan built in FP16 or INT8, or on a new TensorRT, can drift from the model that was validated.
This runs both on sample inputs (real DICOM through the daemon's own preprocessing when given, else
seeded synthetic images) and reports the largest absolute difference and whether the findings agree,
i.e. whether each score lands on the same side of its label's threshold. A disagreement where the
reference score lies within the tolerance of the threshold is counted as borderline, not a failure:
no precision can promise the side of a coin that lands on its edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import DecodeError, EngineError
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import Engine, FloatArray

logger = logging.getLogger(__name__)

# Largest absolute score difference accepted by default, per precision (scores are in [0, 1]).
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of one comparison."""

    model: str
    backend: str
    images: int
    tolerance: float
    max_abs_diff_scores: float
    max_abs_diff_heatmap: float | None
    compared: int  # (image, label) pairs
    disagreements: int  # findings on different sides of the threshold, reference clear of it
    borderline: int  # findings on different sides, reference within tolerance of the threshold

    @property
    def agreement(self) -> float:
        return 1.0 - self.disagreements / self.compared if self.compared else 1.0

    @property
    def passed(self) -> bool:
        return self.max_abs_diff_scores <= self.tolerance and self.disagreements == 0

    def summary(self) -> str:
        heat = "" if self.max_abs_diff_heatmap is None else f", heat map max abs diff {self.max_abs_diff_heatmap:.2e}"
        return (
            f"{self.model} on {self.backend} vs onnxruntime CPU, {self.images} images: "
            f"score max abs diff {self.max_abs_diff_scores:.2e} (tolerance {self.tolerance:.0e}){heat}; "
            f"finding agreement {self.agreement:.2%} ({self.disagreements} disagree, {self.borderline} borderline) "
            f"-> {'PASS' if self.passed else 'FAIL'}"
        )


def synthetic_inputs(card: ModelCard, count: int, seed: int = 0) -> FloatArray:
    """``count`` seeded images in the normalised input range: smooth blobs over noise, plus one blank."""
    c, h, w = card.input_shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((count, c, h, w), np.float32)
    norm = card.preprocessing.normalise
    for i in range(count):
        img = rng.uniform(0.0, 0.2, (h, w)).astype(np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(min(h, w) / 16, min(h, w) / 4)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32) * rng.uniform(0.3, 0.8)
        if i == 0:
            img[...] = 0.0
        out[i] = (np.clip(img, 0.0, 1.0) - norm.mean) / norm.std
    return out


def dicom_inputs(card: ModelCard, paths: Sequence[Path], limit: int) -> FloatArray:
    """Up to ``limit`` frames from DICOM files, through the daemon's own preprocessing; files that fail are skipped."""
    from edge_agent.inference.preprocess import load_instance

    frames: list[FloatArray] = []
    for path in paths:
        if len(frames) >= limit:
            break
        try:
            frames.extend(load_instance(path, card))
        except (DecodeError, OSError) as exc:
            logger.warning("verify: skipping %s: %s", path.name, exc)
    if not frames:
        raise EngineError(f"{card.name}: none of the {len(paths)} DICOM files could be decoded for verification")
    return np.stack(frames[:limit]).astype(np.float32)


def dicom_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``, sorted (DICOM files often have no extension)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def compare(
    card: ModelCard, candidate: Engine, reference: Engine, inputs: FloatArray, tolerance: float, batch: int
) -> VerifyReport:
    """Run both engines over ``inputs`` in batches of ``batch`` and compare scores, heat maps and findings."""
    if inputs.ndim != 4 or len(inputs) == 0:
        raise EngineError(f"{card.name}: verification needs at least one input image")
    thresholds = np.array([card.thresholds[label] for label in card.labels], dtype=np.float32)
    max_scores = 0.0
    max_heat: float | None = None
    disagree = borderline = 0
    for start in range(0, len(inputs), batch):
        chunk = np.ascontiguousarray(inputs[start : start + batch])
        got, ref = candidate.infer(chunk), reference.infer(chunk)
        max_scores = max(max_scores, float(np.abs(got.scores - ref.scores).max()))
        if got.heatmap is not None and ref.heatmap is not None:
            diff = float(np.abs(got.heatmap - ref.heatmap).max())
            max_heat = diff if max_heat is None else max(max_heat, diff)
        flipped = (got.scores >= thresholds) != (ref.scores >= thresholds)
        near = np.abs(ref.scores - thresholds) <= tolerance
        disagree += int((flipped & ~near).sum())
        borderline += int((flipped & near).sum())
    return VerifyReport(
        model=card.name,
        backend=candidate.backend,
        images=len(inputs),
        tolerance=tolerance,
        max_abs_diff_scores=max_scores,
        max_abs_diff_heatmap=max_heat,
        compared=len(inputs) * len(card.labels),
        disagreements=disagree,
        borderline=borderline,
    )


def verify_engine(
    card: ModelCard,
    candidate: Engine,
    inputs: FloatArray,
    *,
    tolerance: float,
    batch: int,
) -> VerifyReport:
    """Compare a loaded ``candidate`` with a fresh ONNX Runtime CPU session of the same model."""
    from edge_agent.inference.onnxruntime import OnnxRuntimeEngine

    reference = OnnxRuntimeEngine(card, max_batch=batch)
    reference.load()
    try:
        report = compare(card, candidate, reference, inputs, tolerance, batch)
    finally:
        reference.close()
    log = logger.info if report.passed else logger.error
    log("verify %s", report.summary())
    return report
