"""The TensorRT plan cache: keys, metadata, atomic writes, and refusing plans that do not match the box."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from edge_agent.errors import EngineError
from edge_agent.inference.card import load_card
from edge_agent.inference.plan_cache import BatchProfile, Box, PlanCache, PlanKey, PlanMeta, PlanUnavailable
from edge_agent.inference.trt_build import BuildOptions, ensure_plan

ENGINES = Path(__file__).resolve().parent.parent / "engines"
H100 = Box("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106")
ORIN = Box("Orin", "8.7", "10.3.0")
SHA = "ab" * 32
PROFILE = BatchProfile(1, 8, 16)
PLAN = b"\x00plan bytes\xff" * 1000


def key(box: Box = H100, precision: str = "fp16", sha: str = SHA) -> PlanKey:
    return PlanKey.for_box(sha, box, precision)  # type: ignore[arg-type]


def store(cache: PlanCache, k: PlanKey, plan: bytes = PLAN, profile: BatchProfile = PROFILE) -> PlanMeta:
    return cache.store("ct-demo", "0.1.0", k, profile, plan, workspace_bytes=1 << 30, build_seconds=12.5)


def test_every_key_field_changes_the_digest() -> None:
    base = key()
    variants = [
        dataclasses.replace(base, model_sha256="cd" * 32),
        dataclasses.replace(base, gpu_name="NVIDIA H200"),
        dataclasses.replace(base, compute_capability="9.1"),
        dataclasses.replace(base, trt_version="11.4.0.107"),
        dataclasses.replace(base, precision="fp32"),
    ]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 6
    assert base.digest() == key().digest()  # stable across calls and processes (no hash randomisation)
    assert all(c in "0123456789abcdef" for c in base.digest())


def test_store_then_load(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    meta = store(cache, key())
    plan_path = tmp_path / "engines" / "ct-demo" / f"{key().digest()}.plan"
    assert cache.plan_path("ct-demo", key()) == plan_path and plan_path.read_bytes() == PLAN
    on_disk = json.loads(plan_path.with_suffix(".json").read_text())
    assert on_disk["key"]["gpu_name"] == H100.gpu_name and on_disk["plan_bytes"] == len(PLAN)
    assert on_disk["profile"] == {"min": 1, "opt": 8, "max": 16}
    found = cache.load("ct-demo", key(), PROFILE)
    assert found is not None and found[0] == PLAN and found[1] == meta
    # Nothing half-written is left behind.
    assert sorted(p.name for p in plan_path.parent.iterdir()) == sorted([plan_path.name, f"{key().digest()}.json"])


def test_nothing_cached(tmp_path: Path) -> None:
    assert PlanCache(tmp_path).load("ct-demo", key(), PROFILE) is None


def test_plan_copied_from_another_box_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plan built on an Orin, copied under the H100 key's file names, is caught by its metadata."""
    cache = PlanCache(tmp_path)
    store(cache, key(ORIN))
    for suffix in (".plan", ".json"):
        src = cache.plan_path("ct-demo", key(ORIN)).with_suffix(suffix)
        shutil.copy(src, cache.plan_path("ct-demo", key(H100)).with_suffix(suffix))
    assert cache.load("ct-demo", key(H100), PROFILE) is None
    assert "gpu_name is 'Orin', this box needs 'NVIDIA H100 80GB HBM3'" in caplog.text
    assert "trt_version is '10.3.0'" in caplog.text


def test_other_precision_model_or_profile_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = PlanCache(tmp_path)
    store(cache, key())
    assert cache.load("ct-demo", key(precision="fp32"), PROFILE) is None
    assert cache.load("ct-demo", key(sha="cd" * 32), PROFILE) is None
    assert cache.load("ct-demo", key(), BatchProfile(1, 8, 32)) is None
    assert "batch profile is" in caplog.text


