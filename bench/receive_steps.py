"""Where one instance's time goes on the receive path, step by step, over one association (or several).

Runs the daemon's own Receiver (``edge_agent/dicom/scp.py``) in this process, with a real Spool and Journal in a
temporary folder and nothing downstream, and sends it CT slices with dcmtk's ``storescu`` (``TCP_NODELAY=1``)
over one association, or ``--associations N`` at once with the series split in slice order, as
bench/ingest.py does. Each step is timed by wrapping the receiver's own methods (nothing in the package
changes); the table gives medians and p90 over every instance of the last repetition.

    .venv/bin/python bench/receive_steps.py [--ct 500] [--reps 3] [--associations 1] [--spool DIR]

``--spool`` puts the spool (and journal) on another file system: the flush step is the disk's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import STORESCU  # noqa: E402
from bench.ingest_data import ct_template, write_series  # noqa: E402
from edge_agent.config import DicomConfig  # noqa: E402
from edge_agent.dicom import incoming, scp  # noqa: E402
from edge_agent.dicom.spool import Spool  # noqa: E402
from edge_agent.journal import Journal  # noqa: E402
from edge_agent.metrics import Metrics  # noqa: E402
from tests.netutil import free_port  # noqa: E402

# (label, from mark, to mark); marks are taken per instance by the wrappers below.
STEPS = (
    ("temp file ready, File Meta written", "begin", "opened"),
    ("dataset arriving (the sender's pace)", "opened", "end"),
    ("to the commit (writeback kick, hand-over)", "end", "place"),
    ("header read", "place", "header"),
    ("rename, fdatasync, folder fsync", "header", "placed"),
    ("journal commit", "placed", "recorded"),
    ("back to the loop, Success written", "recorded", "answered"),
    ("Success to the next command (the sender)", "answered", "next"),
)


class Marks:
    """Timestamps per instance, in arrival order; each instance's row rides on the receiver's Incoming object."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def mark(self, store: Any, name: str, at: float | None = None) -> None:
        row = store.__dict__.get("bench_marks")
        if row is None:
            row = store.__dict__["bench_marks"] = {}
            self.rows.append(row)
        row.setdefault(name, time.perf_counter() if at is None else at)

    def clear(self) -> None:
        self.rows = []


def _wrap(cls: Any, name: str, before: Callable[..., None] | None = None,
          after: Callable[..., None] | None = None) -> None:
    original = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args)
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args)
        return result

    setattr(cls, name, wrapper)


def instrument(marks: Marks) -> None:
    def begun(store: Any, _receiver: Any, conn: Any, *_: Any) -> None:
        marks.mark(store, "begin", store.started)  # the C-STORE's command has just been read
        marks.mark(store, "opened")
        marks.mark(store, "association", id(conn))

    _wrap(scp.Receiver, "_begin_store", after=begun)
    _wrap(scp._Connection, "_on_dataset_end", before=lambda conn: marks.mark(conn._store, "end"))
    _wrap(incoming.Committer, "_place", before=lambda _c, group: [marks.mark(s, "place") for s in group],
          after=lambda _r, _c, group: [(marks.mark(s, "placed"), marks.mark(s, "group", len(group))) for s in group])
    _wrap(incoming, "_read_meta", after=lambda _r, store: marks.mark(store, "header"))
    _wrap(incoming.Committer, "_record", after=lambda _r, _c, group, *_: [marks.mark(s, "recorded") for s in group])
    _wrap(scp._Connection, "_answer", after=lambda _r, _conn, store, _a: marks.mark(store, "answered"))


def run(args: argparse.Namespace, root: Path) -> None:
    marks = Marks()
    instrument(marks)
    journal = Journal(root / "state" / "journal.db")
    spool = Spool(root / "spool", 0)
    config = DicomConfig(host="127.0.0.1", port=free_port(), ae_title="EDGE_AGENT")
    receiver = scp.Receiver(config, spool, journal, Metrics(), lambda meta, recorded: None)
    receiver.start()
    template = ct_template()
    try:
        for rep in range(args.reps):
            marks.clear()
            workload = write_series(template, root / "send", args.ct, args.associations, "ct")
            # As the daemon does at start and while idle: the study's temp files are made before it arrives.
            made = 0 if args.fresh_files else spool.refill()
            os.sync()
            started, cpu = time.perf_counter(), time.process_time()
            senders = [subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", "EDGE_AGENT", "127.0.0.1",
                                         str(receiver.port), *map(str, files)],
                                        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True) for files in workload.groups]
            failed = [p.communicate()[1] for p in senders if p.wait() != 0]
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            if failed:
                raise SystemExit(f"storescu failed: {failed[0][-300:]}")
            print(f"repetition {rep + 1}/{args.reps}: {args.ct} CT slices over {args.associations} "
                  f"association(s), {args.ct / wall:.0f}/s, receiver CPU {cpu * 1000 / args.ct:.2f} ms per instance "
                  f"({made} empty files made before it)", flush=True)
            for group in workload.groups:
                for f in group:
                    f.unlink()
    finally:
        receiver.stop(5.0)
        journal.close()
    rows = marks.rows
    by_association: dict[float, list[dict[str, float]]] = {}
    for row in rows:
        by_association.setdefault(row["association"], []).append(row)
    for own in by_association.values():
        for row, following in itertools.pairwise(own):
            row["next"] = following["begin"]
    print(f"\nsteps of one instance (ms; the last repetition's {len(rows)} instances, medians and p90):\n")
    print("| step | median | p90 |\n|---|---:|---:|")
    total = 0.0
    for label, a, b in STEPS:
        values = sorted((r[b] - r[a]) * 1000 for r in rows if a in r and b in r)
        if not values:
            print(f"| {label} | - | - |")
            continue
        median = statistics.median(values)
        total += median
        print(f"| {label} | {median:.2f} | {values[int(len(values) * 0.9)]:.2f} |")
    print(f"| in all (sum of medians) | {total:.2f} | |")
    groups = [r["group"] for r in rows if "group" in r]
    if groups:
        print(f"\ninstances made durable together (the group each instance was in): "
              f"mean {statistics.mean(groups):.2f}, largest {max(groups):.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", type=int, default=500, help="CT slices per repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (the table is the last one's)")
    parser.add_argument("--associations", type=int, default=1, help="concurrent associations")
    parser.add_argument("--spool", type=Path, help="a folder on the file system to measure (default: a temp dir)")
    parser.add_argument("--fresh-files", action="store_true",
                        help="make every temp file while the study arrives (no kept empty files, as before they were)")
    args = parser.parse_args(argv)
    if not os.access(STORESCU, os.X_OK):
        raise SystemExit(f"{STORESCU} is missing: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(dir=args.spool, prefix="receive-steps-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
