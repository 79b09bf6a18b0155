"""The preprocessing worker pool: a dying worker fails only its own item; workers die with the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import multiprocessing.spawn
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DecodeError
from edge_agent.inference.card import load_card
from edge_agent.inference.preprocess import load_instance_prepared, load_instance_prepared_into
from edge_agent.workers import LOW_PRIORITY_NICENESS, Arena, SentOnce, Slot, WorkerPool, at_low_priority
from tests.dicomfiles import CT_SMALL, EMRI_SMALL, MR_SMALL_RLE

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


def segfault_on(folder: str, value: int) -> int:
    """A decoder that segfaults on one hostile file (a real SIGSEGV: it reads address 0) and decodes the rest;
    each run leaves a file named after its value and worker."""
    with open(os.path.join(folder, f"{value}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    if value < 0:
        ctypes.string_at(0)
    time.sleep(0.01)
    return value * 2


def test_one_crash_among_many_calls_reruns_only_the_culprit_alone(tmp_path: Path) -> None:
    crashes: list[int] = []
    values = [*range(30), -1, *range(30, 59)]

    async def main() -> tuple[list[object], WorkerPool]:
        pool = WorkerPool(2, processes=True, on_crash=lambda: crashes.append(1))
        try:
            await pool.warm_up()
            results = await asyncio.gather(*(pool.run(segfault_on, str(tmp_path), v) for v in values),
                                           return_exceptions=True)
            return results, pool
        finally:
            pool.shutdown()

    results, pool = asyncio.run(main())
    assert len(results) == 60
    for value, result in zip(values, results, strict=True):
        if value < 0:
            assert isinstance(result, DecodeError)
        else:
            assert result == value * 2
    runs: dict[int, list[int]] = {}
    for p in tmp_path.iterdir():
        value, pid, _ = p.name.rsplit(".", 2)
        runs.setdefault(int(value), []).append(int(pid))
    # The call whose worker died ran again alone, in a worker of its own, and killed that one too; every other
    # call ran once: a call in flight on the other worker, or waiting, was not disturbed by the crash.
    assert pool.isolated_runs == 1
    assert len(crashes) == 2
    assert {v: len(pids) for v, pids in runs.items() if len(pids) != 1} == {-1: 2}
    innocent = {pid for v, pids in runs.items() if v >= 0 for pid in pids}
    assert len(set(runs[-1]) & innocent) == 1  # one of the pool's workers, then the lone one, which ran nothing else


def read_gate(path: str) -> str:
    with open(path) as fifo:  # blocks in the worker until the test opens the FIFO for writing
        return fifo.read()


def test_a_call_waiting_for_a_worker_can_be_cancelled(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> None:
        pool = WorkerPool(1, processes=True)
        try:
            held = asyncio.create_task(pool.run(read_gate, str(gate)))
            waiting = asyncio.create_task(pool.run(crash_on, 3))
            await asyncio.sleep(0)  # both tasks start and submit their calls; nothing is timed
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.to_thread(gate.write_text, "open")
            assert await held == "open"
            assert await pool.run(crash_on, 4) == 8
        finally:
            pool.shutdown()

    asyncio.run(main())


def note_run(folder: str, name: str) -> str:
    with open(os.path.join(folder, "order"), "a") as f:  # one short append per call: the order they ran in
        f.write(name + "\n")
    return name


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_urgent_calls_go_ahead_of_routine_ones_waiting_for_a_worker(tmp_path: Path, processes: bool) -> None:
    # A chest radiograph's decoding (an urgent route) must not wait behind a CT series' slices queued before it.
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> list[str]:
        pool = WorkerPool(1, processes=processes)
        try:
            await pool.run(note_run, str(tmp_path), "first")  # the worker is up: what follows queues in order
            held = asyncio.create_task(pool.run(read_gate, str(gate)))
            calls = []
            for name, urgent in (("r1", False), ("r2", False), ("u1", True), ("cancelled", True), ("r3", False),
                                 ("u2", True)):
                calls.append(asyncio.create_task(pool.run(note_run, str(tmp_path), name, urgent=urgent)))
                await asyncio.sleep(0)  # each submits its call before the next: nothing is timed
            calls[3].cancel()
            await asyncio.to_thread(gate.write_text, "open")
            assert await held == "open"
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(done[3], asyncio.CancelledError)
            assert await pool.run(note_run, str(tmp_path), "after") == "after"  # the cancelled one took no turn
            return (tmp_path / "order").read_text().split()
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == ["first", "u1", "u2", "r1", "r2", "r3", "after"]


def test_a_thread_call_whose_caller_stopped_waiting_keeps_its_turn_until_it_ends(tmp_path: Path) -> None:
    # A thread cannot be stopped: the call runs on, and the calls after it wait for it in urgency order.
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> list[str]:
        pool = WorkerPool(1, processes=False)
        try:
            held = asyncio.create_task(pool.run(read_gate, str(gate)))
            await asyncio.sleep(0)
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
            calls = []
            for name, urgent in (("r1", False), ("u1", True)):
                calls.append(asyncio.create_task(pool.run(note_run, str(tmp_path), name, urgent=urgent)))
                await asyncio.sleep(0)
            await asyncio.to_thread(gate.write_text, "open")
            await asyncio.gather(*calls)
            return (tmp_path / "order").read_text().split()
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == ["u1", "r1"]


def test_shutdown_of_a_thread_pool_cancels_the_calls_waiting_for_a_thread(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> None:
        pool = WorkerPool(1, processes=False)
        held = asyncio.create_task(pool.run(read_gate, str(gate)))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(pool.run(crash_on, 3, urgent=u)) for u in (False, True)]
        await asyncio.sleep(0)
        pool.shutdown()
        for task in waiting:
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.to_thread(gate.write_text, "open")  # the running call ends on its own
        assert await held == "open"

    asyncio.run(main())


def test_a_running_call_cancelled_gives_its_worker_back(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> None:
        pool = WorkerPool(1, processes=True)
        try:
            await pool.warm_up()
            held = asyncio.create_task(pool.run(read_gate, str(gate)))
            await asyncio.sleep(0.2)  # the call is in the worker, blocked on the gate
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
            await asyncio.to_thread(gate.write_text, "open")  # its result comes back to nobody
            # The one worker serves the next call (it would wait forever if the worker were not given back).
            assert await asyncio.wait_for(pool.run(crash_on, 4), 30) == 8
        finally:
            pool.shutdown()

    asyncio.run(main())


def echo(value: object) -> object:
    return value


def sized(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def unpicklable_result() -> object:
    return lambda: None


def test_calls_and_results_larger_than_a_pipe_holds_go_through_whole() -> None:
    async def main() -> None:
        pool = WorkerPool(2, processes=True)
        try:
            await pool.warm_up()
            big = os.urandom(5 << 20)  # a pipe holds 64 KiB: the call is written as the worker reads it
            assert await pool.run(echo, big) == big
            results = await asyncio.gather(*(pool.run(sized, n << 20) for n in (1, 8, 3)))
            assert [len(r) for r in results] == [1 << 20, 8 << 20, 3 << 20] and results[1] == sized(8 << 20)
            with pytest.raises(RuntimeError, match="result could not be sent back"):
                await pool.run(unpicklable_result)
            with pytest.raises(DecodeError, match="bad pixels"):
                await pool.run(raise_decode_error)
            assert await pool.run(echo, 7) == 7  # the worker that could not send its result serves on
        finally:
            pool.shutdown()

    asyncio.run(main())


def raise_decode_error() -> None:
    raise DecodeError("bad pixels")


def test_a_worker_killed_while_idle_is_replaced_and_loses_nothing() -> None:
    crashes: list[int] = []

    async def main() -> int:
        pool = WorkerPool(2, processes=True, on_crash=lambda: crashes.append(1))
        try:
            await pool.warm_up()
            pids = {await pool.run(os.getpid) for _ in range(4)}
            victim = next(iter(pids))
            os.kill(victim, signal.SIGKILL)  # as the OOM killer would
            results = await asyncio.gather(*(pool.run(crash_on, v) for v in range(8)))
            assert results == [v * 2 for v in range(8)]
            await pool.warm_up()  # returns once the new worker has started
            assert len(pool.pids()) == 2 and victim not in pool.pids()
            return victim
        finally:
            pool.shutdown()

    victim = asyncio.run(main())
    assert crashes == [1] and not _alive(victim)


def test_a_worker_that_dies_before_it_has_started_is_started_again(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[int, set[int]]:
        pool = WorkerPool(1, processes=True)
        try:
            starting = asyncio.create_task(pool.warm_up())
            await asyncio.sleep(0)
            first = set(pool.pids())
            assert len(first) == 1  # spawned, and still importing: it has not said it started
            for pid in first:
                os.kill(pid, signal.SIGKILL)
            await starting  # waits for the worker started after it, half a second later
            return await pool.run(os.getpid), first
        finally:
            pool.shutdown()

    pid, first = asyncio.run(main())
    assert pid not in first
    assert "a preprocessing worker died before it started (signal SIGKILL); starting another in 0.5 s" in caplog.text


def test_shutdown_cancels_calls_and_stops_busy_and_idle_workers(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)

    async def main() -> tuple[set[int], list[BaseException | object]]:
        pool = WorkerPool(2, processes=True)
        await pool.warm_up()
        pids = set(pool.pids())
        held = asyncio.create_task(pool.run(read_gate, str(gate)))  # busy until the gate opens: never
        waiting = [asyncio.create_task(pool.run(read_gate, str(gate))) for _ in range(2)]
        await asyncio.sleep(0.2)
        pool.shutdown()
        outcomes = await asyncio.gather(held, *waiting, return_exceptions=True)
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(echo, 1)
        return pids, outcomes

    pids, outcomes = asyncio.run(main())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_thread_pool_runs_the_same_calls() -> None:
    async def main() -> int:
        pool = WorkerPool(1, processes=False)
        try:
            return await pool.run(crash_on, 21)
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == 42


def note_warm_up(folder: str, slow: str | None = None) -> None:
    """A warm-up that leaves a trace: a file named after the worker that ran it, one line per run; the first
    worker to claim the file ``slow`` takes a second longer."""
    if slow is not None:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(slow, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            time.sleep(1.0)
    with open(os.path.join(folder, str(os.getpid())), "a") as f:
        f.write("warmed\n")


def warmed_before(folder: str, value: int) -> tuple[int, bool]:
    """This worker's pid, and whether it had run its warm-up before this call; dies on a negative value."""
    warmed = os.path.exists(os.path.join(folder, str(os.getpid())))
    if value < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.1)  # long enough that one worker does not take every call while the other is runnable
    return os.getpid(), warmed


