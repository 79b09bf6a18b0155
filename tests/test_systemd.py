"""sd_notify against a real AF_UNIX datagram socket, as systemd binds it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.systemd import Notifier


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that, so use a short directory.
    path = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener(notify_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(notify_dir / "notify")
    sock.bind(path)
    sock.settimeout(5.0)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_as_systemd_reads_them(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.enabled
    assert n.ready("listening on 11112")
    assert received(sock) == "READY=1\nSTATUS=listening on 11112"
    assert n.status("3 series open")
    assert received(sock) == "STATUS=3 series open"
    assert n.watchdog()
    assert received(sock) == "WATCHDOG=1"
    assert n.stopping("draining")
    assert received(sock) == "STOPPING=1\nSTATUS=draining"
    assert n.ready()
    assert received(sock) == "READY=1"
    assert n.stopping()
    assert received(sock) == "STOPPING=1"
    n.close()


def test_status_text_cannot_inject_another_assignment(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("ok\nREADY=1\r\n  more")
    assert received(sock) == "STATUS=ok READY=1 more"
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"edge-agent-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert received(sock) == "READY=1\nSTATUS=up"
        n.close()
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval_seconds() is None


def test_relative_notify_socket_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.systemd"):
        n = Notifier({"NOTIFY_SOCKET": "notify"})
    assert not n.enabled
    assert "notifications disabled" in caplog.text


def test_vanished_socket_warns_once_and_never_raises(notify_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(notify_dir / "gone")
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    with caplog.at_level(logging.WARNING, logger="edge_agent.systemd"):
        assert n.watchdog() is False
        assert n.watchdog() is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
    # The socket comes back (systemd re-executed): sending works again.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    try:
        assert n.watchdog() is True
        assert received(sock) == "WATCHDOG=1"
    finally:
        sock.close()
        n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval_seconds() == expected


def test_reads_the_process_environment(listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    assert n.watchdog_interval_seconds() == 2.0
    n.watchdog()
    assert received(sock) == "WATCHDOG=1"
    n.close()


def test_watchdog_pings_only_when_systemd_asked_for_them(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert not n.watchdog()
    assert n.status("x")
    assert received(sock) == "STATUS=x"  # the ping above sent nothing
    n.close()


def test_a_reader_that_stops_reading_never_blocks_the_sender(listener: tuple[socket.socket, str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # The caller is the event loop: a full socket buffer must cost a dropped datagram, not a wedged loop.
    _, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    results = [n.watchdog() for _ in range(5000)]
    assert results[0] and not results[-1]
    assert sum("sd_notify" in r.message for r in caplog.records) == 1
    n.close()
