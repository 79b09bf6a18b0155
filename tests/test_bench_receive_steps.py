"""bench/receive_steps.py wraps the receiver's own methods: it must keep finding them, and time every step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_step_of_every_instance_is_timed(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "receive_steps.py"), "--ct", "20", "--reps", "1",
                          "--spool", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the last repetition's 20 instances" in out.stdout
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \|([^|]*)\|$", out.stdout, re.MULTILINE)
    steps = {name.strip(): median.strip() for name, median, _ in rows if name.strip() not in ("step", "---")}
    assert len(steps) == 9, steps  # eight steps and the sum
    for name, median in steps.items():
        assert re.fullmatch(r"\d+\.\d\d", median), f"{name}: {median}"
    assert list(tmp_path.iterdir()) == []  # its temporary spool is gone
