"""The default daemon flags simulated nodules: recipe --demo radiographs in, cxr-nodule findings out.

The images come from the cxr-nodule data recipe (simulate.py --demo: full-size phantom radiographs,
half with a 20-30 mm solid nodule in the open lung; the range the model card says is reliably
found) and go through the real daemon on the default configuration, over dcmtk's storescu, to a
real nats-server. Nothing here was used to train the model or to choose its threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest

from tests.daemon import Daemon, read_findings, storescu, write_config
from tests.test_e2e import SCHEMA
from tests.test_recipe_smoke import run_simulate

pytestmark = pytest.mark.e2e

# How far outside the hottest region's box the nodule centre may lie: one CAM cell (the map is 8x8 cells).
CELL = 1 / 8


def test_default_daemon_flags_simulated_nodules_and_points_at_them(nats_server: Any, tmp_path: Path) -> None:
    rows = run_simulate(tmp_path / "demo", "--demo", timeout=120)
    positives = [r for r in rows if r["label"] == "1"]
    negatives = [r for r in rows if r["label"] == "0"]
    assert len(positives) == len(negatives) == 4
    d = Daemon(write_config(tmp_path, nats_server.url), tmp_path)
    try:
        d.start()
        files = [tmp_path / "demo" / r["file"] for r in rows]
        result = storescu(d.dicom_port, *files)
        assert result.returncode == 0, result.stderr
        findings = read_findings(nats_server.url, len(rows))
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.terminate()
        d.close()
    by_series = {f["series_instance_uid"]: f for f in findings}
    scores: dict[str, list[float]] = {"0": [], "1": []}
    for row, path in zip(rows, files, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        finding = by_series[ds.SeriesInstanceUID]
        jsonschema.validate(finding, SCHEMA)
        assert finding["model"]["name"] == "cxr-nodule" and finding["route"] == "chest-radiograph"
        [result_] = finding["labels"]
        scores[row["label"]].append(result_["score"])
        if row["label"] != "1":
            continue
        # Every 20-30 mm solid nodule is flagged, and the heat map's hottest region is where the nodule is.
        assert result_["positive"], (row["size_mm"], row["location"], result_["score"], result_["threshold"])
        assert finding["priority"] == "urgent"
        box = finding["heatmap"]["bbox"]
        y, x = float(row["row"]) / int(ds.Rows), float(row["col"]) / int(ds.Columns)
        assert box["x0"] - CELL <= x <= box["x1"] + CELL and box["y0"] - CELL <= y <= box["y1"] + CELL, (box, x, y)
    assert min(scores["1"]) > sum(scores["0"]) / len(scores["0"])
