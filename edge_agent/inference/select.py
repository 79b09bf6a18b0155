"""Which backend runs a model here: what the config asks for, checked against what the box has.

``probe()`` looks (TensorRT or TensorRT for RTX importable? a CUDA device, and its compute capability? which
ONNX Runtime execution providers?); ``select_backend()`` is a pure decision over that, with the reason in words
for the log. ``auto`` prefers the full TensorRT where it is installed (it serves every NVIDIA GPU), then
TensorRT for RTX where the GPU is one of its targets (Turing to Blackwell, not Hopper or Jetson), then ONNX
Runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "tensorrt-rtx", "onnxruntime", "auto")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TRT_PROVIDER = "TensorrtExecutionProvider"


@dataclass(frozen=True, slots=True)
class Availability:
    """What this box offers. ``*_problem`` says in words why something is missing."""

    tensorrt_version: str | None
    tensorrt_problem: str | None
    gpu_name: str | None
    gpu_problem: str | None
    ort_providers: tuple[str, ...]
    rtx_version: str | None = None
    rtx_problem: str | None = "TensorRT for RTX was not looked for"
    gpu_capability: str | None = None  # "8.6"


@dataclass(frozen=True, slots=True)
class Selection:
    """The backend chosen for one model, the ONNX Runtime providers if that is it, and why."""

    backend: Literal["tensorrt", "tensorrt-rtx", "onnxruntime"]
    providers: tuple[str, ...]
    reason: str


def probe(device: int = 0) -> Availability:
    """Look at what this box has. Never raises: what is missing is described instead."""
    trt_version: str | None = None
    trt_problem: str | None = None
    try:
        from edge_agent.inference.trt_build import import_tensorrt

        trt_version = str(import_tensorrt().__version__)
    except EngineError as exc:
        trt_problem = str(exc)
    rtx_version: str | None = None
    rtx_problem: str | None = None
    try:
        from edge_agent.inference.trt_flavour import TENSORRT_RTX, import_flavour

        rtx_version = str(import_flavour(TENSORRT_RTX).__version__)
    except EngineError as exc:
        rtx_problem = str(exc)
    gpu_name: str | None = None
    gpu_problem: str | None = None
    gpu_capability: str | None = None
    try:
        from edge_agent.inference import cuda_mem

        count = cuda_mem.device_count()
        if count <= device:
            gpu_problem = f"no CUDA device {device} (the box has {count})"
        else:
            info = cuda_mem.device_info(device)
            gpu_name = f"{info.name} (sm {info.compute_capability})"
            gpu_capability = info.compute_capability
    except EngineError as exc:
        gpu_problem = str(exc)
    try:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
    except ImportError:
        providers = ()
    return Availability(trt_version, trt_problem, gpu_name, gpu_problem, providers, rtx_version, rtx_problem,
                        gpu_capability)


def ort_providers(avail: Availability) -> tuple[tuple[str, ...], str]:
    """The best ONNX Runtime providers on this box, most preferred first, and why."""
    if CPU_PROVIDER not in avail.ort_providers:
        return (), "ONNX Runtime is not installed (or has no CPU provider)"
    if avail.gpu_name is not None:
        if TRT_PROVIDER in avail.ort_providers and avail.tensorrt_version is not None:
            return (TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER), f"onnxruntime-gpu with TensorRT on {avail.gpu_name}"
        if CUDA_PROVIDER in avail.ort_providers:
            return (CUDA_PROVIDER, CPU_PROVIDER), f"onnxruntime-gpu with CUDA on {avail.gpu_name}"
    why = "no CUDA provider in this ONNX Runtime" if avail.gpu_name is not None else f"no GPU ({avail.gpu_problem})"
    return (CPU_PROVIDER,), f"ONNX Runtime on the CPU: {why}"


def select_backend(model: str, requested: str, avail: Availability) -> Selection:
    """Decide the backend for ``model``. EngineError when an explicit request cannot be met here."""
    if requested not in BACKENDS:
        raise ConfigError([(f"models.{model}.backend", f"unknown backend {requested!r}; one of {', '.join(BACKENDS)}")])
    trt_ok = avail.tensorrt_version is not None and avail.gpu_name is not None
    if requested == "tensorrt":
        if avail.tensorrt_version is None:
            raise EngineError(f"engine {model}: backend tensorrt was asked for, but {avail.tensorrt_problem}")
        if avail.gpu_name is None:
            raise EngineError(
                f"engine {model}: backend tensorrt was asked for, but there is no GPU: {avail.gpu_problem}"
            )
        return Selection("tensorrt", (), f"TensorRT {avail.tensorrt_version} on {avail.gpu_name}, as configured")
    rtx_why = _rtx_problem(avail)
    if requested == "tensorrt-rtx":
        if rtx_why is not None:
            raise EngineError(f"engine {model}: backend tensorrt-rtx was asked for, but {rtx_why}")
        return Selection("tensorrt-rtx", (),
                         f"TensorRT for RTX {avail.rtx_version} on {avail.gpu_name}, as configured")
    if requested == "auto" and trt_ok:
        return Selection("tensorrt", (), f"auto: TensorRT {avail.tensorrt_version} on {avail.gpu_name}")
    if requested == "auto" and rtx_why is None:
        return Selection("tensorrt-rtx", (), f"auto: TensorRT for RTX {avail.rtx_version} on {avail.gpu_name} "
                         f"(the full TensorRT is not installed: {avail.tensorrt_problem})")
    providers, why = ort_providers(avail)
    if not providers:
        raise EngineError(f"engine {model}: {why}")
    if requested == "auto":
        missing = avail.tensorrt_problem or avail.gpu_problem or "TensorRT unavailable"
        if avail.gpu_name is not None and rtx_why is not None:
            missing += f"; TensorRT for RTX not used: {rtx_why}"
        return Selection("onnxruntime", providers, f"auto: {why} (TensorRT not used: {missing})")
    return Selection("onnxruntime", providers, why + ", as configured")


def _rtx_problem(avail: Availability) -> str | None:
    """Why TensorRT for RTX cannot serve this box, or None when it can."""
    if avail.rtx_version is None:
        return avail.rtx_problem or "TensorRT for RTX is not installed"
    if avail.gpu_name is None:
        return f"there is no GPU: {avail.gpu_problem}"
    from edge_agent.inference.trt_flavour import RTX_TARGETS, sm_name

    if avail.gpu_capability not in RTX_TARGETS:
        cap = avail.gpu_capability or "unknown"
        return (f"the GPU {avail.gpu_name} ({sm_name(cap)}) is not one of its targets "
                f"({', '.join(sm_name(c) for c in RTX_TARGETS)}); use backend tensorrt")
    return None
