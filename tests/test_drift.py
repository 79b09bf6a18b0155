"""Model monitoring (issue 10): drift references in cards, the index, and shifted inputs through the real pipeline.

The images are variants of a real CT slice (pydicom's CT_small): each with its own gain, offset, noise and
position, so that two sets drawn the same way are alike without being equal. "Shifted" sets are 100 HU
brighter (a miscalibrated scanner) or come from another manufacturer. They go through the daemon's own
decoding, preprocessing and the bundled ct-demo ONNX model.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import dataclasses
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from edge_agent.config import DriftConfig, ModelDeployment
from edge_agent.dicom.pixels import Window, decode_frames
from edge_agent.drift import (
    ABSENT,
    PSI_ALERT,
    SIGNALS,
    STALE_REFERENCE,
    Drift,
    Observation,
    build_reference,
    categorical_reference,
    manufacturer_category,
    numeric_bin,
    numeric_edges,
    numeric_reference,
    observation,
    psi,
)
from edge_agent.errors import ModelError
from edge_agent.inference.batcher import Batcher
from edge_agent.inference.card import ModelCard, list_models, load_card, parse_card, write_drift_reference
from edge_agent.inference.factory import create_engine
from edge_agent.inference.preprocess import Prepared, prepare
from edge_agent.metrics import Metrics
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.validate.run import validate
from edge_agent.workers import WorkerPool
from tests.dicomfiles import CT_SMALL
from tests.test_pipeline import Harness

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ROOT / "engines"
ALERTS = ROOT / "configs" / "alerts.yaml"
WINDOW = Window(40.0, 400.0)  # a soft-tissue window: brighter HU show as brighter grey
ORIGINAL_MAKER = "GE MEDICAL SYSTEMS"


# --- real images, drawn alike or shifted -----------------------------------------------------------------


def variant(stored: np.ndarray, rng: np.random.Generator, brighter_hu: float = 0.0) -> np.ndarray:
    """A CT slice as another patient might give it: gain, offset, noise and position vary; + ``brighter_hu``."""
    hu = stored.astype(np.float64) - 1024.0
    hu = hu * rng.uniform(0.9, 1.1) + rng.normal(0.0, 25.0) + brighter_hu
    hu += rng.normal(0.0, 10.0, hu.shape)
    hu = np.roll(hu, tuple(int(v) for v in rng.integers(-12, 13, 2)), axis=(0, 1))
    return np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.int16)


@pytest.fixture(scope="module")
def ct_demo() -> ModelCard:
    return load_card(ENGINES / "ct-demo")


def observations(card: ModelCard, n: int, seed: int, brighter_hu: float = 0.0, maker: str | None = None
                 ) -> list[Observation]:
    """``n`` variants of CT_small through the daemon's preprocessing and the ct-demo model."""
    [frame] = decode_frames(CT_SMALL)
    rng = np.random.default_rng(seed)
    prepared: list[Prepared] = []
    for _ in range(n):
        shifted = dataclasses.replace(frame, stored=variant(frame.stored, rng, brighter_hu), window=WINDOW,
                                      manufacturer=maker or frame.manufacturer)
        prepared.append(prepare(shifted, card.preprocessing))
    engine = create_engine(card, ModelDeployment(max_batch=16, intra_op_threads=1))
    engine.load()
    try:
        out: list[Observation] = []
        for start in range(0, n, 16):
            chunk = prepared[start : start + 16]
            scores = engine.infer(np.stack([p.tensor for p in chunk])).scores
            out += [observation(p, s) for p, s in zip(chunk, scores, strict=True)]
        return out
    finally:
        engine.close()


def card_with(card: ModelCard, reference: dict[str, Any]) -> ModelCard:
    raw = card.model_dump(mode="json")
    raw["drift_reference"] = reference
    return parse_card(raw)


# --- the index on the Drift object -----------------------------------------------------------------------


