"""Which engine serves a model: the deployment's backend, checked against the box (select.py), then built.

The one place that imports every backend, each only when it is chosen (a TensorRT box never needs ONNX Runtime,
and a CPU box never needs TensorRT).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.config import ModelDeployment
from edge_agent.errors import ConfigError, EngineError
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import Engine
from edge_agent.inference.plan_cache import Precision

logger = logging.getLogger(__name__)


def create_engine(card: ModelCard, deployment: ModelDeployment, state_dir: Path | None = None) -> Engine:
    """The engine for ``card`` on the deployment's backend (not yet loaded).

    ``auto``, ``tensorrt`` and ``tensorrt-rtx`` look at the box first (inference/select.py) and log the choice
    with its reason; TensorRT plans (both flavours) are cached under ``state_dir``.
    """
    if deployment.max_batch > card.batch.max:
        # TensorRT profiles are built up to the card's max; a larger batch would fail at run time there.
        raise ConfigError(
            [(f"models.{card.name}.max_batch", f"{deployment.max_batch} exceeds the card's batch.max {card.batch.max}")]
        )
    backend = deployment.backend
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if backend in ("tensorrt", "tensorrt-rtx", "auto"):
        from edge_agent.inference.select import probe, select_backend

        selection = select_backend(card.name, backend, probe())
        logger.info("model %s: backend %s (%s)", card.name, selection.backend, selection.reason)
        backend = selection.backend
        providers = selection.providers or providers
    if backend in ("tensorrt", "tensorrt-rtx"):
        if state_dir is None:
            raise EngineError(f"{card.name}: the TensorRT backend needs a state directory for its plans")
        from edge_agent.inference.tensorrt import TensorRTEngine
        from edge_agent.inference.trt_build import BuildOptions

        options = BuildOptions(precision=resolve_precision(deployment), workspace_bytes=deployment.workspace_bytes,
                               flavour="tensorrt-rtx" if backend == "tensorrt-rtx" else "tensorrt")
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
