"""The finding document, its schema, message id and subject (pure, fast)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

import jsonschema
import pytest

from edge_agent import __version__
from edge_agent.bus.finding import (
    SCHEMA_VERSION,
    FindingInput,
    Heatmap,
    LabelResult,
    ModelInfo,
    Timings,
    build_finding,
    decode,
    encode,
    heatmap_url,
    load_schema,
    message_id,
    rfc3339,
    stamp_published,
    subject,
)

SERIES = "1.2.826.0.1.3680043.8.498.11"
STUDY = "1.2.826.0.1.3680043.8.498.10"
SOP_A = "1.2.826.0.1.3680043.8.498.12"
SOP_B = "1.2.826.0.1.3680043.8.498.13"
T0 = 1_790_000_000.0


def make_input(**changes: Any) -> FindingInput:
    base = FindingInput(
        site="st-marys",
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        sop_instance_uids=[SOP_A, SOP_B],
        accession_number="ACC123",
        calling_ae_title="CT_SCANNER_1",
        called_ae_title="EDGE_AGENT",
        modality="CT",
        body_part="CHEST",
        route="ct-chest",
        model=ModelInfo(name="ct-demo", version="0.1.0", sha256="ab" * 32, backend="onnxruntime"),
        labels=[
            LabelResult(label="abnormal", score=0.91, threshold=0.5, positive=True, driving_instance_uid=SOP_B,
                        driving_frame=0),
            LabelResult(label="bleed", score=0.2, threshold=0.6, positive=False, driving_instance_uid=SOP_A),
        ],
        priority="urgent",
        heatmap=Heatmap(label="abnormal", x0=0.1, y0=0.2, x1=0.4, y1=0.5, peak=0.97, driving_instance_uid=SOP_B),
        revision=0,
        timings=Timings(received_first=T0, received_last=T0 + 2, completed=T0 + 7, inferred=T0 + 7.2,
                        stage_seconds={"preprocess": 0.05, "infer": 0.012}),
        produced_at=T0 + 7.25,
        agent_host="edge-box-1",
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_built_finding_has_every_field_and_validates(validator: jsonschema.protocols.Validator) -> None:
    f = build_finding(make_input())
    validator.validate(f)
    assert f["schema_version"] == SCHEMA_VERSION
    assert f["finding_id"] == message_id(SERIES, "ct-demo", "0.1.0", 0, T0)
    assert f["driving_instance_uid"] == SOP_B
    assert f["labels"][0]["positive"] is True and f["labels"][1]["positive"] is False
    assert f["heatmap"]["bbox"] == {"x0": 0.1, "y0": 0.2, "x1": 0.4, "y1": 0.5}
    assert f["instance_count"] == f["instances_received"] == f["instances_inferred"] == 2
    assert (f["instances_failed"], f["failed_instance_uids"]) == (0, [])
    assert f["timings"]["received_first"] == "2026-09-21T14:13:20.000Z"
    assert "published_at" not in f["timings"]
    assert f["timings"]["stage_seconds"] == {"preprocess": 0.05, "infer": 0.012}
    assert f["agent"] == {"version": __version__, "host": "edge-box-1"}


def test_optional_parts_validate(validator: jsonschema.protocols.Validator) -> None:
    timings = Timings(received_first=T0, received_last=T0, completed=T0, inferred=T0, published_at=T0 + 1)
    f = build_finding(make_input(heatmap=None, timings=timings, study_instance_uid="", modality="", body_part="",
                                 accession_number="", instances_received=40, priority="routine"))
    validator.validate(f)
    assert f["heatmap"] is None
    assert f["timings"]["published_at"] == rfc3339(T0 + 1)
    assert f["instance_count"] == f["instances_received"] == 40 and f["instances_inferred"] == 2


def test_failed_instances_are_counted_and_listed(validator: jsonschema.protocols.Validator) -> None:
    """Defect 5: the finding says which instances its result covers and which failed."""
    f = build_finding(make_input(sop_instance_uids=[SOP_A], failed_instance_uids=[SOP_B]))
    validator.validate(f)
    assert (f["instances_received"], f["instances_inferred"], f["instances_failed"]) == (2, 1, 1)
    assert f["sop_instance_uids"] == [SOP_A] and f["failed_instance_uids"] == [SOP_B]


def test_positive_is_carried_from_triage_not_recomputed() -> None:
    """Defect 11: float32(0.7) >= 0.7 in triage, but 0.699999988 < 0.7 in float64."""
    import numpy as np

    score = float(np.float32(0.7))
    label = LabelResult(label="a", score=score, threshold=0.7, positive=True, driving_instance_uid=SOP_A)
    f = build_finding(make_input(labels=[label], priority="urgent"))
    assert f["labels"][0]["positive"] is True and f["priority"] == "urgent"


def test_driving_instance_is_the_top_positive_label_else_the_top_score() -> None:
    negatives = [
        LabelResult(label="a", score=0.3, threshold=0.5, positive=False, driving_instance_uid=SOP_A),
        LabelResult(label="b", score=0.4, threshold=0.5, positive=False, driving_instance_uid=SOP_B),
    ]
    assert build_finding(make_input(labels=negatives))["driving_instance_uid"] == SOP_B
    mixed = [
        LabelResult(label="a", score=0.55, threshold=0.5, positive=True, driving_instance_uid=SOP_A),
        LabelResult(label="b", score=0.8, threshold=0.9, positive=False, driving_instance_uid=SOP_B),
    ]
    assert build_finding(make_input(labels=mixed))["driving_instance_uid"] == SOP_A


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("priority",), "stat"),
        (("schema_version",), "2.0"),
        (("finding_id",), "not-a-hash"),
        (("labels", 0, "score"), 1.5),
        (("labels",), []),
        (("heatmap", "bbox", "x1"), -0.1),
        (("sop_instance_uids",), []),
        (("series_instance_uid",), "1.2.3/../etc"),
        (("site",), "a.b"),
        (("produced_at",), "2026-01-01 12:00:00"),
        (("timings", "stage_seconds", "infer"), -1),
        (("model", "sha256"), "xyz"),
        (("revision",), -1),
        (("extra_field",), 1),
        (("model", "extra"), "x"),
    ],
)
def test_schema_rejects_bad_findings(validator: jsonschema.protocols.Validator, path: tuple[Any, ...],
                                     value: Any) -> None:
    f = copy.deepcopy(build_finding(make_input()))
    target: Any = f
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(f)


@pytest.mark.parametrize("missing", ["finding_id", "labels", "timings", "heatmap", "agent", "model"])
def test_schema_requires_fields(validator: jsonschema.protocols.Validator, missing: str) -> None:
    f = build_finding(make_input())
    del f[missing]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(f)


@pytest.mark.parametrize(
    "changes",
    [
        {"priority": "stat"},
        {"labels": []},
        {"sop_instance_uids": []},
        {"revision": -1},
        {"instances_received": 1},  # fewer than the two instances inferred
        {"labels": [LabelResult(label="a", score=float("nan"), threshold=0.5, positive=False,
                                driving_instance_uid=SOP_A)]},
        {"labels": [LabelResult(label="a", score=0.5, threshold=1.5, positive=False, driving_instance_uid=SOP_A)]},
        {"labels": [LabelResult(label="a", score=0.5, threshold=0.5, positive=True, driving_instance_uid=SOP_A,
                                driving_frame=-1)]},
        {"heatmap": Heatmap(label="a", x0=0.5, y0=0.0, x1=0.4, y1=1.0, peak=0.5, driving_instance_uid=SOP_A)},
        {"heatmap": Heatmap(label="a", x0=0.0, y0=0.0, x1=1.2, y1=1.0, peak=0.5, driving_instance_uid=SOP_A)},
        {"timings": Timings(received_first=T0, received_last=T0, completed=T0, inferred=T0,
                            stage_seconds={"infer": float("inf")})},
    ],
)
def test_build_refuses_values_the_schema_would_reject(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_finding(make_input(**changes))


def test_message_id_is_deterministic_hex_and_carries_no_uid() -> None:
    mid = message_id(SERIES, "ct-demo", "0.1.0", 0, T0)
    assert mid == message_id(SERIES, "ct-demo", "0.1.0", 0, T0)
    assert re.fullmatch(r"[0-9a-f]{64}", mid)
    assert SERIES not in mid and "ct-demo" not in mid
    others = {
        message_id(SERIES, "ct-demo", "0.1.0", 1, T0),
        message_id(SERIES, "ct-demo", "0.2.0", 0, T0),
        message_id(SERIES, "cxr-demo", "0.1.0", 0, T0),
        message_id(SERIES + "1", "ct-demo", "0.1.0", 0, T0),
        # The same series UID seen again after its rows were pruned: another revision 0, another id.
        message_id(SERIES, "ct-demo", "0.1.0", 0, T0 + 8 * 86400),
        # Joining without a separator would make these two collide.
        message_id("1.2", "3ct-demo", "0.1.0", 0, T0),
        message_id("1.23", "ct-demo", "0.1.0", 0, T0),
    }
    assert mid not in others and len(others) == 7


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("edge.findings", "site1", "CT", "ct-demo"), "edge.findings.site1.CT.ct-demo"),
        (("edge.findings", "site1", "", "ct-demo"), "edge.findings.site1.unknown.ct-demo"),
        (("edge.findings", "site 1", "C.T", "m*>x"), "edge.findings.site_1.C_T.m__x"),
        (("edge.findings", "s", "MR", "a/b\r\nc"), "edge.findings.s.MR.a_b__c"),
        (("edge", "s", "ÜS", "m"), "edge.s._S.m"),
    ],
)
def test_subject_tokens_are_sanitised(args: tuple[str, str, str, str], expected: str) -> None:
    assert subject(*args) == expected


def test_encode_is_compact_sorted_utf8_and_round_trips() -> None:
    f = build_finding(make_input(accession_number="Ä-1"))
    data = encode(f)
    assert isinstance(data, bytes)
    assert b" " not in data.replace(b"edge-box-1", b"")
    assert "Ä-1".encode() in data
    assert data == encode(json.loads(data))
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert decode(data) == f


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"score": float("nan")})


@pytest.mark.parametrize("data", [b"[1, 2]", b"not json", b"\xff\xfe", b'"text"'])
def test_decode_refuses_non_findings(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data)


def test_rfc3339_is_utc_with_z() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1.2345) == "1970-01-01T00:00:01.234Z"


def test_a_stored_heat_map_is_named_by_url_and_path(validator: jsonschema.protocols.Validator) -> None:
    bare = build_finding(make_input())
    assert bare["heatmap"]["image"] is None and bare["heatmap"]["url"] is None  # no PNG was stored
    assert bare["heatmap"]["overlay_url"] is None
    fid = message_id(SERIES, "ct-demo", "0.1.0", 0, T0)
    heatmap = dataclasses.replace(make_input().heatmap, image=f"heatmaps/{fid}.png",
                                  overlay=f"heatmaps/{fid}.overlay.png")
    f = build_finding(make_input(heatmap=heatmap))
    validator.validate(f)
    assert f["heatmap"]["url"] == heatmap_url(fid) == f"/heatmaps/{fid}.png"
    assert f["heatmap"]["overlay_url"] == heatmap_url(fid, overlay=True) == f"/heatmaps/{fid}.overlay.png"
    bad = copy.deepcopy(f)
    bad["heatmap"]["url"] = "/heatmaps/../../journal.sqlite3"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_stamping_at_publish_fills_published_at_and_the_publish_stage(
    validator: jsonschema.protocols.Validator,
) -> None:
    payload = encode(build_finding(make_input()))
    sent = decode(stamp_published(payload, published_at=T0 + 9.5, queued_at=T0 + 7.25))
    validator.validate(sent)
    assert sent["timings"]["published_at"] == rfc3339(T0 + 9.5)
    assert sent["timings"]["stage_seconds"] == {"preprocess": 0.05, "infer": 0.012, "publish": 2.25}
    # Everything else is as the outbox holds it.
    del sent["timings"]["published_at"], sent["timings"]["stage_seconds"]["publish"]
    assert sent == decode(payload)
    # A clock stepped back never makes a negative stage; a payload that is not a finding goes out unchanged.
    assert decode(stamp_published(payload, T0, T0 + 1))["timings"]["stage_seconds"]["publish"] == 0.0
    assert stamp_published(b"not json", T0, T0) == b"not json"
    assert stamp_published(b'{"timings": 3}', T0, T0) == b'{"timings": 3}'
