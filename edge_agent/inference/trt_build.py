"""ONNX -> serialized TensorRT plan: optimisation profile, workspace limit, timing cache, precision.

TensorRT 10 and 11 differ in how precision is asked for. TensorRT 11 networks are always strongly
typed (the tensors' own types decide, and the FP16/INT8 builder flags are gone), so FP16 there means
a half-precision ONNX graph (``half_precision_onnx``) and INT8 means a graph that is already
quantized (Q/DQ nodes). TensorRT 10 builds the float32 graph with the FP16 / INT8 builder flags, INT8
with an entropy calibrator fed from the deployment's calibration images.

Objects that come from TensorRT are held in names starting with ``trt_`` so that
tests/test_tensorrt_api.py can find every TensorRT name this module uses and check it against the
real 11.4 binding; ``TRT10_ONLY`` lists the names only TensorRT 10 has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.errors import EngineError
from edge_agent.inference import cuda_mem
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import FloatArray
from edge_agent.inference.plan_cache import BatchProfile, Box, PlanCache, PlanKey, PlanMeta, PlanUnavailable, Precision
from edge_agent.inference.trt_flavour import (
    TENSORRT,
    TENSORRT_RTX,
    Flavour,
    import_flavour,
    plan_problems,
    rtx_target,
    rtx_target_name,
    sm_name,
    strongly_typed,
    trt_major,
)

logger = logging.getLogger(__name__)

# Names used on TensorRT 10 code paths only: TensorRT 11 removed them (implicit quantization and
# weakly typed precision flags). The API test checks these are absent from 11.4, and used here.
TRT10_ONLY = frozenset(
    {
        "FP16",
        "INT8",
        "IInt8EntropyCalibrator2",
        "int8_calibrator",
        "set_calibration_profile",
        "get_batch_size",
        "get_batch",
        "read_calibration_cache",
        "write_calibration_cache",
    }
)

DEFAULT_WORKSPACE_BYTES = 2 << 30
_PROGRESS_LOG_INTERVAL_SECONDS = 5.0

def import_tensorrt() -> ModuleType:
    """The full TensorRT's ``tensorrt`` module; EngineError with the reason when it is not installed."""
    return import_flavour(TENSORRT)


def this_box(trt: ModuleType, device: int = 0) -> Box:
    """The GPU and TensorRT version a plan built or loaded here is tied to."""
    info = cuda_mem.device_info(device)
    return Box(info.name, info.compute_capability, str(trt.__version__))


@dataclass(frozen=True)
class BuildOptions:
    """What ``build-engine`` needs beyond the card."""

    precision: Precision = "fp32"
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    # INT8 on TensorRT 10: preprocessed images [C, H, W] the calibrator feeds through the network.
    calibration_images: Sequence[FloatArray] = field(default_factory=tuple)
    device: int = 0
    flavour: Flavour = TENSORRT
    # TensorRT-RTX, ahead of time: the compute capability ("8.6") to build for, with or without a GPU here.
    # None: this machine's GPU.
    capability: str | None = None

    def target_box(self, trt: ModuleType) -> Box:
        """What the plan will be tied to: a named capability (TensorRT-RTX ahead of time: no CUDA call), else
        this machine's GPU."""
        if self.flavour == TENSORRT_RTX and self.capability is not None:
            return Box("", self.capability, str(trt.__version__))
        return this_box(trt, self.device)


# -- TensorRT callbacks ------------------------------------------------------------------------------

_SEVERITY_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is chatty build detail; our INFO is for operators
    "VERBOSE": logging.DEBUG,
}


