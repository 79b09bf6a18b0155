"""Every TensorRT name edge-agent calls exists in the real TensorRT 11.4 Python binding.

TensorRT cannot be installed here, but the ``tensorrt-cu13-bindings`` wheel (a test extra) installs
its binding, ``tensorrt_bindings/tensorrt.so``, which cannot be imported without libnvinfer. So the
names are read from the file itself: pybind11 keeps every class, method, property and enum value name
as a NUL-terminated string (the linker may share a name's bytes with the tail of a longer one, hence
the suffix match), and the package's ``__init__.py`` adds Python helpers such as ``nptype``.

The names the code uses are found by walking its AST: attribute accesses on the ``trt`` module and
on objects held in ``trt_``-prefixed names, and the methods of classes derived from ``trt.*``.
Names only TensorRT 10 has are declared in trt_build.TRT10_ONLY; set EDGE_AGENT_TRT10_BINDING to a
TensorRT 10 ``tensorrt.so`` to check those too. Names only TensorRT for RTX has are declared in
trt_flavour.RTX_ONLY, and every name but the TensorRT 10 ones is checked against the TensorRT for RTX binding
(``tensorrt-rtx-cu13-bindings``, also a test extra) the same way.

Also here: the parts of the builder and backend that run without TensorRT (half-precision ONNX,
buffer layout against the card).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_agent.errors import EngineError
from edge_agent.inference.card import load_card
from edge_agent.inference.tensorrt import TensorSpec, plan_layout, specs_from_onnxruntime
from edge_agent.inference.trt_build import TRT10_ONLY, half_precision_onnx
from edge_agent.inference.trt_flavour import RTX_ONLY

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edge_agent"
ENGINES = ROOT / "engines"
DIST = "tensorrt-cu13-bindings"


RTX_DIST = "tensorrt-rtx-cu13-bindings"


def _binding_files(dist: str = DIST, package: str = "tensorrt_bindings") -> tuple[Path, Path] | None:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    so = [f for f in files if f.name.startswith("tensorrt") and f.name.endswith(".so")]
    init = [f for f in files if str(f).replace("\\", "/").endswith(f"{package}/__init__.py")]
    if not so or not init:
        return None
    return Path(str(so[0].locate())), Path(str(init[0].locate()))


BINDING = _binding_files()
needs_binding = pytest.mark.skipif(
    BINDING is None, reason=f"{DIST} is not installed (pip install '{DIST}==11.4.0.106', in the test extras)"
)
RTX_BINDING = _binding_files(RTX_DIST, "tensorrt_rtx_bindings")
needs_rtx_binding = pytest.mark.skipif(
    RTX_BINDING is None, reason=f"{RTX_DIST} is not installed (pip install '{RTX_DIST}==1.7.1.116', in the test extras)"
)


class Names:
    """The names a TensorRT binding defines, read from its files without importing them."""

    def __init__(self, so: Path, init: Path | None) -> None:
        self.data = so.read_bytes()
        self.python: set[str] = set()
        if init is not None:
            for node in ast.parse(init.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.FunctionDef | ast.ClassDef):
                    self.python.add(node.name)
                elif isinstance(node, ast.Assign):
                    self.python.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.python or name.encode() + b"\0" in self.data)


@cache
def binding() -> Names:
    assert BINDING is not None
    return Names(*BINDING)


def _marked(name: str) -> bool:
    return name.startswith(("trt_", "_trt_"))


def _trt_rooted(node: ast.expr) -> bool:
    """Is ``node`` the trt module, a marked TensorRT object, or something reached from one?"""
    while isinstance(node, ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    if isinstance(node, ast.Name):
        return node.id == "trt" or _marked(node.id)
    if isinstance(node, ast.Attribute):
        return _marked(node.attr) or _trt_rooted(node.value)
    return False


def used_names(source: str) -> set[str]:
    """The TensorRT names a module's code uses (see the module docstring for the rules)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and not _marked(node.attr) and _trt_rooted(node.value):
            out.add(node.attr)
        elif isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Attribute) and _trt_rooted(b.value) for b in node.bases
        ):
            # Overrides of a TensorRT interface must carry the binding's method names exactly.
            out.update(
                f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")
            )
    return out


