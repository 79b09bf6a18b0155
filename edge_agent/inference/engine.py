"""The backend-neutral engine interface every backend implements (ONNX Runtime, TensorRT, TensorRT for RTX).

Which backend serves a model is decided in factory.py; this module imports no backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_agent.errors import EngineError
from edge_agent.inference.card import ModelCard

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """One engine call's result: scores [N, L] and, if the model has one, heat maps [N, L, h, w]."""

    scores: FloatArray
    heatmap: FloatArray | None


@dataclass(frozen=True, slots=True)
class SliceResult:
    """One image's (slice's) result: scores [L] and its heat maps [L, h, w] or None."""

    scores: FloatArray
    heatmap: FloatArray | None


@runtime_checkable
class Engine(Protocol):
    """A loaded model that turns a batch [N, C, H, W] float32 into an EngineOutput."""

    name: str
    backend: str
    input_shape: tuple[int, int, int]

    def load(self) -> None:
        """Build the session and check the model's inputs and outputs against its card."""

    def warm_up(self) -> None:
        """Run once at the largest batch and once at batch 1, so the first real call is not slow."""

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Run one batch; raises EngineError on any failure."""

    def close(self) -> None:
        """Release the session; the engine must be loaded again before use."""


def check_output(card: ModelCard, n: int, out: EngineOutput) -> EngineOutput:
    """Validate an engine's output for a batch of ``n``; raises EngineError with what is wrong."""
    labels = len(card.labels)
    if out.scores.shape != (n, labels):
        raise EngineError(f"{card.name}: scores have shape {list(out.scores.shape)}, expected {[n, labels]}")
    # A NaN compares false against every threshold and would pass as "routine": refuse it instead.
    if not np.isfinite(out.scores).all():
        raise EngineError(f"{card.name}: the model returned non-finite scores")
    if out.heatmap is not None:
        if out.heatmap.ndim != 4 or out.heatmap.shape[:2] != (n, labels):
            raise EngineError(
                f"{card.name}: heat map has shape {list(out.heatmap.shape)}, expected [{n}, {labels}, h, w]"
            )
        if not np.isfinite(out.heatmap).all():
            raise EngineError(f"{card.name}: the model returned a non-finite heat map")
    return out


def check_batch(name: str, input_shape: tuple[int, int, int], batch: FloatArray) -> None:
    """Raise EngineError unless ``batch`` is [N>=1, C, H, W] float32 for this model."""
    if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[0] < 1 or tuple(batch.shape[1:]) != input_shape:
        expected = ", ".join(map(str, input_shape))
        raise EngineError(f"{name}: input batch is {batch.dtype}{list(batch.shape)}, expected float32[N, {expected}]")