def test_every_worker_warms_up_once_before_its_first_call_also_one_started_after_a_crash(tmp_path: Path) -> None:
    folder = tmp_path / "warmed"
    folder.mkdir()

    async def main() -> tuple[set[int], set[int]]:
        pool = WorkerPool(2, on_crash=lambda: None)
        try:
            await pool.warm_up(functools.partial(note_warm_up, str(folder), str(tmp_path / "slow")))
            # Both workers have started, the slow one too.
            assert len(os.listdir(folder)) == 2
            first = await asyncio.gather(*(pool.run(warmed_before, str(folder), v) for v in range(6)))
            assert all(warmed for _, warmed in first)
            with pytest.raises(DecodeError):
                await pool.run(warmed_before, str(folder), -1)  # its worker dies, and again when it runs alone
            await pool.warm_up()  # waits for the worker started in the dead one's place
            after = await asyncio.gather(*(pool.run(warmed_before, str(folder), v) for v in range(6)))
            assert all(warmed for _, warmed in after)
            return {pid for pid, _ in first}, {pid for pid, _ in after}
        finally:
            pool.shutdown()

    first, after = asyncio.run(main())
    assert len(first) == 2 and len(after) == 2 and len(first & after) == 1  # one worker lived, one is new
    runs = {int(p.name): p.read_text() for p in folder.iterdir()}
    assert first | after == set(runs)
    assert all(text == "warmed\n" for text in runs.values())  # once per worker
    # The lone worker that ran the suspect call again, and died again, did not warm up: it would be a fourth.
    assert len(runs) == 3


