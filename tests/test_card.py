"""Model cards: the shipped demo cards, every way a card can be wrong, and reproducible demo models."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.errors import ModelError
from edge_agent.inference.card import ModelCard, list_models, load_card, parse_card

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ROOT / "engines"
DEMOS = ("ct-demo", "cxr-demo")


def copy_model(tmp_path: Path, name: str = "cxr-demo") -> Path:
    dst = tmp_path / "engines" / name
    shutil.copytree(ENGINES / name, dst)
    return dst


def edit_card(model_dir: Path, **changes: Any) -> None:
    card_file = model_dir / "model.yaml"
    raw = yaml.safe_load(card_file.read_text())
    raw.update(changes)
    card_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def demo_raw() -> dict[str, Any]:
    raw = yaml.safe_load((ENGINES / "cxr-demo" / "model.yaml").read_text())
    assert isinstance(raw, dict)
    return raw


@pytest.mark.parametrize("name", DEMOS)
def test_demo_cards_load_and_are_marked_untrained(name: str) -> None:
    card = load_card(ENGINES / name)
    assert isinstance(card, ModelCard)
    assert card.name == name
    assert card.model_path == ENGINES / name / "model.onnx"
    assert card.trained is False
    assert "UNTRAINED" in card.description and "not clinically meaningful" in card.description.replace("NOT", "not")
    assert card.input_shape == (1, 256, 256)
    assert card.outputs.heatmap == "heatmap"
    assert set(card.thresholds) == set(card.labels)
    assert card.model_path.stat().st_size < 1_000_000


def test_demo_granularity() -> None:
    assert load_card(ENGINES / "cxr-demo").granularity == "image"
    assert load_card(ENGINES / "ct-demo").granularity == "slice"


def test_list_models_finds_folders_with_a_card(tmp_path: Path) -> None:
    assert set(DEMOS) <= set(list_models(ENGINES))
    repo = tmp_path / "repo"
    (repo / "b-model").mkdir(parents=True)
    (repo / "b-model" / "model.yaml").write_text("name: b-model\n")
    (repo / "a-model").mkdir()
    (repo / "a-model" / "model.yaml").write_text("name: a-model\n")
    (repo / "no-card").mkdir()
    (repo / "stray.yaml").write_text("x: 1\n")
    assert list_models(repo) == ["a-model", "b-model"]


def test_list_models_of_a_missing_repository_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read the model repository"):
        list_models(tmp_path / "nowhere")


def test_missing_card_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot read model card"):
        load_card(tmp_path / "empty")


def test_bad_yaml_is_a_model_error_with_its_line(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    (model_dir / "model.yaml").write_text("name: cxr-demo\nlabels: [nodule\n")
    with pytest.raises(ModelError, match=r"line \d+, column \d+: not valid YAML"):
        load_card(model_dir)


def test_card_that_is_not_a_mapping_is_a_model_error(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    (model_dir / "model.yaml").write_text("- a list\n")
    with pytest.raises(ModelError, match="must be a YAML mapping"):
        load_card(model_dir)


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    raw = yaml.safe_load((model_dir / "model.yaml").read_text())
    raw["preprocessing"]["windw"] = "auto"
    raw["colour"] = "red"
    (model_dir / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError) as info:
        load_card(model_dir)
    assert "preprocessing.windw: unknown key" in str(info.value)
    assert "colour: unknown key" in str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sha256": "abc"}, "sha256: must be 64 lower-case hex digits"),
        ({"granularity": "volume"}, "granularity: Input should be 'image' or 'slice'"),
        ({"labels": []}, "labels: List should have at least 1 item"),
        ({"thresholds": {"nodule": 1.5}}, "thresholds.nodule: Input should be less than or equal to 1"),
        ({"thresholds": {}}, "no threshold for label(s) nodule"),
        ({"thresholds": {"nodule": 0.5, "mass": 0.5}}, "mass is not in labels"),
        ({"labels": ["nodule", "nodule"]}, "a label is listed twice"),
        ({"trained": "yes"}, "trained: Input should be a valid boolean"),
        ({"name": "CXR Demo!"}, "name: 'CXR Demo!' is not a model name"),
        ({"version": " "}, "version: must not be empty"),
        ({"batch": {"min": 4, "opt": 2, "max": 8}}, "need min <= opt <= max"),
        ({"aggregation": "mean"}, "aggregation: Input should be 'max'"),
        ({"inputs": {"name": "image", "shape": [2, 256, 256]}}, "inputs.shape[0]: Input should be 1 or 3"),
        ({"inputs": {"name": "image", "shape": [1, 128, 128]}}, "must equal inputs.shape[1:]"),
        ({"description": None}, "description: Input should be a valid string"),
    ],
)
def test_invalid_values_name_their_field(change: dict[str, Any], expected: str) -> None:
    raw = demo_raw()
    raw.update(change)
    with pytest.raises(ModelError) as info:
        parse_card(raw, "cxr-demo/model.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("cxr-demo/model.yaml: ")


def test_invalid_nested_values_name_their_path() -> None:
    raw = demo_raw()
    raw["preprocessing"]["window"] = {"center": 40, "width": 0}
    raw["preprocessing"]["normalise"] = {"mean": 0.5, "std": -1}
    with pytest.raises(ModelError) as info:
        parse_card(raw)
    message = str(info.value)
    assert "preprocessing.window.width: Input should be greater than 0" in message
    assert "preprocessing.normalise.std: Input should be greater than 0" in message


def test_missing_required_key_names_it() -> None:
    raw = demo_raw()
    del raw["outputs"]
    with pytest.raises(ModelError, match="outputs: required key is missing"):
        parse_card(raw)


def test_fixed_window_card_is_accepted() -> None:
    raw = demo_raw()
    raw["preprocessing"]["window"] = {"center": -600, "width": 1500}
    card = parse_card(raw)
    assert card.preprocessing.window != "auto"


def test_name_must_match_its_folder(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    renamed = model_dir.rename(model_dir.parent / "other")
    with pytest.raises(ModelError, match="does not match its folder 'other'"):
        load_card(renamed)


def test_sha256_mismatch_is_a_model_error(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    data = bytearray((model_dir / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (model_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_card(model_dir)


def test_card_pointing_at_another_hash_is_a_model_error(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    edit_card(model_dir, sha256="0" * 64)
    with pytest.raises(ModelError, match="the card says 0000"):
        load_card(model_dir)


def test_missing_onnx_is_a_model_error(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path)
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelError, match="cannot read model file"):
        load_card(model_dir)
    assert load_card(model_dir, verify=False).name == "cxr-demo"


def test_demo_models_rebuild_byte_identical(tmp_path: Path) -> None:
    """Everything but the drift reference is built; the reference (made by edge-agent validate) is carried over."""
    out = tmp_path / "rebuilt"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_demo_models.py"), "--out", str(out), "--references-from",
         str(ENGINES)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in DEMOS:
        for file in ("model.onnx", "model.yaml"):
            built = hashlib.sha256((out / name / file).read_bytes()).hexdigest()
            committed = hashlib.sha256((ENGINES / name / file).read_bytes()).hexdigest()
            assert built == committed, f"{name}/{file} differs from a fresh build; rerun scripts/build_demo_models.py"
        assert load_card(out / name).sha256 == load_card(ENGINES / name).sha256


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("manual", "preprocessing.window: must be 'auto' or a mapping with center and width"),
        (5, "preprocessing.window: must be 'auto' or a mapping with center and width"),
        ({"center": 40}, "preprocessing.window.width: required key is missing"),
        ({"center": "soft", "width": 400}, "preprocessing.window.center: Input should be a valid number"),
    ],
)
def test_bad_window_says_what_a_window_is(window: object, expected: str) -> None:
    raw = demo_raw()
    raw["preprocessing"]["window"] = window
    with pytest.raises(ModelError) as info:
        parse_card(raw)
    assert str(info.value) == f"model.yaml: {expected}"


NODULE = ENGINES / "cxr-nodule"


def test_the_nodule_card_has_two_operating_points_and_triage_is_its_threshold() -> None:
    card = load_card(NODULE)
    assert set(card.operating_points) == {"triage", "high_specificity"}
    triage, high = card.operating_points["triage"], card.operating_points["high_specificity"]
    assert card.thresholds["nodule"] == triage.threshold
    assert high.threshold > triage.threshold
    # Each point states what it gives, on both splits: triage keeps its 15 mm promise on validation, and the
    # high-specificity point flags at most 1 in 20 nodule-free validation images.
    assert triage.validation["sensitivity_15mm_and_up"].value >= 0.9
    assert high.validation["specificity"].value >= 0.95
    assert triage.test and high.test
    assert card.calibration is not None and card.calibration.method == "platt"
    assert card.transfer_checks


def test_with_operating_point_moves_only_that_labels_threshold() -> None:
    card = load_card(NODULE)
    high = card.with_operating_point("high_specificity")
    assert high.thresholds["nodule"] == card.operating_points["high_specificity"].threshold
    assert high.model_path == card.model_path and high.sha256 == card.sha256
    assert card.with_operating_point(None) is card
    with pytest.raises(ValueError, match=r"model cxr-nodule has no operating point 'nope' \(its card has: "
                                         r"high_specificity, triage\)"):
        card.with_operating_point("nope")


def test_an_operating_point_for_another_label_is_refused() -> None:
    raw = yaml.safe_load((NODULE / "model.yaml").read_text())
    raw["operating_points"]["triage"]["label"] = "mass"
    with pytest.raises(ModelError, match=r"operating_points\.triage: label 'mass' is not one of"):
        parse_card(raw, NODULE / "model.yaml")
