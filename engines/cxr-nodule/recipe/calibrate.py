"""Calibrate the exported model's scores on the validation split, and choose its two operating points.

    python calibrate.py --engine-dir engines/cxr-nodule --data DATA        (run.sh stage calibrate, after export)

1. Scores the validation split with the exported model through the daemon's own path (edge-agent validate's
   decoding and preprocessing, ONNX Runtime).
2. Platt scaling: p = sigmoid(slope * logit(score) + intercept), fitted by maximum likelihood on the validation
   split. The image score is sigmoid(hottest cell logit), so the calibrated score is the same network with the
   image logit scaled and shifted: the two constants are written into model.onnx in front of its last Sigmoid,
   so that every consumer (the daemon, validate, verify-engine, TensorRT plans) sees calibrated scores. The heat
   map is untouched. A model already calibrated is refused (its ONNX metadata says so).
3. Operating points, on the calibrated validation scores: **triage** (sensitivity 0.90 for nodules >= 15 mm;
   the card's default threshold) and **high_specificity** (specificity 0.95 over all nodule-free images).
4. report/calibration.json (constants, expected calibration error before and after on validation and test,
   reliability bins, the operating points with their validation figures) and report/reliability.png.
5. The card's sha256 and default threshold are updated so that the validate stage measures the calibrated model;
   the card stage then writes the operating points and the calibration into it.

Numpy, onnx and ONNX Runtime only (the daemon's venv is enough).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import yaml
from onnx import helper, numpy_helper

from edge_agent.inference.card import load_card
from edge_agent.inference.plan_cache import write_atomic
from edge_agent.png import encode_png
from edge_agent.validate.labels import read_labels
from edge_agent.validate.plots import BLACK, CHANCE, GRID, TEXT_SCALE, TITLE_SCALE, put_text, text_width, wrap
from edge_agent.validate.run import score_all
from edge_agent.validate.stats import bootstrap_metrics, threshold_for_sensitivity, threshold_for_specificity

CALIBRATED_KEY = "edge_agent.calibration"
TRIAGE_SENSITIVITY = 0.90
TRIAGE_MIN_SIZE_MM = 15.0
HIGH_SPECIFICITY = 0.95
BINS = 10
EPS = 1e-7

TRIAGE_RULE = (
    f"the highest threshold with sensitivity >= {TRIAGE_SENSITIVITY:.2f} for nodules of {TRIAGE_MIN_SIZE_MM:.0f} mm "
    "and larger on the validation split (calibrated scores, scored by the exported ONNX model)"
)
TRIAGE_MEANING = (
    "Triage: meant to put nearly every radiograph with a nodule of 15 mm or more near the top of the reading list. "
    "Most flagged radiographs are still nodule-free (see its specificity): a flag means read this one sooner, "
    "never that a nodule is there, and an unflagged radiograph is read as usual."
)
HIGH_SPEC_RULE = (
    f"the lowest threshold with specificity >= {HIGH_SPECIFICITY:.2f} over all nodule-free images of the validation "
    "split (calibrated scores, scored by the exported ONNX model)"
)
HIGH_SPEC_MEANING = (
    "High specificity: flags few nodule-free radiographs (about one in twenty), so a flag is worth interrupting "
    "for, but it misses most nodules (see its sensitivity): unflagged radiographs must still be read as usual."
)


def logit(p: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.log(q / (1.0 - q))  # type: ignore[no-any-return]


def sigmoid(z: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return 1.0 / (1.0 + np.exp(-z))  # type: ignore[no-any-return]


def fit_platt(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(slope, intercept) maximising the likelihood of ``labels`` under sigmoid(slope * logit(score) + intercept).

    Newton's method on the two parameters, with Platt's target smoothing (labels (N+ + 1)/(N+ + 2) and
    1/(N- + 2)) so that a separable split cannot send the slope to infinity."""
    z = logit(scores.astype(np.float64))
    y = labels.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    w = np.array([1.0, 0.0])
    x = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(100):
        p = sigmoid(x @ w)
        grad = x.T @ (p - t)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(w[0]), float(w[1])


