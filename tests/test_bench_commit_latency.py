"""bench/commit_latency.py wraps the receiver's own methods inside a running daemon: it must keep finding them,
and time every step of both commit paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_every_step_is_timed_for_both_daemons(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "commit_latency.py"), "--ct", "12", "--reps", "1"],
                         capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    header = re.search(r"^\| receiver \|.*\|$", out.stdout, re.MULTILINE)
    assert header is not None, out.stdout[-2000:]
    columns = [c.strip() for c in header.group(0).strip("|").split("|")]
    rows = {}
    for line in re.findall(r"^\| (?:nothing routed|CT routed to ct-demo) \|.*\|$", out.stdout, re.MULTILINE):
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[(cells["receiver"], cells["associations"])] = cells
    assert set(rows) == {(r, a) for r in ("nothing routed", "CT routed to ct-demo") for a in ("1", "4")}
    timed = re.compile(r"\d+\.\d\d \(\d+\.\d\d\)")
    for (_, associations), cells in rows.items():
        assert float(cells["instances/s"]) > 0
        # One association: committed on the receiver's loop; four: through the placing and journal threads.
        steps = ["sender", "data", "commit", "flush", "finish"]
        steps += ["inline"] if associations == "1" else ["wait to place", "place", "record", "hop back"]
        for step in steps:
            assert timed.fullmatch(cells[step]), (associations, step, cells[step])
