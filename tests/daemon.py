"""The daemon as a subprocess, for end-to-end tests: config, READY over a real NOTIFY_SOCKET, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from tests.netutil import free_port

REPO = Path(__file__).resolve().parent.parent
DCMTK_STORESCU = "/usr/bin/storescu"


def write_config(tmp: Path, bus_url: str, **overrides: Any) -> Path:
    """A daemon config for tests: the default config on free ports, state under ``tmp``."""
    raw = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    raw["state_dir"] = str(tmp / "state")
    raw["model_repository"] = str(REPO / "engines")
    raw["site"] = "test"
    raw["dicom"]["port"] = free_port()
    raw["http"]["port"] = free_port()
    raw["bus"]["url"] = bus_url
    raw["bus"]["publish_timeout_seconds"] = 2
    raw["bus"]["reconnect_wait_seconds"] = 0.2
    raw["spool"]["min_free_bytes"] = 1
    raw["routes"][1]["quiet_seconds"] = 1.0
    raw["pipeline"]["drain_timeout_seconds"] = 10
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Daemon:
    config_path: Path
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notes: list[str] = field(default_factory=list)
    # The command that runs edge-agent (an installed one, say); by default this checkout's, with this Python.
    command: tuple[str, ...] = (sys.executable, "-m", "edge_agent")

    @property
    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        return loaded

    @property
    def dicom_port(self) -> int:
        return int(self.config["dicom"]["port"])

    @property
    def http_port(self) -> int:
        return int(self.config["http"]["port"])

    @property
    def log_path(self) -> Path:
        return self.tmp / "daemon.log"

    def start(
        self, wait_ready: bool = True, timeout_seconds: float = 60.0, env: dict[str, str] | None = None
    ) -> Daemon:
        sock_path = self.tmp / "notify.sock"
        if sock_path.exists():
            sock_path.unlink()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        self.notes = []
        full_env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), PYTHONUNBUFFERED="1", **(env or {}))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_note("READY=1", timeout_seconds)
        return self

    def wait_note(self, text: str, timeout_seconds: float = 30.0) -> str:
        """Wait for an sd_notify datagram containing ``text`` (the daemon's own READY/STOPPING)."""
        assert self.notify is not None
        deadline = time.monotonic() + timeout_seconds
        for note in self.notes:
            if text in note:
                return note
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            self.notify.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                note = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notes.append(note)
            if text in note:
                return note
        raise AssertionError(f"no {text!r} from the daemon in {timeout_seconds} s; got {self.notes}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout_seconds: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_seconds)
        self.close()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.close()

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def http_bytes(self, path: str) -> tuple[int, bytes]:
        """GET a path on the daemon's HTTP port: the status and the body as bytes (e.g. a PNG)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 if absent)."""
        _, text = self.http("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if "{" in key:
                mname, _, rest = key.partition("{")
                got = ",".join(sorted(rest.rstrip("}").split(",")))
            else:
                mname, got = key, ""
            if mname == name and got == want:
                return float(value)
        return 0.0

    def metric_total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels`` (e.g. over all models)."""
        _, text = self.http("/metrics")
        want = {f'{k}="{v}"' for k, v in labels.items()}
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            mname, _, rest = key.partition("{")
            if mname == name and want <= set(rest.rstrip("}").split(",")):
                total += float(value)
        return total

    def wait_metric(
        self, name: str, at_least: float, timeout_seconds: float = 30.0, at_most: float | None = None, **labels: str
    ) -> float:
        """Poll /metrics until the sample reaches ``at_least`` (or falls to ``at_most``)."""
        deadline = time.monotonic() + timeout_seconds
        value = 0.0
        while time.monotonic() < deadline:
            value = self.metric(name, **labels)
            if (value <= at_most) if at_most is not None else (value >= at_least):
                return value
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} = {value}, wanted >= {at_least}\n{self.log()}")


def storescu(
    port: int, *files: Path, calling_aet: str = "STORESCU", called_aet: str = "EDGE_AGENT", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu, with Nagle off (TCP_NODELAY=1; dcmtk leaves it on otherwise)."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [DCMTK_STORESCU, "-aet", calling_aet, "-aec", called_aet, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


async def _read_findings(url: str, count: int, timeout_seconds: float, subject: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_seconds
        while True:
            # The daemon creates the stream once it reaches the broker; until then there is nothing to read.
            try:
                sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
                break
            except NotFoundError:
                if time.monotonic() > deadline:
                    return []
                await asyncio.sleep(0.1)
        out: list[dict[str, Any]] = []
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                break
            out.append(json.loads(msg.data))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def read_findings(
    url: str, count: int, timeout_seconds: float = 60.0, subject: str = "edge.findings.>"
) -> list[dict[str, Any]]:
    """Every finding in the stream from the start, waiting until ``count`` are there or the timeout passes."""
    return asyncio.run(_read_findings(url, count, timeout_seconds, subject))


async def _stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


def stream_count(url: str, stream: str = "EDGE_FINDINGS") -> int:
    return asyncio.run(_stream_count(url, stream))