@cache
def code_names() -> dict[str, set[str]]:
    """Every module of the package -> the TensorRT names it uses (modules that use none left out)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = used_names(path.read_text(encoding="utf-8"))
        if names:
            found[str(path.relative_to(ROOT))] = names
    return found


def all_used() -> set[str]:
    return set().union(*code_names().values())


def test_the_walker_sees_the_backend_and_the_builder() -> None:
    """A floor, so that a renamed marker cannot make the check below vacuous."""
    modules = code_names()
    assert "edge_agent/inference/tensorrt.py" in modules and "edge_agent/inference/trt_build.py" in modules
    assert len(all_used()) >= 40


def test_the_walker_rules() -> None:
    src = """
import tensorrt as trt
x = trt.Builder(trt.Logger()).create_network(0)
trt_parser.get_error(0).desc()
self._trt_engine.get_tensor_name(0)
other.serialize()
class M(trt.IProgressMonitor):
    def phase_start(self): ...
    def _helper(self): ...
"""
    assert used_names(src) == {"Builder", "Logger", "create_network", "get_error", "desc", "get_tensor_name",
                               "IProgressMonitor", "phase_start"}


@needs_binding
def test_the_extraction_tells_present_from_absent() -> None:
    """Names TensorRT 11 removed are absent, names it has are present: the check below means something."""
    names = binding()
    for present in ("execute_async_v3", "set_tensor_address", "IProgressMonitor", "STRONGLY_TYPED", "nptype"):
        assert present in names
    for removed in ("execute_async_v2", "get_binding_index", "max_workspace_size", "build_engine", "FP16"):
        assert removed not in names


@needs_binding
def test_every_tensorrt_name_the_code_uses_exists_in_11_4() -> None:
    names = binding()
    missing = {
        f"{module}: {name}"
        for module, used in code_names().items()
        for name in sorted(used - TRT10_ONLY - RTX_ONLY)
        if name not in names
    }
    assert not missing, f"not in {DIST} 11.4: {sorted(missing)}"


@needs_rtx_binding
def test_every_name_the_code_uses_but_tensorrt_10_ones_exists_in_tensorrt_rtx() -> None:
    assert RTX_BINDING is not None
    names = Names(*RTX_BINDING)
    for present in ("ComputeCapability", "set_compute_capability", "execute_async_v3", "IProgressMonitor"):
        assert present in names
    missing = sorted(n for n in all_used() - TRT10_ONLY if n not in names)
    assert not missing, f"not in {RTX_DIST}: {missing}"


@needs_binding
def test_rtx_only_names_are_used_and_absent_from_11_4() -> None:
    names = binding()
    assert set(RTX_ONLY) - all_used() == set()
    assert not {n for n in RTX_ONLY if n in names}


def test_trt10_only_names_are_all_used() -> None:
    """The TensorRT 10 list stays honest: each entry is used by a TensorRT 10 code path."""
    assert set(TRT10_ONLY) - all_used() == set()


@needs_binding
def test_trt10_only_names_are_really_gone_from_11_4() -> None:
    names = binding()
    # INT8 lives on as a DataType value in 11.4; the BuilderFlag of that name is what went away.
    still = {n for n in TRT10_ONLY if n in names} - {"INT8"}
    assert not still, f"declared TensorRT-10-only, but 11.4 has: {sorted(still)}"


@pytest.mark.skipif("EDGE_AGENT_TRT10_BINDING" not in os.environ, reason="EDGE_AGENT_TRT10_BINDING not set")
def test_every_name_exists_in_tensorrt_10() -> None:
    """With a TensorRT 10 binding (e.g. tensorrt-cu12-bindings 10.3, JetPack 6), every name but the 11-only ones."""
    so = Path(os.environ["EDGE_AGENT_TRT10_BINDING"])
    init = so.parent / "__init__.py"
    names = Names(so, init if init.exists() else None)
    missing = sorted(n for n in all_used() if n not in names)
    # TensorRT 10 has all of them: STRONGLY_TYPED and IProgressMonitor arrived in 10.0.
    assert not missing, f"not in {so}: {missing}"


# -- what runs without TensorRT ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["ct-demo", "cxr-demo"])
def test_half_precision_onnx_runs_and_agrees(model: str) -> None:
    """The FP16 graph TensorRT 11 builds from: valid ONNX, float32 at its edges, close to the original."""
    card = load_card(ENGINES / model)
    data = card.model_path.read_bytes()
    half = half_precision_onnx(data)
    proto = onnx.load_from_string(half)
    onnx.checker.check_model(proto, full_check=True)
    assert {i.data_type for i in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]
    assert {o.type.tensor_type.elem_type for o in proto.graph.output} == {onnx.TensorProto.FLOAT}
    x = np.random.default_rng(0).normal(0.0, 1.0, (4, *card.input_shape)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {card.inputs.name: x})
    got = ort.InferenceSession(half, providers=["CPUExecutionProvider"]).run(None, {card.inputs.name: x})
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, atol=2e-2)


def test_half_precision_refuses_weights_beyond_float16() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([1e6], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [w],
    )
    with pytest.raises(EngineError, match="overflows float16"):
        half_precision_onnx(helper.make_model(graph).SerializeToString())


def test_layout_of_the_demo_models() -> None:
    card = load_card(ENGINES / "ct-demo")
    layout = plan_layout(card, specs_from_onnxruntime(card.model_path), 16)
    assert [(b.name, b.max_shape, b.nbytes) for b in layout] == [
        ("image", (16, 1, 256, 256), 16 * 256 * 256 * 4),
        ("scores", (16, 1), 64),
        ("heatmap", (16, 1, 16, 16), 16 * 256 * 4),
    ]
    assert layout[0].shape_for(3) == (3, 1, 256, 256) and layout[0].nbytes_for(3) == 3 * 256 * 256 * 4


def _specs(**changes: TensorSpec) -> list[TensorSpec]:
    f32 = np.dtype(np.float32)
    specs = {
        "image": TensorSpec("image", True, f32, (-1, 1, 256, 256)),
        "scores": TensorSpec("scores", False, f32, (-1, 1)),
        "heatmap": TensorSpec("heatmap", False, f32, (-1, 1, 16, 16)),
    }
    specs.update(changes)
    return list(specs.values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": TensorSpec("img", True, np.dtype(np.float32), (-1, 1, 256, 256))}, "no input 'image'"),
        ({"image": TensorSpec("image", True, np.dtype(np.float16), (-1, 1, 256, 256))}, "is float16, expected float32"),
        ({"image": TensorSpec("image", True, np.dtype(np.float32), (4, 1, 256, 256))}, "fixed batch of 4"),
        ({"image": TensorSpec("image", True, np.dtype(np.float32), (-1, 3, 256, 256))}, "axis 1 is 3, expected 1"),
        ({"scores": TensorSpec("scores", False, np.dtype(np.float32), (-1, 2))}, "axis 1 is 2, expected 1"),
        ({"scores": TensorSpec("scores", False, np.dtype(np.float32), (-1,))}, "rank 1, expected 2"),
        ({"heatmap": TensorSpec("heatmap", False, np.dtype(np.float32), (-1, -1, -1, -1))}, "axis 2 is dynamic"),
        ({"mask": TensorSpec("mask", True, np.dtype(np.float32), (-1, 1))}, "one input is supported"),
    ],
)
def test_layout_mismatches_name_the_problem(changes: dict[str, TensorSpec], message: str) -> None:
    card = load_card(ENGINES / "ct-demo")
    with pytest.raises(EngineError, match="ct-demo: the plan does not match its card") as err:
        plan_layout(card, _specs(**changes), 16)
    assert message in str(err.value)


def test_dynamic_output_axes_are_resolved_at_max_batch() -> None:
    card = load_card(ENGINES / "ct-demo")
    dynamic = TensorSpec("heatmap", False, np.dtype(np.float32), (-1, -1, -1, -1))
    layout = plan_layout(card, _specs(heatmap=dynamic), 8, lambda name: (8, 1, 32, 32))
    assert layout[2].max_shape == (8, 1, 32, 32)
    with pytest.raises(EngineError, match="resolves to"):
        plan_layout(card, _specs(heatmap=dynamic), 8, lambda name: (4, 1, 32, 32))
