"""TensorRT for RTX: real plans of both bundled models built on the CPU, and how the daemon picks and refuses them.

The plans are built once per run by ``edge-agent build-engine --backend tensorrt-rtx`` for every target TensorRT
for RTX has, in fp32 and fp16, with the real PyPI wheels (no GPU needed to build). Running a plan needs an RTX-class
GPU: that part is bench/gpu_check.sh's. Everything here stops before the first CUDA call, which is the point: a
plan for another flavour, version or GPU must be refused before one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.errors import EngineError
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.inference.plan_cache import Box, PlanCache, PlanMeta, PlanUnavailable, Precision
from edge_agent.inference.select import Availability, select_backend
from edge_agent.inference.trt_build import BuildOptions, ensure_plan
from edge_agent.inference.trt_flavour import (
    RTX_TARGETS,
    TENSORRT,
    TENSORRT_RTX,
    parse_capability,
    plan_problems,
    read_rtx_header,
)

REPO = Path(__file__).resolve().parent.parent
ENGINES = REPO / "engines"
MODELS = ("ct-demo", "cxr-nodule")
PRECISIONS = ("fp32", "fp16")
SMS = ",".join("sm" + c.replace(".", "") for c in RTX_TARGETS)

# The wheels exist for Linux x86-64 (and Windows), CPython 3.11 and 3.12; the test extra installs them there.
pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info < (3, 13)),
    reason="tensorrt-rtx-cu13 wheels are published for Linux x86-64, CPython 3.11 and 3.12 only",
)


def trt_version() -> str:
    import tensorrt_rtx_bindings as trt

    return str(trt.__version__)


def write_config(tmp: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    raw["state_dir"] = str(tmp / "state")
    raw["model_repository"] = str(ENGINES)
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plans of both models for every target and precision, built as a workstation would, into one folder."""
    tmp = tmp_path_factory.mktemp("rtx")
    config = write_config(tmp)
    out = tmp / "plans"
    for model in MODELS:
        done = edge_agent("build-engine", model, "--config", str(config), "--backend", "tensorrt-rtx",
                          "--compute-capability", SMS, "--precision", *PRECISIONS, "--out", str(out))
        assert done.returncode == 0, done.stderr
        # Progress: one line per plan, counted.
        total = len(RTX_TARGETS) * len(PRECISIONS)
        assert f"[{total}/{total}] {model}" in done.stdout
    return out


def metas(folder: Path) -> list[tuple[PlanMeta, bytes]]:
    found = []
    for path in sorted(folder.rglob("*.json")):
        meta = PlanMeta.from_json(path.read_text())
        found.append((meta, path.with_suffix(".plan").read_bytes()))
    return found


def test_every_plan_is_built_for_what_its_metadata_says(shipped: Path) -> None:
    plans = metas(shipped)
    assert sorted((m.model, m.key.compute_capability, m.key.precision) for m, _ in plans) == sorted(
        (model, cap, p) for model in MODELS for cap in RTX_TARGETS for p in PRECISIONS
    )
    for meta, plan in plans:
        card = load_card(ENGINES / meta.model)
        assert meta.key.flavour == TENSORRT_RTX
        assert meta.key.gpu_name == ""
        assert meta.key.model_sha256 == card.sha256
        assert meta.key.trt_version == trt_version()
        profile = (meta.profile.min, meta.profile.opt, meta.profile.max)
        assert profile == (card.batch.min, card.batch.opt, card.batch.max)
        assert meta.plan_bytes == len(plan)
        assert 0 < meta.build_seconds < 120
        header = read_rtx_header(plan)
        assert header.capabilities == (meta.key.compute_capability,)
        assert header.version == trt_version()
        assert header.length == len(plan)
        assert plan_problems(TENSORRT_RTX, plan, trt_version(), meta.key.compute_capability) == []


def test_fp16_halves_the_weights_of_the_nodule_model(shipped: Path) -> None:
    sizes = {(m.model, m.key.compute_capability, m.key.precision): m.plan_bytes for m, _ in metas(shipped)}
    onnx_bytes = (ENGINES / "cxr-nodule" / "model.onnx").stat().st_size
    for cap in RTX_TARGETS:
        fp32, fp16 = sizes[("cxr-nodule", cap, "fp32")], sizes[("cxr-nodule", cap, "fp16")]
        # The weights are most of this plan: in fp32 about the ONNX file's size, in fp16 about half of it.
        assert 0.8 * onnx_bytes < fp32 < 1.6 * onnx_bytes
        assert fp16 < 0.7 * fp32


