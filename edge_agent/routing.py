"""Rules that pick a model for a series: pure functions over the configured routes.

Routes are tried in config order and the first whose ``match`` fits wins, like a firewall rule
list: an operator reads the file top to bottom and knows which rule a series takes.

The slice range is special: while a series is still arriving its final slice count is unknown, so
the range is not applied (``slice_count=None``) and a slice-level model may start streaming on the
first instance. At completion the count is known and the range is applied; a series that no
longer fits is then routed again (or left unrouted).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from edge_agent.config import Route, RouteMatch
from edge_agent.dicom.header import InstanceMeta
from edge_agent.records import SeriesRow


def _split_image_type(value: str) -> tuple[str, ...]:
    # ImageType is multi-valued (PS3.3 C.7.6.1.1.2); the journal keeps it backslash-joined as in the element.
    return tuple(v.strip().upper() for v in value.split("\\") if v.strip())


@dataclass(frozen=True)
class SeriesFacts:
    """The header values of a series that routes match on (normalised: upper case, stripped)."""

    modality: str = ""
    body_part: str = ""
    sop_class_uid: str = ""
    image_type: tuple[str, ...] = ()
    series_description: str = ""

    @classmethod
    def create(cls, modality: str, body_part: str, sop_class_uid: str, image_type: str | Iterable[str],
               series_description: str) -> SeriesFacts:
        """Normalise raw header values the way RouteMatch normalises its lists."""
        types = _split_image_type(image_type) if isinstance(image_type, str) else tuple(
            t.strip().upper() for t in image_type if t.strip()
        )
        return cls(
            modality=modality.strip().upper(),
            body_part=body_part.strip().upper(),
            sop_class_uid=sop_class_uid.strip(),
            image_type=types,
            series_description=series_description.strip(),
        )

    @classmethod
    def from_row(cls, row: SeriesRow) -> SeriesFacts:
        """Facts of a series as the journal holds them."""
        return cls.create(row.modality, row.body_part, row.sop_class_uid, row.image_type, row.series_description)

    @classmethod
    def from_meta(cls, meta: InstanceMeta) -> SeriesFacts:
        """Facts of a series as read from one of its instances."""
        return cls.create(meta.modality, meta.body_part, meta.sop_class_uid, meta.image_type, meta.series_description)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    # Patterns come from the validated config (config.RouteMatch checks they compile); cache them
    # because every stored instance is routed.
    return re.compile(pattern, re.IGNORECASE)


def header_fits(match: RouteMatch, facts: SeriesFacts) -> bool:
    """True when every criterion except the slice range fits (an empty list means any)."""
    if match.modality and facts.modality not in match.modality:
        return False
    if match.body_part and facts.body_part not in match.body_part:
        return False
    if match.sop_class and facts.sop_class_uid not in match.sop_class:
        return False
    if match.image_type and not set(match.image_type) <= set(facts.image_type):
        return False
    return match.series_description is None or _regex(match.series_description).search(
        facts.series_description
    ) is not None


def slices_fit(match: RouteMatch, slice_count: int) -> bool:
    """True when ``slice_count`` lies in the route's slice range (bounds included)."""
    return match.slices.min <= slice_count and (match.slices.max is None or slice_count <= match.slices.max)


def route_fits(route: Route, facts: SeriesFacts, slice_count: int | None) -> bool:
    """One route against one series; the slice range applies only once ``slice_count`` is known."""
    if not header_fits(route.match, facts):
        return False
    return slice_count is None or slices_fit(route.match, slice_count)


def match_route(routes: list[Route], series: SeriesFacts, slice_count: int | None) -> Route | None:
    """The first route in config order that fits the series, or None.

    ``slice_count=None`` means the series is still arriving: the slice range is not applied yet.
    """
    for route in routes:
        if route_fits(route, series, slice_count):
            return route
    return None


def candidate_routes(routes: list[Route], facts: SeriesFacts) -> list[Route]:
    """Routes, in config order, that could match this series once its slice count is known."""
    return [r for r in routes if header_fits(r.match, facts)]
