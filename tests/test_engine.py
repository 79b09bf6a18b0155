"""The ONNX Runtime engine on the real demo models, and every way loading or running can fail."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data
import pytest
import yaml

from edge_agent.config import ModelDeployment
from edge_agent.errors import ConfigError, EngineError
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.inference.engine import Engine, EngineOutput, check_output
from edge_agent.inference.factory import create_engine
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine
from edge_agent.inference.preprocess import load_instance

ENGINES = Path(__file__).resolve().parent.parent / "engines"
CT_SMALL = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"


@pytest.fixture
def engine() -> Iterator[OnnxRuntimeEngine]:
    eng = OnnxRuntimeEngine(load_card(ENGINES / "ct-demo"), intra_op_threads=1, max_batch=4)
    eng.load()
    try:
        yield eng
    finally:
        eng.close()


def copy_model(tmp_path: Path, name: str = "ct-demo", **changes: Any) -> Path:
    dst = tmp_path / name
    shutil.copytree(ENGINES / name, dst)
    if changes:
        raw = yaml.safe_load((dst / "model.yaml").read_text())
        for key, value in changes.items():
            raw[key] = value
        (dst / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst


def test_engine_satisfies_the_protocol(engine: OnnxRuntimeEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "ct-demo"
    assert engine.backend == "onnxruntime"
    assert engine.input_shape == (1, 256, 256)


def test_infer_real_ct_slice(engine: OnnxRuntimeEngine) -> None:
    card = engine.card
    x = np.stack(load_instance(CT_SMALL, card))
    out = engine.infer(x)
    assert out.scores.shape == (1, 1) and out.scores.dtype == np.float32
    assert 0.0 < float(out.scores[0, 0]) < 1.0
    assert out.heatmap is not None and out.heatmap.shape == (1, 1, 16, 16)
    # Deterministic, and a batch gives each image the same result as running it alone.
    batch = np.concatenate([x, np.zeros_like(x), x])
    again = engine.infer(batch)
    np.testing.assert_allclose(again.scores[0], out.scores[0], rtol=1e-5)
    np.testing.assert_allclose(again.scores[2], out.scores[0], rtol=1e-5)
    np.testing.assert_allclose(again.heatmap[2], out.heatmap[0], rtol=1e-5)  # type: ignore[index]


def test_warm_up_runs_max_batch_and_one(engine: OnnxRuntimeEngine) -> None:
    engine.warm_up()


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((2, 1, 128, 128), np.float32),
        np.zeros((2, 3, 256, 256), np.float32),
        np.zeros((1, 256, 256), np.float32),
        np.zeros((0, 1, 256, 256), np.float32),
        np.zeros((2, 1, 256, 256), np.float64),
    ],
    ids=["size", "channels", "rank", "empty", "dtype"],
)
def test_wrong_input_is_an_engine_error(engine: OnnxRuntimeEngine, batch: np.ndarray) -> None:
    with pytest.raises(EngineError, match=r"ct-demo: input batch is .*expected float32\[N, 1, 256, 256\]"):
        engine.infer(batch)


def test_non_finite_scores_are_an_engine_error(engine: OnnxRuntimeEngine) -> None:
    # A NaN score would compare false against every threshold and pass as routine.
    x = np.full((1, 1, 256, 256), np.nan, np.float32)
    with pytest.raises(EngineError, match="non-finite scores"):
        engine.infer(x)


def test_infer_before_load_and_after_close_is_an_engine_error() -> None:
    eng = OnnxRuntimeEngine(load_card(ENGINES / "ct-demo"), intra_op_threads=1)
    x = np.zeros((1, 1, 256, 256), np.float32)
    with pytest.raises(EngineError, match="not loaded"):
        eng.infer(x)
    eng.load()
    assert eng.infer(x).scores.shape == (1, 1)
    eng.close()
    with pytest.raises(EngineError, match="not loaded"):
        eng.infer(x)


def test_model_swapped_after_the_card_was_read_is_refused(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    card = load_card(model_dir)
    shutil.copy(ENGINES / "cxr-demo" / "model.onnx", model_dir / "model.onnx")
    with pytest.raises(EngineError, match="does not match the card's sha256"):
        OnnxRuntimeEngine(card).load()


def test_model_file_gone_after_the_card_was_read(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    card = load_card(model_dir)
    (model_dir / "model.onnx").unlink()
    with pytest.raises(EngineError, match="cannot read"):
        OnnxRuntimeEngine(card).load()


def test_file_that_is_not_onnx_is_an_engine_error(tmp_path: Path) -> None:
    junk = b"this is not an ONNX model"
    model_dir = copy_model(tmp_path, sha256=hashlib.sha256(junk).hexdigest())
    (model_dir / "model.onnx").write_bytes(junk)
    with pytest.raises(EngineError, match="ONNX Runtime cannot load"):
        OnnxRuntimeEngine(load_card(model_dir)).load()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"inputs": {"name": "pixels", "shape": [1, 256, 256]}}, "no input 'pixels'"),
        ({"outputs": {"scores": "logits", "heatmap": "heatmap"}}, "no output 'logits'"),
        ({"outputs": {"scores": "scores", "heatmap": "cam_map"}}, "no output 'cam_map'"),
        (
            {"labels": ["abnormal", "bleed"], "thresholds": {"abnormal": 0.5, "bleed": 0.5}},
            "output 'scores' axis 1 is 1, expected 2",
        ),
        (
            {
                "inputs": {"name": "image", "shape": [1, 512, 512]},
                "preprocessing": {"resize": [512, 512]},
            },
            "input 'image' axis 2 is 256, expected 512",
        ),
    ],
)
def test_model_that_does_not_match_its_card_is_refused(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    card = load_card(copy_model(tmp_path, **changes))
    with pytest.raises(EngineError, match="does not match its card") as info:
        OnnxRuntimeEngine(card).load()
    assert expected in str(info.value)


def test_check_output_rejects_malformed_outputs() -> None:
    card = load_card(ENGINES / "ct-demo")
    good = np.zeros((2, 1), np.float32)
    assert check_output(card, 2, EngineOutput(good, None)).heatmap is None
    with pytest.raises(EngineError, match="scores have shape"):
        check_output(card, 3, EngineOutput(good, None))
    with pytest.raises(EngineError, match="heat map has shape"):
        check_output(card, 2, EngineOutput(good, np.zeros((2, 16, 16), np.float32)))
    with pytest.raises(EngineError, match="non-finite heat map"):
        check_output(card, 2, EngineOutput(good, np.full((2, 1, 4, 4), np.inf, np.float32)))


def test_create_engine_builds_the_configured_backend() -> None:
    card: ModelCard = load_card(ENGINES / "cxr-demo")
    eng = create_engine(card, ModelDeployment(max_batch=4, intra_op_threads=1))
    assert isinstance(eng, OnnxRuntimeEngine)
    assert eng.max_batch == 4 and eng.intra_op_threads == 1
    eng.load()
    eng.warm_up()
    eng.close()


def test_create_engine_refuses_a_batch_above_the_cards_max() -> None:
    card = load_card(ENGINES / "cxr-demo")
    with pytest.raises(ConfigError, match=r"models.cxr-demo.max_batch: 64 exceeds the card's batch.max 16"):
        create_engine(card, ModelDeployment(max_batch=64))
