"""Series completion: the pure rule with a fake clock, the timers with real short quiet times."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from edge_agent.dicom.assembler import Assembler, due_at, is_complete

QUIET_SECONDS = 0.05
WAIT_SECONDS = 5.0  # upper bound for an event that should come within a few quiet times


# -- the pure rule --------------------------------------------------------------------------------

def test_quiet_time_completes_a_series_without_expected_count() -> None:
    assert not is_complete(now=104.9, last_received=100.0, quiet_seconds=5.0, instance_count=3, expected_count=None)
    assert is_complete(now=105.0, last_received=100.0, quiet_seconds=5.0, instance_count=3, expected_count=None)
    assert due_at(100.0, 5.0, 3, None) == 105.0


def test_expected_count_reached_completes_at_once() -> None:
    assert is_complete(now=100.0, last_received=100.0, quiet_seconds=5.0, instance_count=10, expected_count=10)
    assert is_complete(now=100.0, last_received=100.0, quiet_seconds=5.0, instance_count=11, expected_count=10)
    assert due_at(100.0, 5.0, 10, 10) == 100.0


def test_expected_count_not_reached_still_completes_after_quiet_time() -> None:
    # A lost slice must not hold the series open for ever.
    assert not is_complete(now=102.0, last_received=100.0, quiet_seconds=5.0, instance_count=9, expected_count=10)
    assert is_complete(now=105.0, last_received=100.0, quiet_seconds=5.0, instance_count=9, expected_count=10)


def test_nonsense_expected_count_is_ignored() -> None:
    assert due_at(100.0, 5.0, 1, 0) == 105.0


def test_zero_quiet_time_is_complete_at_once() -> None:
    assert is_complete(now=100.0, last_received=100.0, quiet_seconds=0.0, instance_count=1, expected_count=None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rule_follows_a_fake_clock() -> None:
    clock = FakeClock()
    last = clock()
    for step in range(5):
        clock.now += 1.0
        assert is_complete(clock(), last, 4.5, 1, None) is (step == 4)


# -- the timers -----------------------------------------------------------------------------------

class Recorder:
    """An on_complete callback that records series ids and sets an event per series."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.events: dict[int, asyncio.Event] = {}

    def event(self, series_id: int) -> asyncio.Event:
        return self.events.setdefault(series_id, asyncio.Event())

    async def __call__(self, series_id: int) -> None:
        self.completed.append(series_id)
        self.event(series_id).set()


def test_quiet_series_completes_once() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS, 1, None)
        assert asm.open_count() == 1
        await asyncio.wait_for(rec.event(1).wait(), WAIT_SECONDS)
        assert asm.open_count() == 0
        await asm.close()
        assert rec.completed == [1]

    asyncio.run(main())


def test_every_instance_rearms_the_one_timer() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(7, 0.0, 1, None)  # due at once...
        asm.touch(7, 3600.0, 2, None)  # ...but re-armed before it fired
        asm.touch(8, 0.0, 1, None)
        assert asm.open_count() == 2
        # Timers fire in due order, so had series 7's first timer survived it would have fired by now.
        await asyncio.wait_for(rec.event(8).wait(), WAIT_SECONDS)
        assert rec.completed == [8]
        asm.touch(7, 0.0, 3, None)  # and re-arming the other way brings completion forward
        await asyncio.wait_for(rec.event(7).wait(), WAIT_SECONDS)
        await asm.close()
        assert rec.completed == [8, 7]

    asyncio.run(main())


def test_quiet_time_counts_from_the_last_instance() -> None:
    async def main() -> None:
        quiet_seconds = 0.2
        rec = Recorder()
        asm = Assembler(rec)
        loop = asyncio.get_running_loop()
        for n in range(1, 11):
            asm.touch(7, quiet_seconds, n, None)
            last_touch = loop.time()
            await asyncio.sleep(quiet_seconds / 20)  # the modality's pace: far inside the quiet time
        assert rec.completed == []
        await asyncio.wait_for(rec.event(7).wait(), WAIT_SECONDS)
        assert loop.time() - last_touch >= quiet_seconds * 0.9
        await asm.close()
        assert rec.completed == [7]

    asyncio.run(main())


def test_expected_count_reached_completes_without_waiting_for_quiet_time() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(3, 3600.0, 1, 2)
        asm.touch(3, 3600.0, 2, 2)
        await asyncio.wait_for(rec.event(3).wait(), WAIT_SECONDS)
        await asm.close()
        assert rec.completed == [3]

    asyncio.run(main())