def test_shifted_inputs_raise_the_index_above_the_alert_and_alike_ones_stay_low(ct_demo: ModelCard) -> None:
    reference = build_reference(observations(ct_demo, 400, seed=1), data="t", command="t",
                                model_sha256=ct_demo.sha256)
    assert reference["signals"]["manufacturer"]["categories"] == [ORIGINAL_MAKER]
    card = card_with(ct_demo, reference)
    metrics = Metrics()
    config = DriftConfig(window_images=300, min_images=100)

    def index_after(obs: list[Observation]) -> dict[str, float]:
        drift = Drift({"ct-demo": card}, config, metrics)
        drift.add("ct-demo", obs[:99])
        assert drift.index("ct-demo") is None and drift.snapshot()["ct-demo"]["state"] == "collecting"
        drift.add("ct-demo", obs[99:])
        index = drift.index("ct-demo")
        assert index is not None and set(index) == set(SIGNALS)
        assert metrics.registry.get_sample_value(
            "edge_agent_model_drift_psi", {"model": "ct-demo", "signal": "input_mean"}) == index["input_mean"]
        return index

    # Two samples drawn alike differ by chance: about (bins - 1) * (1/300 + 1/400) = 0.06 here, far below 0.25.
    alike = index_after(observations(ct_demo, 300, seed=2))
    assert max(alike.values()) < 0.15, alike

    brighter = index_after(observations(ct_demo, 300, seed=3, brighter_hu=100.0))
    assert brighter["input_mean"] > PSI_ALERT, brighter
    assert brighter["manufacturer"] < 0.05 and brighter["pixel_spacing"] < 0.05, brighter

    other_maker = index_after(observations(ct_demo, 300, seed=4, maker="Acme Medical Devices"))
    assert other_maker["manufacturer"] > PSI_ALERT, other_maker
    assert max(v for k, v in other_maker.items() if k != "manufacturer") < 0.15, other_maker


def test_the_gauges_show_the_window_as_it_is_when_scraped_and_no_index_before_min_images(
        ct_demo: ModelCard) -> None:
    reference = build_reference(observations(ct_demo, 200, seed=1), data="t", command="t",
                                model_sha256=ct_demo.sha256)
    metrics = Metrics()
    drift = Drift({"ct-demo": card_with(ct_demo, reference)}, DriftConfig(window_images=60, min_images=40), metrics)

    def exported(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "ct-demo", **labels})

    assert exported("edge_agent_model_drift_window_images") is None  # nothing seen yet
    drift.add("ct-demo", observations(ct_demo, 39, seed=2))
    assert exported("edge_agent_model_drift_window_images") == 39
    assert exported("edge_agent_model_drift_psi", signal="input_mean") is None
    drift.add("ct-demo", observations(ct_demo, 1, seed=3))
    alike = drift.index("ct-demo")
    assert alike is not None
    for signal, value in alike.items():
        assert exported("edge_agent_model_drift_psi", signal=signal) == value
    # Later inputs move what a scrape reads, with nothing set by hand in between; the window stays exported.
    drift.add("ct-demo", observations(ct_demo, 60, seed=4, brighter_hu=100.0))
    shifted = drift.index("ct-demo")
    assert shifted is not None and shifted["input_mean"] > PSI_ALERT > alike["input_mean"]
    assert exported("edge_agent_model_drift_psi", signal="input_mean") == shifted["input_mean"]
    assert exported("edge_agent_model_drift_window_images") == 60


