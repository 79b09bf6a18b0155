"""GPU check for the tensorrt-rtx backend: TensorRT for RTX on this GPU, for real. Run by bench/gpu_check.sh.

Where the GPU is one of TensorRT for RTX's targets (sm75, sm80, sm86, sm89, sm120, sm121), each bundled model is
built for it, fp32 and fp16, and loaded through the daemon's own engine (edge_agent/inference/tensorrt.py); then,
per model and precision: the build and first-load time (kernels are compiled on the GPU at first use), latency per
batch size and images/s, GPU memory, and agreement with ONNX Runtime on the CPU (largest score and heat-map
difference on synthetic inputs and on real DICOM through the daemon's preprocessing, and findings that changed
side of the threshold). Where it is not a target (Hopper, sm90), it says what TensorRT for RTX does there: the
build for this GPU, and loading a plan built ahead of time for another target.

Prints everything it measures; exits 1 if a step failed. Needs tensorrt_rtx_bindings (the tensorrt-rtx extra),
cuda.bindings and onnxruntime.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.errors import EngineError  # noqa: E402
from edge_agent.inference import cuda_mem  # noqa: E402
from edge_agent.inference.card import load_card  # noqa: E402
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from edge_agent.inference.plan_cache import PlanCache  # noqa: E402
from edge_agent.inference.tensorrt import TensorRTEngine  # noqa: E402
from edge_agent.inference.trt_build import BuildOptions, build_and_cache  # noqa: E402
from edge_agent.inference.trt_flavour import RTX_TARGETS, TENSORRT_RTX, import_flavour  # noqa: E402
from edge_agent.inference.verify import compare, dicom_files, dicom_inputs, synthetic_inputs  # noqa: E402

MODELS = ("ct-demo", "cxr-nodule")
BATCHES = (1, 8, 16)
lines: list[str] = []
failed = False


def say(text: str) -> None:
    print(text, flush=True)
    lines.append(text)


def real_dicom(model: str) -> list[Path]:
    """Real files the model's route takes: CT slices for ct-demo, chest radiographs for cxr-nodule."""
    import pydicom.data

    base = Path(pydicom.data.__file__).parent
    if model == "ct-demo":
        return [p for p in (base / "test_files" / n for n in ("CT_small.dcm", "693_J2KI.dcm", "693_UNCI.dcm"))
                if p.is_file()]
    store = base.parent.parent / "data_store" / "data"
    return sorted(store.glob("RG*_UNCR.dcm")) or dicom_files(store)[:4]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def run_model(model: str, precision: str, state: Path) -> None:
    card = load_card(ROOT / "engines" / model)
    options = BuildOptions(precision, flavour=TENSORRT_RTX)  # type: ignore[arg-type]
    started = time.perf_counter()
    engine = TensorRTEngine(card, state_dir=state, allow_build=True, options=options, slots=1)
    engine.load()
    loaded = time.perf_counter() - started
    first = time.perf_counter()
    engine.warm_up()
    warm = time.perf_counter() - first
    say(f"  {model} {precision}: built and loaded in {loaded:.2f} s (plan built: {engine.built}), "
        f"warm-up (first runs, kernels compiled) {warm:.2f} s, GPU memory {engine.gpu_memory_bytes / 2**20:.0f} MiB")
    say("  | batch | median ms | p90 ms | images/s |")
    say("  |---:|---:|---:|---:|")
    for n in BATCHES:
        batch = synthetic_inputs(card, n)
        times = []
        for _ in range(60):
            t = time.perf_counter()
            engine.infer(batch)
            times.append(time.perf_counter() - t)
        times.sort()
        med = statistics.median(times)
        say(f"  | {n} | {ms(med)} | {ms(times[int(len(times) * 0.9)])} | {n / med:.0f} |")
    ort = OnnxRuntimeEngine(card, intra_op_threads=4, max_batch=card.batch.max)
    ort.load()
    for label, inputs in (("synthetic", synthetic_inputs(card, 32)),
                          ("real DICOM", dicom_inputs(card, real_dicom(model), 32))):
        if len(inputs) == 0:
            say(f"  agreement on {label}: no inputs")
            continue
        report = compare(card, engine, ort, inputs, 1e-2 if precision == "fp16" else 1e-4, min(8, card.batch.max))
        say(f"  agreement with ONNX Runtime on the CPU, {len(inputs)} {label} inputs: {report.summary()}")
    ort.close()
    engine.close()


def not_a_target(capability: str, state: Path) -> None:
    """What TensorRT for RTX says on a GPU it does not list (Hopper)."""
    trt = import_flavour(TENSORRT_RTX)
    card = load_card(ROOT / "engines" / "ct-demo")
    try:
        build_and_cache(card, PlanCache(state), BuildOptions("fp32", flavour=TENSORRT_RTX), trt)
        say(f"  build for this GPU (sm {capability}): built (unexpected: not a listed target)")
    except EngineError as exc:
        say(f"  build for this GPU (sm {capability}): refused: {exc}")
    # A plan built ahead of time for sm89, loaded here anyway (bypassing the daemon's own refusal).
    _, meta = build_and_cache(card, PlanCache(state), BuildOptions("fp32", flavour=TENSORRT_RTX, capability="8.9"),
                              trt)
    plan = PlanCache(state).plan_path(card.name, meta.key).read_bytes()
    from edge_agent.inference.trt_build import make_logger

    runtime = trt.Runtime(make_logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    say(f"  an sm89 plan deserialised on sm {capability}: {'an engine' if engine is not None else 'None'}")
    if engine is not None:
        context = engine.create_execution_context()
        say(f"  and an execution context: {'created' if context is not None else 'None'}")


def main() -> int:
    global failed
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, help="also write the output here")
    args = ap.parse_args()
    try:
        trt = import_flavour(TENSORRT_RTX)
        info = cuda_mem.device_info(0)
    except EngineError as exc:
        say(f"TensorRT for RTX GPU check: NOT RUN: {exc}")
        return 0
    say(f"TensorRT for RTX {trt.__version__} on {info.name} (sm {info.compute_capability})")
    with tempfile.TemporaryDirectory(prefix="rtx-gpu-") as tmp:
        state = Path(tmp)
        if info.compute_capability not in RTX_TARGETS:
            say(f"sm {info.compute_capability} is not one of TensorRT for RTX's targets; what it does here:")
            try:
                not_a_target(info.compute_capability, state)
            except Exception:
                say(traceback.format_exc())
                failed = True
        else:
            for model in MODELS:
                for precision in ("fp32", "fp16"):
                    try:
                        run_model(model, precision, state / f"{model}-{precision}")
                    except Exception:
                        say(f"  {model} {precision}: FAILED\n{traceback.format_exc()}")
                        failed = True
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
