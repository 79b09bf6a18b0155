"""What one preprocessing call on the worker pool costs besides its own work, side by side in one run: the card
sent as itself or once (``SentOnce``), the input sent back through the pool's pipe or through shared memory
(``Arena``).

Runs ``WorkerPool`` (two worker processes, as the daemon's default) in this process and calls it as the
pipeline does, the calls of each way interleaved in rounds; CPU is this process's plus the workers' (from
/proc), per call.

    .venv/bin/python bench/worker_calls.py [--calls 2000] [--rounds 3]

- "nothing": a function that takes the card and returns at once: the cost of the call itself.
- "CT slice": ``load_instance_prepared_into`` on a 512x512 CT slice for ct-demo: the real call (its 256 KiB
  input back through the pipe, or, with an arena, written into a slot that the daemon reads in place).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest_data import CT_SOURCE  # noqa: E402
from edge_agent.inference.card import ModelCard, load_card  # noqa: E402
from edge_agent.inference.preprocess import load_instance_prepared_into  # noqa: E402
from edge_agent.workers import Arena, SentOnce, WorkerPool  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def nothing(path: Path, card: ModelCard, slot: Any) -> int:
    return card.input_shape[0]


def _cpu_seconds(pids: list[int], own: bool = True) -> float:
    """CPU seconds so far of ``pids``, and of this process with ``own``."""
    mine = os.times()
    total = mine.user + mine.system if own else 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def _workers(pool: WorkerPool) -> list[int]:
    """The pool's worker processes (an older pool, without ``pids``: this process's children, less
    multiprocessing's resource tracker)."""
    if hasattr(pool, "pids"):
        return list(pool.pids())
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return sorted(p for p in found if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes())


async def _call(pool: WorkerPool, fn: Any, card: Any, arena: Arena | None) -> None:
    slot = arena.take() if arena is not None else None
    try:
        result = await pool.run(fn, CT_SOURCE, card, slot)
        if isinstance(result, tuple) and result[1]:
            assert arena is not None and slot is not None
            float(arena.read(slot, (1, 256, 256))[0, 0, 0])  # read in place, as the batcher does
    finally:
        if slot is not None:
            assert arena is not None
            arena.give_back(slot)


async def _timed(pool: WorkerPool, pids: list[int], fn: Any, card: Any, arena: Arena | None,
                 calls: int, own: bool = True) -> tuple[float, float]:
    """(wall ms, CPU ms) per call, with as many calls in flight as the pool has workers, twice over; the CPU is the
    workers' and, with ``own``, this process's."""
    cpu0, wall0 = _cpu_seconds(pids, own), time.perf_counter()
    pending: set[asyncio.Future[Any]] = set()
    for _ in range(calls):
        if len(pending) >= 2 * pool.workers:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.ensure_future(_call(pool, fn, card, arena)))
    await asyncio.gather(*pending)
    return (time.perf_counter() - wall0) * 1000 / calls, (_cpu_seconds(pids, own) - cpu0) * 1000 / calls


async def main(args: argparse.Namespace) -> None:
    card = load_card(REPO / "engines" / "ct-demo")
    once = SentOnce(card)
    pool = WorkerPool(2)
    arena = Arena(2 * pool.workers, 4 * 256 * 256)
    await pool.warm_up()
    pids = _workers(pool)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for work, fn, calls in (("nothing", nothing, args.calls), ("CT slice", load_instance_prepared_into,
                                                                       args.calls // 4)):
                ways: tuple[tuple[str, Any, Arena | None], ...] = (
                    ("card as itself, input through the pipe", card, None),
                    ("SentOnce, input through the pipe", once, None),
                    ("SentOnce, input in an Arena slot", once, arena))
                for way, arg, shared in ways[: 2 if work == "nothing" else 3]:
                    results.setdefault((work, way), []).append(await _timed(pool, pids, fn, arg, shared, calls))
    finally:
        pool.shutdown()
        arena.close()
    print(f"{args.rounds} rounds, medians; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| call | how | wall per call (ms) | CPU per call, daemon + workers (ms) |")
    print("|---|---|---:|---:|")
    for (work, way), runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {work} | {way} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per measurement of the empty function")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each measures every combination once")
    asyncio.run(main(ap.parse_args()))