def test_the_window_forgets_old_inputs_and_the_snapshot_says_what_drifts(ct_demo: ModelCard) -> None:
    reference = build_reference(observations(ct_demo, 200, seed=1), data="the test set", command="t",
                                model_sha256=ct_demo.sha256)
    card = card_with(ct_demo, reference)
    drift = Drift({"ct-demo": card, "cxr-demo": load_card(ENGINES / "cxr-demo")},
                  DriftConfig(window_images=150, min_images=50))
    drift.add("ct-demo", observations(ct_demo, 150, seed=5, maker="Acme"))
    snap = drift.snapshot()["ct-demo"]
    assert snap["state"] == "drift" and snap["drifting"] == ["manufacturer"] and snap["images"] == 150, snap
    assert snap["reference"] == {"images": 200, "data": "the test set"} and snap["alert_psi"] == PSI_ALERT
    # 150 alike inputs later, the window holds none of the other maker's.
    drift.add("ct-demo", observations(ct_demo, 150, seed=6))
    snap = drift.snapshot()["ct-demo"]
    assert snap["state"] == "stable" and snap["drifting"] == [] and snap["images"] == 150, snap
    assert max(snap["psi"].values()) < PSI_ALERT
    # A model whose card has no reference (cxr-demo here, as loaded from a copy without one) is named, not watched.
    bare = card_with(load_card(ENGINES / "cxr-demo"), None)  # type: ignore[arg-type]
    assert Drift({"cxr-demo": bare}, DriftConfig()).snapshot() == {
        "cxr-demo": {"state": "unwatched", "reason": "the model card has no drift_reference"}
    }
    assert Drift({"ct-demo": card}, DriftConfig(enabled=False)).snapshot()["ct-demo"]["state"] == "unwatched"
    # A reference made for another model file (the card's sha256 moved on, the reference did not) is not used:
    # the model still runs, and the snapshot says why it is not watched.
    moved = card_with(ct_demo, {**reference, "model_sha256": "0" * 64})
    assert Drift({"ct-demo": moved}, DriftConfig()).snapshot()["ct-demo"] == {
        "state": "unwatched", "reason": STALE_REFERENCE}


# --- the pure parts --------------------------------------------------------------------------------------


def test_psi_is_zero_for_equal_distributions_and_large_for_disjoint_ones() -> None:
    assert psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5]) == 0.0
    assert 0.0 < psi([0.5, 0.5], [0.6, 0.4]) < 0.1
    assert psi([1.0, 0.0], [0.0, 1.0]) > 10.0  # an empty bin counts as PSI_FLOOR, not zero: finite
    assert psi([0.5, 0.5], [0.9, 0.1]) > PSI_ALERT


def test_numeric_bins_split_at_quantiles_and_mark_the_reference_range() -> None:
    values = [float(v) for v in np.linspace(0.0, 1.0, 500)]
    edges = numeric_edges(values)
    assert len(edges) == 11 and edges[0] <= 0.0 and edges[-1] > 1.0  # 9 deciles and the range's two ends
    assert numeric_bin(edges, -0.5) == 0 and numeric_bin(edges, 0.0) == 1 and numeric_bin(edges, 1.0) == 10
    assert numeric_bin(edges, 1.5) == 11 and numeric_bin(edges, None) == 12
    ref = numeric_reference(values)
    # Beyond the range: the chance 1/(n+1) that one more value like these falls there.
    assert ref is not None and ref["proportions"][0] == ref["proportions"][-1] == round(1 / 501, 6)
    assert all(abs(p - 0.1) < 0.01 for p in ref["proportions"][1:-1]) and ref["missing"] == 0.0
    assert abs(sum(ref["proportions"]) - 1.0) < 1e-5
    # A small reference: fewer bins, and no claim about its range.
    assert len(numeric_edges(values[:40])) == 1
    # One value, as pixel spacing often is: values either side of it fall into other bins.
    one = numeric_edges([0.7] * 300)
    assert numeric_bin(one, 0.69) != numeric_bin(one, 0.7) != numeric_bin(one, 0.71)
    assert numeric_reference([None, None]) is None
    assert numeric_reference([0.5, None])["missing"] == 0.5  # type: ignore[index]


def test_manufacturers_are_folded_and_rare_ones_count_as_other() -> None:
    assert manufacturer_category("  Siemens   Healthineers ") == "SIEMENS HEALTHINEERS"
    assert manufacturer_category("") == ABSENT
    ref = categorical_reference(["A"] * 60 + ["B"] * 39 + ["C"])
    assert ref == {"categories": ["A", "B"], "proportions": [0.6, 0.39, 0.01]}


def test_build_reference_leaves_out_a_signal_no_image_has() -> None:
    obs = [Observation(0.5, 0.1, 1.0, None, "X")] * 5
    ref = build_reference(obs, data="d", command="c", model_sha256="0" * 64)
    assert set(ref["signals"]) == {"score", "input_mean", "input_std", "manufacturer"}
    with pytest.raises(ValueError, match="at least one image"):
        build_reference([], data="d", command="c", model_sha256="0" * 64)


