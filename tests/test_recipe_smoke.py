"""The cxr-nodule data recipe in --smoke mode: a handful of tiny phantom radiographs, no downloads.

Runs the real simulate.py as a subprocess in this environment (numpy and pydicom only) and checks what
the training recipe and ``edge-agent validate`` rely on: valid CR/DX files, a labels CSV, splits by
virtual patient, determinism from the seed, and the null control.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_agent.inference.card import load_card
from edge_agent.inference.preprocess import load_instance

REPO = Path(__file__).resolve().parent.parent
SIMULATE = REPO / "engines" / "cxr-nodule" / "recipe" / "simulate.py"
COLUMNS = {"file", "label", "size_mm", "contrast", "type", "location", "anatomy_source", "patient_id", "split"}
VENDORS = {"Aurora Imaging Systems", "Borealis Radiology", "Cobalt Digital X-Ray", "Dunmore Medical"}
SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX"}


def run_smoke(out: Path, *extra: str, seed: int = 0) -> list[dict[str, str]]:
    """simulate.py --smoke into ``out``; returns the labels CSV rows."""
    return run_simulate(out, "--smoke", *extra, seed=seed)


def run_simulate(out: Path, *args: str, seed: int = 0, timeout: float = 60) -> list[dict[str, str]]:
    """simulate.py with ``args`` into ``out``, downloading nothing; returns the labels CSV rows."""
    env = {**os.environ, "HOME": str(out.parent / "home"), "PIP_NO_INDEX": "1"}  # nothing may be fetched
    subprocess.run(
        [sys.executable, str(SIMULATE), *args, "--out", str(out), "--seed", str(seed), "--workers", "1"],
        check=True,
        capture_output=True,
        timeout=timeout,
        env=env,
    )
    with (out / "labels.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("smoke") / "data"
    return out, run_smoke(out)


def test_smoke_writes_labelled_images(smoke: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = smoke
    assert 6 <= len(rows) <= 20
    assert set(rows[0]) >= COLUMNS
    assert {r["label"] for r in rows} == {"0", "1"}
    assert sum(r["label"] == "1" for r in rows) == len(rows) // 2
    assert {r["anatomy_source"] for r in rows} == {"phantom"}
    for r in rows:
        assert (out / r["file"]).is_file()
        if r["label"] == "1":
            assert 4.0 <= float(r["size_mm"]) <= 30.0
            assert float(r["contrast"]) > 0
            assert r["type"] in {"solid", "part-solid", "ground-glass"}
            assert r["location"] in {"behind_heart", "apex", "below_diaphragm", "over_rib", "lung_field"}
        else:
            assert r["size_mm"] == "" and r["type"] == "none"


def test_splits_are_by_virtual_patient(smoke: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = smoke
    splits_of: dict[str, set[str]] = {}
    for r in rows:
        splits_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    for split in ("train", "validation", "test"):
        with (out / f"labels_{split}.csv").open(newline="", encoding="utf-8") as f:
            assert [r["file"] for r in csv.DictReader(f)] == [r["file"] for r in rows if r["split"] == split]


def test_files_are_valid_chest_radiographs(smoke: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = smoke
    uids = set()
    for r in rows:
        ds = pydicom.dcmread(out / r["file"])
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.Modality == SOP_CLASSES[ds.SOPClassUID]
        assert ds.BodyPartExamined == "CHEST"
        assert ds.PhotometricInterpretation in {"MONOCHROME1", "MONOCHROME2"}
        assert ds.PhotometricInterpretation == r["photometric"]
        assert ds.Manufacturer in VENDORS and ds.Manufacturer == r["manufacturer"]
        assert 10 <= ds.BitsStored <= 16
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert int(pixels.max()) < (1 << ds.BitsStored) and int(pixels.min()) < int(pixels.max())
        uids.add(ds.SOPInstanceUID)
        # Never a file name derived from a UID.
        assert ds.SOPInstanceUID not in r["file"]
    assert len(uids) == len(rows)


def test_smoke_images_go_through_the_daemons_preprocessing(smoke: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = smoke
    card = load_card(REPO / "engines" / "cxr-demo")  # the chest preprocessing the daemon runs
    for r in rows:
        (tensor,) = load_instance(out / r["file"], card)
        assert tensor.shape == card.input_shape
        assert np.isfinite(tensor).all() and float(tensor.std()) > 0.1


def test_same_seed_same_data_other_seed_other_data(smoke: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    out, rows = smoke
    again = run_smoke(tmp_path / "again")
    assert again == rows
    first = rows[0]["file"]
    a, b = pydicom.dcmread(out / first), pydicom.dcmread(tmp_path / "again" / first)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.PixelData == b.PixelData
    other = run_smoke(tmp_path / "other", seed=1)
    assert pydicom.dcmread(tmp_path / "other" / first).PixelData != a.PixelData
    assert [r["size_mm"] for r in other] != [r["size_mm"] for r in rows]


def test_extra_training_patients_leave_the_base_set_unchanged(
    smoke: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    out, rows = smoke
    more = run_smoke(tmp_path / "more", "--extra-train-patients", "2")
    base, extra = more[: len(rows)], more[len(rows) :]
    assert base == rows  # same files, labels and splits: validation and test are exactly as without them
    for r in rows:
        assert (tmp_path / "more" / r["file"]).read_bytes() == (out / r["file"]).read_bytes()
    assert len(extra) == 2 * len(rows) // 3  # two more patients of the smoke set's size
    assert {r["split"] for r in extra} == {"train"}
    assert not {r["patient_id"] for r in extra} & {r["patient_id"] for r in rows}
    assert {r["label"] for r in extra} == {"0", "1"}


def test_null_control_inserts_zero_contrast(tmp_path: Path) -> None:
    rows = run_smoke(tmp_path / "null", "--null")
    positives = [r for r in rows if r["label"] == "1"]
    assert positives
    assert all(float(r["contrast"]) == 0.0 and r["contrast_bin"] == "0" for r in positives)


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SIMULATE), "--smoke"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "--out" in result.stderr
