"""The cxr-nodule recipe's calibration (engines/cxr-nodule/recipe/calibrate.py): Platt scaling that recovers known
constants, written into an ONNX graph that ONNX Runtime then runs, and refused a second time."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines" / "cxr-nodule" / "recipe"))

import calibrate


def test_platt_recovers_the_slope_and_intercept_of_the_data() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20000)
    true_p = calibrate.sigmoid(0.6 * calibrate.logit(raw) - 0.8)
    labels = rng.random(raw.size) < true_p
    slope, intercept = calibrate.fit_platt(raw, labels)
    assert slope == pytest.approx(0.6, abs=0.05) and intercept == pytest.approx(-0.8, abs=0.05)
    fitted = calibrate.sigmoid(slope * calibrate.logit(raw) + intercept)
    assert calibrate.ece(fitted, labels) < calibrate.ece(raw, labels)
    assert calibrate.ece(fitted, labels) < 0.02


def tiny_model() -> onnx.ModelProto:
    """image [N, 1] -> scores = Sigmoid(image): the shape of the nodule model's score head."""
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["image"], ["scores"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_constants_go_into_the_graph_in_front_of_the_scores_sigmoid() -> None:
    model = calibrate.calibrated_onnx(tiny_model(), 1.7, 0.4, "scores")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = np.linspace(-6, 6, 25, dtype=np.float32)[:, None]
    [got] = session.run(["scores"], {"image": z})
    assert np.abs(got - calibrate.sigmoid(1.7 * z + 0.4)).max() < 1e-6
    with pytest.raises(SystemExit, match="already calibrated"):
        calibrate.calibrated_onnx(model, 1.0, 0.0, "scores")


def test_a_score_that_is_not_a_sigmoid_is_not_calibrated_in_place() -> None:
    model = tiny_model()
    model.graph.node[0].op_type = "Relu"
    with pytest.raises(SystemExit, match="not a Sigmoid"):
        calibrate.calibrated_onnx(model, 1.0, 0.0, "scores")