def test_a_warm_up_asked_for_after_calls_leaves_the_running_workers_alone(tmp_path: Path) -> None:
    folder = str(tmp_path)

    async def main() -> tuple[int, int]:
        pool = WorkerPool(1)
        try:
            running = asyncio.create_task(pool.run(read_gate, str(gate)))
            await asyncio.sleep(0)
            # The warm-up waits for the worker, which the call in flight holds until the gate opens.
            warming = asyncio.create_task(pool.warm_up(functools.partial(note_warm_up, folder)))
            await asyncio.sleep(0)
            await asyncio.to_thread(gate.write_text, "open")
            assert await running == "open"  # the call in flight was not disturbed
            await warming
            pid, warmed = await pool.run(warmed_before, folder, 1)
            assert not warmed
            with pytest.raises(DecodeError):
                await pool.run(warmed_before, folder, -1)
            new_pid, warmed = await pool.run(warmed_before, folder, 1)
            assert warmed  # the pool made after the crash warms up
            return pid, new_pid
        finally:
            pool.shutdown()

    gate = tmp_path / "gate"
    os.mkfifo(gate)
    pid, new_pid = asyncio.run(main())
    assert new_pid != pid and str(pid) not in {p.name for p in tmp_path.iterdir()}


def warm_up_that_kills_its_worker() -> None:
    """As the OOM killer would end a worker whose warm-up image does not fit."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_warm_up_that_kills_its_worker_is_given_up_and_the_pool_serves_cold(caplog: pytest.LogCaptureFixture) -> None:
    crashes: list[int] = []

    async def main() -> tuple[list[int], int, int]:
        pool = WorkerPool(2, on_crash=lambda: crashes.append(1))
        try:
            await pool.warm_up(warm_up_that_kills_its_worker)  # returns: its workers start cold in the end
            isolated = pool.isolated_runs
            results = await asyncio.gather(*(pool.run(crash_on, v) for v in range(6)))
            return results, isolated, pool.isolated_runs
        finally:
            pool.shutdown()

    results, isolated_during_warm_up, isolated_after = asyncio.run(main())
    assert results == [0, 2, 4, 6, 8, 10]
    assert isolated_after == isolated_during_warm_up  # the calls after the warm-up ran on a pool, none alone
    assert 1 <= len(crashes) <= 2  # the warmed-up pool, and perhaps the one made before the verdict
    assert "a preprocessing worker died while warming up; workers start cold from now on" in caplog.text


def failing_warm_up() -> None:
    raise RuntimeError("no memory for the warm-up image")


@pytest.mark.parametrize("processes", [True, False])
def test_a_warm_up_that_fails_leaves_the_workers_serving_and_says_so(
    processes: bool, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> int:
        pool = WorkerPool(2, processes=processes)
        try:
            await pool.warm_up(failing_warm_up)
            return await pool.run(crash_on, 21)
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == 42
    said = capfd.readouterr().err + caplog.text  # a worker process logs to its stderr
    assert "preprocessing worker's warm-up failed (RuntimeError); it starts cold" in said


_unpickled = 0  # in a worker: how many Card objects it has unpickled


class Card:
    """Stands in for a model card; counts, in each process, how often one is unpickled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: dict[str, str]) -> None:
        global _unpickled
        _unpickled += 1
        self.__dict__.update(state)


