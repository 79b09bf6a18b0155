"""What one crashing worker costs the calls in flight beside it: 60 decodes with no crash vs. 60 with one.

Each call decodes and preprocesses a real 512x512 CT slice for the ct-demo card, as the pipeline does;
one call of the second run segfaults its worker instead (a real SIGSEGV), like a decoder on a hostile
file. The pool is warm before each run. Both runs are made here, side by side, so the ratio needs no
second build to compare with. Run:  .venv/bin/python bench/worker_crash.py [--calls 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import statistics
import time
from pathlib import Path

import pydicom.data

from edge_agent.errors import DecodeError
from edge_agent.inference.card import ModelCard, load_card
from edge_agent.workers import WorkerPool

REPO = Path(__file__).resolve().parent.parent
# A real 512x512 CT slice from the pydicom-data wheel.
CT_SOURCE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data" / "693_UNCR.dcm"


def decode(path: str, card: ModelCard, crash: bool) -> int:
    if crash:
        ctypes.string_at(0)  # read address 0: the worker dies of SIGSEGV
    from edge_agent.inference.preprocess import load_instance

    return len(load_instance(Path(path), card))


async def one_run(calls: int, workers: int, crash_at: int | None, card: ModelCard) -> tuple[float, WorkerPool, int]:
    pool = WorkerPool(workers)
    try:
        await pool.warm_up()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(pool.run(decode, str(CT_SOURCE), card, i == crash_at) for i in range(calls)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
    finally:
        pool.shutdown()
    failed = sum(isinstance(r, DecodeError) for r in results)
    wrong = [r for r in results if not isinstance(r, DecodeError) and r != 1]
    if wrong or failed != (crash_at is not None):
        raise SystemExit(f"unexpected results: {failed} DecodeError, others {wrong[:3]}")
    return elapsed, pool, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case; the median is shown")
    args = parser.parse_args()
    card = load_card(REPO / "engines" / "ct-demo")
    rows = []
    for name, crash_at in (("no crash", None), ("one crash", args.calls // 2)):
        seconds = []
        for _ in range(args.repeats):
            elapsed, pool, failed = asyncio.run(one_run(args.calls, args.workers, crash_at, card))
            seconds.append(elapsed)
        # An older WorkerPool has no counters: "-".
        isolated = getattr(pool, "isolated_runs", "-")
        retried = getattr(pool, "retried_calls", "-")
        kills = 0 if crash_at is None else 1
        rows.append((name, args.calls, kills, failed, isolated, retried, statistics.median(seconds)))
    print(f"workers: {args.workers}, median of {args.repeats} runs each")
    print(f"{'case':<10} {'calls':>5} {'kills':>5} {'failed':>6} {'alone':>5} {'retried':>7} {'seconds':>8}")
    for name, n, kills, failed, isolated, retried, secs in rows:
        print(f"{name:<10} {n:>5} {kills:>5} {failed:>6} {isolated!s:>5} {retried!s:>7} {secs:>8.2f}")
    print(f"one crash / no crash: {rows[1][-1] / rows[0][-1]:.2f}x")


if __name__ == "__main__":
    main()
