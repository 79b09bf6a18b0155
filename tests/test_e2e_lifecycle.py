"""End to end, the daemon's life around its work: housekeeping faults it survives, the state_dir lock,
and a second SIGTERM while the publisher waits for a broker that is down."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.cli import EXIT_FAILURE, EXIT_STATE_DIR_LOCKED
from edge_agent.journal import Journal
from tests.daemon import Daemon, storescu, write_config
from tests.fault_tools import build_hanging_model
from tests.natsutil import NatsServer
from tests.test_e2e import CR_CHEST, _children, fresh_copy

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started: any still running at the end is killed."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
        d.close()


def wait_log(d: Daemon, text: str, timeout_seconds: float = 30.0) -> None:
    """Wait for a line in the daemon's log (a foreign process: its log is what there is to wait on)."""
    deadline = time.monotonic() + timeout_seconds
    while text not in d.log():
        assert d.proc is not None
        if d.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the daemon's log:\n{d.log()}")
        time.sleep(0.05)


def jam(path: Path) -> None:
    """Turn a spool file into a non-empty directory: unlink() raises IsADirectoryError on it (root or not)."""
    if path.exists():
        path.unlink()
    path.mkdir(parents=True)
    (path / "stuck").write_bytes(b"x")


def spool_files(state: Path) -> list[Path]:
    return [p for p in (state / "spool" / "instances").glob("*/*.dcm") if p.is_file()]


# -- A: housekeeping errors are counted; the daemon goes on -----------------------------------------


def test_housekeeping_faults_are_counted_and_the_daemon_serves_on(tmp_path: Path, daemons: list[Daemon]) -> None:
    broker = NatsServer(tmp_path / "nats")  # started later: the first finding waits in the outbox
    state = tmp_path / "state"
    # An orphan the start-up sweep cannot remove, and a heat-map folder that is a file.
    jam(state / "spool" / "instances" / "20260101" / f"{secrets.token_hex(16)}.dcm")
    (state / "heatmaps").write_text("a file where the folder should be")
    d = Daemon(write_config(tmp_path, broker.url), tmp_path)
    daemons.append(d)
    d.start()
    try:
        assert d.metric("edge_agent_housekeeping_errors_total", step="orphans") == 1
        d.wait_metric("edge_agent_housekeeping_errors_total", 1, step="heatmaps")

        # The release step's delete fails: the study's spool file has become a directory.
        assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
        d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="queued")
        [held] = spool_files(state)
        jam(held)
        broker.start()
        d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="published")
        d.wait_metric("edge_agent_housekeeping_errors_total", 1, step="release")

        assert d.http("/readyz")[0] == 200 and d.http("/healthz")[0] == 200
        assert d.proc is not None and d.proc.poll() is None
        # Still serving: the next study goes through and its file is released.
        assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
        d.wait_metric("edge_agent_findings_total", 2, model="cxr-nodule", outcome="published")
        d.wait_metric("edge_agent_spool_bytes", 0, at_most=0)
        assert d.terminate() == 0
    finally:
        broker.stop()
    log = d.log()
    assert "housekeeping step release failed: IsADirectoryError [EISDIR]" in log
    assert "housekeeping step heatmaps failed: NotADirectoryError [ENOTDIR]" in log
    assert held.name not in log  # error kinds, never spool paths


# -- B: one daemon per state_dir --------------------------------------------------------------------


def test_a_second_daemon_on_the_same_state_dir_exits_without_touching_it(
    tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]
) -> None:
    first = Daemon(write_config(tmp_path, nats_server.url), tmp_path)
    daemons.append(first)
    first.start()
    assert first.proc is not None
    state = tmp_path / "state"
    # An instance the first daemon is receiving right now: in the spool, its journal row not committed yet.
    day = state / "spool" / "instances" / time.strftime("%Y%m%d", time.gmtime())
    day.mkdir(parents=True, exist_ok=True)
    in_flight = day / f"{secrets.token_hex(16)}.dcm"
    in_flight.write_bytes(b"DICM")

    second_tmp = tmp_path / "second"
    second_tmp.mkdir()
    second = Daemon(write_config(second_tmp, nats_server.url, state_dir=str(state)), second_tmp)
    daemons.append(second)
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(60) == EXIT_STATE_DIR_LOCKED
    lines = [line for line in second.log().splitlines() if "in use" in line]
    assert lines == [lines[0]] and f"state_dir {state} is in use by another edge-agent (pid {first.proc.pid})" in (
        lines[0]
    ), second.log()
    assert "Traceback" not in second.log()
    assert in_flight.exists()  # not swept as an orphan
    assert first.http("/readyz")[0] == 200

    # The lock goes with its holder: once the first has stopped, the next start takes the directory.
    assert first.terminate() == 0
    third = Daemon(second.config_path, second_tmp)
    daemons.append(third)
    third.start()
    assert not in_flight.exists()  # now it is an orphan of a daemon that is gone, and swept at start
    assert third.terminate() == 0