def make_logger(trt: ModuleType) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to Python logging."""

    class _TrtLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = _SEVERITY_LEVELS.get(getattr(severity, "name", str(severity)), logging.INFO)
            logging.getLogger("tensorrt").log(level, "%s", msg)

    return _TrtLogger()


def make_progress_monitor(trt: ModuleType, model: str) -> Any | None:
    """A ``trt.IProgressMonitor`` that logs build phases (None where this TensorRT has none)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Progress(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
        # TensorRT calls these from several of its own threads.
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}
            self._last_log = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            if parent_phase is None:
                logger.info("engine %s: build phase %s (%d steps)", model, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            with self._lock:
                total = self._steps.get(phase_name, 0)
                due = now - self._last_log >= _PROGRESS_LOG_INTERVAL_SECONDS
                if due:
                    self._last_log = now
            if due:
                logger.info("engine %s: %s step %d/%d", model, phase_name, step + 1, total)
            return True  # never cancel: a half-built plan is worth nothing

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return _Progress()


def make_int8_calibrator(trt: ModuleType, input_name: str, images: Sequence[FloatArray], batch_size: int) -> Any:
    """TensorRT 10's entropy calibrator over ``images``, batch by batch through one device buffer."""
    if not images:
        raise EngineError("INT8 needs calibration images (models.<name>.calibration_dir), none were given")
    stacked = np.ascontiguousarray(np.stack(images).astype(np.float32))
    batch_size = max(1, min(batch_size, len(stacked)))

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._host = cuda_mem.PinnedBuffer(stacked[:batch_size].nbytes)
            self._device = cuda_mem.DeviceBuffer(stacked[:batch_size].nbytes)
            self._stream = cuda_mem.Stream()

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next + batch_size > len(stacked):
                return None  # a partial last batch would not match the calibration profile's shape
            chunk = stacked[self._next : self._next + batch_size]
            self._next += batch_size
            self._host.array(np.float32, chunk.shape)[...] = chunk
            cuda_mem.copy_h2d_async(self._device, self._host, chunk.nbytes, self._stream)
            self._stream.synchronize()
            return [self._device.ptr if n == input_name else 0 for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return None  # calibrate afresh: the plan cache already keeps the result

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

        def _release(self) -> None:
            self._host.free()
            self._device.free()
            self._stream.destroy()

    return _Calibrator()


# -- precision on TensorRT 11: half-precision ONNX -----------------------------------------------------

# Inputs that ONNX types independently of the data (Resize's roi and scales are float32 whatever T is).
_KEEP_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def half_precision_onnx(data: bytes) -> bytes:
    """The model with float32 weights and activations as float16, its inputs and outputs still float32.

    Casts at the edges keep the engine's interface (and so the batcher, pinned buffers and the
    verify step) the same for every precision; TensorRT 11's strongly typed network then runs the
    body in FP16.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    keep = {
        node.input[i]
        for node in graph.node
        for i in range(len(node.input))
        if (node.op_type, i) in _KEEP_FLOAT32_INPUTS and node.input[i]
    }

    def half(t: Any) -> Any:
        arr = numpy_helper.to_array(t)
        if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
            raise EngineError(f"weight {t.name!r} overflows float16; build this model in fp32")
        return numpy_helper.from_array(arr.astype(np.float16), t.name)

    for i, init in enumerate(graph.initializer):
        if init.data_type == f32 and init.name not in keep:
            graph.initializer[i].CopyFrom(half(init))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
            elif (
                attr.type == onnx.AttributeProto.TENSOR
                and attr.t.data_type == f32
                and not (node.op_type == "Constant" and node.output[0] in keep)
            ):
                attr.t.CopyFrom(half(attr.t))
    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == f32 and vi.name not in keep:
            vi.type.tensor_type.elem_type = f16
    # The graph's float32 inputs and outputs keep their names and types; casts sit between them and the body.
    renames: dict[str, str] = {}
    head: list[Any] = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == f32:
            renames[inp.name] = f"{inp.name}__fp16"
            head.append(helper.make_node("Cast", [inp.name], [renames[inp.name]], to=f16, name=f"{inp.name}__to_fp16"))
    tail: list[Any] = []
    out_renames: dict[str, str] = {}
    for out in graph.output:
        if out.type.tensor_type.elem_type == f32:
            out_renames[out.name] = f"{out.name}__fp16"
            tail.append(
                helper.make_node("Cast", [out_renames[out.name]], [out.name], to=f32, name=f"{out.name}__to_fp32")
            )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
            elif name in out_renames:
                node.input[i] = out_renames[name]
        for i, name in enumerate(node.output):
            if name in out_renames:
                node.output[i] = out_renames[name]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + body + tail)
    return bytes(model.SerializeToString())


def _is_quantized(data: bytes) -> bool:
    import onnx

    return any(n.op_type in {"QuantizeLinear", "DequantizeLinear"} for n in onnx.load_from_string(data).graph.node)


# -- the build ---------------------------------------------------------------------------------------


def build_plan(
    card: ModelCard,
    options: BuildOptions,
    trt: ModuleType | None = None,
    attach_timing_cache: Callable[[Any], None] | None = None,
) -> bytes:
    """Build a serialized plan for ``card``; EngineError naming the step that failed.

    Full TensorRT builds for the GPU it runs on. TensorRT-RTX builds for ``options.capability`` (on any machine,
    with or without a GPU), else for this machine's GPU.
    """
    flavour = options.flavour
    trt = trt if trt is not None else import_flavour(flavour)
    model = card.name
    try:
        onnx_bytes = card.model_path.read_bytes()
    except OSError as exc:
        raise EngineError(f"engine {model}: cannot read {card.model_path}: {exc.strerror}") from None
    precision = options.precision
    typed = strongly_typed(flavour, trt)
    if typed and precision == "fp16":
        onnx_bytes = half_precision_onnx(onnx_bytes)
    elif typed and precision == "int8" and not _is_quantized(onnx_bytes):
        raise EngineError(
            f"engine {model}: INT8 on TensorRT {trt.__version__} needs a quantized ONNX model (Q/DQ nodes); "
            "TensorRT 11 and TensorRT for RTX do not calibrate float models. Export a Q/DQ model, or build fp16/fp32"
        )

    trt_logger = make_logger(trt)
    trt_builder = trt.Builder(trt_logger)
    # TensorRT-RTX networks are always strongly typed (its flag is deprecated and ignored).
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed and flavour == TENSORRT else 0
    trt_network = trt_builder.create_network(flags)
    trt_parser = trt.OnnxParser(trt_network, trt_logger)
    if not trt_parser.parse(onnx_bytes):
        errors = [str(trt_parser.get_error(i).desc()) for i in range(trt_parser.num_errors)]
        raise EngineError(
            f"engine {model}: TensorRT cannot parse the ONNX model: " + "; ".join(errors or ["no detail"])
        )

    trt_config = trt_builder.create_builder_config()
    trt_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if attach_timing_cache is not None:
        attach_timing_cache(trt_config)
    trt_profile = trt_builder.create_optimization_profile()
    c, h, w = card.input_shape
    b = card.batch
    trt_profile.set_shape(card.inputs.name, (b.min, c, h, w), (b.opt, c, h, w), (b.max, c, h, w))
    trt_config.add_optimization_profile(trt_profile)
    if flavour == TENSORRT_RTX:
        capability = options.capability or this_box(trt, options.device).compute_capability
        trt_config.num_compute_capabilities = 1
        if not trt_config.set_compute_capability(rtx_target(trt, capability), 0):
            raise EngineError(f"engine {model}: TensorRT for RTX refused the target {sm_name(capability)}")
    monitor = make_progress_monitor(trt, model)
    if monitor is not None:
        trt_config.progress_monitor = monitor
    calibrator = None
    if not typed and precision == "fp16":
        trt_config.set_flag(trt.BuilderFlag.FP16)
    elif not typed and precision == "int8":
        trt_config.set_flag(trt.BuilderFlag.INT8)
        trt_config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot run fall back to FP16, not FP32
        calibrator = make_int8_calibrator(trt, card.inputs.name, options.calibration_images, b.opt)
        trt_config.int8_calibrator = calibrator
        trt_config.set_calibration_profile(trt_profile)
    try:
        trt_plan = trt_builder.build_serialized_network(trt_network, trt_config)
    finally:
        if calibrator is not None:
            calibrator._release()
    if trt_plan is None:
        raise EngineError(f"engine {model}: TensorRT could not build the plan (see the tensorrt log lines above)")
    # The monitor must outlive every TensorRT object that uses it (the binding's own documentation).
    del trt_config, monitor
    return bytes(trt_plan)


def build_and_cache(
    card: ModelCard,
    cache: PlanCache,
    options: BuildOptions,
    trt: ModuleType | None = None,
    on_built: Callable[[PlanMeta], None] | None = None,
) -> tuple[bytes, PlanMeta]:
    """Build a plan (full TensorRT: with the box's persistent timing cache), store it, and return it with its
    metadata."""
    trt = trt if trt is not None else import_flavour(options.flavour)
    box = options.target_box(trt)
    key = PlanKey.for_box(card.sha256, box, options.precision, options.flavour)
    profile = BatchProfile(card.batch.min, card.batch.opt, card.batch.max)
    logger.info(
        "engine %s: building a plan for %s (batch %d/%d/%d, workspace %d MiB)%s",
        card.name,
        key.describe(),
        profile.min,
        profile.opt,
        profile.max,
        options.workspace_bytes >> 20,
        "; this takes minutes" if options.flavour == TENSORRT else "",
    )
    started = time.perf_counter()
    if options.flavour == TENSORRT:
        with _TimingCache(cache, box) as attach:
            plan = build_plan(card, options, trt, attach)
    else:
        # TensorRT-RTX times nothing at build time (its kernels are compiled on the GPU): no timing cache.
        plan = build_plan(card, options, trt)
    seconds = time.perf_counter() - started
    meta = cache.store(
        card.name,
        card.version,
        key,
        profile,
        plan,
        workspace_bytes=options.workspace_bytes,
        build_seconds=seconds,
        extra={"tensorrt_major": trt_major(trt)},
    )
    logger.info("engine %s: plan built in %.1f s (%.1f MiB)", card.name, seconds, len(plan) / 2**20)
    if on_built is not None:
        on_built(meta)
    return plan, meta


class _TimingCache:
    """Loads the box's timing cache into the builder config, and saves what the build learned."""

    def __init__(self, cache: PlanCache, box: Box) -> None:
        self.cache, self.box = cache, box
        self.trt_timing: Any = None

    def attach(self, trt_config: Any) -> None:
        data = self.cache.read_timing_cache(self.box)
        self.trt_timing = trt_config.create_timing_cache(data)
        # ignore_mismatch=False: a cache from another device is discarded, never trusted.
        if not trt_config.set_timing_cache(self.trt_timing, False):
            logger.warning("timing cache rejected by TensorRT; building without it")
            self.trt_timing = None

    def __enter__(self) -> Callable[[Any], None]:
        return self.attach

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.trt_timing is not None:
            self.cache.write_timing_cache(self.box, bytes(self.trt_timing.serialize()))


def ensure_plan(
    card: ModelCard,
    cache: PlanCache,
    options: BuildOptions,
    *,
    allow_build: bool,
    trt: ModuleType | None = None,
    box: Box | None = None,
) -> tuple[bytes, PlanMeta, bool]:
    """A plan for this box: the cached one if it matches, else a new build if allowed.

    Returns (plan, metadata, built). PlanUnavailable when none matches and building is disabled,
    naming what the cache does hold (a plan for another GPU, flavour or version is named, never loaded) and
    the command that builds the right one. ``box`` defaults to this machine's GPU and TensorRT. A TensorRT-RTX
    plan's own header is read too (trt_flavour.py): one that is not for this capability and version is refused
    here, before any CUDA call.
    """
    flavour = options.flavour
    if box is None:
        trt = trt if trt is not None else import_flavour(flavour)
        box = this_box(trt, options.device)
    key = PlanKey.for_box(card.sha256, box, options.precision, flavour)
    profile = BatchProfile(card.batch.min, card.batch.opt, card.batch.max)
    if flavour == TENSORRT_RTX:
        rtx_target_check(card.name, box.compute_capability)
    found = cache.load(card.name, key, profile)
    refused = ""
    if found is not None:
        problems = plan_problems(flavour, found[0], box.trt_version, box.compute_capability)
        if not problems:
            return found[0], found[1], False
        refused = f" (the cached plan was refused: {'; '.join(problems)})"
        logger.warning("engine %s: cached plan refused: %s", card.name, "; ".join(problems))
    if not allow_build:
        held = "; ".join(m.key.describe() for m in cache.entries(card.name))
        command = build_command(card.name, flavour, box.compute_capability, options.precision)
        raise PlanUnavailable(
            f"engine {card.name}: no usable plan for {key.describe()}{refused} and building is disabled "
            f"(models.{card.name}.allow_build); run `{command}`"
            + (f" (cached plans are for: {held})" if held else "")
        )
    plan, meta = build_and_cache(card, cache, options, trt)
    return plan, meta, True


def build_command(model: str, flavour: Flavour, capability: str, precision: Precision) -> str:
    """The command that builds the plan a box is missing."""
    if flavour == TENSORRT_RTX:
        return (f"edge-agent build-engine {model} --backend tensorrt-rtx --compute-capability {sm_name(capability)} "
                f"--precision {precision}")
    return f"edge-agent build-engine {model} --precision {precision}"


def rtx_target_check(model: str, capability: str) -> None:
    """EngineError when TensorRT-RTX cannot serve a GPU of this capability (no plan could ever be built)."""
    try:
        rtx_target_name(capability)
    except EngineError as exc:
        raise EngineError(f"engine {model}: {exc}") from None
