"""The model on a real chest radiograph that no stage of the recipe used: does what it learned transfer?

    python transfer.py --engine-dir engines/cxr-nodule          (run.sh stage transfer, after calibrate)

The radiograph is RG1 from the pydicom-data wheel (a real PA chest CR, 1955x1841, in four encodings), which shows
several real round masses in both lungs. Six of them are marked below by eye (boxes in the image's own geometry,
as fractions of its width and height; marked on a display of the image by the developer, not by a radiologist).
For each encoding: the calibrated score, whether each operating point flags it, where the heat map's hottest cell
is, and how much of the heat map's mass falls in the marked boxes against their share of the image (above 1: the
heat map points at the masses more than at the rest). The daemon's own overlay picture
(of the uncompressed encoding) is written under report/transfer/.

What it can show is limited: one image, a positive one, no negative real radiograph in any package here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data

from edge_agent.config import ModelDeployment
from edge_agent.dicom.pixels import decode_frames
from edge_agent.inference.card import load_card
from edge_agent.inference.factory import create_engine
from edge_agent.inference.verify import dicom_inputs
from edge_agent.overlay import OverlayText, display_size, heat_on_image, render_overlay
from edge_agent.png import write_png

DATA_STORE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data"
FILES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
# (x0, y0, x1, y1) as fractions of the image's width and height; viewer's left is the patient's right.
MASSES = (
    (0.150, 0.318, 0.250, 0.412),  # right mid zone, lateral
    (0.213, 0.524, 0.325, 0.630),  # right lower zone, near the hilum
    (0.100, 0.636, 0.188, 0.718),  # right lower zone, lateral
    (0.694, 0.306, 0.781, 0.389),  # left mid zone, upper
    (0.750, 0.389, 0.850, 0.483),  # left mid zone, lateral
    (0.738, 0.548, 0.850, 0.654),  # left lower zone
)
COMMAND = "engines/cxr-nodule/recipe/run.sh transfer"


def in_boxes(shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in MASSES:
        mask[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = True
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    card = load_card(args.engine_dir)
    engine = create_engine(card, ModelDeployment(max_batch=1, intra_op_threads=2))
    engine.load()
    points = {name: float(op.threshold) for name, op in card.operating_points.items()}
    calibration = args.engine_dir / "report" / "calibration.json"
    if not points and calibration.exists():  # before the card stage has written them into the card
        points = {name: float(op["threshold"])
                  for name, op in json.loads(calibration.read_text())["operating_points"].items()}
    out_dir = args.engine_dir / "report" / "transfer"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in FILES:
        path = DATA_STORE / name
        x = dicom_inputs(card, [path], 1)
        got = engine.infer(np.ascontiguousarray(x[:1]))
        score = float(got.scores[0, 0])
        assert got.heatmap is not None
        heat = got.heatmap[0, 0]
        frame = decode_frames(path)[0]
        size = display_size(frame.shape)
        on_image = heat_on_image(heat, card.preprocessing, frame.shape, size).astype(np.float64)
        boxes = in_boxes(on_image.shape)
        enrichment = float(on_image[boxes].sum() / on_image.sum()) / float(boxes.mean())
        peak = np.unravel_index(int(np.argmax(on_image)), on_image.shape)
        peak_frac = (peak[1] / on_image.shape[1], peak[0] / on_image.shape[0])
        overlay = out_dir / f"{Path(name).stem}.overlay.png"
        if name == FILES[0]:  # the other encodings' pictures look the same (their scores and maps are compared)
            picture = render_overlay(path, 0, card.preprocessing, heat, None, OverlayText(
                card.name, card.labels[0], score, float(card.thresholds[card.labels[0]])))
            write_png(overlay, picture)
        results.append({
            "file": name,
            "score": score,
            "flagged": {op: score >= t for op, t in points.items()},
            "heatmap_peak_xy": [round(peak_frac[0], 3), round(peak_frac[1], 3)],
            "peak_on_a_marked_mass": bool(boxes[peak]),
            "heat_in_marked_masses_vs_their_area": round(enrichment, 3),
            "heatmap_cells_max": float(heat.max()),
            "overlay": str(overlay.relative_to(args.engine_dir)) if overlay.exists() else None,
        })
    first = results[0]
    flags = ", ".join(f"{op} {'flags it' if f else 'does not flag it'}" for op, f in first["flagged"].items())
    spread = max(r["score"] for r in results) - min(r["score"] for r in results)
    summary = (
        f"RG1 (real PA chest CR with several round masses; pydicom-data): calibrated score {first['score']:.3f} "
        f"({flags}; the four encodings, lossy JPEG 2000 included, within {spread:.3f} of each other). "
        f"Heat map: hottest point at x {first['heatmap_peak_xy'][0]:.2f}, y {first['heatmap_peak_xy'][1]:.2f} of the "
        f"image (from its top left), {'on' if first['peak_on_a_marked_mass'] else 'off'} the masses marked by eye; "
        f"{first['heat_in_marked_masses_vs_their_area']:.2f}x as much heat in the six marked masses as their share "
        "of the image (1.0 = no preference). One positive image: it cannot show specificity on real radiographs."
    )
    report = {"data": "RG1_UNCR/UNCI/J2KR/J2KI.dcm from pydicom-data 1.0.0 (a real chest radiograph no stage used)",
              "masses_marked_by_eye": MASSES, "results": results,
              "checks": [{"data": "RG1 from the pydicom-data 1.0.0 wheel: a real PA chest CR, 1955x1841, with several "
                          "round masses in both lungs; never used to train, tune or choose a threshold",
                          "command": COMMAND, "result": summary}]}
    (args.engine_dir / "report" / "transfer.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
