"""The fault-injection suite, small: each scenario of tests/fault_scenarios.py once, against the real daemon.

The long run is ``.venv/bin/python bench/faults.py --kills 20 --instances 1000`` (docs/reliability.md).
Each test prints its outcome (``pytest -s`` shows it) and fails with every contract violation it saw.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import fault_scenarios as scenarios
from tests.fault_tools import CannotInject
from tests.faults import Outcome, StreamMessage, check_findings

pytestmark = pytest.mark.e2e


def run(scenario: Callable[..., Outcome], tmp_path: Path, **sizes: Any) -> Outcome:
    try:
        out = scenario(tmp_path / "work", **sizes)
    except CannotInject as exc:
        pytest.skip(str(exc))
    print(out.summary())
    assert out.ok, out.summary()
    return out


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    out = run(scenarios.sigkill, tmp_path, kills=3, instances=40, seed=7)
    assert out.times == 3 and out.acknowledged >= 40


def test_sigterm_while_a_slow_engine_completes_a_series(tmp_path: Path) -> None:
    run(scenarios.sigterm_slow_engine, tmp_path, slices=12, seconds_per_image=0.25)


@pytest.mark.parametrize("overdue", [True, False], ids=["call-overdue", "call-within-its-deadline"])
def test_sigterm_while_an_engine_call_hangs_exits_promptly_and_the_next_start_finishes(
    tmp_path: Path, overdue: bool
) -> None:
    run(scenarios.sigterm_hung_engine, tmp_path, overdue=overdue)


def test_a_late_instance_makes_one_revision_and_identical_resends_none(tmp_path: Path) -> None:
    run(scenarios.late_and_resend, tmp_path)


def test_broker_killed_mid_publish(tmp_path: Path) -> None:
    run(scenarios.broker_killed_mid_publish, tmp_path, crs=3, ct_slices=6)


def test_broker_down_at_start(tmp_path: Path) -> None:
    run(scenarios.broker_down_at_start, tmp_path, crs=2, ct_slices=5)


def test_broker_down_longer_than_the_duplicate_window(tmp_path: Path) -> None:
    out = run(scenarios.broker_down_past_duplicate_window, tmp_path)
    assert any("more than once" in n for n in out.notes)


def test_a_stream_that_refuses_writes(tmp_path: Path) -> None:
    run(scenarios.stream_refuses_writes, tmp_path)


def test_disk_full_mid_write(tmp_path: Path) -> None:
    run(scenarios.disk_full_mid_write, tmp_path)


def test_an_unremovable_spool_file(tmp_path: Path) -> None:
    run(scenarios.unremovable_spool_file, tmp_path)


def test_a_read_only_heat_map_folder(tmp_path: Path) -> None:
    run(scenarios.read_only_heatmaps, tmp_path)


# -- the checker itself, on made-up streams (no daemon) ---------------------------------------------------


def _msg(seq: int, series: str, revision: int, sops: list[str], *, failed: int = 0) -> StreamMessage:
    finding_id = f"{series}-{revision}"
    finding = {"finding_id": finding_id, "series_instance_uid": series, "revision": revision,
               "sop_instance_uids": sops, "instances_received": len(sops) + failed,
               "instances_inferred": len(sops), "instances_failed": failed, "schema_version": "1.2"}
    return StreamMessage(seq, finding_id, b"{}", finding)


def test_the_checker_passes_a_correct_stream() -> None:
    v = check_findings({"s1": {"a", "b"}, "s2": {"c"}},
                       [_msg(1, "s1", 0, ["a"]), _msg(2, "s2", 0, ["c"]), _msg(3, "s1", 1, ["a", "b"])])
    assert not v.lost and not v.problems and v.revisions == 1 and v.duplicate_ids == 0


def test_the_checker_finds_lost_partial_duplicate_and_empty_revisions() -> None:
    v = check_findings(
        {"lost": {"a"}, "short": {"a", "b"}, "dup": {"a"}, "rerev": {"a"}},
        [_msg(1, "short", 0, ["a"], failed=1), _msg(2, "dup", 0, ["a"]), _msg(3, "dup", 0, ["a"]),
         _msg(4, "rerev", 0, ["a"]), _msg(5, "rerev", 1, ["a"])],
    )
    assert sorted(x.split(":")[0] for x in v.lost) == ["series ...lost", "series ...short"]
    assert v.duplicate_ids == 1
    text = "\n".join(v.problems)
    assert "partial finding" in text and "repeat a finding_id" in text and "a new revision without new data" in text


def test_the_checker_reads_a_finding_without_the_1_2_counts_as_not_covering() -> None:
    old = StreamMessage(1, "x", b"{}", {"finding_id": "x", "series_instance_uid": "s", "revision": 0,
                                         "sop_instance_uids": ["a"], "schema_version": "1.1"})
    v = check_findings({"s": {"a"}}, [old])
    assert len(v.lost) == 1 and any("lack 'instances_inferred'" in p for p in v.problems)