# -- C: a second signal ends the shutdown at once -----------------------------------------------------


@pytest.mark.parametrize("broker_state", ["never_up", "stopped", "frozen"])
def test_a_second_sigterm_ends_the_shutdown_while_the_publisher_waits_for_the_broker(
    tmp_path: Path, daemons: list[Daemon], broker_state: str
) -> None:
    broker = NatsServer(tmp_path / "nats")
    if broker_state != "never_up":
        broker.start()
    # A flush timeout far above what the test waits: the exit must not wait for it.
    d = Daemon(write_config(tmp_path, broker.url, **{"pipeline.drain_timeout_seconds": 60}), tmp_path)
    daemons.append(d)
    try:
        d.start()
        if broker_state != "never_up":
            d.wait_metric("edge_agent_broker_connected", 1)
            if broker_state == "stopped":
                broker.stop()
                d.wait_metric("edge_agent_broker_connected", 0, at_most=0)
            else:
                broker.pause()  # connected, nothing answers: the flush and the connection's drain would wait
        assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
        d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="queued")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        wait_log(d, "pending finding(s) before stopping")
        d.proc.send_signal(signal.SIGTERM)
        try:
            rc = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after the second SIGTERM:\n{d.log()}")
        elapsed = time.monotonic() - t0
    finally:
        broker.stop()
    assert rc == 0
    assert elapsed < 15, elapsed
    log = d.log()
    assert "forcing exit" in log and "forced exit" in log
    # What was not published stays in the outbox, for the next start.
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    try:
        assert journal.counts().outbox_pending == 1
    finally:
        journal.close()


def test_a_model_whose_warm_up_never_returns_stops_the_start_with_the_reason(
    tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]
) -> None:
    """A wedged GPU at start, as the daemon sees one: a start-up call on an engine that does not return. The start
    ends with the reason, without waiting for the call (an ONNX Runtime model that cannot start is fatal, as its
    errors are), instead of hanging until systemd's TimeoutStartSec."""
    repo = tmp_path / "models"
    repo.mkdir()
    for bundled in ("cxr-nodule", "ct-demo"):
        (repo / bundled).symlink_to(Path(__file__).resolve().parent.parent / "engines" / bundled)
    build_hanging_model(repo / "ct-hang", at_warm_up=True)
    config = write_config(tmp_path, nats_server.url, model_repository=str(repo), **{
        "routes.1.model": "ct-hang", "models.ct-hang": {"infer_timeout_seconds": 1.0}})
    d = Daemon(config, tmp_path)
    daemons.append(d)
    d.start(wait_ready=False)
    assert d.proc is not None
    # The preprocessing workers start while the models load, not after: here they are up while the start is held
    # in the model's warm-up (before, none started until every model was warm).
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and d.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        workers = [kid for kid in _children(d.proc.pid)
                   if b"resource_tracker" not in Path(f"/proc/{kid}/cmdline").read_bytes()]
    assert len(workers) == 2, d.log()  # preprocess_workers, while the start waits for the warm-up
    assert d.proc.wait(60) == EXIT_FAILURE  # before the fix: no exit at all (the warm-up's thread was joined)
    said = "edge-agent stopped: engine ct-hang: its warm-up did not return within 4 s (a wedged GPU or driver?)"
    assert said in d.log()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)  # the failed start left no worker behind


def test_an_http_port_in_use_ends_the_start_in_one_line(
    tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]
) -> None:
    """Another service on http.port: exit 1 with one line that names the port and the keys, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(write_config(tmp_path, nats_server.url, **{"http.port": port}), tmp_path)
        daemons.append(d)
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(60) == EXIT_FAILURE
    log = d.log()
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in log and "see http.host / http.port" in log, log
    assert "Traceback" not in log
