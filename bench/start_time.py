"""How long the daemon takes from its command to ready, beside an earlier version: fresh starts, alternating.

A box restarts after an update, a reboot or a crash, and every study sent meanwhile waits (or is refused) until
the daemon is ready again. Each run starts the daemon with the routes and models as shipped
(`bench/ingest_peers.EdgeAgent`, its own nats-server, a new state folder: nothing to resume), times it from the
process's start until ``/readyz`` answers 200 (polled every 10 ms), and stops it; the two versions alternate and
swap which goes first.

Run:  .venv/bin/python bench/start_time.py --baseline-source DIR [--edge-agent-source DIR] [--runs 6]
      (DIR from 'git archive REV | tar -x -C DIR')
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import make_receiver, order_for
from bench.ingest_peers import REPO, EdgeAgent


def start_seconds(source: Path) -> float:
    """Start a daemon from ``source`` on a new state folder; seconds until it is ready. Stops it."""
    with tempfile.TemporaryDirectory(prefix="edge-start-") as folder:
        daemon = make_receiver("edge-ct", Path(folder), source)
        assert isinstance(daemon, EdgeAgent)
        daemon.ready_poll_seconds = 0.01
        try:
            daemon.start()
            return daemon.start_seconds
        finally:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge-agent-source", type=Path, default=REPO)
    parser.add_argument("--baseline-source", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=6, help="fresh starts of each version")
    args = parser.parse_args()
    versions = {"edge-agent": args.edge_agent_source, "baseline": args.baseline_source}
    results: dict[str, list[float]] = {name: [] for name in versions}
    for run in range(args.runs):
        for name in order_for(run, list(versions)):
            results[name].append(start_seconds(versions[name].resolve()))
            print(f"run {run + 1}: {name} ready after {results[name][-1]:.2f} s", flush=True)
    print(f"\n{args.runs} fresh starts of each, alternating; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| daemon | source | ready after, median | min | max |")
    print("|---|---|---:|---:|---:|")
    for name, runs in results.items():
        print(f"| {name} | {versions[name]} | {statistics.median(runs):.2f} s | {min(runs):.2f} s | "
              f"{max(runs):.2f} s |")
    ratio = statistics.median(results["baseline"]) / statistics.median(results["edge-agent"])
    print(f"\nedge-agent starts {ratio:.2f}x as fast as the baseline (ratio of medians)")


if __name__ == "__main__":
    main()
