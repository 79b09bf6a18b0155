"""The back-pressure bounds on their own: the admission gate (pure) and the decode slots (asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.backpressure import Admission, Slots


def test_admission_closes_at_the_limit_and_opens_at_half() -> None:
    gate = Admission(10)
    assert gate.resume_at == 5
    changes = [gate.update(n) for n in range(11)]
    assert changes == [False] * 10 + [True]
    assert gate.reason is not None and "pipeline.max_pending_instances" in gate.reason
    # Hysteresis: falling below the limit is not enough.
    assert [gate.update(n) for n in (9, 7, 6, 12)] == [False] * 4
    assert gate.reason is not None
    assert gate.update(5) is True and gate.reason is None
    assert gate.update(9) is False and gate.reason is None


def test_admission_rejects_a_resume_mark_that_is_not_below_the_limit() -> None:
    with pytest.raises(ValueError):
        Admission(4, resume_at=4)
    with pytest.raises(ValueError):
        Admission(0)


def test_slots_serve_urgent_waiters_first_and_never_exceed_their_size() -> None:
    async def main() -> None:
        slots = Slots(2)
        order: list[str] = []
        peak = 0
        release = asyncio.Event()

        async def job(name: str, urgent: bool) -> None:
            nonlocal peak
            async with slots.hold(urgent):
                peak = max(peak, slots.held)
                order.append(name)
                await release.wait()

        first = [asyncio.create_task(job(f"r{i}", False)) for i in range(2)]
        await asyncio.sleep(0)
        later = [asyncio.create_task(job("r2", False)), asyncio.create_task(job("u0", True))]
        await asyncio.sleep(0)
        assert slots.held == 2 and slots.waiting == 2
        release.set()
        await asyncio.gather(*first, *later)
        assert order == ["r0", "r1", "u0", "r2"]
        assert peak == 2 and slots.held == 0

    asyncio.run(main())


def test_a_cancelled_waiter_gives_back_what_it_was_granted() -> None:
    async def main() -> None:
        slots = Slots(1)
        entered: list[str] = []

        async def waiter(name: str) -> None:
            async with slots.hold():
                entered.append(name)

        held = slots.hold()
        await held.__aenter__()
        gone = asyncio.create_task(waiter("gone"))
        granted = asyncio.create_task(waiter("granted"))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        gone.cancel()  # cancelled while waiting: it never holds a slot
        await asyncio.gather(gone, return_exceptions=True)
        await held.__aexit__(None, None, None)  # the slot goes to `granted`...
        granted.cancel()  # ...which is cancelled before it runs: the slot must come back
        await asyncio.gather(granted, return_exceptions=True)
        assert entered == [] and slots.held == 0
        async with slots.hold():
            assert slots.held == 1

    asyncio.run(main())
