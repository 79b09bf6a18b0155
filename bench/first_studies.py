"""The first CRs after the daemon starts: Success to finding, per CR, on fresh daemons, beside an earlier version.

A daemon that has just started (after an update, a reboot, a power cut) meets its first studies cold. This
bench starts a fresh daemon with the routes as shipped (`bench/ingest_peers.EdgeAgent`, its own nats-server),
waits for it to go idle, sends single chest CRs one at a time (`bench/ingest_latency.measure_cr_latency`), and
stops it; then the same for the daemon from ``--baseline-source``, the two alternating and swapping which goes
first. It prints, for each CR's position after the start, the median over the runs of its latency and of its
preprocessing, inference and the rest (from the finding's own stage timings).

Run:  .venv/bin/python bench/first_studies.py --baseline-source DIR [--edge-agent-source DIR] [--runs 4] [--crs 6]
      (DIR from 'git archive REV | tar -x -C DIR')
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import make_receiver
from bench.ingest_latency import LatencyResult, measure_cr_latency
from bench.ingest_peers import REPO
from bench.ingest_procstat import wait_idle

PARTS = ("preprocess", "infer", "rest")


def fresh_daemon_run(source: Path, crs: int) -> LatencyResult:
    """Start a daemon from ``source``, send ``crs`` CRs one at a time once it is idle, stop it."""
    with tempfile.TemporaryDirectory(prefix="edge-first-") as folder:
        daemon = make_receiver("edge-ct", Path(folder), source)
        daemon.start()
        try:
            wait_idle(daemon.pid, timeout_seconds=120)
            assert daemon.nats is not None
            return asyncio.run(measure_cr_latency(daemon.nats.url, daemon.port, daemon.called_aet, crs))
        finally:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge-agent-source", type=Path, default=REPO)
    parser.add_argument("--baseline-source", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=4, help="fresh daemons of each version")
    parser.add_argument("--crs", type=int, default=6, help="CRs sent to each fresh daemon")
    args = parser.parse_args()
    versions = {"edge-agent": args.edge_agent_source, "baseline": args.baseline_source}
    results: dict[str, list[LatencyResult]] = {name: [] for name in versions}
    for run in range(args.runs):
        order = list(versions) if run % 2 == 0 else list(reversed(versions))
        for name in order:
            result = fresh_daemon_run(versions[name], args.crs)
            if result.problems:
                print(f"{name}, run {run + 1}: {'; '.join(result.problems)}", flush=True)
            results[name].append(result)
            print(f"{name} run {run + 1}: " + ", ".join(f"{x:.1f}" for x in result.latencies_ms) + " ms", flush=True)
    print(f"\nMedian over {args.runs} fresh daemons of each, ms: latency (preprocess / infer / rest)")
    print("| CR after the start | " + " | ".join(versions) + " |")
    print("|---:|" + "---:|" * len(versions))
    for i in range(args.crs):
        cells = []
        for name in versions:
            runs = [r for r in results[name] if len(r.stages_ms) > i and len(r.latencies_ms) > i]
            if not runs:
                cells.append("-")
                continue
            latency = statistics.median(r.latencies_ms[i] for r in runs)
            parts = " / ".join(f"{statistics.median(r.stages_ms[i][p] for r in runs):.1f}" for p in PARTS)
            cells.append(f"{latency:.1f} ({parts})")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
