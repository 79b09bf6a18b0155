"""A series' life as a pure state machine: states, events, transitions and the revision rule.

No I/O here. The journal applies these rules inside its transactions (so a rule and the state it
reads can never disagree), and the pipeline asks them what to do; nobody else decides a series'
state (STYLE.md 17).

    open --Closed(routed)--> complete --Queued--> queued --Acked--> published --ReleaseClaimed--> released
    open --Closed(unrouted)--> unrouted --ReleaseClaimed--> released
    complete --Failed--> failed          (a permanent failure: files are kept for an operator)
    complete --Deferred--> complete      (a transient failure: tried again after a back-off)
    queued --Rejected--> failed          (the broker refused the finding for good)

A genuinely new instance (a new SOP Instance UID, or new content under a known one) re-opens any
state but ``open`` under the next revision, and the next finding covers the whole series. A re-send
whose content matches the instance held changes nothing, in any state: it is a lost C-STORE-RSP or a
PACS re-send, not new data (issue 8, defect 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class SeriesState(StrEnum):
    OPEN = "open"  # instances are still arriving
    COMPLETE = "complete"  # closed and routed; the finding is being made (again after a transient failure)
    QUEUED = "queued"  # the finding is in the outbox
    PUBLISHED = "published"  # JetStream acknowledged the finding; the spool files may be kept a while
    RELEASED = "released"  # the spool files are gone; the row remains as history until pruned
    UNROUTED = "unrouted"  # no route matched; recorded, then released
    FAILED = "failed"  # could not be processed; files kept for an operator


class Event(StrEnum):
    CLOSED_ROUTED = "closed_routed"
    CLOSED_UNROUTED = "closed_unrouted"
    QUEUED = "queued"
    ACKED = "acked"
    RELEASE_CLAIMED = "release_claimed"
    FAILED = "failed"
    DEFERRED = "deferred"
    REJECTED = "rejected"


class IllegalTransition(ValueError):
    """An event that the series' current state does not allow (a stale revision, a race)."""


_TRANSITIONS: dict[tuple[SeriesState, Event], SeriesState] = {
    (SeriesState.OPEN, Event.CLOSED_ROUTED): SeriesState.COMPLETE,
    (SeriesState.OPEN, Event.CLOSED_UNROUTED): SeriesState.UNROUTED,
    (SeriesState.COMPLETE, Event.QUEUED): SeriesState.QUEUED,
    (SeriesState.OPEN, Event.FAILED): SeriesState.FAILED,  # an error before it could be routed
    (SeriesState.COMPLETE, Event.FAILED): SeriesState.FAILED,
    (SeriesState.COMPLETE, Event.DEFERRED): SeriesState.COMPLETE,
    (SeriesState.QUEUED, Event.ACKED): SeriesState.PUBLISHED,
    (SeriesState.QUEUED, Event.REJECTED): SeriesState.FAILED,
    (SeriesState.PUBLISHED, Event.RELEASE_CLAIMED): SeriesState.RELEASED,
    (SeriesState.UNROUTED, Event.RELEASE_CLAIMED): SeriesState.RELEASED,
}

# States whose spool files the daemon still needs (resumed at start, or kept for an operator).
HOLDING_STATES = frozenset({SeriesState.OPEN, SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.FAILED})
RELEASABLE_STATES = frozenset({SeriesState.PUBLISHED, SeriesState.UNROUTED})


def transition(state: SeriesState, event: Event) -> SeriesState:
    """The state after ``event``. Raises IllegalTransition when ``state`` does not allow it."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.value}") from None


def allowed_from(event: Event) -> tuple[SeriesState, ...]:
    """The states ``event`` may leave from: what a guarded SQL UPDATE checks."""
    return tuple(s for (s, e) in _TRANSITIONS if e is event)


class Arrival(StrEnum):
    NEW = "new"  # a SOP instance the series did not hold
    REPLACED = "replaced"  # a known SOP instance with different content: the new content wins
    IDENTICAL = "identical"  # the same SOP instance with the same content: nothing changes


@dataclass(frozen=True, slots=True)
class ArrivalDecision:
    """What a stored instance does to its series."""

    arrival: Arrival
    revision: int  # the series' revision after the instance
    reopens: bool  # the series leaves a closed state for ``open`` under ``revision``

    @property
    def changes_series(self) -> bool:
        return self.arrival is not Arrival.IDENTICAL


def on_arrival(
    state: SeriesState | None, revision: int, held_digest: str | None, content_digest: str
) -> ArrivalDecision:
    """The revision rule. ``state`` is None for a series not seen before.

    ``held_digest`` is the content digest of the instance with the same SOP Instance UID that the series
    already holds (released or not), or None when it holds none; an empty one (a row written before
    digests were kept) never matches, nor does one of another kind (a SHA-256 from before BLAKE3,
    dicom/digest.py), so such a re-send counts as new content.
    """
    if held_digest is not None and content_digest and held_digest == content_digest:
        return ArrivalDecision(Arrival.IDENTICAL, revision if state is not None else 0, False)
    arrival = Arrival.NEW if held_digest is None else Arrival.REPLACED
    if state is None:
        return ArrivalDecision(arrival, 0, False)
    if state is SeriesState.OPEN:
        return ArrivalDecision(arrival, revision, False)
    # New data after the series was closed: the finding must be made again over the whole series,
    # under a new revision (and so a new message id).
    return ArrivalDecision(arrival, revision + 1, True)


def count_says_complete(
    instance_count: int, expected_counts: Iterable[int | None], acquisition_numbers: Iterable[int | None]
) -> bool:
    """Whether Images in Acquisition (0020,1002) may end the series now, before its quiet time.

    The element counts the images of one acquisition, not of the series, and vendors set it per
    acquisition (often 1 for every slice of a 2-D multi-slice MR). So it is trusted only when every
    instance held carries the same count of at least two, they all belong to one acquisition (no
    instance of another acquisition has arrived), and exactly that many have arrived (issue 8,
    defect 3). Otherwise the route's quiet time rules.
    """
    counts = set(expected_counts)
    acquisitions = set(acquisition_numbers)
    if len(counts) != 1 or len(acquisitions) > 1:
        return False
    (expected,) = counts
    return expected is not None and expected >= 2 and instance_count == expected


@dataclass(frozen=True, slots=True)
class Coverage:
    """What a finding's result covers (finding schema 1.2)."""

    received: int  # every instance of the series the daemon took responsibility for, all revisions
    inferred: int  # instances whose every frame was inferred in this result
    failed: int  # instances held that could not be decoded or inferred

    def __post_init__(self) -> None:
        if min(self.received, self.inferred, self.failed) < 0:
            raise ValueError("coverage counts cannot be negative")
        if self.inferred + self.failed > self.received:
            raise ValueError("a result cannot cover more instances than were received")

    @property
    def whole_series(self) -> bool:
        return self.inferred == self.received


def retry_delay_seconds(attempt: int, first_seconds: float = 2.0, max_seconds: float = 300.0) -> float:
    """The back-off before try ``attempt`` (1 = the first retry) after a transient failure."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    return float(min(max_seconds, first_seconds * 2.0 ** min(attempt - 1, 30)))
