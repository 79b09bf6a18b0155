"""Shared fixtures: real peers and fresh state for every test."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.journal import Journal
from edge_agent.metrics import Metrics
from tests.certs import CertPaths, make_certs
from tests.daemon import Daemon, write_config
from tests.natsutil import NatsServer
from tests.ul import RawPeer


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real ``nats-server -js`` on a free loopback port; ``.stop()``/``.start()`` keep port and storage."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A fresh test CA with a server certificate for 127.0.0.1/localhost, a client certificate and an unrelated CA."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def metrics() -> Metrics:
    """A Metrics object on its own registry."""
    return Metrics()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """A fresh journal database under the test's tmp_path."""
    j = Journal(tmp_path / "state" / "journal.db")
    try:
        yield j
    finally:
        j.close()


@pytest.fixture
def daemon(tmp_path: Path, nats_server: NatsServer) -> Iterator[Callable[..., Daemon]]:
    """``daemon(**overrides)``: a daemon subprocess on the shared nats-server (not started); killed at the end."""
    started: list[Daemon] = []

    def make(**overrides: Any) -> Daemon:
        d = Daemon(write_config(tmp_path, nats_server.url, **overrides), tmp_path)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            d.kill9()
        d.close()


@pytest.fixture
def peers() -> Iterator[list[RawPeer]]:
    """Raw Upper Layer peers a test opens (tests/ul.py), closed at its end."""
    opened: list[RawPeer] = []
    yield opened
    for p in opened:
        p.close()
