"""A CT series that arrives while the one before is being released, against the same series on a quiet daemon.

A PACS forwarding a backlog sends study after study: the finding of one is published, its spool files are
released (each emptied into a slot: its blocks zeroed in the page cache and later written back) while the next
one floods in. This bench starts the daemon with the routes as shipped (CT routed to ct-demo) and, in each
repetition:

1. sends series A (``--ct`` slices over four associations) and waits only until its finding is published, which
   starts A's release;
2. at once sends series B and times it ("after a release");
3. waits until B's finding is published and the daemon is idle, flushes the page cache (``sync``) and waits for
   the machine to go quiet; then sends series C and times it ("quiet").

Run:  .venv/bin/python bench/back_to_back.py [--ct 1000] [--reps 3] [--edge-agent-source DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import make_receiver, make_workload, send
from bench.ingest_data import ct_template
from bench.ingest_peers import REPO, SETTLE_TIMEOUT_SECONDS, EdgeAgent
from bench.ingest_procstat import tree_cpu_seconds, wait_idle


def wait_published(daemon: EdgeAgent, findings: int) -> None:
    """Until the daemon has published ``findings`` findings in all (polled every 20 ms)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while daemon.counters()["published"] < findings:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{findings} findings not published within {SETTLE_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.02)


def timed_send(daemon: EdgeAgent, folder: Path, slices: int, logs: Path) -> tuple[float, float]:
    """Send one new CT series over four associations; (instances/s, daemon CPU ms per instance while sending)."""
    workload = make_workload("ct4", {"ct": ct_template()}, folder, slices, 0)
    cpu0, started = tree_cpu_seconds(daemon.pid), time.perf_counter()
    problems = send(workload, daemon.port, daemon.called_aet, logs)
    wall, cpu = time.perf_counter() - started, tree_cpu_seconds(daemon.pid) - cpu0
    if problems:
        raise RuntimeError("; ".join(problems))
    return workload.instances / wall, cpu * 1000 / workload.instances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=1000, help="CT slices per series")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--edge-agent-source", type=Path, default=REPO)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"after a release": [], "quiet": []}
    with tempfile.TemporaryDirectory(prefix="edge-back-to-back-") as folder:
        root = Path(folder)
        daemon = make_receiver("edge-ct", root, args.edge_agent_source.resolve())
        assert isinstance(daemon, EdgeAgent)
        logs = root / "logs"
        logs.mkdir()
        daemon.start()
        try:
            wait_idle(daemon.pid, timeout_seconds=120)
            published = daemon.counters()["published"]
            for rep in range(args.reps):
                timed_send(daemon, root / "a", args.ct, logs)  # A, as the series before
                published += 1
                wait_published(daemon, published)  # A's release starts now
                results["after a release"].append(timed_send(daemon, root / "b", args.ct, logs))
                published += 1
                wait_published(daemon, published)
                wait_idle(daemon.pid, timeout_seconds=SETTLE_TIMEOUT_SECONDS)
                os.sync()
                wait_idle(daemon.pid, timeout_seconds=SETTLE_TIMEOUT_SECONDS)
                results["quiet"].append(timed_send(daemon, root / "c", args.ct, logs))
                published += 1
                wait_published(daemon, published)
                wait_idle(daemon.pid, timeout_seconds=SETTLE_TIMEOUT_SECONDS)
                for way, runs in results.items():
                    print(f"rep {rep + 1}: {way}: {runs[-1][0]:.0f} instances/s, {runs[-1][1]:.2f} ms CPU/instance",
                          flush=True)
        finally:
            daemon.stop()
    print(f"\n{args.reps} repetitions, {args.ct} CT slices a series over 4 associations, medians; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; daemon from {args.edge_agent_source}\n")
    print("| series sent | instances/s, median (min-max) | daemon CPU per instance while sending |")
    print("|---|---:|---:|")
    for way, runs in results.items():
        rates = [r for r, _ in runs]
        print(f"| {way} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
              f"{statistics.median(c for _, c in runs):.2f} ms |")
    after, quiet = (statistics.median(r for r, _ in runs) for runs in results.values())
    print(f"\nafter a release / quiet: {after / quiet:.2f}x")


if __name__ == "__main__":
    main()
