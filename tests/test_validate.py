"""edge_agent.validate: the statistics, the PNG, and a real model (the bundled cxr-demo) over the smoke data set."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import ModelDeployment
from edge_agent.errors import ModelError
from edge_agent.inference.card import load_card
from edge_agent.inference.factory import create_engine
from edge_agent.inference.preprocess import load_instance
from edge_agent.validate.plots import CURVE, OPERATING_POINT, RocText, roc_png
from edge_agent.validate.report import ValidationReport, roc_text, write_reports
from edge_agent.validate.run import validate
from edge_agent.validate.stats import (
    Estimate,
    GroupReport,
    ValidationInputError,
    bootstrap_estimates,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from tests.test_recipe_smoke import run_smoke

REPO = Path(__file__).resolve().parent.parent
# validate is about the mechanics (same preprocessing and engine as the daemon, the statistics, the reports), so
# any one-label chest model does; cxr-demo is always in the repository.
MODEL = REPO / "engines" / "cxr-demo"


# --- pure statistics --------------------------------------------------------------------------------


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return float(wins / (len(pos) * len(neg)))


def test_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(60), 1)  # rounding makes plenty of ties
    labels = rng.integers(0, 2, 60)
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))


def test_auc_edge_cases() -> None:
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert roc_auc([0.1, 0.2], [1, 1]) is None
    assert roc_auc([], []) is None


def test_roc_curve_runs_from_origin_to_one_one_and_never_goes_back() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 50)
    points = roc_curve(rng.random(50) + labels * 0.3, labels)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(points))
    assert roc_curve([0.1, 0.2], [0, 0]) == []


def test_threshold_is_the_highest_that_keeps_the_target_sensitivity() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) * 0.5 + labels * 0.3
    t = threshold_for_sensitivity(scores, labels, 0.9)
    positives = np.sort(scores[labels == 1])
    assert (positives >= t).mean() >= 0.9
    # Rounded down by at most 1e-6, and the next positive score up would lose the target.
    exact = positives[positives >= t][0]
    assert exact - 1e-6 <= t <= exact
    higher = positives[positives > exact][0]
    assert (positives >= higher).mean() < 0.9
    with pytest.raises(ValidationInputError, match="without positive"):
        threshold_for_sensitivity([0.1, 0.2], [0, 0], 0.9)


def test_threshold_is_the_lowest_that_keeps_the_target_specificity() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300) * 0.5 + labels * 0.3
    t = threshold_for_specificity(scores, labels, 0.95)
    negatives = np.sort(scores[labels == 0])
    assert (negatives < t).mean() >= 0.95
    # Rounded up by at most 1e-6 above the negative it must clear; one notch lower would flag it too.
    cleared = negatives[negatives < t][-1]
    assert cleared < t <= cleared + 1e-6 + 1e-12
    assert (negatives < cleared).mean() < 0.95
    with pytest.raises(ValidationInputError, match="without negative"):
        threshold_for_specificity([0.1, 0.2], [1, 1], 0.95)


def test_bootstrap_intervals_bracket_the_estimate_and_are_reproducible() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 120)
    scores = rng.random(120) + labels * 0.4
    first = bootstrap_estimates(scores, labels, 0.7, 300, seed=1)
    assert first == bootstrap_estimates(scores, labels, 0.7, 300, seed=1)
    for est in first:
        assert est.value is not None and est.low is not None and est.high is not None
        assert 0.0 <= est.low <= est.value <= est.high <= 1.0
    sens, spec, auc = bootstrap_estimates(scores[labels == 1], labels[labels == 1], 0.7, 50, seed=1)
    assert spec.value is None and auc.value is None and sens.value is not None


def read_png(data: bytes) -> tuple[int, int, np.ndarray]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + width * 3)
    return width, height, raw[:, 1:].reshape(height, width, 3)


def ink(rgb: np.ndarray) -> np.ndarray:
    """Where something dark (text, axes) is drawn."""
    return np.asarray(rgb.max(axis=-1) < 100)


def test_roc_png_is_a_valid_image_with_axes_words_curve_and_point() -> None:
    text = RocText(title="ROC curve of m 1, label 'x'", curve="ROC curve, AUC 0.900", operating_point=("a", "b"),
                   caption="A caption long enough to wrap onto a second line below the plot, " * 3)
    width, height, rgb = read_png(roc_png([(0.0, 0.0), (0.1, 0.8), (1.0, 1.0)], operating_point=(0.1, 0.8), text=text))
    assert width == 560 and height > 560
    assert ((rgb == CURVE).all(axis=-1)).sum() > 300  # the curve (and its legend line)
    assert ((rgb == OPERATING_POINT).all(axis=-1)).sum() > 100  # the point and its legend mark
    left, top, side = 80, 50, 440
    assert ink(rgb[:top]).sum() > 200  # the title
    assert ink(rgb[top:top + side, :left - 30]).sum() > 200  # the y axis' label, bottom to top
    assert ink(rgb[top + side + 25 : top + side + 55, left:left + side]).sum() > 200  # the x axis' label
    assert ink(rgb[top + side + 60 :]).sum() > 500  # the caption, wrapped over several lines
    # Without words, a plain plot still comes out.
    assert read_png(roc_png([(0.0, 0.0), (1.0, 1.0)]))[0] == 560


def test_the_roc_words_let_a_reader_understand_the_plot_alone(tmp_path: Path) -> None:
    overall = GroupReport("all", "all", 100, 40, 60, Estimate(0.75, 0.6, 0.85), Estimate(0.5, 0.4, 0.6),
                          Estimate(0.71234, 0.65, 0.77))
    report = ValidationReport("cxr-nodule", "1.0.0-sim", "nodule", 0.288752, 100, [], overall, [],
                              [(0.0, 0.0), (0.5, 0.75), (1.0, 1.0)], [], 1000, 1.0, statement="Not for diagnosis.")
    words = roc_text(report)
    assert words.title == "ROC curve of cxr-nodule 1.0.0-sim, label 'nodule'"
    assert words.curve == "ROC curve, AUC 0.712 (95% CI 0.650-0.770)"
    assert words.operating_point == ("card threshold 0.288752:", "sensitivity 0.750, specificity 0.500")
    assert "100 images (40 with 'nodule', 60 without)" in words.caption
    assert "1000 resamples" in words.caption and words.caption.endswith("Not for diagnosis.")
    assert words.x_label == "False positive rate (1 - specificity)"
    assert words.y_label == "True positive rate (sensitivity)"
    assert report.operating_point == (0.5, 0.75)
    # One class only: no curve, no point, and the caption says why.
    lonely = ValidationReport("m", "1", "x", 0.5, 3, [], GroupReport(
        "all", "all", 3, 0, 3, Estimate(None, None, None), Estimate(1.0, None, None), Estimate(None, None, None)
    ), [], [], [], 10, 0.1)
    assert lonely.operating_point is None and roc_text(lonely).operating_point == ()
    assert "No curve" in roc_text(lonely).caption and roc_text(lonely).curve == "ROC curve (AUC n/a)"
    write_reports(lonely, tmp_path)
    assert read_png((tmp_path / "roc.png").read_bytes())[0] == 560


# --- a real model over real (simulated) DICOM -------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "data"
    run_smoke(out)
    return out


def test_validate_reports_figures_subgroups_and_plot(smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = validate(MODEL, smoke, smoke / "labels.csv", out, bootstrap=100)
    rows = smoke_rows(smoke)
    assert report.model == "cxr-demo" and report.images == len(rows) and not report.failures
    assert report.overall.positives == sum(r["label"] == "1" for r in rows)
    assert report.threshold == load_card(MODEL).thresholds["nodule"]
    for est in (report.overall.sensitivity, report.overall.specificity, report.overall.auc):
        assert est.value is not None and 0.0 <= est.value <= 1.0
    columns = {g.column for g in report.subgroups}
    assert {"size_bin", "location", "anatomy_source", "Manufacturer", "ViewPosition"} <= columns
    # Identifiers and raw measurements are not subgroups by default.
    assert not columns & {"file", "label", "patient_id", "size_mm", "row", "col"}
    manufacturers = {g.value: g.n for g in report.subgroups if g.column == "Manufacturer"}
    assert sum(manufacturers.values()) == len(rows)
    # Nodule sizes exist only on positives: each size bin is scored against every negative image.
    sizes = [g for g in report.subgroups if g.column == "size_bin" and g.value != "none"]
    assert sizes and all(g.against_all_negatives and g.negatives == report.overall.negatives for g in sizes)
    assert sum(g.positives for g in sizes) == report.overall.positives
    assert all(g.auc.value is not None for g in sizes)
    [none] = [g for g in report.subgroups if g.column == "size_bin" and g.value == "none"]
    assert not none.against_all_negatives and none.positives == 0
    data = json.loads((out / "report.json").read_text())
    assert data["overall"]["n"] == len(rows) and data["threshold"] == report.threshold
    assert "ROC AUC" in (out / "report.md").read_text()
    assert read_png((out / "roc.png").read_bytes())[0] == 560
    # No patient identifiers from the files or the CSV end up in the reports.
    for name in ("report.json", "report.md"):
        assert "SIM-PHANTOM" not in (out / name).read_text()


def test_scores_are_the_daemons_scores_for_each_file(smoke: Path, tmp_path: Path) -> None:
    report = validate(MODEL, smoke, smoke / "labels.csv", tmp_path, bootstrap=20)
    card = load_card(MODEL)
    engine = create_engine(card, ModelDeployment(max_batch=1))
    engine.load()
    try:
        for name, _, score in report.cases:
            (tensor,) = load_instance(smoke / name, card)
            alone = float(engine.infer(tensor[None]).scores[0, 0])
            assert score == pytest.approx(alone, abs=1e-5)  # batching does not change a score
    finally:
        engine.close()


def test_explicit_subgroups_and_patient_attributes_refused(smoke: Path, tmp_path: Path) -> None:
    report = validate(MODEL, smoke, smoke / "labels.csv", tmp_path, bootstrap=20, subgroups=["split", "Modality"])
    assert [g.column for g in report.subgroups] == ["split"] * 3 + ["Modality"] * len(
        {g.value for g in report.subgroups if g.column == "Modality"}
    )
    with pytest.raises(ValidationInputError, match="PatientID"):
        validate(MODEL, smoke, smoke / "labels.csv", tmp_path, bootstrap=20, subgroups=["PatientID"])


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def smoke_rows(smoke: Path) -> list[dict[str, str]]:
    with (smoke / "labels.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_undecodable_files_are_listed_not_fatal(smoke: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(smoke, data)
    (data / "images" / "broken.dcm").write_bytes(b"not a DICOM file at all")
    rows = smoke_rows(smoke)
    labels = write_csv(tmp_path / "labels.csv", [*rows, {**rows[0], "file": "images/broken.dcm"}])
    report = validate(MODEL, data, labels, tmp_path / "out", bootstrap=20)
    assert report.images == len(rows)
    assert [f for f, _ in report.failures] == ["images/broken.dcm"]
    assert "broken.dcm" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_decodable_is_an_error(smoke: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.dcm").write_bytes(b"junk")
    labels = write_csv(tmp_path / "labels.csv", [{"file": "bad.dcm", "label": "1"}])
    with pytest.raises(ValidationInputError, match="none of the 1 files"):
        validate(MODEL, tmp_path, labels, tmp_path / "out", bootstrap=20)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"file": "images/00000.dcm"}], "missing column"),
        ([{"file": "images/00000.dcm", "label": "yes"}], "label must be 0 or 1"),
        ([{"file": "../outside.dcm", "label": "1"}], "outside the data folder"),
        ([{"file": "/etc/passwd", "label": "1"}], "outside the data folder"),
    ],
)
def test_bad_labels_csv_is_refused_with_the_reason(
    smoke: Path, tmp_path: Path, rows: list[dict[str, str]], message: str
) -> None:
    labels = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(ValidationInputError, match=message):
        validate(MODEL, smoke, labels, tmp_path / "out", bootstrap=20)


def test_missing_labels_csv_and_empty_csv(smoke: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationInputError, match="cannot read"):
        validate(MODEL, smoke, tmp_path / "nope.csv", tmp_path / "out")
    (tmp_path / "empty.csv").write_text("file,label\n")
    with pytest.raises(ValidationInputError, match="no rows"):
        validate(MODEL, smoke, tmp_path / "empty.csv", tmp_path / "out")


def test_a_model_that_does_not_match_its_card_is_refused(smoke: Path, tmp_path: Path) -> None:
    model = tmp_path / "cxr-demo"
    shutil.copytree(MODEL, model)
    with (model / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        validate(model, smoke, smoke / "labels.csv", tmp_path / "out")


def test_validate_command_line(smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "validate",
            "cxr-demo",
            str(smoke),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--subgroup",
            "size_bin",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "ROC AUC" in result.stdout and (out / "report.json").is_file() and (out / "roc.png").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "edge_agent", "validate", "cxr-demo", str(smoke), "--labels", str(tmp_path / "no.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def card_with_figures(tmp_path: Path, figures: dict[str, object]) -> Path:
    """A copy of cxr-demo whose card states validation figures (as a trained model's card does)."""
    import yaml

    model = tmp_path / "cxr-demo"
    shutil.copytree(MODEL, model)
    card = yaml.safe_load((model / "model.yaml").read_text())
    card["statement"] = "Simulated-lesion detectability, not clinical performance; not for diagnosis."
    card["training_data"] = "none (untrained)"
    card["validation"] = figures
    (model / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return model


def test_the_cards_own_figures_are_checked_against_the_measured_ones(smoke: Path, tmp_path: Path) -> None:
    measured = validate(MODEL, smoke, smoke / "labels.csv", tmp_path / "first", bootstrap=50)
    assert measured.against_card == [] and measured.reproduces_card is None  # cxr-demo states no figures
    o = measured.overall

    def fig(e: object) -> dict[str, object]:
        return {"value": e.value, "low": e.low, "high": e.high}  # type: ignore[attr-defined]

    figures = {
        "data": "smoke split",
        "command": "edge-agent validate cxr-demo DATA",
        "operating_point": "fixed 0.5",
        "images": o.n,
        "positives": o.positives,
        "auc": fig(o.auc),
        "sensitivity": fig(o.sensitivity),
        "specificity": fig(o.specificity),
        "sensitivity_by": {"size_bin=4-6": fig(o.sensitivity)},
        "controls": {"null_insertion": {"value": 0.5, "low": 0.45, "high": 0.55}},
        "smallest_reliable": None,
    }
    again = validate(card_with_figures(tmp_path / "a", figures), smoke, smoke / "labels.csv", tmp_path / "a-out")
    assert again.reproduces_card is True
    assert {m for m, *_ in again.against_card} == {"images", "positives", "auc", "sensitivity", "specificity"}
    text = (tmp_path / "a-out" / "report.md").read_text()
    assert "Against the model card: reproduced" in text and "not for diagnosis" in text
    assert json.loads((tmp_path / "a-out" / "report.json").read_text())["reproduces_card"] is True

    assert o.auc.value is not None
    wrong = {**figures, "auc": {"value": round(1.0 - o.auc.value, 3) if o.auc.value != 0.5 else 0.9}}
    off = validate(card_with_figures(tmp_path / "b", wrong), smoke, smoke / "labels.csv", tmp_path / "b-out")
    assert off.reproduces_card is False
    assert [same for m, _, _, same in off.against_card if m == "auc"] == [False]
    assert "NOT reproduced" in (tmp_path / "b-out" / "report.md").read_text()


def test_card_validation_figures_are_checked_strictly(tmp_path: Path) -> None:
    figures = {
        "data": "x",
        "command": "y",
        "operating_point": "z",
        "images": 10,
        "positives": 5,
        "auc": {"value": 1.7},
        "sensitivity": {"value": 0.5},
        "specificity": {"value": 0.5},
    }
    with pytest.raises(ModelError, match=r"validation\.auc\.value"):
        load_card(card_with_figures(tmp_path / "a", figures))
    with pytest.raises(ModelError, match=r"validation\.speed"):
        load_card(card_with_figures(tmp_path / "b", {**figures, "auc": {"value": 0.7}, "speed": 3}))
