"""A chest CR's triage latency while a CT series floods in, with inference below the receiver and beside it.

What `pipeline.inference_niceness` trades: on a box with few cores it answers senders first, so a flood is taken
sooner; the cost falls on findings that are wanted while the flood runs. This bench measures both sides in one
interleaved run. It starts the daemon (routes as shipped: CT to ct-demo, chest CR to cxr-nodule; each with its own
nats-server) once per niceness given, and in each repetition, for each daemon in turn (the order alternates):

- sends one CT series over four associations at once with dcmtk's storescu (TCP_NODELAY=1), as bench/ingest.py
  does, and times it from the first storescu's start to the last one's exit;
- meanwhile sends the 1955x1841 chest CR of pydicom-data with fresh UIDs over a pynetdicom association, one at a
  time, each once the last one's finding has come from the stream (and 0.2 s more), and stops when the CT
  series is in: the latency is from each CR's C-STORE Success to its finding's delivery from the JetStream
  stream, so it counts preprocessing and inference waiting for the CPU behind the receiver;
- waits until the daemon has settled (every series closed, every finding published): "until settled" is from
  the start of the CT series to then, when the CT's own finding is out.

Run:  .venv/bin/python bench/busy_latency.py                     (niceness 10 and 0, 3 repetitions, 1500 slices)
      .venv/bin/python bench/busy_latency.py --niceness 10 5 0 --reps 5 --receiver-processes 2
      .venv/bin/python bench/busy_latency.py --edge-agent-source DIR   (DIR from 'git archive HEAD | tar -x -C DIR')
      .venv/bin/python bench/busy_latency.py --niceness 10 --baseline-source DIR   (this checkout against DIR,
                                                                                     side by side)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import make_workload, send
from bench.ingest_data import ct_template, dx_template
from bench.ingest_latency import measure_cr_latency, nearest_rank
from bench.ingest_peers import REPO, EdgeAgent
from bench.ingest_procstat import wait_idle

CR_GAP_SECONDS = 0.1  # after the CT series has begun, before the first CR


@dataclass
class Run:
    key: str  # the niceness ("10"), with ", baseline" for the daemon from --baseline-source ("10, baseline")
    ct_seconds: float = 0.0
    settled_seconds: float = 0.0
    cr_ms: list[float] = field(default_factory=list)
    cr_stages_ms: list[dict[str, float]] = field(default_factory=list)  # per CR: preprocess, queue, infer, rest
    problems: list[str] = field(default_factory=list)


async def one_run(daemon: EdgeAgent, key: str, ct: int, folder: Path) -> Run:
    run = Run(key)
    workload = make_workload("ct4", {"ct": ct_template(), "dx": dx_template()}, folder / "send", ct, 1)
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    before = daemon.counters()
    ct_done = threading.Event()

    def flood() -> list[str]:
        try:
            return send(workload, daemon.port, daemon.called_aet, logs)
        finally:
            ct_done.set()

    started = time.perf_counter()
    ct_sent = asyncio.create_task(asyncio.to_thread(flood))
    await asyncio.sleep(CR_GAP_SECONDS)
    assert daemon.nats is not None
    latency = await measure_cr_latency(daemon.nats.url, daemon.port, daemon.called_aet, 10_000, until=ct_done.is_set)
    run.problems += await ct_sent + latency.problems
    run.ct_seconds = time.perf_counter() - started
    run.cr_ms = latency.latencies_ms
    run.cr_stages_ms = latency.stages_ms
    crs = len(latency.latencies_ms)
    await asyncio.to_thread(daemon.settle, before, workload.instances + crs, workload.series_count + crs)
    run.settled_seconds = time.perf_counter() - started
    run.problems += daemon.notes
    daemon.notes.clear()
    if (stored := daemon.stored_since(before)) < workload.instances + crs:
        run.problems.append(f"stored {stored} of {workload.instances + crs}")
    return run


def table(runs: list[Run], keys: list[str], ct: int) -> str:
    lines = ["| inference_niceness | CT series in (s, median) | CT instances/s | until settled (s) | CRs | "
             "CR Success -> finding p50 (ms) | p90 | max | of which p50: preprocess | queue | infer | rest | "
             "problems |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in keys:
        mine = [r for r in runs if r.key == n]
        cr = [v for r in mine for v in r.cr_ms]
        ct_s = statistics.median(r.ct_seconds for r in mine)
        settled = statistics.median(r.settled_seconds for r in mine)
        problems = "; ".join(p for r in mine for p in r.problems) or "none"
        stages = [stage for r in mine for stage in r.cr_stages_ms]
        parts = " | ".join(f"{nearest_rank([st[k] for st in stages], 50):.0f}" if stages else "-"
                           for k in ("preprocess", "queue", "infer", "rest"))
        lines.append(f"| {n} | {ct_s:.2f} | {ct / ct_s:.0f} | {settled:.2f} | {len(cr)} | {nearest_rank(cr, 50):.0f}"
                     f" | {nearest_rank(cr, 90):.0f} | {max(cr, default=float('nan')):.0f} | {parts} | {problems} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--niceness", type=int, nargs="+", default=[10, 0], help="pipeline.inference_niceness values")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ct", type=int, default=1500, help="CT slices per series")
    ap.add_argument("--receiver-processes", type=int, default=1, metavar="N", help="dicom.receiver_processes")
    ap.add_argument("--edge-agent-source", type=Path, default=REPO)
    ap.add_argument("--baseline-source", type=Path,
                    help="also a daemon from this source tree for each niceness, interleaved with the others")
    args = ap.parse_args()
    started = time.monotonic()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="edge-busy-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        daemons: dict[str, EdgeAgent] = {}
        sources = [("", args.edge_agent_source)]
        if args.baseline_source:
            sources.append((", baseline", args.baseline_source))
        for n in args.niceness:
            for suffix, source in sources:
                key = f"{n}{suffix}"
                print(f"starting edge-agent with inference_niceness {key} ...", flush=True)
                name = f"nice{n}{'-base' if suffix else ''}"
                d = EdgeAgent(name, f"inference_niceness {key}", root / name, "EDGE_AGENT", routed=True,
                              source=source.resolve(), receiver_processes=args.receiver_processes,
                              pipeline={"inference_niceness": n})
                d.start()
                stack.callback(d.stop)
                wait_idle(d.pid, timeout_seconds=120)
                daemons[key] = d
        keys = list(daemons)
        for rep in range(args.reps):
            order = keys if rep % 2 == 0 else keys[::-1]
            for n in order:
                r = asyncio.run(one_run(daemons[n], n, args.ct, root / "work"))
                runs.append(r)
                cr = ", ".join(f"{v:.0f}" for v in r.cr_ms)
                print(f"rep {rep + 1}/{args.reps} niceness {n}: CT in {r.ct_seconds:.2f} s, settled "
                      f"{r.settled_seconds:.2f} s; CR ms: {cr}{'; ' + '; '.join(r.problems) if r.problems else ''}",
                      flush=True)
    print()
    print(f"- command: `.venv/bin/python bench/busy_latency.py {shlex.join(sys.argv[1:])}`")
    print(f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}")
    print(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {(time.monotonic() - started) / 60:.1f} "
          f"minutes; {args.reps} repetitions; CT series of {args.ct} slices over 4 associations; "
          f"receiver_processes {args.receiver_processes}")
    print()
    print(table(runs, keys, args.ct))
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
