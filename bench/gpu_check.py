"""GPU check: the cuda-python memory layer and the TensorRT-less part of the TensorRT backend, for real.

Run by bench/gpu_check.sh on a GPU box. Needs cuda-python (cuda.bindings) and CuPy; uses only the
repository's own code for everything else. Steps that need TensorRT itself run when ``import
tensorrt`` works and are marked NOT RUN otherwise. Prints one table; exits 1 if any step failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.errors import EngineError  # noqa: E402
from edge_agent.inference import cuda_mem  # noqa: E402
from edge_agent.inference.card import ModelCard, load_card  # noqa: E402
from edge_agent.inference.tensorrt import Binding, Slot, plan_layout, specs_from_onnxruntime  # noqa: E402

MODELS = [m for m in ("ct-demo", "cxr-demo", "cxr-nodule") if (ROOT / "engines" / m / "model.yaml").is_file()]
Row = tuple[str, str, str]
rows: list[Row] = []


def step(name: str, fn: Callable[[], str]) -> None:
    """Run one check; record PASS with its detail, or FAIL with the error."""
    started = time.perf_counter()
    try:
        detail = fn()
        status = "PASS"
    except NotRun as exc:
        status, detail = "NOT RUN", str(exc)
    except Exception as exc:  # a check that raises is a failed check, reported with its cause
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    rows.append((name, status, f"{detail} [{time.perf_counter() - started:.2f} s]"))
    print(f"{status:8} {name}: {detail}", flush=True)


class NotRun(Exception):
    """A step that this machine cannot run (e.g. no TensorRT)."""


def cupy_module() -> Any:
    import cupy

    return cupy


def on_stream(cp: Any, stream: cuda_mem.Stream) -> Any:
    """CuPy's view of a cuda_mem stream, through the CUDA stream protocol where this CuPy has it."""
    if hasattr(cp.cuda.Stream, "from_external"):
        return cp.cuda.Stream.from_external(stream)
    return cp.cuda.ExternalStream(stream.handle)


