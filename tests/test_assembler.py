"""Series completion: the pure rule with a fake clock, the timers with real short quiet times."""

from __future__ import annotations

import asyncio
import time

from edge_agent.dicom.assembler import Assembler, due_at

QUIET_SECONDS = 0.05
WAIT_SECONDS = 5.0  # upper bound for an event that should come within a few quiet times


# -- the pure rule --------------------------------------------------------------------------------

def test_quiet_time_completes_a_series_unless_a_trusted_count_says_it_is_complete() -> None:
    assert due_at(100.0, 5.0, count_complete=False) == 105.0
    assert due_at(100.0, 5.0, count_complete=True) == 100.0
    assert due_at(100.0, 0.0, count_complete=False) == 100.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the timers -----------------------------------------------------------------------------------

class Recorder:
    """An on_due callback that records series ids and sets an event per series."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.events: dict[int, asyncio.Event] = {}

    def event(self, series_id: int) -> asyncio.Event:
        return self.events.setdefault(series_id, asyncio.Event())

    def __call__(self, series_id: int) -> None:
        self.completed.append(series_id)
        self.event(series_id).set()


def test_quiet_series_completes_once() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS)
        assert asm.open_count() == 1
        await asyncio.wait_for(rec.event(1).wait(), WAIT_SECONDS)
        assert asm.open_count() == 0
        asm.close()
        assert rec.completed == [1]

    asyncio.run(main())


def test_every_instance_rearms_the_one_timer() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(7, 0.0)  # due at once...
        asm.touch(7, 3600.0)  # ...but re-armed before it fired
        asm.touch(8, 0.0)
        assert asm.open_count() == 2
        # Timers fire in due order, so had series 7's first timer survived it would have fired by now.
        await asyncio.wait_for(rec.event(8).wait(), WAIT_SECONDS)
        assert rec.completed == [8]
        asm.touch(7, 0.0)  # and re-arming the other way brings completion forward
        await asyncio.wait_for(rec.event(7).wait(), WAIT_SECONDS)
        asm.close()
        assert rec.completed == [8, 7]

    asyncio.run(main())


def test_quiet_time_counts_from_the_last_instance() -> None:
    async def main() -> None:
        quiet_seconds = 0.2
        rec = Recorder()
        asm = Assembler(rec)
        loop = asyncio.get_running_loop()
        for _n in range(1, 11):
            asm.touch(7, quiet_seconds)
            last_touch = loop.time()
            await asyncio.sleep(quiet_seconds / 20)  # the modality's pace: far inside the quiet time
        assert rec.completed == []
        await asyncio.wait_for(rec.event(7).wait(), WAIT_SECONDS)
        assert loop.time() - last_touch >= quiet_seconds * 0.9
        asm.close()
        assert rec.completed == [7]

    asyncio.run(main())


def test_a_trusted_count_completes_without_waiting_for_quiet_time() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(3, 3600.0, False)
        asm.touch(3, 3600.0, True)  # the pipeline found a trustworthy count reached
        await asyncio.wait_for(rec.event(3).wait(), WAIT_SECONDS)
        asm.close()
        assert rec.completed == [3]

    asyncio.run(main())


def test_series_are_timed_independently() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS)
        asm.touch(2, 3600.0)
        await asyncio.wait_for(rec.event(1).wait(), WAIT_SECONDS)
        assert asm.open_count() == 1  # series 2 is still open
        asm.close()
        assert rec.completed == [1]
        assert asm.open_count() == 0

    asyncio.run(main())


def test_resumed_series_keeps_its_elapsed_quiet_time() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        # The quiet time passed while the daemon was down.
        asm.touch(4, 3600.0, last_received=time.monotonic() - 3600.0)
        await asyncio.wait_for(rec.event(4).wait(), WAIT_SECONDS)
        asm.close()

    asyncio.run(main())


def test_forget_disarms_the_timer() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS)
        asm.touch(2, QUIET_SECONDS * 2)
        asm.forget(1)
        asm.forget(99)  # unknown ids are fine
        assert asm.open_count() == 1
        await asyncio.wait_for(rec.event(2).wait(), WAIT_SECONDS)  # fires after series 1 would have
        asm.close()
        assert rec.completed == [2]

    asyncio.run(main())


def test_close_disarms_timers_and_ignores_later_touches() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS)
        asm.close()
        assert asm.open_count() == 0
        asm.touch(2, 0.0)  # e.g. an instance stored while shutting down: resumed on the next start
        assert asm.open_count() == 0
        # Give a would-be timer the chance to fire: nothing may run after close.
        await asyncio.sleep(QUIET_SECONDS * 2)
        assert rec.completed == []

    asyncio.run(main())


def test_fake_clock_drives_the_delay() -> None:
    async def main() -> None:
        clock = FakeClock()
        rec = Recorder()
        asm = Assembler(rec, clock=clock)
        loop = asyncio.get_running_loop()
        start = loop.time()
        asm.touch(5, 10.0, last_received=clock.now - 10.0)  # due now by the fake clock
        asm.touch(6, 10.0, last_received=clock.now - 10.0 + QUIET_SECONDS)  # due in one quiet time
        await asyncio.wait_for(rec.event(5).wait(), WAIT_SECONDS)
        assert rec.completed == [5]
        await asyncio.wait_for(rec.event(6).wait(), WAIT_SECONDS)
        assert loop.time() - start >= QUIET_SECONDS * 0.9
        asm.close()

    asyncio.run(main())
