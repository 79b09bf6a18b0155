"""What a preprocessing worker's call costs below busy normal threads: CPU per CT slice at two nicenesses.

Starts ``WorkerPool`` (two worker processes, as the daemon's default) at niceness 0 and at 10
(``pipeline.inference_niceness``), each beside two busy loops at normal priority on the machine's cores (the
receiver and the senders, in the daemon), and sends it CT slices for ct-demo as the pipeline does (the input
back through an ``Arena`` slot, four calls in flight). The workers' own CPU per call is read from /proc. The two
settings are interleaved in rounds; one line per round, then medians.

    .venv/bin/python bench/worker_niceness.py [--calls 400] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.worker_calls import _call, _timed  # noqa: E402
from edge_agent.inference.card import load_card  # noqa: E402
from edge_agent.inference.preprocess import load_instance_prepared_into  # noqa: E402
from edge_agent.workers import Arena, SentOnce, WorkerPool  # noqa: E402

BUSY = "while True: pass"


async def _measure(niceness: int, once: Any, calls: int) -> tuple[float, float]:
    """(workers' CPU ms, wall ms) per call, for a pool at ``niceness`` beside the busy loops."""
    pool = WorkerPool(2, niceness=niceness)
    arena = Arena(8, 4 * 256 * 256)
    try:
        await pool.warm_up()
        for _ in range(20):
            await _call(pool, load_instance_prepared_into, once, arena)
        wall, cpu = await _timed(pool, pool.pids(), load_instance_prepared_into, once, arena, calls, own=False)
        return cpu, wall
    finally:
        pool.shutdown()
        arena.close()


async def _rounds(args: argparse.Namespace) -> dict[int, list[tuple[float, float]]]:
    once = SentOnce(load_card(REPO / "engines" / "ct-demo"))
    results: dict[int, list[tuple[float, float]]] = {0: [], 10: []}
    for r in range(args.rounds):
        for niceness in (0, 10) if r % 2 == 0 else (10, 0):
            cpu, wall = await _measure(niceness, once, args.calls)
            results[niceness].append((cpu, wall))
            print(f"round {r + 1}: niceness {niceness:2d}: {cpu:.2f} ms CPU, {wall:.2f} ms wall per call", flush=True)
    return results


def main(args: argparse.Namespace) -> None:
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 2)]
    try:
        results = asyncio.run(_rounds(args))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"\n{args.rounds} rounds of {args.calls} calls, medians; {len(busy)} busy loops at niceness 0 beside "
          f"the pool; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| workers' niceness | workers' CPU per CT slice (ms) | wall per call (ms) |")
    print("|---:|---:|---:|")
    for niceness, runs in results.items():
        print(f"| {niceness} | {statistics.median(c for c, _ in runs):.2f} | "
              f"{statistics.median(w for _, w in runs):.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="CT slices per measurement")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each measures both nicenesses once")
    main(ap.parse_args())
