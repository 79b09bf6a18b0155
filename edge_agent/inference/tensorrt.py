"""The TensorRT engine: a cached plan, one execution context and CUDA stream per slot, pinned copies.

One engine for both flavours (trt_flavour.py): full TensorRT and TensorRT for RTX share the runtime calls
used here (Runtime, deserialize_cuda_engine, execution contexts, set_tensor_address, execute_async_v3), the
slots, the buffers and the plan cache; ``BuildOptions.flavour`` says which library loads the plan.

Everything that does not need libnvinfer is separate and usable alone: ``plan_layout`` (which tensors,
how large at the profile's max batch, checked against the card) and ``Slot`` (device and pinned
buffers, a stream, the copies around one execution). bench/gpu_check.py runs those on a GPU without
TensorRT. Objects from TensorRT are held in ``trt_``-prefixed names (tests/test_tensorrt_api.py).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.errors import EngineError
from edge_agent.inference import cuda_mem
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import EngineOutput, FloatArray, check_batch, check_output
from edge_agent.inference.plan_cache import PlanCache, PlanMeta
from edge_agent.inference.trt_build import BuildOptions, ensure_plan, make_logger
from edge_agent.inference.trt_flavour import describe, import_flavour, runtime_verdict

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor as the plan (or the ONNX model) declares it; -1 marks a dynamic axis."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Binding:
    """A tensor's buffers: its shape at the largest batch this engine runs, and the bytes that takes."""

    spec: TensorSpec
    max_shape: tuple[int, ...]
    nbytes: int

    @property
    def name(self) -> str:
        return self.spec.name

    def shape_for(self, n: int) -> tuple[int, ...]:
        return (n, *self.max_shape[1:])

    def nbytes_for(self, n: int) -> int:
        return self.nbytes // self.max_shape[0] * n


def plan_layout(
    card: ModelCard,
    specs: Sequence[TensorSpec],
    max_batch: int,
    resolve: Callable[[str], tuple[int, ...]] | None = None,
) -> list[Binding]:
    """The buffers for ``specs`` at ``max_batch``, input first; EngineError listing every mismatch with the card.

    An output whose non-batch axes are declared dynamic (shapes computed inside the graph) is sized by
    ``resolve(name)``: its real shape once the input is set to ``max_batch`` images.
    """
    by_name = {s.name: s for s in specs}
    problems: list[str] = []
    labels = len(card.labels)
    wanted: list[tuple[str, bool, tuple[int | None, ...]]] = [(card.inputs.name, True, (None, *card.input_shape))]
    wanted.append((card.outputs.scores, False, (None, labels)))
    if card.outputs.heatmap is not None:
        wanted.append((card.outputs.heatmap, False, (None, labels, None, None)))
    layout: list[Binding] = []
    for name, is_input, expected in wanted:
        spec = by_name.get(name)
        kind = "input" if is_input else "output"
        if spec is None:
            problems.append(f"no {kind} {name!r} (the plan has {sorted(by_name)})")
            continue
        if spec.is_input != is_input:
            problems.append(f"{name!r} is not an {kind}")
        if spec.dtype != np.float32:
            problems.append(f"{kind} {name!r} is {spec.dtype}, expected float32")
        if len(spec.shape) != len(expected):
            problems.append(f"{kind} {name!r} has rank {len(spec.shape)}, expected {len(expected)}")
            continue
        if spec.shape[0] not in (-1, max_batch):
            problems.append(f"{kind} {name!r} has a fixed batch of {spec.shape[0]}; the batch axis must be dynamic")
        if not is_input and resolve is not None and any(d < 0 for d in spec.shape[1:]):
            resolved = tuple(int(d) for d in resolve(name))
            if len(resolved) != len(spec.shape) or resolved[0] != max_batch:
                problems.append(f"{kind} {name!r} resolves to {list(resolved)} at batch {max_batch}")
                continue
            spec = TensorSpec(spec.name, spec.is_input, spec.dtype, (-1, *resolved[1:]))
        for axis, (have, want) in enumerate(zip(spec.shape[1:], expected[1:], strict=True), start=1):
            if have < 0:
                problems.append(f"{kind} {name!r} axis {axis} is dynamic; only the batch axis may be")
            elif want is not None and have != want:
                problems.append(f"{kind} {name!r} axis {axis} is {have}, expected {want}")
        max_shape = (max_batch, *spec.shape[1:])
        layout.append(Binding(spec, max_shape, int(np.prod(max_shape, dtype=np.int64)) * spec.dtype.itemsize))
    extra = sorted(set(by_name) - {w[0] for w in wanted})
    if any(by_name[n].is_input for n in extra):
        problems.append(f"extra inputs {[n for n in extra if by_name[n].is_input]}; one input is supported")
    if problems:
        raise EngineError(f"{card.name}: the plan does not match its card: " + "; ".join(problems))
    return layout