def ece(p: np.ndarray[Any, Any], y: np.ndarray[Any, Any], bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean |observed rate - mean score| over equal-width bins."""
    return float(sum(b["n"] * abs(b["observed"] - b["mean_score"]) for b in reliability(p, y, bins)) / len(p))


def reliability(p: np.ndarray[Any, Any], y: np.ndarray[Any, Any], bins: int = BINS) -> list[dict[str, Any]]:
    """Per equal-width score bin: its range, the number of images, their mean score and observed nodule rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for i in range(bins):
        m = which == i
        if m.any():
            out.append({"low": float(edges[i]), "high": float(edges[i + 1]), "n": int(m.sum()),
                        "mean_score": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


def calibrated_onnx(model: onnx.ModelProto, slope: float, intercept: float, scores_output: str) -> onnx.ModelProto:
    """The model with ``slope`` and ``intercept`` applied to the image logit in front of the scores' Sigmoid."""
    if any(p.key == CALIBRATED_KEY for p in model.metadata_props):
        raise SystemExit("model.onnx is already calibrated: run the export stage again first")
    graph = model.graph
    [node] = [n for n in graph.node if scores_output in n.output]
    if node.op_type != "Sigmoid":
        raise SystemExit(f"the scores come from a {node.op_type} node, not a Sigmoid: cannot calibrate in place")
    logit_in = node.input[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(slope, dtype=np.float32), "calibration_slope"),
        numpy_helper.from_array(np.array(intercept, dtype=np.float32), "calibration_intercept"),
    ])
    scaled, shifted = f"{logit_in}__calibration_scaled", f"{logit_in}__calibrated"
    mul = helper.make_node("Mul", [logit_in, "calibration_slope"], [scaled], name="calibration_mul")
    add = helper.make_node("Add", [scaled, "calibration_intercept"], [shifted], name="calibration_add")
    node.input[0] = shifted
    at = list(graph.node).index(node)
    graph.node.insert(at, add)
    graph.node.insert(at, mul)
    entry = model.metadata_props.add()
    entry.key = CALIBRATED_KEY
    entry.value = json.dumps({"method": "platt", "slope": slope, "intercept": intercept})
    onnx.checker.check_model(model)
    return model


def reliability_png(path: Path, curves: list[tuple[str, list[dict[str, Any]], tuple[int, int, int]]],
                    title: str, caption: str, side: int = 420) -> None:
    """Observed nodule rate against mean score per bin, one line per curve, the diagonal for perfect calibration."""
    left, top, right = 80, 50, 40
    width = left + side + right
    lines = wrap(caption, width - 30)
    height = top + side + 70 + 20 * (len(lines) + len(curves)) + 10
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)

    def xy(a: float, b: float) -> tuple[int, int]:
        return round(left + a * side), round(top + (1.0 - b) * side)

    put_text(canvas, title, 15, 30, TITLE_SCALE, BLACK, 2)
    for t in np.linspace(0.0, 1.0, 11):
        cv2.line(canvas, xy(t, 0.0), xy(t, 1.0), GRID, 1)
        cv2.line(canvas, xy(0.0, t), xy(1.0, t), GRID, 1)
    cv2.line(canvas, xy(0.0, 0.0), xy(1.0, 1.0), CHANCE, 1)
    cv2.rectangle(canvas, xy(0.0, 1.0), xy(1.0, 0.0), BLACK, 1)
    for t in np.linspace(0.0, 1.0, 6):
        label = f"{t:.1f}"
        x, y = xy(t, 0.0)
        put_text(canvas, label, x - text_width(label) // 2, y + 20)
        x, y = xy(0.0, t)
        put_text(canvas, label, x - 10 - text_width(label), y + 5)
    xl = "mean score in the bin"
    put_text(canvas, xl, left + (side - text_width(xl)) // 2, top + side + 45)
    put_text(canvas, "observed", 5, top - 8, TEXT_SCALE)
    for _, bins, colour in curves:
        pts = np.array([xy(b["mean_score"], b["observed"]) for b in bins], dtype=np.int32)
        if len(pts) >= 2:
            cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        for x, y in pts:
            cv2.circle(canvas, (int(x), int(y)), 4, colour, -1)
    y0 = top + side + 70
    for i, (name, _, colour) in enumerate(curves):
        cv2.line(canvas, (20, y0 + 20 * i - 4), (45, y0 + 20 * i - 4), colour, 3)
        put_text(canvas, name, 52, y0 + 20 * i)
    for i, line in enumerate(lines):
        put_text(canvas, line, 15, y0 + 20 * (len(curves) + i))
    path.write_bytes(encode_png(canvas))


def figures(p: np.ndarray[Any, Any], y: np.ndarray[Any, Any], sizes: np.ndarray[Any, Any], threshold: float
            ) -> dict[str, Any]:
    big = (~y) | (sizes >= TRIAGE_MIN_SIZE_MM)
    m = bootstrap_metrics(p, y, threshold, 1000, 0)
    m15 = bootstrap_metrics(p[big], y[big], threshold, 1000, 0)
    return {"sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "sensitivity_15mm_and_up": m15["sensitivity"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the recipe's data (labels_validation.csv)")
    parser.add_argument("--test-data", type=Path, default=None,
                        help="where labels_test.csv and its images are (default: --data); for the test reliability")
    args = parser.parse_args(argv)
    engine_dir: Path = args.engine_dir
    card = load_card(engine_dir)
    rows = read_labels(args.data / "labels_validation.csv", args.data)
    raw, failures, _ = score_all(card, args.data, rows, 8, 2)
    if failures:
        raise SystemExit(f"{len(failures)} validation images could not be decoded")
    s = np.array(raw, dtype=np.float64)
    y = np.array([r["label"] == "1" for r in rows])
    sizes = np.array([float(r["size_mm"] or 0.0) for r in rows])
    slope, intercept = fit_platt(s, y)
    p = sigmoid(slope * logit(s) + intercept)
    print(f"Platt: slope {slope:.4f}, intercept {intercept:.4f}; validation ECE {ece(s, y):.4f} -> {ece(p, y):.4f}")

    onnx_path = engine_dir / "model.onnx"
    model = calibrated_onnx(onnx.load(str(onnx_path)), slope, intercept, card.outputs.scores)
    data = model.SerializeToString()
    write_atomic(onnx_path, data)
    sha = hashlib.sha256(data).hexdigest()

    big = (~y) | (sizes >= TRIAGE_MIN_SIZE_MM)
    triage = threshold_for_sensitivity(p[big], y[big], TRIAGE_SENSITIVITY)
    high_spec = threshold_for_specificity(p, y, HIGH_SPECIFICITY)

    # The card now names the calibrated model, with the triage threshold: validate measures it from here.
    card_path = engine_dir / "model.yaml"
    text = card_path.read_text(encoding="utf-8")
    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    raw_card = yaml.safe_load(text)
    raw_card["sha256"] = sha
    raw_card["thresholds"] = {card.labels[0]: triage}
    raw_card.pop("drift_reference", None)  # computed with the uncalibrated scores: the drift stage remakes it
    card_path.write_text(head + yaml.safe_dump(raw_card, sort_keys=False, width=110), encoding="utf-8")

    # The calibrated model itself, through the daemon's path again: its scores must be the formula's.
    check, failures, _ = score_all(load_card(engine_dir), args.data, rows, 8, 2)
    diff = float(np.abs(np.array(check, dtype=np.float64) - p).max())
    print(f"calibrated model against the formula on {len(rows)} validation images: max abs diff {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the calibrated model does not give the calibrated scores")

    out: dict[str, Any] = {
        "method": "platt",
        "fitted_on": f"the validation split ({len(rows)} images, {int(y.sum())} with a nodule)",
        "slope": slope,
        "intercept": intercept,
        "sha256": sha,
        "ece": {"validation_before": ece(s, y), "validation_after": ece(p, y)},
        "reliability": {"validation_before": reliability(s, y), "validation_after": reliability(p, y)},
        "operating_points": {
            "triage": {"threshold": triage, "rule": TRIAGE_RULE, "meaning": TRIAGE_MEANING,
                       "validation": figures(p, y, sizes, triage)},
            "high_specificity": {"threshold": high_spec, "rule": HIGH_SPEC_RULE, "meaning": HIGH_SPEC_MEANING,
                                 "validation": figures(p, y, sizes, high_spec)},
        },
    }
    curves = [("validation, before calibration", out["reliability"]["validation_before"], (180, 180, 180)),
              ("validation, calibrated", out["reliability"]["validation_after"], (31, 119, 180))]
    test_dir = args.test_data or args.data
    if (test_dir / "labels_test.csv").exists():
        test_rows = read_labels(test_dir / "labels_test.csv", test_dir)
        pt_raw, _, _ = score_all(load_card(engine_dir), test_dir, test_rows, 8, 2)
        keep = [i for i, v in enumerate(pt_raw) if v is not None]
        pt = np.array([pt_raw[i] for i in keep], dtype=np.float64)
        yt = np.array([test_rows[i]["label"] == "1" for i in keep])
        out["ece"]["test_after"] = ece(pt, yt)
        out["reliability"]["test_after"] = reliability(pt, yt)
        curves.append(("test, calibrated", out["reliability"]["test_after"], (214, 39, 40)))
    report = engine_dir / "report"
    report.mkdir(exist_ok=True)
    (report / "calibration.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    eces = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in out["ece"].items())
    reliability_png(
        report / "reliability.png", curves, f"{card.name}: reliability of the nodule score",
        f"Observed share of radiographs with a nodule against the mean score, in {BINS} equal-width score bins "
        f"(bins with images only). On the diagonal a score of 0.3 means 3 in 10 such radiographs have a nodule. "
        f"Platt scaling fitted on the validation split (slope {slope:.3f}, intercept {intercept:.3f}). Expected "
        f"calibration error: {eces}. Simulated radiographs only; not clinical performance.",
    )
    print(json.dumps({k: v for k, v in out.items() if k != "reliability"}, indent=2))
    return 0 if math.isfinite(slope) else 1


if __name__ == "__main__":
    sys.exit(main())
