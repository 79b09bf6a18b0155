"""The agent in-process: signals by calling the handler, the state_dir lock, one lifecycle on real peers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import Agent, lock_state_dir
from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, parse_config
from edge_agent.errors import StateDirLockedError
from edge_agent.journal import Journal
from edge_agent.metrics import Metrics
from tests.dicomfiles import CT_SMALL, storescu
from tests.natsutil import NatsServer
from tests.netutil import free_port

ENGINES = Path(__file__).resolve().parent.parent / "engines"


def config(tmp: Path, bus_url: str = "nats://127.0.0.1:1") -> AgentConfig:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp / "state")
    raw["model_repository"] = str(ENGINES)
    raw["dicom"]["port"] = free_port()
    raw["http"]["port"] = free_port()
    raw["bus"]["url"] = bus_url
    raw["bus"]["reconnect_wait_seconds"] = 0.1
    raw["spool"]["min_free_bytes"] = 1
    raw["routes"][1]["quiet_seconds"] = 0.2
    raw["pipeline"]["preprocess_pool"] = "thread"
    return parse_config(raw)


def test_the_first_signal_drains_and_the_second_forces_exit(tmp_path: Path) -> None:
    async def main() -> None:
        agent = Agent(config(tmp_path))
        agent.handle_exit(signal.SIGTERM)
        assert agent.should_exit.is_set() and not agent.force_exit.is_set()
        agent.handle_exit(signal.SIGINT)
        assert agent.force_exit.is_set()

    asyncio.run(main())


def test_the_state_dir_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirLockedError, match=f"pid {os.getpid()}"):
            lock_state_dir(tmp_path)
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path))  # free again once the holder closed it


def test_a_lifecycle_stores_infers_publishes_and_stops_cleanly(tmp_path: Path, nats_server: NatsServer) -> None:
    """startup -> a CT instance by storescu -> its finding acknowledged -> shutdown marks the stop clean."""
    cfg = config(tmp_path, nats_server.url)

    async def main() -> None:
        agent = Agent(cfg, Metrics())
        run = asyncio.create_task(agent.run(install_signal_handlers=False))
        while agent.receiver is None or not agent.receiver.accepting:
            assert not run.done(), run.exception() if run.done() else ""
            await asyncio.sleep(0.05)
        result = await asyncio.to_thread(storescu, cfg.dicom.port, [CT_SMALL])
        assert result.returncode == 0, result.stderr
        assert agent.journal is not None
        journal = agent.journal

        def settled() -> bool:
            states = journal.counts().by_series_state
            return bool(states) and set(states) <= {"published", "released"}

        for _ in range(1200):  # the quiet time, inference and the PubAck: a few seconds
            if settled():
                break
            await asyncio.sleep(0.05)
        assert settled(), journal.counts()
        agent.handle_exit(signal.SIGTERM)
        await asyncio.wait_for(run, 60)

    asyncio.run(main())
    journal = Journal(cfg.state_dir / "journal.sqlite3")
    try:
        assert journal.begin_run()  # the previous run recorded a clean stop: nothing to re-publish
    finally:
        journal.close()


def _thread_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.parametrize("cr_priority", ["urgent", "routine"])
def test_a_model_an_urgent_route_names_runs_at_the_daemons_priority_the_others_below_it(
        tmp_path: Path, cr_priority: str) -> None:
    # pipeline.inference_niceness lowers the engines below the receiver (receiving first); a chest CR routed as
    # urgent must not wait for its inference behind a CT flood at that priority.
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["model_repository"] = str(ENGINES)
    raw["pipeline"]["inference_niceness"] = 5
    [cr_route] = [r for r in raw["routes"] if r["model"] == "cxr-nodule"]
    cr_route["priority"] = cr_priority
    agent = Agent(parse_config(raw))
    base = _thread_niceness()
    try:
        # The threads each model is loaded on (its runtime's own threads inherit their niceness) and runs on.
        nice = {name: agent._engines_of(name).submit(_thread_niceness).result() for name in ("cxr-nodule", "ct-demo")}
    finally:
        agent._engine_pool.shutdown()
        agent._urgent_engine_pool.shutdown()
    assert nice["ct-demo"] == min(19, base + 5)  # routine only
    assert nice["cxr-nodule"] == (base if cr_priority == "urgent" else min(19, base + 5))