@pytest.fixture
def cache(shipped: Path, tmp_path: Path) -> PlanCache:
    """A box's plan cache after `edge-agent import-plans` of the shipped folder."""
    config = write_config(tmp_path)
    done = edge_agent("import-plans", str(shipped), "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("imported ") == len(MODELS) * len(RTX_TARGETS) * len(PRECISIONS)
    return PlanCache(tmp_path / "state")


def rtx(precision: Precision = "fp16") -> BuildOptions:
    return BuildOptions(precision, flavour=TENSORRT_RTX)


def card(model: str = "cxr-nodule") -> ModelCard:
    return load_card(ENGINES / model)


@pytest.mark.parametrize("cap", list(RTX_TARGETS))
def test_the_box_picks_the_plan_for_its_gpu(cache: PlanCache, cap: str) -> None:
    box = Box("NVIDIA RTX A4000", cap, trt_version())
    plan, meta, built = ensure_plan(card(), cache, rtx(), allow_build=False, box=box)
    assert not built
    assert (meta.key.compute_capability, meta.key.precision) == (cap, "fp16")
    assert read_rtx_header(plan).capabilities == (cap,)


def test_a_gpu_tensorrt_rtx_does_not_serve_is_refused_with_the_reason(cache: PlanCache) -> None:
    for cap, gpu in (("9.0", "NVIDIA H100"), ("8.7", "Orin"), ("10.0", "NVIDIA B200")):
        refusal = rf"does not serve compute capability {re.escape(cap)} .*served by the full TensorRT"
        with pytest.raises(EngineError, match=refusal):
            ensure_plan(card(), cache, rtx(), allow_build=False, box=Box(gpu, cap, trt_version()))


def test_no_plan_for_this_gpu_names_the_build_command(tmp_path: Path, shipped: Path) -> None:
    cache = PlanCache(tmp_path / "state")
    only = [p for p in sorted(shipped.rglob("*.json")) if '"compute_capability": "8.6"' in p.read_text()]
    for meta_path in only:  # a box that was sent the sm86 plans only
        meta = PlanMeta.from_json(meta_path.read_text())
        cache.put(meta, meta_path.with_suffix(".plan").read_bytes())
    with pytest.raises(PlanUnavailable) as err:
        ensure_plan(card(), cache, rtx(), allow_build=False, box=Box("NVIDIA L40S", "8.9", trt_version()))
    text = str(err.value)
    command = "edge-agent build-engine cxr-nodule --backend tensorrt-rtx --compute-capability sm89 --precision fp16"
    assert command in text
    assert "cached plans are for: TensorRT for RTX" in text and "sm86" in text


def test_a_plan_from_another_version_is_not_loaded(cache: PlanCache) -> None:
    with pytest.raises(PlanUnavailable, match=re.escape("no usable plan for TensorRT for RTX 1.8.0.1, sm86, fp16")):
        ensure_plan(card(), cache, rtx(), allow_build=False, box=Box("NVIDIA RTX A4000", "8.6", "1.8.0.1"))


def test_a_mislabelled_plan_is_refused_by_its_own_header(cache: PlanCache) -> None:
    """Metadata that says sm89 over a plan built for sm86 (a copy gone wrong): the header tells, before CUDA."""
    c = card()
    sm86 = ensure_plan(c, cache, rtx(), allow_build=False, box=Box("x", "8.6", trt_version()))
    sm89_box = Box("NVIDIA L4", "8.9", trt_version())
    _, meta89, _ = ensure_plan(c, cache, rtx(), allow_build=False, box=sm89_box)
    wrong = dataclasses.replace(meta89, plan_sha256=sm86[1].plan_sha256, plan_bytes=sm86[1].plan_bytes)
    cache.put(wrong, sm86[0])
    refusal = "the cached plan was refused: it was built for sm86, and this GPU is sm89"
    with pytest.raises(PlanUnavailable, match=refusal):
        ensure_plan(c, cache, rtx(), allow_build=False, box=sm89_box)


def test_a_full_tensorrt_plan_is_not_a_tensorrt_rtx_plan(cache: PlanCache) -> None:
    c = card("ct-demo")
    box = Box("NVIDIA RTX A4000", "8.6", trt_version())
    _, meta, _ = ensure_plan(c, cache, rtx("fp32"), allow_build=False, box=box)
    foreign = b"ftrt" + bytes(200)  # what a full TensorRT plan's bytes could be: no TensorRT-RTX header
    cache.put(dataclasses.replace(meta, plan_sha256=hashlib.sha256(foreign).hexdigest(), plan_bytes=len(foreign)),
              foreign)
    with pytest.raises(PlanUnavailable, match="not a TensorRT for RTX plan"):
        ensure_plan(c, cache, rtx("fp32"), allow_build=False, box=box)
    # And the other way round: a TensorRT-RTX plan under the full TensorRT.
    plan = next((cache.root / "cxr-nodule").glob("*.plan")).read_bytes()
    assert plan_problems(TENSORRT, plan, "11.4.0.106", "8.6") == [
        "it is a TensorRT for RTX plan, and this model runs on the full TensorRT"]


def test_import_refuses_what_does_not_check_out(shipped: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shipped, bad)
    metas_ = sorted(bad.rglob("*.json"))
    # 1: plan bytes altered after the metadata was written.
    plan1 = metas_[0].with_suffix(".plan")
    plan1.write_bytes(plan1.read_bytes()[:-1] + b"\0")
    # 2: built from another model file than this box's.
    raw = json.loads(metas_[1].read_text())
    raw["key"]["model_sha256"] = "ab" * 32
    metas_[1].write_text(json.dumps(raw))
    # 3: a model name that would be a path.
    raw = json.loads(metas_[2].read_text())
    raw["model"] = "../../etc"
    metas_[2].write_text(json.dumps(raw))
    # 4: not metadata at all.
    metas_[3].write_text("{")
    done = edge_agent("import-plans", str(bad), "--config", str(write_config(tmp_path)))
    assert done.returncode == 1
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 4
    assert "sha256 or length differ" in refused[0]
    assert "built from another model file" in refused[1]
    assert "is not a model name" in refused[2]
    assert "not plan metadata" in refused[3]
    assert not (tmp_path / "state" / "engines" / ".." / ".." / "etc").exists()


def test_build_engine_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    done = edge_agent("build-engine", "ct-demo", "--config", config, "--backend", "tensorrt-rtx",
                      "--compute-capability", "sm90", "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "does not serve compute capability 9.0 (sm90)" in done.stderr
    done = edge_agent("build-engine", "ct-demo", "--config", config, "--backend", "tensorrt-rtx",
                      "--compute-capability", "ampere")
    assert done.returncode == 3 and "'ampere' is not a compute capability" in done.stderr
    done = edge_agent("build-engine", "ct-demo", "--config", config, "--compute-capability", "sm86")
    assert done.returncode == 3 and "--compute-capability is for --backend tensorrt-rtx" in done.stderr


@pytest.mark.parametrize(("text", "cap"), [("sm86", "8.6"), ("SM_120", "12.0"), ("8.9", "8.9"), ("75", "7.5")])
def test_capabilities_are_read_as_written(text: str, cap: str) -> None:
    assert parse_capability(text) == cap


def avail(cap: str | None, trt: bool = False, rtx_installed: bool = True) -> Availability:
    return Availability(
        "11.4.0.106" if trt else None, None if trt else "TensorRT is not installed",
        f"GPU (sm {cap})" if cap else None, None if cap else "no CUDA device",
        ("CPUExecutionProvider",),
        "1.7.1.116" if rtx_installed else None, None if rtx_installed else "TensorRT for RTX is not installed",
        cap,
    )


def test_auto_picks_the_flavour_that_serves_the_gpu() -> None:
    assert select_backend("m", "auto", avail("8.9")).backend == "tensorrt-rtx"
    assert select_backend("m", "auto", avail("8.9", trt=True)).backend == "tensorrt"
    hopper = select_backend("m", "auto", avail("9.0"))
    assert hopper.backend == "onnxruntime"
    assert "TensorRT for RTX not used: the GPU GPU (sm 9.0) (sm90) is not one of its targets" in hopper.reason
    assert select_backend("m", "auto", avail(None)).backend == "onnxruntime"
    with pytest.raises(EngineError, match=r"backend tensorrt-rtx was asked for, but .*use backend tensorrt"):
        select_backend("m", "tensorrt-rtx", avail("9.0"))
    with pytest.raises(EngineError, match="backend tensorrt-rtx was asked for, but there is no GPU"):
        select_backend("m", "tensorrt-rtx", avail(None))
    assert select_backend("m", "tensorrt-rtx", avail("12.0")).reason.startswith("TensorRT for RTX 1.7.1.116 on")


def test_the_runtimes_own_check_runs_without_a_gpu_as_far_as_it_can(shipped: Path) -> None:
    """TensorRT for RTX's get_engine_validity, for real: without a GPU it can only tell a TensorRT for RTX plan
    from anything else (it cannot read the GPU, so it never says valid); on a GPU the engine asks it before
    deserialising (tensorrt.py)."""
    import tensorrt_rtx_bindings as trt

    from edge_agent.inference.trt_build import make_logger
    from edge_agent.inference.trt_flavour import runtime_verdict

    runtime = trt.Runtime(make_logger(trt))
    assert runtime_verdict(trt, runtime, b"ftrt" + bytes(200)) == "not a TensorRT for RTX plan (malformed)"
    plan = next(shipped.rglob("*.plan")).read_bytes()
    verdict = runtime_verdict(trt, runtime, plan)
    assert verdict is not None and "malformed" not in verdict
    assert runtime.deserialize_cuda_engine(plan) is None  # no GPU: no engine, and no exception