def test_plan_altered_after_writing_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = PlanCache(tmp_path)
    store(cache, key())
    path = cache.plan_path("ct-demo", key())
    path.write_bytes(PLAN[:-1] + b"\x00")
    assert cache.load("ct-demo", key(), PROFILE) is None
    path.write_bytes(PLAN[:100])
    assert cache.load("ct-demo", key(), PROFILE) is None
    assert "does not match its metadata's sha256" in caplog.text


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": 1}', '{"format": 99, "key": {}}'])
def test_malformed_metadata_is_ignored(tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = PlanCache(tmp_path)
    store(cache, key())
    cache.meta_path("ct-demo", key()).write_text(text)
    assert cache.load("ct-demo", key(), PROFILE) is None
    assert "unreadable plan metadata" in caplog.text
    assert cache.entries("ct-demo") == []


def test_metadata_round_trip() -> None:
    meta = PlanMeta("m", "1", key(), PROFILE, "00" * 32, 3, 1 << 30, 1.5, 1.0, extra={"tensorrt_major": 11})
    assert PlanMeta.from_json(meta.to_json()) == meta


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_state_dir_is_an_engine_error(tmp_path: Path) -> None:
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines").chmod(0o500)
    try:
        with pytest.raises(EngineError, match="cannot write plan"):
            store(PlanCache(tmp_path), key())
    finally:
        (tmp_path / "engines").chmod(0o700)


def test_unwritable_state_dir_even_for_root(tmp_path: Path) -> None:
    (tmp_path / "engines").write_text("a file where the folder should be")
    with pytest.raises(EngineError, match="cannot write plan"):
        store(PlanCache(tmp_path), key())


def test_timing_cache_per_box(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    assert cache.read_timing_cache(H100) == b""
    cache.write_timing_cache(H100, b"timings")
    assert cache.read_timing_cache(H100) == b"timings"
    assert cache.read_timing_cache(ORIN) == b""
    assert cache.timing_cache_path(H100) != cache.timing_cache_path(ORIN)


def test_no_plan_and_building_disabled_says_so(tmp_path: Path) -> None:
    card = load_card(ENGINES / "ct-demo")
    cache = PlanCache(tmp_path)
    orin_key = PlanKey.for_box(card.sha256, ORIN, "fp16")
    cache.store(card.name, card.version, orin_key, BatchProfile(1, 8, 16), PLAN, workspace_bytes=1, build_seconds=1)
    with pytest.raises(PlanUnavailable) as err:
        ensure_plan(card, cache, BuildOptions(precision="fp16"), allow_build=False, box=H100)
    text = str(err.value)
    assert text.startswith(
        "engine ct-demo: no usable plan for TensorRT 11.4.0.106 on NVIDIA H100 80GB HBM3 (sm 9.0), fp16")
    assert "building is disabled (models.ct-demo.allow_build)" in text
    assert "run `edge-agent build-engine ct-demo --precision fp16`" in text
    assert "cached plans are for: TensorRT 10.3.0 on Orin (sm 8.7), fp16" in text


def test_matching_plan_is_loaded_without_tensorrt(tmp_path: Path) -> None:
    card = load_card(ENGINES / "ct-demo")
    cache = PlanCache(tmp_path)
    k = PlanKey.for_box(card.sha256, H100, "fp32")
    cache.store(card.name, card.version, k, BatchProfile(1, 8, 16), PLAN, workspace_bytes=1, build_seconds=1)
    plan, meta, built = ensure_plan(card, cache, BuildOptions(), allow_build=False, box=H100)
    assert plan == PLAN and meta.key == k and not built


def test_plans_cached_before_the_flavour_was_in_the_key_keep_their_names() -> None:
    """The key's digest names the plan's file: adding the flavour must not orphan a box's full-TensorRT plans."""
    k = PlanKey.for_box("ab" * 32, H100, "fp16")
    old_fields = {"model_sha256": "ab" * 32, "gpu_name": H100.gpu_name, "compute_capability": "9.0",
                  "trt_version": H100.trt_version, "precision": "fp16"}
    old = hashlib.sha256(json.dumps(old_fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    assert k.flavour == "tensorrt" and k.digest() == old
    rtx = PlanKey.for_box("ab" * 32, Box("NVIDIA RTX A4000", "8.6", "1.7.1.116"), "fp16", "tensorrt-rtx")
    full = PlanKey.for_box("ab" * 32, Box("x", "8.6", "1.7.1.116"), "fp16")
    assert rtx.gpu_name == "" and rtx.digest() != full.digest()