def unpickled_so_far(card: Card, crash: bool = False) -> tuple[str, int, int]:
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    return card.name, _unpickled, os.getpid()


def test_an_argument_sent_once_is_unpickled_once_per_worker() -> None:
    async def main() -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]], tuple[str, int, int]]:
        pool = WorkerPool(1)
        try:
            card = Card("ct-demo")
            plain = [await pool.run(unpickled_so_far, card) for _ in range(3)]
            once = SentOnce(Card("cxr"))
            sent = [await pool.run(unpickled_so_far, once) for _ in range(3)]
            # The worker dies; the call runs again alone, then the rebuilt pool's new worker takes it afresh.
            with pytest.raises(DecodeError):
                await pool.run(unpickled_so_far, once, True)
            return plain, sent, await pool.run(unpickled_so_far, once)
        finally:
            pool.shutdown()

    plain, sent, after = asyncio.run(main())
    assert [(name, n) for name, n, _ in plain] == [("ct-demo", 1), ("ct-demo", 2), ("ct-demo", 3)]  # every call
    assert [(name, n) for name, n, _ in sent] == [("cxr", 4)] * 3  # once, then kept
    assert after[:2] == ("cxr", 1) and after[2] != sent[0][2]


def test_a_thread_pool_is_handed_the_value_itself() -> None:
    async def main(card: Card) -> Card:
        pool = WorkerPool(1, processes=False)
        try:
            return await pool.run(lambda c: c, SentOnce(card))
        finally:
            pool.shutdown()

    card = Card("ct-demo")
    assert asyncio.run(main(card)) is card


