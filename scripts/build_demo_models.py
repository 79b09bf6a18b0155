#!/usr/bin/env python3
"""Build the default demo models (engines/cxr-demo, engines/ct-demo) deterministically.

These are UNTRAINED small CNNs with seeded He-initialised weights: they exercise the whole pipeline
(preprocessing, batching, heat maps, triage) with a real ONNX graph, but their scores carry no
clinical meaning. The same seed gives byte-identical model.onnx files on every machine, so the
SHA-256 in each card stays valid and a rebuild can be checked against the committed files.

A card's ``drift_reference`` is not built here: ``edge-agent validate MODEL DATA --drift-reference`` measures
it (the command is in the section) and writes it into the card. A rebuild keeps the one a card already holds
when it was made for the same model file (its ``model_sha256``), and drops it otherwise.

Usage: python scripts/build_demo_models.py [--out engines] [--check] [--references-from engines]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference.card import write_drift_reference

OPSET = 17
# IR 8 keeps the files loadable by older ONNX Runtime and TensorRT parsers.
IR_VERSION = 8
INPUT_SIZE = 256
CHANNELS = (8, 16, 16, 32)  # four stride-2 convs: 256 -> 16, so the heat map is 16x16


@dataclass(frozen=True)
class DemoSpec:
    name: str
    seed: int
    labels: tuple[str, ...]
    granularity: str
    description: str
    intended_use: str
    preprocessing: dict[str, Any]


def _preprocessing(keep_aspect: bool) -> dict[str, Any]:
    """The window/resize/normalise every demo card uses; only letterboxing differs."""
    return {
        "window": "auto",
        "invert_monochrome1": True,
        "rescale": True,
        "resize": [INPUT_SIZE, INPUT_SIZE],
        "keep_aspect": keep_aspect,
        "normalise": {"mean": 0.5, "std": 0.25},
    }


DEMOS = (
    DemoSpec(
        name="cxr-demo",
        seed=0,
        labels=("nodule",),
        granularity="image",
        description=(
            "UNTRAINED demonstration model for chest radiographs (CR/DX): a small CNN with seeded random "
            "weights that outputs an image-level score and a 16x16 class activation map. Its scores are "
            "NOT clinically meaningful. It exists to exercise the pipeline until a trained model lands."
        ),
        intended_use="Pipeline testing and demonstration only. Not for clinical use.",
        preprocessing=_preprocessing(keep_aspect=True),
    ),
    DemoSpec(
        name="ct-demo",
        seed=1,
        labels=("abnormal",),
        granularity="slice",
        description=(
            "UNTRAINED demonstration model for CT/MR slices: a small CNN with seeded random weights that "
            "outputs a slice-level score and a 16x16 class activation map. Its scores are NOT clinically "
            "meaningful. It exists to exercise the pipeline until a trained model lands."
        ),
        intended_use="Pipeline testing and demonstration only. Not for clinical use.",
        preprocessing=_preprocessing(keep_aspect=False),
    ),
)


def _he(rng: np.random.Generator, out_ch: int, in_ch: int, k: int) -> np.ndarray:
    fan_in = in_ch * k * k
    return np.asarray(rng.standard_normal((out_ch, in_ch, k, k)) * np.sqrt(2.0 / fan_in), dtype=np.float32)


def build_model(spec: DemoSpec) -> onnx.ModelProto:
    """conv3x3/2+ReLU x4 -> 1x1 conv (class activation map) -> GAP+sigmoid scores, sigmoid heat map."""
    rng = np.random.default_rng(spec.seed)
    n_labels = len(spec.labels)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev, in_ch = "image", 1
    for i, out_ch in enumerate(CHANNELS):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits.append(numpy_helper.from_array(_he(rng, out_ch, in_ch, 3), w))
        inits.append(numpy_helper.from_array(np.zeros(out_ch, np.float32), b))
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, w, b],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        prev, in_ch = f"relu{i}", out_ch
    inits.append(numpy_helper.from_array(_he(rng, n_labels, in_ch, 1), "cam.weight"))
    inits.append(numpy_helper.from_array(np.zeros(n_labels, np.float32), "cam.bias"))
    nodes.append(helper.make_node("Conv", [prev, "cam.weight", "cam.bias"], ["cam"], name="cam", kernel_shape=[1, 1]))
    nodes.append(helper.make_node("GlobalAveragePool", ["cam"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["logits"], name="flatten", axis=1))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["scores"], name="scores"))
    nodes.append(helper.make_node("Sigmoid", ["cam"], ["heatmap"], name="heatmap"))
    side = INPUT_SIZE // 2 ** len(CHANNELS)
    graph = helper.make_graph(
        nodes,
        spec.name.replace("-", "_"),
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, INPUT_SIZE, INPUT_SIZE])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_labels]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", n_labels, side, side]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edge-agent scripts/build_demo_models.py",
        producer_version="1",
        doc_string=f"{spec.name}: UNTRAINED demonstration model (seed {spec.seed}); scores are not clinically "
        "meaningful.",
    )
    onnx.checker.check_model(model)
    return model


def card_for(spec: DemoSpec, sha256: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": "0.1.0-untrained",
        "description": spec.description,
        "intended_use": spec.intended_use,
        "trained": False,
        "sha256": sha256,
        "granularity": spec.granularity,
        "inputs": {"name": "image", "shape": [1, INPUT_SIZE, INPUT_SIZE], "dtype": "float32"},
        "outputs": {"scores": "scores", "heatmap": "heatmap"},
        "labels": list(spec.labels),
        "thresholds": dict.fromkeys(spec.labels, 0.5),
        "aggregation": "max",
        "batch": {"min": 1, "opt": 8, "max": 16},
        "preprocessing": spec.preprocessing,
    }


def kept_drift_reference(card_path: Path, sha256: str) -> dict[str, Any] | None:
    """The drift_reference a card holds for the model file with ``sha256``, if any (see the module's docstring)."""
    try:
        raw = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    reference = raw.get("drift_reference") if isinstance(raw, dict) else None
    if isinstance(reference, dict) and reference.get("model_sha256") == sha256:
        return reference
    return None


def build(out: Path, references_from: Path | None = None) -> dict[str, str]:
    """Write <out>/<name>/model.onnx and model.yaml for every demo model; return name -> sha256.

    Drift references are kept from the cards in ``references_from`` (default: ``out``).
    """
    hashes: dict[str, str] = {}
    for spec in DEMOS:
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        data = build_model(spec).SerializeToString(deterministic=True)
        sha = hashlib.sha256(data).hexdigest()
        reference = kept_drift_reference((references_from or out) / spec.name / "model.yaml", sha)
        (folder / "model.onnx").write_bytes(data)
        header = (
            "# Model card. Generated by scripts/build_demo_models.py; rebuild rather than edit.\n"
            "# UNTRAINED: scores are not clinically meaningful.\n"
        )
        body = yaml.safe_dump(card_for(spec, sha), sort_keys=False, width=100, allow_unicode=False)
        (folder / "model.yaml").write_text(header + body, encoding="utf-8")
        if reference is not None:
            write_drift_reference(folder, reference)
        hashes[spec.name] = sha
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "engines")
    parser.add_argument(
        "--check",
        action="store_true",
        help="build into a temporary folder and fail unless --out holds exactly those files",
    )
    parser.add_argument(
        "--references-from",
        type=Path,
        default=None,
        help="keep the drift references of the cards in this folder (default: --out)",
    )
    args = parser.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            built = build(Path(tmp), references_from=args.references_from or args.out)
            stale = [
                name
                for name in built
                for f in ("model.onnx", "model.yaml")
                if (Path(tmp) / name / f).read_bytes() != (args.out / name / f).read_bytes()
            ]
        if stale:
            print(
                f"out of date in {args.out}: {', '.join(sorted(set(stale)))}; run {Path(__file__).name}",
                file=sys.stderr,
            )
            return 1
        print(f"{', '.join(built)}: up to date")
        return 0
    for name, sha in build(args.out, args.references_from).items():
        print(f"{name}: {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
