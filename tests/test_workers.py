"""The preprocessing worker pool: a dying worker fails only its own item; workers die with the daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.errors import DecodeError
from edge_agent.workers import WorkerPool

REPO = Path(__file__).resolve().parent.parent


def crash_on(value: int) -> int:
    """Stands in for a decoder that faults on one hostile file: the worker process dies outright."""
    if value < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return value * 2


def test_a_worker_that_dies_fails_only_its_item_and_the_pool_recovers() -> None:
    crashes: list[int] = []

    async def main() -> list[object]:
        pool = WorkerPool(2, processes=True, on_crash=lambda: crashes.append(1))
        try:
            await pool.warm_up()
            results = await asyncio.gather(*(pool.run(crash_on, v) for v in (1, 2, -1, 3, 4)),
                                           return_exceptions=True)
            results.append(await pool.run(crash_on, 5))  # the rebuilt pool serves new work
            return results
        finally:
            pool.shutdown()

    results = asyncio.run(main())
    assert results[:2] == [2, 4] and results[3:] == [6, 8, 10]
    assert isinstance(results[2], DecodeError)
    assert len(crashes) >= 1


def test_thread_pool_runs_the_same_calls() -> None:
    async def main() -> int:
        pool = WorkerPool(1, processes=False)
        try:
            return await pool.run(crash_on, 21)
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == 42


_CHILD = """
import asyncio, os, sys
from edge_agent.workers import WorkerPool, _warm

async def main():
    pool = WorkerPool(2)
    await pool.warm_up()
    pids = {await pool.run(_warm) for _ in range(8)}
    print(" ".join(map(str, sorted(pids))), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_workers_die_when_the_daemon_is_killed() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout is not None
    pids = [int(p) for p in child.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    child.kill()
    child.wait(10)
    child.stdout.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