def write_into(slot: Slot, value: float, shape: tuple[int, ...] = (2, 2), dtype: str = "float32") -> bool:
    return slot.write(np.full(shape, value, dtype))


def test_an_input_comes_back_through_the_arena_as_it_would_through_the_pipe() -> None:
    """The worker's first frame lands in shared memory bit for bit; further frames come through the pipe."""
    card = load_card(REPO / "engines" / "ct-demo")
    files = [CT_SMALL, MR_SMALL_RLE, EMRI_SMALL]  # EMRI_SMALL: multi-frame

    async def main() -> list[tuple[Any, bool, Any]]:
        pool, arena = WorkerPool(2), Arena(2, 4 * int(np.prod(card.input_shape)))
        try:
            out = []
            for path in files:
                slot = arena.take()
                assert slot is not None
                got, in_slot = await pool.run(load_instance_prepared_into, path, SentOnce(card), slot)
                out.append((got, in_slot, arena.read(slot, card.input_shape).copy() if in_slot else None))
                arena.give_back(slot)
            assert arena.free == 2
            return out
        finally:
            pool.shutdown()
            arena.close()

    for path, (got, in_slot, first) in zip(files, asyncio.run(main()), strict=True):
        want = load_instance_prepared(path, card)
        assert in_slot and got[0].tensor.size == 0 and len(got) == len(want)
        assert first.dtype == np.float32 and np.array_equal(first, want[0].tensor)
        assert all(np.array_equal(g.tensor, w.tensor) for g, w in zip(got[1:], want[1:], strict=True))
        assert [replace(g, tensor=None) for g in got] == [replace(w, tensor=None) for w in want]
    assert len(load_instance_prepared(EMRI_SMALL, card)) > 1


def test_an_arena_hands_out_its_slots_once_and_refuses_what_does_not_fit() -> None:
    async def main() -> None:
        pool, arena = WorkerPool(1), Arena(2, 16)
        try:
            a, b = arena.take(), arena.take()
            assert a is not None and b is not None and arena.take() is None and a.offset != b.offset
            assert await pool.run(write_into, a, 1.5) and await pool.run(write_into, b, -2.0)
            assert not await pool.run(write_into, a, 9.0, (3, 2))  # 24 bytes
            assert not await pool.run(write_into, a, 9.0, (2, 2), "float64")
            assert (arena.read(a, (2, 2)) == 1.5).all() and (arena.read(b, (2, 2)) == -2.0).all()
            arena.give_back(a)
            assert arena.take() == a
            # A later arena that gets the same fd number: the worker, which keeps its maps, maps the new one.
            fd = a.fd
            arena.close()
            arena = Arena(1, 16)
            # As the kernel does when the old number is the lowest free one: the new memfd under the old number.
            if arena._fd != fd:  # (it may have been the lowest free one here already)
                os.dup2(arena._fd, fd)
                os.close(arena._fd)
                arena._fd = fd
            c = arena.take()
            assert c is not None and c.fd == fd and c.token != a.token
            assert await pool.run(write_into, c, 7.0)
            assert (arena.read(c, (2, 2)) == 7.0).all()
        finally:
            pool.shutdown()
            arena.close()

    asyncio.run(main())


