"""Timing wrappers installed inside a running daemon by bench/commit_latency.py (never by the daemon itself).

``install()`` wraps the receiver's methods that mark the steps of one C-STORE, from its command set to its
answer, and keeps each step's durations in memory; SIGUSR2 writes their percentiles as JSON to the file named
by ``EDGE_AGENT_BENCH_TIMINGS`` and starts afresh. The wrappers cost a few microseconds per instance.

Steps, per instance (milliseconds):
- ``sender``: from our answer to the previous instance to the next command set on that association;
- ``data``: from the command set to the dataset's last fragment;
- ``commit``: from the last fragment to our answer (a Success means the file is on disk and journalled);
  over one association the instance is committed on the receiver's loop (``inline``); otherwise it goes
  through the two committer threads: ``wait to place`` (the placing thread busy with the group before),
  ``place`` (header, rename, fsyncs; ``flush`` is the spool's rename and fsyncs alone), ``wait to record``,
  ``record`` (the journal commit), ``hop back`` (the journal thread to the receiver's loop), and ``finish``
  (handing the instance to the pipeline and writing the answer).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import time
from collections import defaultdict
from typing import Any

_steps: dict[str, list[float]] = defaultdict(list)


def _note(step: str, seconds: float) -> None:
    _steps[step].append(seconds * 1e3)


def _dump(*_: Any) -> None:
    out = {}
    for step, values in list(_steps.items()):
        ordered = sorted(values)
        if ordered:
            out[step] = {"n": len(ordered), "p50": statistics.median(ordered),
                         "p90": ordered[int(0.9 * (len(ordered) - 1))]}
    _steps.clear()
    path = os.environ["EDGE_AGENT_BENCH_TIMINGS"]
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)


def _wrap(cls: Any, name: str, before: Any = None, after: Any = None) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        now = time.perf_counter()
        if before is not None:
            before(now, *args)
        result = original(*args, **kwargs)
        if after is not None:
            after(now, time.perf_counter(), *args)
        return result

    setattr(cls, name, wrapper)


def install() -> None:
    from edge_agent.dicom import incoming, scp, spool

    def on_command(now: float, conn: Any, *_: Any) -> None:
        answered = getattr(conn, "_bench_answered", None)
        if answered is not None:
            _note("sender", now - answered)
        conn._bench_command = now

    def on_dataset_end(now: float, conn: Any) -> None:
        conn._bench_ended = now
        if getattr(conn, "_bench_command", None) is not None:
            _note("data", now - conn._bench_command)
        if conn._store is not None:
            conn._store._bench_ended = now

    def on_answer(now: float, conn: Any, store: Any, *_: Any) -> None:
        conn._bench_answered = now
        ended = getattr(store, "_bench_ended", None)
        if ended is not None:
            _note("commit", now - ended)

    def on_submit(now: float, committer: Any, store: Any) -> None:
        store._bench_submitted = now

    def on_place(started: float, ended: float, committer: Any, items: list[Any]) -> None:
        for w in items:
            if hasattr(w.store, "_bench_submitted"):
                _note("wait to place", started - w.store._bench_submitted)
            _note("place", ended - started)
            w.store._bench_placed = ended

    def on_record(started: float, ended: float, committer: Any, placed: list[Any]) -> None:
        for p in placed:
            for w in p.items:
                if hasattr(w.store, "_bench_placed"):
                    _note("wait to record", started - w.store._bench_placed)
                w.store._bench_recorded = ended
        if placed:
            _note("record", (ended - started) / len(placed))

    def on_finish_start(now: float, conn: Any, store: Any, result: Any) -> None:
        if hasattr(store, "_bench_recorded"):
            _note("hop back", now - store._bench_recorded)

    def on_finish(started: float, ended: float, conn: Any, store: Any, result: Any) -> None:
        _note("finish", ended - started)

    def on_inline(started: float, ended: float, *_: Any) -> None:
        _note("inline", ended - started)

    def on_flush(started: float, ended: float, *_: Any) -> None:
        _note("flush", ended - started)

    _wrap(scp._Connection, "_on_command", before=on_command)
    _wrap(scp._Connection, "_on_dataset_end", before=on_dataset_end)
    _wrap(scp._Connection, "_answer", before=on_answer)
    _wrap(scp._Connection, "_finish", before=on_finish_start, after=on_finish)
    _wrap(incoming.Committer, "submit", before=on_submit)
    _wrap(incoming.Committer, "_place_group", after=on_place)
    _wrap(incoming.Committer, "_record_group", after=on_record)
    _wrap(incoming.Committer, "commit_now", after=on_inline)
    _wrap(spool.Spool, "place", after=on_flush)
    signal.signal(signal.SIGUSR2, _dump)