def device_array(cp: Any, buf: cuda_mem.DeviceBuffer, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A CuPy view of a cuda_mem device buffer (no copy, CuPy does not own the memory)."""
    mem = cp.cuda.UnownedMemory(buf.ptr, buf.nbytes, owner=buf)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


def check_environment() -> str:
    rt, drv = cuda_mem.versions()
    info = cuda_mem.device_info(0)
    free, total = cuda_mem.memory_info()
    return (
        f"Python {platform.python_version()}, CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}."
        f"{drv % 1000 // 10}, {cuda_mem.device_count()} device(s); device 0: {info.name}, sm {info.compute_capability},"
        f" {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)"
    )


def check_roundtrip() -> str:
    """Pinned -> device, a CuPy op on the device buffer on the same stream, device -> pinned; values checked."""
    cp = cupy_module()
    n = 16 << 20  # 16 Mi float32 = 64 MiB
    host = cuda_mem.PinnedBuffer(n * 4)
    dev = cuda_mem.DeviceBuffer(n * 4)
    stream = cuda_mem.Stream()
    try:
        src = host.array(np.float32, (n,))
        src[...] = np.arange(n, dtype=np.float32) % 1000
        expected = src * 2.0 + 1.0
        cuda_mem.copy_h2d_async(dev, host, n * 4, stream)
        with on_stream(cp, stream):
            x = device_array(cp, dev, cp.float32, (n,))
            x *= 2.0
            x += 1.0
        src[...] = -1.0  # the D2H copy must overwrite this
        cuda_mem.copy_d2h_async(host, dev, n * 4, stream)
        stream.synchronize()
        if not np.array_equal(host.array(np.float32, (n,)), expected):
            bad = int(np.count_nonzero(host.array(np.float32, (n,)) != expected))
            raise AssertionError(f"{bad} of {n} values wrong after the round trip")
        return f"64 MiB pinned->device, CuPy x*2+1 on the same stream, device->pinned: all {n} values correct"
    finally:
        host.free()
        dev.free()
        stream.destroy()


def check_bandwidth() -> str:
    """H2D and D2H bandwidth over 256 MiB, timed with CUDA events on the stream."""
    nbytes = 256 << 20
    host, dev, stream = cuda_mem.PinnedBuffer(nbytes), cuda_mem.DeviceBuffer(nbytes), cuda_mem.Stream()
    start, end = cuda_mem.Event(), cuda_mem.Event()
    try:
        host.array(np.uint8, (nbytes,))[...] = 7
        results = {}
        for label, copy in (
            ("H2D", lambda: cuda_mem.copy_h2d_async(dev, host, nbytes, stream)),
            ("D2H", lambda: cuda_mem.copy_d2h_async(host, dev, nbytes, stream)),
        ):
            copy()  # warm
            stream.synchronize()
            best = float("inf")
            for _ in range(5):
                start.record(stream)
                copy()
                end.record(stream)
                end.synchronize()
                best = min(best, end.elapsed_ms(start))
            results[label] = nbytes / (best / 1000) / 1e9
        return f"pinned, 256 MiB, best of 5: H2D {results['H2D']:.1f} GB/s, D2H {results['D2H']:.1f} GB/s"
    finally:
        start.destroy()
        end.destroy()
        host.free()
        dev.free()
        stream.destroy()


def check_errors() -> str:
    """CUDA errors come back as EngineError naming the call (a huge allocation, a use after free)."""
    try:
        cuda_mem.DeviceBuffer(1 << 50)
    except EngineError as exc:
        oom = str(exc)
    else:
        raise AssertionError("a 1 PiB cudaMalloc did not fail")
    buf = cuda_mem.DeviceBuffer(1024)
    buf.free()
    try:
        _ = buf.ptr
    except EngineError:
        pass
    else:
        raise AssertionError("a freed buffer's pointer was handed out")
    return f"1 PiB cudaMalloc -> EngineError({oom!r}); use after free refused"


def ort_resolver(card: ModelCard) -> Callable[[str], tuple[int, ...]]:
    """Output shapes at max batch, from one ONNX Runtime run at batch 1 (what a TensorRT context reports)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(card.model_path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {card.inputs.name: np.zeros((1, *card.input_shape), np.float32)})
    shapes = {o.name: tuple(r.shape) for o, r in zip(session.get_outputs(), outs, strict=True)}
    return lambda name: (card.batch.max, *shapes[name][1:])


def standin_execute(cp: Any, layout: list[Binding]) -> Callable[[Slot, int], None]:
    """What execute_async_v3 does to the buffers, done by CuPy on the slot's stream: scores = sigmoid(mean
    of the image) and heat map = the image average-pooled to the heat map's size."""
    inp, scores, heat = layout[0], layout[1], layout[2] if len(layout) > 2 else None

    def execute(slot: Slot, n: int) -> None:
        with on_stream(cp, slot.stream):
            x = device_array(cp, slot.device[inp.name], cp.float32, inp.max_shape)[:n]
            s = device_array(cp, slot.device[scores.name], cp.float32, scores.max_shape)[:n]
            s[...] = 1.0 / (1.0 + cp.exp(-x.mean(axis=(1, 2, 3))))[:, None]
            if heat is not None:
                h, w = heat.max_shape[2:]
                hm = device_array(cp, slot.device[heat.name], cp.float32, heat.max_shape)[:n]
                ih, iw = inp.max_shape[2:]
                pooled = x.mean(axis=1).reshape(n, h, ih // h, w, iw // w).mean(axis=(2, 4))
                hm[...] = pooled[:, None, :, :]

    return execute


def standin_reference(batch: np.ndarray, layout: list[Binding]) -> dict[str, np.ndarray]:
    inp, scores = layout[0], layout[1]
    out = {scores.name: (1.0 / (1.0 + np.exp(-batch.mean(axis=(1, 2, 3)))))[:, None].astype(np.float32)}
    if len(layout) > 2:
        heat = layout[2]
        _, labels, h, w = heat.max_shape
        _, ih, iw = inp.max_shape[1:]
        n = len(batch)
        pooled = batch.mean(axis=1).reshape(n, h, ih // h, w, iw // w).mean(axis=(2, 4))
        out[heat.name] = np.repeat(pooled[:, None], labels, axis=1).astype(np.float32)
    return out


def check_layout(model: str) -> str:
    card = load_card(ROOT / "engines" / model)
    layout = plan_layout(card, specs_from_onnxruntime(card.model_path), card.batch.max, ort_resolver(card))
    parts = [f"{b.name}{list(b.max_shape)} {b.nbytes} B" for b in layout]
    return f"profile {card.batch.min}/{card.batch.opt}/{card.batch.max}: " + ", ".join(parts)


def check_slots(model: str, n_slots: int) -> str:
    """Slots sized for the profile's max batch, run concurrently from threads, each result checked."""
    cp = cupy_module()
    card = load_card(ROOT / "engines" / model)
    layout = plan_layout(card, specs_from_onnxruntime(card.model_path), card.batch.max, ort_resolver(card))
    execute = standin_execute(cp, layout)
    slots = [Slot(layout) for _ in range(n_slots)]
    rng = np.random.default_rng(0)
    try:
        batches = [rng.normal(size=(int(rng.integers(1, card.batch.max + 1)), *card.input_shape)).astype(np.float32)
                   for _ in range(4 * n_slots)]

        def work(i: int) -> float:
            slot = slots[i % n_slots]
            got = slot.run(batches[i], execute)
            want = standin_reference(batches[i], layout)
            return max(float(np.abs(got[k] - want[k]).max()) for k in want)

        # One batch per slot at a time: that is what the engine's slot queue guarantees.
        worst = 0.0
        with concurrent.futures.ThreadPoolExecutor(n_slots) as pool:
            for start in range(0, len(batches), n_slots):
                worst = max(worst, *pool.map(work, range(start, min(start + n_slots, len(batches)))))
        if worst > 1e-4:
            raise AssertionError(f"max abs diff {worst:.2e} between the GPU stand-in and numpy")
        try:
            slots[0].run(np.zeros((card.batch.max + 1, *card.input_shape), np.float32), execute)
        except EngineError:
            pass
        else:
            raise AssertionError("a batch above the profile's max was accepted")
        # Latency of one max batch through copies + stand-in kernel.
        big = batches[0][:1].repeat(card.batch.max, axis=0)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            slots[0].run(big, execute)
            times.append(time.perf_counter() - t)
        return (
            f"{n_slots} slots x {sum(s.device_bytes for s in slots[:1]) >> 10} KiB device + pinned; {len(batches)} "
            f"batches from {n_slots} threads, max abs diff {worst:.1e}; oversize batch refused; batch {card.batch.max}"
            f" round trip median {np.median(times) * 1000:.2f} ms"
        )
    finally:
        for s in slots:
            s.free()


def check_gpu_metrics() -> str:
    """NVML gauges on a real registry, read at scrape time."""
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_agent.gpu_metrics import GpuMetrics

    registry = CollectorRegistry(auto_describe=True)
    gpu = GpuMetrics(registry)
    if gpu.nvml_problem is not None:
        raise NotRun(gpu.nvml_problem)
    values = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("edge_agent_gpu_"):
            name, value = line.split(" ", 1)
            values[name] = float(value)
    if values.get("edge_agent_gpu_memory_total_bytes", 0) <= 0:
        raise AssertionError(f"no GPU memory total in the scrape: {values}")
    return ", ".join(f"{k.removeprefix('edge_agent_gpu_')}={v:.3g}" for k, v in sorted(values.items()))


def check_tensorrt(model: str, precision: str) -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise NotRun("no TensorRT on this machine") from None
    from edge_agent.inference.tensorrt import TensorRTEngine
    from edge_agent.inference.trt_build import BuildOptions
    from edge_agent.inference.verify import DEFAULT_TOLERANCE, synthetic_inputs, verify_engine

    card = load_card(ROOT / "engines" / model)
    with tempfile.TemporaryDirectory() as state:
        engine = TensorRTEngine(
            card, state_dir=Path(state), options=BuildOptions(precision=precision), allow_build=True  # type: ignore[arg-type]
        )
        engine.load()
        try:
            engine.warm_up()
            report = verify_engine(
                card, engine, synthetic_inputs(card, 32), tolerance=DEFAULT_TOLERANCE[precision], batch=card.batch.max
            )
        finally:
            engine.close()
    if not report.passed:
        raise AssertionError(report.summary())
    return report.summary()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    step("environment: cuda-python, driver, device", check_environment)
    step("cuda_mem: pinned/device round trip + CuPy op on the stream", check_roundtrip)
    step("cuda_mem: H2D/D2H bandwidth (events)", check_bandwidth)
    step("cuda_mem: CUDA errors -> EngineError", check_errors)
    step("gpu_metrics: NVML gauges in a scrape", check_gpu_metrics)
    for model in MODELS:
        step(f"tensorrt.plan_layout {model} (specs from ONNX)", lambda m=model: check_layout(m))  # type: ignore[misc]
    for model in MODELS[:1] + [m for m in MODELS if m == "cxr-nodule"]:
        step(f"tensorrt.Slot {model}: 4 slots, threads, stand-in kernel", lambda m=model: check_slots(m, 4))  # type: ignore[misc]
    for model, precision in [(MODELS[0], "fp32"), (MODELS[0], "fp16"), *((m, "fp16") for m in MODELS[1:])]:
        step(f"TensorRT build + load + verify {model} {precision}", lambda m=model, pr=precision: check_tensorrt(m, pr))  # type: ignore[misc]
    if not any(n.startswith("TensorRT") and s == "PASS" for n, s, _ in rows):
        for name in ("build-engine CLI, plan cache on a real GPU", "INT8 calibration (TensorRT 10)"):
            rows.append((name, "NOT RUN", "no TensorRT on this machine"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'step':{width}}  {'result':8} detail", f"{'-' * width}  {'-' * 8} {'-' * 40}"]
    lines += [f"{n:{width}}  {s:8} {d}" for n, s, d in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 1 if any(s == "FAIL" for _, s, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
