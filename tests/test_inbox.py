"""LoopInbox: calls from other threads run on the loop in the order posted, a burst with one wake-up."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from edge_agent.inbox import LoopInbox


def test_calls_from_several_threads_run_on_the_loop_each_thread_in_its_order() -> None:
    async def main() -> tuple[list[tuple[int, int]], set[int], LoopInbox]:
        loop = asyncio.get_running_loop()
        inbox = LoopInbox(loop)
        seen: list[tuple[int, int]] = []
        threads_run_on: set[int] = set()
        done = asyncio.Event()
        per_thread, senders = 2000, 4

        def record(sender: int, n: int) -> None:
            threads_run_on.add(threading.get_ident())
            seen.append((sender, n))
            if len(seen) == per_thread * senders:
                done.set()

        def send(sender: int) -> None:
            for n in range(per_thread):
                inbox.post(record, sender, n)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
        for t in threads:
            t.start()
        await asyncio.wait_for(done.wait(), 30)
        for t in threads:
            t.join()
        return seen, threads_run_on, inbox

    seen, ran_on, inbox = asyncio.run(main())
    assert len(seen) == 8000 and len(set(seen)) == 8000
    for sender in range(4):
        assert [n for s, n in seen if s == sender] == list(range(2000))
    assert len(ran_on) == 1  # the loop's own thread
    assert inbox.calls == 8000
    assert 1 <= inbox.wakeups <= inbox.calls


def test_a_burst_posted_while_the_loop_is_busy_costs_one_wakeup() -> None:
    async def main() -> LoopInbox:
        loop = asyncio.get_running_loop()
        inbox = LoopInbox(loop)
        got: list[int] = []
        posted = threading.Event()

        def burst() -> None:
            for i in range(50):
                inbox.post(got.append, i)
            posted.set()

        threading.Thread(target=burst).start()
        posted.wait(10)  # the loop is held here, as by other work, while the burst arrives
        await asyncio.sleep(0.05)
        assert got == list(range(50))
        return inbox

    inbox = asyncio.run(main())
    assert (inbox.wakeups, inbox.calls) == (1, 50)


def test_a_failing_call_is_reported_and_the_ones_after_it_still_run() -> None:
    reported: list[dict[str, Any]] = []

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        inbox = LoopInbox(loop)
        got: list[int] = []

        def fail() -> None:
            raise ValueError("boom")

        def burst() -> None:
            inbox.post(got.append, 1)
            inbox.post(fail)
            inbox.post(got.append, 2)

        t = threading.Thread(target=burst)
        t.start()
        t.join()
        await asyncio.sleep(0.05)
        return got

    assert asyncio.run(main()) == [1, 2]
    assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)


def test_posting_to_a_closed_loop_raises_and_keeps_nothing() -> None:
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        inbox.post(print, "never")
    with pytest.raises(RuntimeError):  # the next one too: no drain was left marked as scheduled
        inbox.post(print, "never")