def test_series_are_timed_independently() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS, 1, None)
        asm.touch(2, 3600.0, 1, None)
        await asyncio.wait_for(rec.event(1).wait(), WAIT_SECONDS)
        assert asm.open_count() == 1  # series 2 is still open
        await asm.close()
        assert rec.completed == [1]
        assert asm.open_count() == 0

    asyncio.run(main())


def test_resumed_series_keeps_its_elapsed_quiet_time() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        # The quiet time passed while the daemon was down.
        asm.touch(4, 3600.0, 1, None, last_received=time.monotonic() - 3600.0)
        await asyncio.wait_for(rec.event(4).wait(), WAIT_SECONDS)
        await asm.close()

    asyncio.run(main())


def test_forget_disarms_the_timer() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS, 1, None)
        asm.touch(2, QUIET_SECONDS * 2, 1, None)
        asm.forget(1)
        asm.forget(99)  # unknown ids are fine
        assert asm.open_count() == 1
        await asyncio.wait_for(rec.event(2).wait(), WAIT_SECONDS)  # fires after series 1 would have
        await asm.close()
        assert rec.completed == [2]

    asyncio.run(main())


def test_close_waits_for_running_completions() -> None:
    async def main() -> None:
        started = asyncio.Event()
        release = asyncio.Event()
        finished: list[int] = []

        async def slow(series_id: int) -> None:
            started.set()
            await release.wait()
            finished.append(series_id)

        asm = Assembler(slow)
        asm.touch(1, 0.0, 1, None)
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        assert asm.running_count() == 1
        closing = asyncio.create_task(asm.close())
        await asyncio.sleep(0)
        assert not closing.done()
        release.set()
        await asyncio.wait_for(closing, WAIT_SECONDS)
        assert finished == [1]
        assert asm.running_count() == 0

    asyncio.run(main())


def test_close_cancels_completions_past_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def stuck(series_id: int) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        asm = Assembler(stuck)
        asm.touch(1, 0.0, 1, None)
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        await asyncio.wait_for(asm.close(timeout_seconds=0.01), WAIT_SECONDS)
        assert cancelled.is_set()
        assert asm.running_count() == 0

    with caplog.at_level(logging.WARNING, logger="edge_agent.dicom.assembler"):
        asyncio.run(main())
    assert "1 series completions cancelled" in caplog.text


def test_close_disarms_timers_and_ignores_later_touches() -> None:
    async def main() -> None:
        rec = Recorder()
        asm = Assembler(rec)
        asm.touch(1, QUIET_SECONDS, 1, None)
        await asm.close()
        assert asm.open_count() == 0
        asm.touch(2, 0.0, 1, None)  # e.g. an instance stored while shutting down: resumed on the next start
        assert asm.open_count() == 0
        # Give a would-be timer the chance to fire: nothing may run after close.
        await asyncio.sleep(QUIET_SECONDS * 2)
        assert rec.completed == []

    asyncio.run(main())


def test_a_failing_completion_is_logged_and_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rec = Recorder()

        async def on_complete(series_id: int) -> None:
            if series_id == 1:
                raise RuntimeError("boom")
            await rec(series_id)

        asm = Assembler(on_complete)
        asm.touch(1, 0.0, 1, None)
        asm.touch(2, QUIET_SECONDS, 1, None)
        await asyncio.wait_for(rec.event(2).wait(), WAIT_SECONDS)
        await asm.close()
        assert rec.completed == [2]

    with caplog.at_level(logging.ERROR, logger="edge_agent.dicom.assembler"):
        asyncio.run(main())
    assert "completing series 1 failed" in caplog.text


def test_fake_clock_drives_the_delay() -> None:
    async def main() -> None:
        clock = FakeClock()
        rec = Recorder()
        asm = Assembler(rec, clock=clock)
        loop = asyncio.get_running_loop()
        start = loop.time()
        asm.touch(5, 10.0, 1, None, last_received=clock.now - 10.0)  # due now by the fake clock
        asm.touch(6, 10.0, 1, None, last_received=clock.now - 10.0 + QUIET_SECONDS)  # due in one quiet time
        await asyncio.wait_for(rec.event(5).wait(), WAIT_SECONDS)
        assert rec.completed == [5]
        await asyncio.wait_for(rec.event(6).wait(), WAIT_SECONDS)
        assert loop.time() - start >= QUIET_SECONDS * 0.9
        await asm.close()

    asyncio.run(main())