# --- the reference in the card ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models(ENGINES))
def test_every_bundled_model_has_a_reference_for_its_own_model_file(name: str) -> None:
    card = load_card(ENGINES / name)
    assert card.drift_reference is not None, f"{name}: run edge-agent validate ... --drift-reference"
    assert card.drift_reference.model_sha256 == card.sha256
    assert set(card.drift_reference.signals) <= set(SIGNALS)
    assert "--drift-reference" in card.drift_reference.command


def good_reference(sha: str) -> dict[str, Any]:
    return {
        "data": "d",
        "command": "c",
        "model_sha256": sha,
        "images": 10,
        "signals": {
            "score": {"edges": [0.5], "proportions": [0.5, 0.5]},
            "manufacturer": {"categories": ["A"], "proportions": [0.9, 0.1]},
        },
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_sha256": "ABC"}, "drift_reference.model_sha256: must be 64 lower-case hex digits"),
        ({"signals": {"score": {"edges": [0.5, 0.4], "proportions": [0.3, 0.3, 0.4]}}}, "edges must increase"),
        ({"signals": {"score": {"edges": [0.5], "proportions": [1.0]}}}, "1 edges make 2 bins, not 1"),
        ({"signals": {"score": {"edges": [0.5], "proportions": [0.5, 0.2]}}}, "must add up to 1"),
        ({"signals": {"manufacturer": {"edges": [0.5], "proportions": [0.5, 0.5]}}}, "must be categorical"),
        ({"signals": {"manufacturer": {"categories": ["other"], "proportions": [0.5, 0.5]}}}, "must not be 'other'"),
        ({"signals": {"colour": {"edges": [0.5], "proportions": [0.5, 0.5]}}}, "drift_reference.signals.colour"),
        ({"signals": {}}, "drift_reference.signals"),
        ({"images": 0}, "drift_reference.images"),
    ],
)
def test_a_bad_reference_is_a_model_error_naming_the_field(
    ct_demo: ModelCard, change: dict[str, Any], message: str
) -> None:
    raw = ct_demo.model_dump(mode="json")
    raw["drift_reference"] = {**good_reference(ct_demo.sha256), **change}
    with pytest.raises(ModelError, match=message):
        parse_card(raw)
    raw["drift_reference"] = good_reference(ct_demo.sha256)
    assert parse_card(raw).drift_reference is not None


def test_writing_a_reference_replaces_only_that_section(tmp_path: Path) -> None:
    model = tmp_path / "cxr-nodule"
    shutil.copytree(ENGINES / "cxr-nodule", model)
    before = (model / "model.yaml").read_text()
    card = load_card(model)
    write_drift_reference(model, good_reference(card.sha256))
    write_drift_reference(model, {**good_reference(card.sha256), "images": 11})
    after = (model / "model.yaml").read_text()
    assert after.count("drift_reference:") == 1 and load_card(model).drift_reference.images == 11  # type: ignore[union-attr]
    head = before[: before.index("drift_reference:")]
    assert after.startswith(head) and "# SIMULATED-LESION DETECTABILITY" in after  # comments and keys kept
    # A reference the card would refuse is not written: the card stays as it was.
    with pytest.raises(ModelError, match="must add up to 1"):
        write_drift_reference(model, {**good_reference(card.sha256), "signals": {
            "score": {"edges": [0.5], "proportions": [0.5, 0.4]}}})
    assert (model / "model.yaml").read_text() == after


def test_a_demo_rebuild_drops_a_reference_made_for_another_model_file(tmp_path: Path) -> None:
    refs = tmp_path / "refs" / "cxr-demo"
    refs.mkdir(parents=True)
    raw = yaml.safe_load((ENGINES / "cxr-demo" / "model.yaml").read_text())
    raw["drift_reference"]["model_sha256"] = "0" * 64
    (refs / "model.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_models.py"), "--out", str(tmp_path / "out"),
                    "--references-from", str(tmp_path / "refs")], check=True, capture_output=True, timeout=60)
    assert load_card(tmp_path / "out" / "cxr-demo").drift_reference is None
    assert load_card(tmp_path / "out" / "ct-demo").drift_reference is None  # none to keep


