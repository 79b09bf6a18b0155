"""Routing rules: which route (and so which model) a series takes."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.config import Route, parse_config
from edge_agent.dicom.header import InstanceMeta
from edge_agent.journal import SeriesRow, SeriesState
from edge_agent.routing import SeriesFacts, candidate_routes, match_route, route_fits

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def routes(*specs: dict[str, Any]) -> list[Route]:
    """Routes built through the real config parser, so matching sees what the daemon sees."""
    raw = {"site": "test", "state_dir": "/tmp/x", "routes": [{"model": "m", **s} for s in specs]}
    return parse_config(raw, env={}).routes


def facts(**kw: Any) -> SeriesFacts:
    base: dict[str, Any] = {"modality": "CT", "body_part": "CHEST", "sop_class_uid": CT_IMAGE,
                            "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "series_description": "Chest 1.0 B31f"}
    base.update(kw)
    return SeriesFacts.create(**base)


def names(rs: list[Route]) -> list[str]:
    return [r.name for r in rs]


def test_first_matching_route_in_config_order_wins() -> None:
    rs = routes({"name": "any-ct", "match": {"modality": ["CT"]}},
                {"name": "chest-ct", "match": {"body_part": ["CHEST"]}})
    assert match_route(rs, facts(), None) is rs[0]
    assert match_route(list(reversed(rs)), facts(), None) is rs[1]


def test_no_route_matches() -> None:
    rs = routes({"name": "cr", "match": {"modality": ["CR", "DX"]}})
    assert match_route(rs, facts(), 10) is None
    assert match_route([], facts(), None) is None
    assert candidate_routes(rs, facts()) == []


def test_empty_match_takes_everything() -> None:
    rs = routes({"name": "all"})
    assert match_route(rs, SeriesFacts(), None) is rs[0]
    assert match_route(rs, SeriesFacts(), 1) is rs[0]


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"modality": ["ct"]}, True),  # the config upper-cases its lists
        ({"modality": ["MR"]}, False),
        ({"body_part": ["CHEST", "LUNG"]}, True),
        ({"body_part": ["HEAD"]}, False),
        ({"sop_class": [CT_IMAGE]}, True),
        ({"sop_class": [CR_IMAGE, DX_IMAGE]}, False),
        ({"image_type": ["ORIGINAL", "AXIAL"]}, True),
        ({"image_type": ["original"]}, True),
        ({"image_type": ["DERIVED"]}, False),
        ({"image_type": ["ORIGINAL", "LOCALIZER"]}, False),  # every listed value must be present
        ({"series_description": "b31"}, True),  # searched, case-insensitive
        ({"series_description": "^chest"}, True),
        ({"series_description": "^1\\.0"}, False),
        ({"series_description": "lung|b31f$"}, True),
        ({"modality": ["CT"], "body_part": ["HEAD"]}, False),  # all criteria must hold
    ],
)
def test_each_criterion(match: dict[str, Any], expected: bool) -> None:
    rs = routes({"name": "r", "match": match})
    assert (match_route(rs, facts(), None) is not None) is expected
    assert (match_route(rs, facts(), 100) is not None) is expected
    assert (candidate_routes(rs, facts()) == rs) is expected


def test_header_values_are_normalised() -> None:
    f = facts(modality=" ct ", body_part="chest", image_type="original\\ primary \\\\axial",
              series_description="  Chest  ")
    assert f == SeriesFacts("CT", "CHEST", CT_IMAGE, ("ORIGINAL", "PRIMARY", "AXIAL"), "Chest")
    assert SeriesFacts.create("CT", "", "", ["derived", " "], "").image_type == ("DERIVED",)


def test_missing_header_values_do_not_match_a_listed_value() -> None:
    rs = routes({"name": "r", "match": {"body_part": ["CHEST"]}})
    assert match_route(rs, facts(body_part=""), None) is None
    rs = routes({"name": "r", "match": {"image_type": ["ORIGINAL"]}})
    assert match_route(rs, facts(image_type=""), None) is None
    rs = routes({"name": "r", "match": {"series_description": "."}})
    assert match_route(rs, facts(series_description=""), None) is None


def test_slice_range_is_not_applied_while_the_series_is_arriving() -> None:
    rs = routes({"name": "thin", "match": {"slices": {"min": 100}}}, {"name": "fallback"})
    assert match_route(rs, facts(), None) is rs[0]  # streaming may start on the first instance
    assert match_route(rs, facts(), 99) is rs[1]  # at completion the range applies
    assert match_route(rs, facts(), 100) is rs[0]


@pytest.mark.parametrize(("count", "fits"), [(1, False), (2, True), (5, True), (6, False)])
def test_slice_range_bounds_are_inclusive(count: int, fits: bool) -> None:
    route = routes({"name": "r", "match": {"slices": {"min": 2, "max": 5}}})[0]
    assert route_fits(route, facts(), count) is fits
    assert route_fits(route, facts(), None) is True


def test_slice_range_without_max() -> None:
    route = routes({"name": "r", "match": {"slices": {"min": 1}}})[0]
    assert route_fits(route, facts(), 1) and route_fits(route, facts(), 10_000)


def test_candidate_routes_ignore_slices_and_keep_order() -> None:
    rs = routes(
        {"name": "big", "match": {"modality": ["CT"], "slices": {"min": 200}}},
        {"name": "mr", "match": {"modality": ["MR"]}},
        {"name": "small", "match": {"modality": ["CT"], "slices": {"max": 50}}},
        {"name": "any"},
    )
    assert names(candidate_routes(rs, facts())) == ["big", "small", "any"]
    assert match_route(rs, facts(), None) is rs[0]
    assert match_route(rs, facts(), 30) is rs[2]
    assert match_route(rs, facts(), 100) is rs[3]
    # The first candidate is what match_route picks before the count is known.
    assert candidate_routes(rs, facts())[0] is match_route(rs, facts(), None)


def test_from_meta_and_from_row_agree() -> None:
    meta = InstanceMeta(
        sop_instance_uid="1.2.3.4", sop_class_uid=CR_IMAGE, series_uid="1.2.3", modality="cr", body_part="Chest",
        image_type="ORIGINAL\\PRIMARY", series_description="PA",
    )
    row = SeriesRow(
        id=1, series_uid="1.2.3", study_uid="", accession="", modality="CR", body_part="CHEST",
        sop_class_uid=CR_IMAGE, image_type="ORIGINAL\\PRIMARY", series_description="PA", manufacturer="",
        calling_aet="", called_aet="", expected_count=None, revision=0, first_received=0.0, last_received=0.0,
        state=SeriesState.OPEN, route=None, model=None, note=None, instance_count=1,
    )
    assert SeriesFacts.from_meta(meta) == SeriesFacts.from_row(row)
    assert SeriesFacts.from_row(row) == SeriesFacts("CR", "CHEST", CR_IMAGE, ("ORIGINAL", "PRIMARY"), "PA")


def test_facts_are_hashable_and_frozen() -> None:
    f = facts()
    assert {f: 1}[facts()] == 1
    with pytest.raises(AttributeError):
        f.modality = "MR"  # type: ignore[misc]
