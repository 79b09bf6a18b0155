"""The receivers bench/ingest.py compares, each started and stopped by the bench: dcmtk storescp (one process,
and --fork), Orthanc, and edge-agent (the daemon as a subprocess, with its own nats-server).

Each receiver says when the work an instance caused has finished (``settle``) and how many instances it
stored, so the bench can check that every instance sent landed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.ingest_procstat import tree, wait_idle
from tests.natsutil import NatsServer
from tests.netutil import free_port

REPO = Path(__file__).resolve().parent.parent
STORESCP = shutil.which("storescp") or "/usr/bin/storescp"
# dcmtk leaves Nagle on unless TCP_NODELAY is set in the environment; storescp and Orthanc (built on dcmtk) get it,
# like the storescu senders, else every small PDU waits for a delayed ACK (40 ms). edge-agent sets it itself.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ECHOSCU = shutil.which("echoscu") or "/usr/bin/echoscu"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 60.0
SETTLE_TIMEOUT_SECONDS = 600.0


def http_get(url: str, timeout_seconds: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout_seconds: float,
               every_seconds: float = 0.1) -> None:
    """Poll ``check()`` (a foreign process's readiness has nothing to await) until true, or fail with its log."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(every_seconds)
    raise RuntimeError(f"{what} not ready after {timeout_seconds:.0f} s:\n{tail(log)}")


def tail(path: Path, n_bytes: int = 3000) -> str:
    try:
        return path.read_bytes()[-n_bytes:].decode("utf-8", "replace")
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM, then SIGKILL; then SIGKILL any of its descendants (worker pools) still alive, by pid."""
    if proc is None:
        return
    descendants = [p for p in tree(proc.pid) if p != proc.pid] if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Receiver:
    """One receiver under test: ``key`` for --only, ``label`` for the table."""

    key: str
    label: str
    root: Path
    called_aet: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)
    # The CPUs the receiver (and every process it starts) may run on; None: all of them.
    cpus: frozenset[int] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.key}.log"

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Its own session: a Ctrl-C at the terminal reaches the bench, which then stops it in order.
            cpus = self.cpus
            pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd or self.root, start_new_session=True, preexec_fn=pin)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)

    def counters(self) -> dict[str, float]:
        """Counts that ``settle`` and ``stored_since`` compare before and after a workload."""
        return {}

    def settle(self, before: dict[str, float], instances: int, series: int) -> None:
        """Return once the work caused by the last workload is over (CPU idle)."""
        if not wait_idle(self.pid, timeout_seconds=SETTLE_TIMEOUT_SECONDS):
            self.notes.append("did not go idle within the settle timeout")

    def stored_since(self, before: dict[str, float]) -> int:
        raise NotImplementedError

    def after_workload(self) -> None:
        """Drop what the workload left behind (outside the timed window)."""


@dataclass
class Storescp(Receiver):
    fork: bool = False

    @property
    def out_dir(self) -> Path:
        return self.root / "received"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [STORESCP, "--aetitle", self.called_aet, "--output-directory", str(self.out_dir)]
        self._spawn([*cmd, *(["--fork"] if self.fork else []), str(self.port)], env=DCMTK_ENV)

        def echo() -> bool:
            res = subprocess.run([ECHOSCU, "-aec", self.called_aet, "127.0.0.1", str(self.port)],
                                 capture_output=True, timeout=10, check=False, env=DCMTK_ENV)
            return res.returncode == 0

        assert self.proc is not None
        wait_until(echo, self.label, self.proc, self.log_path, START_TIMEOUT_SECONDS)

    def counters(self) -> dict[str, float]:
        return {"files": float(sum(1 for p in self.out_dir.rglob("*") if p.is_file()))}

    def stored_since(self, before: dict[str, float]) -> int:
        return int(self.counters()["files"] - before["files"])

    def after_workload(self) -> None:
        for p in self.out_dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


@dataclass
class Orthanc(Receiver):
    http_port: int = field(default_factory=free_port)

    def start(self) -> None:
        storage, index = self.root / "storage", self.root / "index"
        storage.mkdir(parents=True, exist_ok=True)
        index.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(index),
            "StorageCompression": False,
            # fsync() after each write to the storage area: Success means on disk, as for edge-agent.
            "SyncStorageArea": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.called_aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "SaveJobs": False,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._spawn([ORTHANC, str(path)], env=DCMTK_ENV)
        assert self.proc is not None
        wait_until(lambda: http_get(self._url("/system"))[0] == 200, self.label, self.proc, self.log_path,
                   START_TIMEOUT_SECONDS)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def counters(self) -> dict[str, float]:
        _, body = http_get(self._url("/statistics"))
        return {"instances": float(json.loads(body)["CountInstances"])}

    def stored_since(self, before: dict[str, float]) -> int:
        return int(self.counters()["instances"] - before["instances"])


def parse_metrics(text: str) -> dict[tuple[str, frozenset[str]], float]:
    out: dict[tuple[str, frozenset[str]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        out[(name, frozenset(labels.rstrip("}").split(",")) - {""})] = float(value)
    return out


def metric_sum(metrics: dict[tuple[str, frozenset[str]], float], name: str, **labels: str) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


def histogram_mean_ms(before: dict[tuple[str, frozenset[str]], float], after: dict[tuple[str, frozenset[str]], float],
                      name: str, **labels: str) -> float | None:
    """The mean of a histogram's observations made between two scrapes, in ms."""
    count = metric_sum(after, f"{name}_count", **labels) - metric_sum(before, f"{name}_count", **labels)
    total = metric_sum(after, f"{name}_sum", **labels) - metric_sum(before, f"{name}_sum", **labels)
    return total / count * 1000 if count > 0 else None


@dataclass
class EdgeAgent(Receiver):
    """The daemon as configured by configs/agent.yaml, on free ports, with its own nats-server.

    ``routed``: the routes as shipped (CT/MR to ct-demo, chest CR/DX to cxr-nodule); otherwise one route that
    matches nothing these workloads send (modality NM), so instances are received, spooled, journalled, then
    released as unrouted.
    """

    routed: bool = False
    # The source tree the daemon runs from (configs/agent.yaml and engines/ too): this checkout by default, or a
    # snapshot (``git archive HEAD | tar -x -C DIR``) to measure a fixed version while the checkout changes.
    source: Path = REPO
    http_port: int = field(default_factory=free_port)
    nats: NatsServer | None = None
    receiver_processes: int = 1  # dicom.receiver_processes
    pipeline: dict[str, Any] = field(default_factory=dict)  # settings of the pipeline section over the shipped ones
    ready_poll_seconds: float = 0.1  # how often start() asks /readyz
    start_seconds: float = 0.0  # set by start(): from the daemon's command to its /readyz answering 200

    def config(self) -> dict[str, Any]:
        raw: dict[str, Any] = yaml.safe_load((self.source / "configs" / "agent.yaml").read_text())
        assert self.nats is not None
        raw["site"] = "bench"
        raw["state_dir"] = str(self.root / "state")
        raw["model_repository"] = str(self.source / "engines")
        raw["dicom"]["port"] = self.port
        raw["dicom"]["ae_title"] = self.called_aet
        if self.receiver_processes > 1:
            raw["dicom"]["receiver_processes"] = self.receiver_processes
        raw["http"]["port"] = self.http_port
        raw["bus"]["url"] = self.nats.url
        raw["pipeline"].update(self.pipeline)
        if self.cpus is not None:  # pinned (bench/ingest.py --receiver-cpus): a preprocessing worker per CPU
            raw["pipeline"]["preprocess_workers"] = len(self.cpus)
        if not self.routed:
            raw["routes"] = [{"name": "nothing", "match": {"modality": ["NM"]}, "model": "ct-demo"}]
            raw["models"] = {k: v for k, v in raw["models"].items() if k == "ct-demo"}
        return raw

    def command(self, config_path: Path) -> list[str]:
        """The daemon's command line."""
        return [sys.executable, "-m", "edge_agent", "serve", "--config", str(config_path)]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        # The source ahead of the venv's editable install; packages on PYTHONPATH (bench/scale_check.sh) after it.
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(self.source),
                                                                            env.get("PYTHONPATH")])))
        return env

    def start(self) -> None:
        self.nats = NatsServer(self.root / "nats")
        self.nats.start()
        path = self.root / "agent.yaml"
        path.write_text(yaml.safe_dump(self.config()))
        started = time.perf_counter()
        self._spawn(self.command(path), env=self.environment(), cwd=self.source)
        assert self.proc is not None
        wait_until(lambda: http_get(self._url("/readyz"))[0] == 200, self.label, self.proc, self.log_path,
                   START_TIMEOUT_SECONDS, every_seconds=self.ready_poll_seconds)
        self.start_seconds = time.perf_counter() - started

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.nats is not None:
                self.nats.stop()

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metrics(self) -> dict[tuple[str, frozenset[str]], float]:
        return parse_metrics(http_get(self._url("/metrics"))[1].decode())

    def counters(self) -> dict[str, float]:
        m = self.metrics()
        return {
            "stored": metric_sum(m, "edge_agent_instances_total", outcome="stored"),
            "series_done": sum(metric_sum(m, "edge_agent_series_total", outcome=o)
                               for o in ("routed", "unrouted", "failed")),
            "routed": metric_sum(m, "edge_agent_series_total", outcome="routed"),
            "published": metric_sum(m, "edge_agent_findings_total", outcome="published"),
            "outbox": metric_sum(m, "edge_agent_outbox_pending"),
        }

    def settle(self, before: dict[str, float], instances: int, series: int) -> None:
        """Wait for every series to be closed (after its quiet time) and every finding to be published."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            now = self.counters()
            routed = now["routed"] - before["routed"]
            if (now["series_done"] - before["series_done"] >= series
                    and now["published"] - before["published"] >= routed and now["outbox"] == 0):
                break
            time.sleep(0.1)
        else:
            self.notes.append(f"series or findings not finished within {SETTLE_TIMEOUT_SECONDS:.0f} s")
        super().settle(before, instances, series)

    def stored_since(self, before: dict[str, float]) -> int:
        return int(self.counters()["stored"] - before["stored"])
