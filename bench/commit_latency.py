"""Where one C-STORE's time goes inside the daemon, with and without CT routed: medians per step, and the machine.

The rates of ``bench/ingest.py`` are set by how long each association waits between two instances, since a
sender sends the next only after the answer to the last. This bench starts the daemon with timing wrappers
installed (``bench/commit_hooks.py``: a few microseconds per instance), sends CT over one and over four
associations with dcmtk's ``storescu``, and prints the median (and 90th percentile) of each step of an
instance's round trip, with the whole machine's CPU use over the same window from /proc/stat (all cores:
200% is both cores of a 2-core machine busy). Receivers and workloads alternate within each repetition.

Run:  .venv/bin/python bench/commit_latency.py [--ct 1000] [--reps 2] [--edge-agent-source DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import send  # noqa: E402
from bench.ingest_data import ct_template, write_series  # noqa: E402
from bench.ingest_peers import EdgeAgent  # noqa: E402

STEPS = ["sender", "data", "commit", "inline", "wait to place", "place", "flush", "wait to record", "record",
         "hop back", "finish"]
CPU_FIELDS = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]


class TimedEdgeAgent(EdgeAgent):
    """The daemon with bench/commit_hooks.py installed before it starts."""

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def command(self, config_path: Path) -> list[str]:
        code = ("import commit_hooks; commit_hooks.install(); from edge_agent.cli import main; "
                f"raise SystemExit(main(['serve', '--config', {str(config_path)!r}]))")
        return [sys.executable, "-c", code]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(PYTHONPATH=f"{self.source}{os.pathsep}{REPO / 'bench'}", EDGE_AGENT_BENCH_TIMINGS=str(self.timings))
        return env

    def take_timings(self) -> dict[str, dict[str, float]]:
        """The steps' percentiles since the last call (the daemon writes them on SIGUSR2)."""
        with_mtime = self.timings.stat().st_mtime_ns if self.timings.exists() else 0
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.timings.exists() and self.timings.stat().st_mtime_ns != with_mtime:
                result: dict[str, dict[str, float]] = json.loads(self.timings.read_text())
                return result
            time.sleep(0.05)
        raise RuntimeError("the daemon wrote no timings")


def cpu_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=1000, help="CT slices per workload")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--edge-agent-source", type=Path, default=REPO,
                        help="the daemon's source tree (git archive REV | tar -x -C DIR)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="commit-latency-"))
    template = ct_template()
    agents = {
        "nothing routed": TimedEdgeAgent("edge-nothing", "nothing routed", root / "nothing", "EDGE",
                                         routed=False, source=args.edge_agent_source),
        "CT routed to ct-demo": TimedEdgeAgent("edge-ct", "CT routed", root / "routed", "EDGE", routed=True,
                                               source=args.edge_agent_source),
    }
    results: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    try:
        for agent in agents.values():
            agent.start()
        warm = write_series(template, root / "warm", 200, 4, "warm")
        for agent in agents.values():
            send(warm, agent.port, agent.called_aet, root)
        for rep in range(args.reps):
            order = list(agents.items()) if rep % 2 == 0 else list(reversed(agents.items()))
            for associations in (1, 4):
                for name, agent in order:
                    workload = write_series(template, root / f"w{rep}-{associations}-{agent.key}", args.ct,
                                            associations, "ct")
                    time.sleep(3)  # the previous series' completion and writeback out of the way
                    agent.take_timings()
                    before, started = cpu_ticks(), time.perf_counter()
                    problems = send(workload, agent.port, agent.called_aet, root)
                    wall = time.perf_counter() - started
                    ticks = [b - a for a, b in zip(before, cpu_ticks(), strict=True)]
                    steps = agent.take_timings()
                    total = sum(ticks) or 1
                    cores = os.cpu_count() or 1
                    cpu = {k: 100.0 * cores * t / total for k, t in zip(CPU_FIELDS, ticks, strict=True)}
                    results[(name, associations)].append(
                        {"rate": args.ct / wall, "cpu": cpu, "steps": steps, "problems": problems})
                    print(f"rep {rep + 1} {name}, {associations} association(s): {args.ct / wall:.0f}/s"
                          f"{' PROBLEMS ' + str(problems) if problems else ''}", flush=True)
                    for p in workload.groups:
                        for f in p:
                            f.unlink()
    finally:
        for agent in agents.values():
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    print()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.ct} CT slices of {template.file_bytes / 1e6:.2f} MB per workload, {args.reps} repetitions "
          "(medians over repetitions of each step's median; p90 in brackets)")
    print()
    print("| receiver | associations | instances/s | machine CPU busy | iowait | idle | "
          + " | ".join(STEPS) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(STEPS))
    for (name, associations), runs in results.items():
        busy = med([sum(r["cpu"][k] for k in ("user", "nice", "system", "irq", "softirq", "steal")) for r in runs])
        cells = []
        for step in STEPS:
            got = [r["steps"][step] for r in runs if step in r["steps"]]
            cells.append(f"{med([g['p50'] for g in got]):.2f} ({med([g['p90'] for g in got]):.2f})" if got else "-")
        print(f"| {name} | {associations} | {med([r['rate'] for r in runs]):.0f} | {busy:.0f}% | "
              f"{med([r['cpu']['iowait'] for r in runs]):.0f}% | {med([r['cpu']['idle'] for r in runs]):.0f}% | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
