"""The pure core of a series' life: transitions, the revision rule, the count rule, coverage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.series import (
    Arrival,
    Coverage,
    Event,
    IllegalTransition,
    SeriesState,
    allowed_from,
    count_says_complete,
    on_arrival,
    retry_delay_seconds,
    transition,
)

S = SeriesState


def test_the_happy_path_from_open_to_released() -> None:
    state = S.OPEN
    for event in (Event.CLOSED_ROUTED, Event.QUEUED, Event.ACKED, Event.RELEASE_CLAIMED):
        state = transition(state, event)
    assert state is S.RELEASED
    assert transition(transition(S.OPEN, Event.CLOSED_UNROUTED), Event.RELEASE_CLAIMED) is S.RELEASED


def test_failures_and_deferrals() -> None:
    assert transition(S.COMPLETE, Event.DEFERRED) is S.COMPLETE  # a transient failure keeps it complete
    assert transition(S.COMPLETE, Event.FAILED) is S.FAILED
    assert transition(S.OPEN, Event.FAILED) is S.FAILED
    assert transition(S.QUEUED, Event.REJECTED) is S.FAILED


@pytest.mark.parametrize(("state", "event"), [
    (S.OPEN, Event.QUEUED),  # a finding for a series that was never closed
    (S.QUEUED, Event.RELEASE_CLAIMED),  # files released before the PubAck
    (S.COMPLETE, Event.RELEASE_CLAIMED),
    (S.FAILED, Event.RELEASE_CLAIMED),  # an operator's files
    (S.RELEASED, Event.ACKED),
    (S.PUBLISHED, Event.QUEUED),
])
def test_illegal_transitions_are_refused(state: SeriesState, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        transition(state, event)


def test_no_event_leaves_a_released_series_and_files_go_only_after_the_ack() -> None:
    for state, event in itertools.product(S, Event):
        try:
            after = transition(state, event)
        except IllegalTransition:
            continue
        assert state is not S.RELEASED
        if after is S.RELEASED:
            assert state in (S.PUBLISHED, S.UNROUTED)
        assert state in allowed_from(event)


def test_an_identical_resend_changes_nothing_in_every_state() -> None:
    for state in S:
        decision = on_arrival(state, 3, "abc", "abc")
        assert decision.arrival is Arrival.IDENTICAL and decision.revision == 3 and not decision.reopens
        assert not decision.changes_series


def test_new_data_reopens_every_closed_state_under_the_next_revision() -> None:
    for state in S:
        for held in (None, "old"):
            decision = on_arrival(state, 3, held, "new")
            assert decision.arrival is (Arrival.NEW if held is None else Arrival.REPLACED)
            if state is S.OPEN:
                assert (decision.revision, decision.reopens) == (3, False)
            else:
                assert (decision.revision, decision.reopens) == (4, True)
    assert on_arrival(None, 0, None, "x").revision == 0


def test_a_missing_hash_never_matches() -> None:
    assert on_arrival(S.PUBLISHED, 0, "", "").arrival is Arrival.REPLACED


def test_images_in_acquisition_of_one_acquisition_completes_a_series() -> None:
    assert count_says_complete(3, [3, 3, 3], [1, 1, 1])
    assert count_says_complete(3, [3, 3, 3], [None, None, None])
    assert not count_says_complete(2, [3, 3], [1, 1])  # not yet


def test_images_in_acquisition_is_not_trusted_when_it_cannot_be_the_series_size() -> None:
    """Defect 3: a 20-slice 2-D MR whose every slice says 1 must not complete after every slice."""
    assert not count_says_complete(1, [1], [1])
    assert not count_says_complete(5, [1] * 5, [1] * 5)
    assert not count_says_complete(3, [3, 3, None], [1, 1, 1])  # one instance does not say
    assert not count_says_complete(3, [3, 3, 2], [1, 1, 1])  # they disagree
    assert not count_says_complete(3, [3, 3, 3], [1, 1, 2])  # another acquisition is arriving
    assert not count_says_complete(4, [3, 3, 3, 3], [1, 1, 1, 1])  # more than one acquisition's worth
    assert not count_says_complete(0, [], [])


@given(st.integers(0, 40), st.lists(st.one_of(st.none(), st.integers(0, 40)), max_size=40),
       st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=40))
def test_the_count_rule_trusts_only_a_single_agreeing_count_of_at_least_two(
    n: int, counts: list[int | None], acquisitions: list[int | None]
) -> None:
    if count_says_complete(n, counts, acquisitions):
        assert len(set(counts)) == 1 and len(set(acquisitions)) <= 1
        assert counts[0] is not None and counts[0] >= 2 and n == counts[0]


def test_coverage() -> None:
    assert Coverage(4, 4, 0).whole_series
    assert not Coverage(4, 3, 1).whole_series
    assert not Coverage(4, 1, 0).whole_series  # earlier instances were released
    with pytest.raises(ValueError):
        Coverage(2, 2, 1)
    with pytest.raises(ValueError):
        Coverage(2, -1, 0)


def test_retry_delays_grow_and_are_capped() -> None:
    delays = [retry_delay_seconds(n) for n in range(1, 15)]
    assert delays[0] == 2.0 and delays == sorted(delays) and delays[-1] == 300.0
    with pytest.raises(ValueError):
        retry_delay_seconds(0)