def test_the_alert_uses_the_same_threshold_as_the_code() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert f"> {PSI_ALERT}" in rules["EdgeAgentModelDrift"]["expr"]


# --- validate makes the reference; the real pipeline feeds the index --------------------------------------


def write_ct(folder: Path, n: int, seed: int, brighter_hu: float = 0.0, maker: str | None = None) -> list[Path]:
    """``n`` CT_small variants as one series of DICOM files with a soft-tissue window."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(CT_SMALL)
    stored = template.pixel_array.copy()
    rng = np.random.default_rng(seed)
    series = generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(template)  # Dataset.copy() is shallow: new pixel data would reach the template
        ds.PixelData = variant(stored, rng, brighter_hu).tobytes()
        ds.WindowCenter, ds.WindowWidth = WINDOW.center, WINDOW.width
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        if maker is not None:
            ds.Manufacturer = maker
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


class DriftHarness(Harness):
    def __init__(self, tmp: Path, card: ModelCard, config: DriftConfig) -> None:
        super().__init__(tmp)
        self.card = card
        self.drift = Drift({"ct-demo": card}, config, self.metrics)

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[Pipeline]:
        batcher = Batcher("ct-demo", self.engine, 8, 2.0, self.metrics, self.executor)
        await batcher.start()
        pool = WorkerPool(1, processes=False)
        pipe = Pipeline(self.config, self.journal, self.spool.path, self.metrics,
                        {"ct-demo": LoadedModel(self.card, batcher, "onnxruntime")}, pool, self.wake,
                        drift=self.drift)
        try:
            yield pipe
        finally:
            await pipe.close()
            await batcher.stop()
            pool.shutdown()


@pytest.fixture
def drift_harness(tmp_path: Path) -> Iterator[DriftHarness]:
    """ct-demo with a drift reference that ``edge-agent validate --drift-reference`` made from 60 alike images."""
    model = tmp_path / "engines" / "ct-demo"
    shutil.copytree(ENGINES / "ct-demo", model)
    data = tmp_path / "reference"
    files = write_ct(data / "images", 60, seed=10)
    with (data / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *((p.relative_to(data), 0) for p in files)])
    report = validate(model, data, data / "labels.csv", tmp_path / "report", bootstrap=10, drift_reference=True)
    assert report.files["card"] == str(model / "model.yaml")
    card = load_card(model)
    assert card.drift_reference is not None and card.drift_reference.images == 60
    h = DriftHarness(tmp_path, card, DriftConfig(window_images=30, min_images=20))
    try:
        yield h
    finally:
        h.close()


def test_shifted_series_through_the_pipeline_raise_the_exported_index(tmp_path: Path,
                                                                       drift_harness: DriftHarness) -> None:
    h = drift_harness

    def psi_metric(signal: str) -> float | None:
        return h.metrics.registry.get_sample_value("edge_agent_model_drift_psi",
                                                   {"model": "ct-demo", "signal": signal})

    async def main() -> None:
        async with h.pipeline() as pipe:
            for path in write_ct(tmp_path / "alike", 30, seed=11):
                h.store(pipe, path)
            await h.wait_findings(1)
            snap = h.drift.snapshot()["ct-demo"]
            assert snap["state"] == "stable" and snap["images"] == 30, (snap["psi"], snap["drifting"])
            assert max(snap["psi"].values()) < PSI_ALERT
            for path in write_ct(tmp_path / "shifted", 30, seed=12, brighter_hu=100.0, maker="Acme"):
                h.store(pipe, path)
            await h.wait_findings(2)
            snap = h.drift.snapshot()["ct-demo"]
            assert snap["state"] == "drift" and {"input_mean", "manufacturer"} <= set(snap["drifting"]), snap
            for signal in ("input_mean", "manufacturer"):
                value = psi_metric(signal)
                assert value is not None and value > PSI_ALERT
            assert h.metrics.registry.get_sample_value("edge_agent_model_drift_window_images",
                                                       {"model": "ct-demo"}) == 30

    asyncio.run(main())
