"""Backend selection, the engine options in the config, readiness without an engine, verify, GPU metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.agent import Agent
from edge_agent.config import ModelDeployment, parse_config
from edge_agent.errors import ConfigError, EngineError
from edge_agent.gpu_metrics import GpuMetrics
from edge_agent.inference.card import load_card
from edge_agent.inference.factory import create_engine, resolve_precision
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine
from edge_agent.inference.select import Availability, probe, select_backend
from edge_agent.inference.verify import compare, synthetic_inputs, verify_engine
from edge_agent.metrics import Metrics
from tests.netutil import free_port

ENGINES = Path(__file__).resolve().parent.parent / "engines"
CPU, CUDA, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU = "NVIDIA H100 80GB HBM3 (sm 9.0)"


def avail(trt: bool = False, gpu: bool = False, providers: tuple[str, ...] = (CPU,)) -> Availability:
    return Availability(
        "11.4.0.106" if trt else None,
        None if trt else "TensorRT is not installed or cannot load (No module named 'tensorrt')",
        GPU if gpu else None,
        None if gpu else "cudaGetDeviceCount: cudaErrorNoDevice: no CUDA-capable device is detected",
        providers,
    )


@pytest.mark.parametrize(
    ("requested", "box", "backend", "providers", "reason"),
    [
        ("auto", avail(trt=True, gpu=True), "tensorrt", (), f"auto: TensorRT 11.4.0.106 on {GPU}"),
        ("auto", avail(trt=True), "onnxruntime", (CPU,), "TensorRT not used: cudaGetDeviceCount: cudaErrorNoDevice"),
        ("auto", avail(gpu=True, providers=(CUDA, CPU)), "onnxruntime", (CUDA, CPU), "onnxruntime-gpu with CUDA"),
        ("auto", avail(), "onnxruntime", (CPU,), "ONNX Runtime on the CPU: no GPU"),
        ("onnxruntime", avail(trt=True, gpu=True, providers=(TRT_EP, CUDA, CPU)), "onnxruntime", (TRT_EP, CUDA, CPU),
         "onnxruntime-gpu with TensorRT"),
        ("onnxruntime", avail(gpu=True, providers=(TRT_EP, CUDA, CPU)), "onnxruntime", (CUDA, CPU), "with CUDA"),
        ("onnxruntime", avail(gpu=True), "onnxruntime", (CPU,), "no CUDA provider in this ONNX Runtime"),
        ("tensorrt", avail(trt=True, gpu=True), "tensorrt", (), "as configured"),
    ],
)
def test_selection(
    requested: str, box: Availability, backend: str, providers: tuple[str, ...], reason: str
) -> None:
    chosen = select_backend("ct-demo", requested, box)
    assert (chosen.backend, chosen.providers) == (backend, providers)
    assert reason in chosen.reason


@pytest.mark.parametrize(
    ("box", "message"),
    [
        (avail(gpu=True), "engine ct-demo: backend tensorrt was asked for, but TensorRT is not installed"),
        (avail(trt=True), "engine ct-demo: backend tensorrt was asked for, but there is no GPU: cudaGetDeviceCount"),
    ],
)
def test_tensorrt_asked_for_but_missing(box: Availability, message: str) -> None:
    with pytest.raises(EngineError, match="^" + message):
        select_backend("ct-demo", "tensorrt", box)


def test_no_onnxruntime_at_all() -> None:
    with pytest.raises(EngineError, match="ONNX Runtime is not installed"):
        select_backend("ct-demo", "auto", avail(providers=()))


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"models.ct-demo.backend: unknown backend 'tvm'"):
        select_backend("ct-demo", "tvm", avail())


def test_probe_describes_this_box() -> None:
    found = probe()
    assert CPU in found.ort_providers
    if found.tensorrt_version is None:
        assert found.tensorrt_problem and "TensorRT" in found.tensorrt_problem
    if found.gpu_name is None:
        assert found.gpu_problem


def test_auto_falls_back_to_onnxruntime_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    box = probe()
    if box.tensorrt_version is not None and box.gpu_name is not None:
        pytest.skip("this box has TensorRT and a GPU")
    engine = create_engine(load_card(ENGINES / "ct-demo"), ModelDeployment(backend="auto"), Path("/nonexistent"))
    assert isinstance(engine, OnnxRuntimeEngine)
    assert "model ct-demo: backend onnxruntime (auto: ONNX Runtime on the CPU" in caplog.text


def test_engine_options_in_config(tmp_path: Path) -> None:
    d = ModelDeployment.model_validate(
        {"backend": "tensorrt", "precision": "fp16", "allow_build": True, "workspace_bytes": 1 << 30,
         "calibration_dir": str(tmp_path), "verify_at_start": True, "verify_max_abs_diff": 0.05}
    )
    assert d.calibration_dir == tmp_path and resolve_precision(d) == "fp16"
    assert resolve_precision(ModelDeployment()) == "fp32"
    assert not ModelDeployment().allow_build  # a build takes minutes: never by surprise at start-up


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"backend": "tvm"}, "unknown backend 'tvm'; one of: onnxruntime, tensorrt, tensorrt-rtx, auto"),
        ({"precision": "fp8"}, "unknown precision 'fp8'; one of: fp32, fp16, int8"),
        ({"calibration_dir": "/nonexistent/calibration"}, "/nonexistent/calibration: no such folder"),
        ({"workspace_bytes": 1024}, "greater than or equal to 16777216"),
        ({"verify_max_abs_diff": 0}, "greater than 0"),
    ],
)
def test_engine_option_errors_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"site": "s", "state_dir": "/s", "models": {"ct-demo": raw}}, env={})
    assert any(path.startswith("models.ct-demo.") and message in msg for path, msg in err.value.problems)


def test_daemon_without_an_engine_stays_up_not_ready_and_says_why(tmp_path: Path) -> None:
    """backend tensorrt on a box without TensorRT: /readyz says why; the DICOM port stays closed."""
    if probe().tensorrt_version is not None:
        pytest.skip("this box has TensorRT")
    reason = "engine ct-demo: backend tensorrt was asked for, but TensorRT is not installed or cannot load"
    asyncio.run(_not_ready_scenario(tmp_path, "tensorrt", reason))


def test_tensorrt_rtx_without_a_gpu_stays_up_not_ready_and_says_why(tmp_path: Path) -> None:
    """backend tensorrt-rtx where the library is installed (the test extra) but there is no GPU."""
    box = probe()
    if box.rtx_version is None or box.gpu_name is not None:
        pytest.skip("needs TensorRT for RTX installed and no GPU")
    asyncio.run(_not_ready_scenario(
        tmp_path, "tensorrt-rtx", "engine ct-demo: backend tensorrt-rtx was asked for, but there is no GPU"))


async def _not_ready_scenario(tmp_path: Path, backend: str, reason: str) -> None:
    config = parse_config(
        {
            "site": "test",
            "state_dir": str(tmp_path / "state"),
            "model_repository": str(ENGINES),
            "dicom": {"host": "127.0.0.1", "port": free_port()},
            "http": {"host": "127.0.0.1", "port": 0},
            "pipeline": {"preprocess_pool": "thread", "preprocess_workers": 1},
            "models": {"ct-demo": {"backend": backend}},
            "routes": [{"name": "ct", "model": "ct-demo"}],
        },
        env={},
    )
    metrics = Metrics()
    agent = Agent(config, metrics)
    await agent.startup()
    try:
        ready, body = agent.readiness()
        assert not ready
        assert any(r.startswith(reason) for r in body["reasons"])
        assert agent.receiver is None and agent.pipeline is None
        assert agent.http is not None
        url = f"http://127.0.0.1:{agent.http.port}/readyz"

        def fetch() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, served = await asyncio.to_thread(fetch)
        assert status == 503 and any(r.startswith(reason) for r in served["reasons"])
        assert b'edge_agent_engine_up{model="ct-demo"} 0.0' in generate_latest(metrics.registry)
    finally:
        await agent.shutdown()


def test_verify_same_model_passes() -> None:
    card = load_card(ENGINES / "ct-demo")
    candidate = OnnxRuntimeEngine(card, max_batch=4)
    candidate.load()
    try:
        report = verify_engine(card, candidate, synthetic_inputs(card, 10), tolerance=1e-3, batch=4)
    finally:
        candidate.close()
    assert report.passed and report.images == 10 and report.compared == 10
    assert report.max_abs_diff_scores == 0.0 and report.agreement == 1.0
    assert "-> PASS" in report.summary()


def test_verify_catches_a_different_model() -> None:
    """cxr-demo's weights in place of ct-demo's: same shapes, different scores; verify must fail."""
    card = load_card(ENGINES / "ct-demo")
    other = load_card(ENGINES / "cxr-demo")
    candidate, reference = OnnxRuntimeEngine(other, max_batch=4), OnnxRuntimeEngine(card, max_batch=4)
    candidate.load()
    reference.load()
    try:
        inputs = synthetic_inputs(card, 12, seed=3)
        report = compare(card, candidate, reference, inputs, tolerance=1e-3, batch=4)
    finally:
        candidate.close()
        reference.close()
    assert not report.passed and report.max_abs_diff_scores > 1e-3
    assert report.disagreements + report.borderline <= report.compared
    assert "-> FAIL" in report.summary()


def test_synthetic_inputs_are_seeded_and_shaped() -> None:
    card = load_card(ENGINES / "ct-demo")
    a, b = synthetic_inputs(card, 3, seed=1), synthetic_inputs(card, 3, seed=1)
    assert a.shape == (3, *card.input_shape) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_gpu_metrics_without_nvml_leave_the_scrape_intact() -> None:
    registry = CollectorRegistry(auto_describe=True)
    gpu = GpuMetrics(registry)
    text = generate_latest(registry).decode()
    if gpu.nvml_problem is not None:
        assert "edge_agent_gpu_memory_used_bytes" not in text
    card = load_card(ENGINES / "ct-demo")
    gpu.record_engine("ct-demo", OnnxRuntimeEngine(card))  # holds nothing on a GPU: nothing recorded
    assert 'edge_agent_engine_gpu_memory_bytes{model="ct-demo"}' not in generate_latest(registry).decode()
