"""The backend-neutral engine interface: ONNX Runtime now, TensorRT later, same calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_agent.config import ModelDeployment
from edge_agent.errors import ConfigError, EngineError
from edge_agent.inference.card import ModelCard

if TYPE_CHECKING:
    from edge_agent.inference.plan_cache import Precision

logger = logging.getLogger(__name__)

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


def create_engine(card: ModelCard, deployment: ModelDeployment, state_dir: Path | None = None) -> Engine:
    """The engine for ``card`` on the deployment's backend (not yet loaded).

    ``auto`` and ``tensorrt`` look at the box first (inference/select.py) and log the choice with its
    reason; TensorRT plans are cached under ``state_dir``.
    """
    if deployment.max_batch > card.batch.max:
        # TensorRT profiles are built up to the card's max; a larger batch would fail at run time there.
        raise ConfigError(
            [(f"models.{card.name}.max_batch", f"{deployment.max_batch} exceeds the card's batch.max {card.batch.max}")]
        )
    backend = deployment.backend
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if backend in ("tensorrt", "auto"):
        from edge_agent.inference.select import probe, select_backend

        selection = select_backend(card.name, backend, probe())
        logger.info("model %s: backend %s (%s)", card.name, selection.backend, selection.reason)
        backend = selection.backend
        providers = selection.providers or providers
    if backend == "tensorrt":
        if state_dir is None:
            raise EngineError(f"{card.name}: the TensorRT backend needs a state directory for its plans")
        from edge_agent.inference.tensorrt import TensorRTEngine
        from edge_agent.inference.trt_build import BuildOptions

        options = BuildOptions(precision=resolve_precision(deployment), workspace_bytes=deployment.workspace_bytes)
        return TensorRTEngine(
            card,
            state_dir=state_dir,
            max_batch=deployment.max_batch,
            options=options,
            allow_build=deployment.allow_build,
        )
    if backend == "onnxruntime":
        # Imported here so that a TensorRT-only box never needs ONNX Runtime, and vice versa.
        from edge_agent.inference.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(
            card, intra_op_threads=deployment.intra_op_threads, max_batch=deployment.max_batch, providers=providers
        )
    raise ConfigError([(f"models.{card.name}.backend", f"unknown backend {deployment.backend!r}")])


def resolve_precision(deployment: ModelDeployment) -> Precision:
    """The precision to build a TensorRT plan in: the deployment's, else fp32."""
    p = deployment.precision or "fp32"
    if p == "fp16":
        return "fp16"
    if p == "int8":
        return "int8"
    if p == "fp32":
        return "fp32"
    raise ConfigError([("models.precision", f"unknown precision {p!r}")])