def test_a_slot_that_cannot_be_mapped_takes_nothing_and_the_input_goes_by_the_pipe() -> None:
    gone = Slot(owner=2**22 + 1, fd=3, token=b"x", size=16, offset=0, length=16)  # above any pid Linux gives
    assert not gone.write(np.zeros((2, 2), np.float32))


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


def niceness() -> tuple[int, int]:
    """This thread's niceness (Linux keeps one per thread) and its process's main thread's."""
    return os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, os.getpid())


@pytest.mark.parametrize("processes", [True, False])
def test_low_priority_work_runs_on_a_lowered_thread_and_lowers_nothing_else(processes: bool) -> None:
    # How a finding's overlay is drawn: in a worker, on a thread of its own at niceness +10 (19 at most), while the
    # worker's own thread (and the daemon's, with a thread pool) keep theirs.
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        pool = WorkerPool(1, processes=processes)
        try:
            return await pool.run(at_low_priority, niceness), await pool.run(niceness)
        finally:
            pool.shutdown()

    (low, main_thread), (plain, _) = asyncio.run(main())
    assert low == min(19, base + LOW_PRIORITY_NICENESS)
    assert main_thread == base and plain == base
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    assert at_low_priority(crash_on, 4) == 8  # the result comes back


@pytest.mark.parametrize("processes", [True, False])
def test_a_lowered_pool_runs_its_calls_lower_and_its_low_priority_work_lower_still(processes: bool) -> None:
    # pipeline.inference_niceness: the workers run that much below the daemon; the daemon's own thread does not.
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        pool = WorkerPool(2, processes=processes, niceness=3)
        try:
            return await pool.run(niceness), await pool.run(at_low_priority, niceness)
        finally:
            pool.shutdown()

    (call, _), (low, _) = asyncio.run(main())
    assert call == min(19, base + 3)
    # The low-priority thread sits below its process's main thread: a worker's, lowered with the pool (processes),
    # or this process's, which is not (threads: whichever thread asked first, here or in an earlier test).
    assert low == min(19, base + (3 if processes else 0) + LOW_PRIORITY_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_a_pool_whose_workers_cannot_start_says_so_and_recovers(tmp_path: Path) -> None:
    """Workers whose interpreter exits at once (a broken install): the pool's problem says so, which /readyz reports
    (Agent.readiness), while the calls wait; once a worker can start, they run and the problem is gone."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    python = multiprocessing.spawn.get_executable()
    resource_tracker.ensure_running()  # started by the good interpreter, before the workers need it

    async def main() -> None:
        pool = WorkerPool(1, processes=True)
        multiprocessing.spawn.set_executable(str(broken))
        try:
            call = asyncio.create_task(pool.run(crash_on, 21))
            for _ in range(1500):
                if pool.problem is not None:
                    break
                await asyncio.sleep(0.02)
            assert pool.problem.startswith("no preprocessing worker is running: a preprocessing worker died before "
                                           "it started (exit code 1)")
            assert not call.done()
            multiprocessing.spawn.set_executable(python)
            assert await asyncio.wait_for(call, 30) == 42
            assert pool.problem is None
        finally:
            multiprocessing.spawn.set_executable(python)
            pool.shutdown()

    asyncio.run(main())