def specs_from_onnxruntime(path: Path) -> list[TensorSpec]:
    """The tensors an ONNX model declares, as ONNX Runtime reads them (what a plan of it exposes)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    out = []
    for args, is_input in ((session.get_inputs(), True), (session.get_outputs(), False)):
        for arg in args:
            shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            out.append(TensorSpec(arg.name, is_input, np.dtype(types.get(arg.type, np.uint8)), shape))
    return out


def specs_from_plan(trt: ModuleType, trt_engine: Any) -> list[TensorSpec]:
    """The I/O tensors of a deserialized ICudaEngine."""
    out = []
    for i in range(trt_engine.num_io_tensors):
        name = trt_engine.get_tensor_name(i)
        is_input = trt_engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(trt_engine.get_tensor_dtype(name)))
        out.append(TensorSpec(name, is_input, dtype, tuple(int(d) for d in trt_engine.get_tensor_shape(name))))
    return out


class Slot:
    """One concurrent lane: a stream, device buffers at max batch, pinned host buffers, and (with TensorRT) a context.

    ``run`` does the copies around ``execute``: the input goes pinned -> device, ``execute(slot, n)``
    queues the work on the slot's stream, the outputs come back device -> pinned, one sync at the end.
    """

    def __init__(self, layout: Sequence[Binding]) -> None:
        self.layout = list(layout)
        self.stream = cuda_mem.Stream()
        self.device: dict[str, cuda_mem.DeviceBuffer] = {}
        self.host: dict[str, cuda_mem.PinnedBuffer] = {}
        self.trt_context: Any = None
        try:
            for b in self.layout:
                self.device[b.name] = cuda_mem.DeviceBuffer(b.nbytes)
                self.host[b.name] = cuda_mem.PinnedBuffer(b.nbytes)
        except EngineError:
            self.free()
            raise

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.layout)

    def run(self, batch: FloatArray, execute: Callable[[Slot, int], None]) -> dict[str, FloatArray]:
        """Copy ``batch`` in, run ``execute``, copy the outputs for ``len(batch)`` images out (as new arrays)."""
        n = int(batch.shape[0])
        inp = self.layout[0]
        if n > inp.max_shape[0]:
            raise EngineError(f"batch of {n} exceeds the {inp.max_shape[0]} the buffers were sized for")
        self.host[inp.name].array(np.float32, inp.shape_for(n))[...] = batch
        cuda_mem.copy_h2d_async(self.device[inp.name], self.host[inp.name], inp.nbytes_for(n), self.stream)
        execute(self, n)
        for b in self.layout[1:]:
            cuda_mem.copy_d2h_async(self.host[b.name], self.device[b.name], b.nbytes_for(n), self.stream)
        self.stream.synchronize()
        # Copies: the pinned buffers are reused by the next batch while the caller still holds these.
        return {b.name: np.array(self.host[b.name].array(np.float32, b.shape_for(n))) for b in self.layout[1:]}

    def free(self) -> None:
        self.trt_context = None
        for dbuf in self.device.values():
            dbuf.free()
        for hbuf in self.host.values():
            hbuf.free()
        self.device.clear()
        self.host.clear()
        self.stream.destroy()


class TensorRTEngine:
    """A model as a TensorRT plan for this GPU, behind the same interface as OnnxRuntimeEngine."""

    def __init__(
        self,
        card: ModelCard,
        *,
        state_dir: Path,
        max_batch: int | None = None,
        options: BuildOptions | None = None,
        allow_build: bool = False,
        slots: int = 1,
    ) -> None:
        self.card = card
        self.name = card.name
        self.input_shape = card.input_shape
        self.max_batch = max_batch if max_batch is not None else card.batch.max
        self.options = options or BuildOptions()
        self.backend: str = self.options.flavour  # "tensorrt" or "tensorrt-rtx"
        self.allow_build = allow_build
        self.cache = PlanCache(state_dir)
        self.n_slots = max(1, slots)
        self.plan_meta: PlanMeta | None = None
        self.built = False
        self._slots: list[Slot] = []
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        self._trt: ModuleType | None = None
        self._trt_logger: Any = None
        self._trt_runtime: Any = None
        self._trt_engine: Any = None

    @property
    def device_bytes(self) -> int:
        """Bytes of device memory this engine holds: I/O buffers of every slot (TensorRT's own activations aside)."""
        return sum(s.device_bytes for s in self._slots)

    @property
    def gpu_memory_bytes(self) -> int:
        """An estimate of all the GPU memory this engine holds: I/O buffers, each context's activations, weights."""
        if self._trt_engine is None:
            return 0
        activations = int(self._trt_engine.device_memory_size_v2) * len(self._slots)
        weights = self.plan_meta.plan_bytes if self.plan_meta is not None else 0
        return self.device_bytes + activations + weights

    def load(self) -> None:
        """Find (or build, if allowed) the plan for this GPU, deserialize it, and set up the slots."""
        if self.max_batch > self.card.batch.max:
            raise EngineError(
                f"{self.name}: max batch {self.max_batch} exceeds the card's batch.max {self.card.batch.max}"
            )
        trt = import_flavour(self.options.flavour)
        cuda_mem.set_device(self.options.device)
        plan, meta, built = ensure_plan(self.card, self.cache, self.options, allow_build=self.allow_build, trt=trt)
        started = time.perf_counter()
        self._trt_logger = make_logger(trt)
        self._trt_runtime = trt.Runtime(self._trt_logger)
        verdict = runtime_verdict(trt, self._trt_runtime, plan)
        if verdict is not None:
            raise EngineError(f"{self.name}: {describe(self.options.flavour)} refuses the plan: {verdict}")
        trt_engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if trt_engine is None:
            raise EngineError(f"{self.name}: TensorRT could not deserialize the cached plan (see the tensorrt log)")
        self._trt, self._trt_engine = trt, trt_engine
        # A first context, shaped for the largest batch, tells the real sizes of outputs the plan declares dynamic.
        trt_first = self._trt_engine.create_execution_context()
        if trt_first is None:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        inp_shape = (self.max_batch, *self.input_shape)
        if not trt_first.set_input_shape(self.card.inputs.name, inp_shape):
            raise EngineError(f"{self.name}: the plan refuses input shape {list(inp_shape)}")
        layout = plan_layout(
            self.card,
            specs_from_plan(trt, trt_engine),
            self.max_batch,
            lambda name: tuple(int(d) for d in trt_first.get_tensor_shape(name)),
        )
        trt_shapes = trt_engine.get_tensor_profile_shape(self.card.inputs.name, 0)
        if len(trt_shapes) == 3 and int(trt_shapes[2][0]) < self.max_batch:
            raise EngineError(
                f"{self.name}: the plan's profile ends at batch {trt_shapes[2][0]}, below {self.max_batch}"
            )
        try:
            for i in range(self.n_slots):
                slot = Slot(layout)
                self._slots.append(slot)
                trt_context = trt_first if i == 0 else self._trt_engine.create_execution_context()
                slot.trt_context = self._bind(trt_context, slot)
                self._free.put(slot)
        except EngineError:
            self.close()
            raise
        self.plan_meta, self.built = meta, built
        logger.info(
            "model %s %s: %s %s plan %s loaded in %.2f s (%d slot(s), %d MiB of I/O buffers)",
            self.name,
            self.card.version,
            describe(self.options.flavour),
            meta.key.precision,
            "built" if built else "from cache",
            time.perf_counter() - started,
            self.n_slots,
            self.device_bytes >> 20,
        )

    def _bind(self, trt_context: Any, slot: Slot) -> Any:
        if trt_context is None:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        # Buffers never move, so their addresses are bound once; each call only sets the batch shape.
        for b in slot.layout:
            if not trt_context.set_tensor_address(b.name, slot.device[b.name].ptr):
                raise EngineError(f"{self.name}: TensorRT refused the address of tensor {b.name!r}")
        return trt_context

    def _execute(self, slot: Slot, n: int) -> None:
        trt_context = slot.trt_context
        inp = slot.layout[0]
        if not trt_context.set_input_shape(inp.name, inp.shape_for(n)):
            raise EngineError(f"{self.name}: TensorRT refused input shape {list(inp.shape_for(n))}")
        for b in slot.layout[1:]:
            got = tuple(int(d) for d in trt_context.get_tensor_shape(b.name))
            if got != b.shape_for(n):
                raise EngineError(
                    f"{self.name}: output {b.name!r} has shape {list(got)}, expected {list(b.shape_for(n))}"
                )
        if not trt_context.execute_async_v3(slot.stream.handle):
            raise EngineError(f"{self.name}: TensorRT execution failed (see the tensorrt log)")

    def warm_up(self) -> None:
        """One run at max batch and one at batch 1 on every slot (first runs load kernels)."""
        for _ in range(len(self._slots)):
            for n in (self.max_batch, 1):
                self.infer(np.zeros((n, *self.input_shape), dtype=np.float32))

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Run one batch [N, C, H, W] on a free slot; EngineError on any failure or malformed output."""
        if self._trt_engine is None:
            raise EngineError(f"{self.name}: engine is not loaded")
        check_batch(self.name, self.input_shape, batch)
        if batch.shape[0] > self.max_batch:
            raise EngineError(f"{self.name}: batch of {batch.shape[0]} exceeds max_batch {self.max_batch}")
        slot = self._free.get()
        try:
            out = slot.run(np.ascontiguousarray(batch), self._execute)
        finally:
            self._free.put(slot)
        scores = out[self.card.outputs.scores]
        heatmap = out.get(self.card.outputs.heatmap) if self.card.outputs.heatmap is not None else None
        return check_output(self.card, int(batch.shape[0]), EngineOutput(scores, heatmap))

    def close(self) -> None:
        for slot in self._slots:
            try:
                slot.free()
            except EngineError as exc:
                logger.warning("model %s: releasing GPU buffers failed: %s", self.name, exc)
        self._slots.clear()
        self._free = queue.SimpleQueue()
        self._trt_engine = None
        self._trt_runtime = None
