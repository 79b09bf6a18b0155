"""Export the trained checkpoint to ONNX (dynamic batch; outputs scores [N,1] and heatmap [N,1,32,32]).

    python export.py --checkpoint DIR/checkpoint.pt --train-report DIR/train_report.json --data DATA
                     --engine-dir engines/cxr-nodule

Checks the ONNX model against torch on real preprocessed images (max abs difference reported, and
refused above a tolerance), scores the validation split with the exported model itself (ONNX Runtime)
to choose the card's threshold for the stated operating point, then writes model.onnx and the card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_card import write_card
from train import INPUT_SIZE, build_model, load_tensors, read_rows

from edge_agent.validate.stats import bootstrap_metrics, threshold_for_sensitivity

OPSET = 17
TOLERANCE = 1e-4
# The operating point: 90% sensitivity for the nodules the model is meant to find (20-30 mm) on the
# validation split. Over all sizes it would be set by 4-10 mm nodules the model cannot see, and the
# threshold would flag four normal images in five.
TARGET_SENSITIVITY = 0.90
TARGET_MIN_SIZE_MM = 20.0
OPERATING_POINT = (
    f"{TARGET_SENSITIVITY:.0%} sensitivity for nodules of {TARGET_MIN_SIZE_MM:.0f}-30 mm on the validation split "
    "(scored by the exported ONNX model)"
)


def export(checkpoint: Path, onnx_path: Path) -> torch.nn.Module:
    model = build_model(pretrained=False)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    dummy = torch.zeros(2, 1, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(onnx_path),
            input_names=["image"],
            output_names=["scores", "heatmap"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}, "heatmap": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    return model


def compare(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray[Any, Any]) -> dict[str, float]:
    """Max abs differences torch vs ONNX Runtime, at batch len(x) and at batch 1."""
    with torch.no_grad():
        t_scores, t_heat = (v.numpy() for v in model(torch.from_numpy(x)))
    o_scores, o_heat = session.run(["scores", "heatmap"], {"image": x})
    one_scores, _ = session.run(["scores", "heatmap"], {"image": x[:1]})
    return {
        "images": len(x),
        "max_abs_diff_scores": float(np.abs(t_scores - o_scores).max()),
        "max_abs_diff_heatmap": float(np.abs(t_heat - o_heat).max()),
        "max_abs_diff_batch1_vs_batch": float(np.abs(one_scores[0] - o_scores[0]).max()),
        "heatmap_shape": list(o_heat.shape[1:]),
    }


def choose_threshold(
    session: ort.InferenceSession, x: np.ndarray[Any, Any], rows: list[dict[str, str]]
) -> dict[str, Any]:
    """The card's threshold from the exported model's validation scores, and the validation figures at it."""
    scores = np.concatenate(
        [session.run(["scores"], {"image": np.ascontiguousarray(x[i : i + 32])})[0][:, 0] for i in range(0, len(x), 32)]
    ).astype(np.float64)
    labels = np.array([int(r["label"]) for r in rows])
    sizes = np.array([float(r["size_mm"] or 0.0) for r in rows])
    target = (labels == 0) | (sizes >= TARGET_MIN_SIZE_MM)
    threshold = threshold_for_sensitivity(scores[target], labels[target], TARGET_SENSITIVITY)
    return {
        "operating_point": OPERATING_POINT,
        "threshold": threshold,
        "validation": bootstrap_metrics(scores, labels, threshold, 1000, 0),
        "validation_20_30mm": bootstrap_metrics(scores[target], labels[target], threshold, 1000, 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--train-report", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="simulated data (test images for the check)")
    parser.add_argument("--engine-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    onnx_path = args.engine_dir / "model.onnx"
    model = export(args.checkpoint, onnx_path)
    rows = read_rows(args.data / "labels.csv")
    tensors = load_tensors(args.data, rows)
    test = [i for i, r in enumerate(rows) if r["split"] == "test"][:16]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    check = compare(model, session, np.ascontiguousarray(tensors[test]))
    print(json.dumps(check, indent=2))
    if max(check["max_abs_diff_scores"], check["max_abs_diff_heatmap"]) > TOLERANCE:
        raise SystemExit(f"ONNX and torch disagree by more than {TOLERANCE}")
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    train_report = json.loads(args.train_report.read_text())
    validation = [i for i, r in enumerate(rows) if r["split"] == "validation"]
    chosen = choose_threshold(session, tensors[validation], [rows[i] for i in validation])
    print(json.dumps({k: v for k, v in chosen.items() if k != "operating_point"}, indent=2))
    check.update(
        sha256=sha,
        bytes=onnx_path.stat().st_size,
        opset=OPSET,
        torch=torch.__version__,
        onnxruntime=ort.__version__,
        trained_on=train_report.get("device", "cpu"),
        **chosen,
    )
    report_dir = args.engine_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "export.json").write_text(json.dumps(check, indent=2) + "\n")
    write_card(args.engine_dir, sha, float(chosen["threshold"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
