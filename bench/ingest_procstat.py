"""CPU time and resident memory of a process and its descendants, read from /proc (Linux only).

CPU is the sum over the tree of utime + stime + cutime + cstime: a child that exits and is reaped moves its
time into its parent's cutime/cstime, so two snapshots of the same tree give the CPU it spent in between,
short-lived children (storescp --fork) included. RSS is the sum of VmRSS over the tree's processes (shared
pages, e.g. a worker pool's, are counted once per process: an upper bound).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
RSS_SAMPLE_SECONDS = 0.02
TREE_REFRESH_SECONDS = 0.1


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses; the fields after its last ')' do not.
    return text[text.rindex(")") + 2 :].split()


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                out[int(entry.name)] = int(fields[1])
    return out


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (from /proc/PID/task/TID/children, CONFIG_PROC_CHILDREN)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


_HAVE_CHILDREN_FILES = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def tree(root: int) -> list[int]:
    """``root`` and every process below it, right now."""
    if _HAVE_CHILDREN_FILES:
        # Cheap enough to run every few tens of milliseconds (a full scan of /proc is not).
        children = _children
    else:
        by_parent: dict[int, list[int]] = {}
        for pid, ppid in _ppids().items():
            by_parent.setdefault(ppid, []).append(pid)

        def children(pid: int) -> list[int]:
            return by_parent.get(pid, [])

    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children(pid))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime summed over ``pids``."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS_PER_SECOND


def tree_cpu_seconds(root: int) -> float:
    return cpu_seconds(tree(root))


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


def system_busy_seconds() -> float:
    """CPU time of the whole machine spent not idle (all cores), from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_SECOND


@dataclass
class TreeSampler:
    """Samples the summed RSS of a process tree in a thread (20 ms; the tree every 100 ms); keeps the peak."""

    root: int
    peak_rss_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        pids: list[int] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed >= TREE_REFRESH_SECONDS:
                pids, refreshed = tree(self.root), now
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes(pids))
            self._stop.wait(RSS_SAMPLE_SECONDS)


def wait_idle(
    root: int, *, cpu_share: float = 0.05, quiet_seconds: float = 1.0, timeout_seconds: float = 300.0
) -> bool:
    """Wait until the tree uses under ``cpu_share`` of one core for ``quiet_seconds`` in a row."""
    step = 0.25
    deadline = time.monotonic() + timeout_seconds
    last_cpu, last_t, calm_since = tree_cpu_seconds(root), time.monotonic(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(step)
        cpu, now = tree_cpu_seconds(root), time.monotonic()
        if (cpu - last_cpu) / (now - last_t) > cpu_share:
            calm_since = now
        elif now - calm_since >= quiet_seconds:
            return True
        last_cpu, last_t = cpu, now
    return False
