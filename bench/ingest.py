"""Ingest throughput of edge-agent beside dcmtk storescp and Orthanc, from one interleaved run (issue 9).

The bench starts every receiver itself (storescp, storescp --fork, Orthanc with fsync, and edge-agent twice:
nothing routed, and the routes as shipped with CT going to ct-demo), each on its own free loopback port and temp
folder, and sends to them with dcmtk's storescu (TCP_NODELAY=1). Each repetition runs every workload against
every receiver in turn, in an order that changes between repetitions: in a full run no receiver follows the
same one twice in the first four (``order_for``; a receiver measured right after Orthanc was seen to run
slower, whichever it was); the tables give medians.

- Wall time: from starting storescu to the exit of the last storescu (its last C-STORE-RSP and release).
- CPU: utime + stime of the receiver's process tree (edge-agent's worker processes and storescp's forked
  children included; nats-server and the sender not), from /proc, while receiving and until settled (every
  series closed, every finding published, the tree idle).
- Peak RSS: the summed VmRSS of the receiver's tree, sampled every 20 ms, over the whole run.
- Sender's CPU: the storescu senders' utime + stime (with the bench's own, which is small) while sending: on a
  machine where the senders share the receiver's cores, what is left of them for the receiver.

- Others' CPU: what the rest of the machine used in the window (other users' jobs, but also kernel writeback,
  loopback softirq work and edge-agent's nats-server), as a share of all cores; before each measurement the bench
  waits (up to 30 s) for the rest of the machine to go quiet.
- CR latency (edge-agent with the routes as shipped): C-STORE Success to the finding's delivery from the stream.

Run:  .venv/bin/python bench/ingest.py                      (500 CT of 0.5 MB, 20 DX of 15.7 MB, 3 repetitions)
      .venv/bin/python bench/ingest.py --quick              (a smoke run: 40 CT, 3 DX, 1 repetition, 5 CRs)
      .venv/bin/python bench/ingest.py --only storescp edge-nothing --reps 5 --markdown out.md
      .venv/bin/python bench/ingest.py --netns --nice -10 --edge-agent-source DIR   (as root, on a shared machine;
          DIR from 'git archive HEAD | tar -x -C DIR' pins the daemon's version while the checkout changes)
      .venv/bin/python bench/ingest.py --only storescp edge-nothing edge-base --baseline-source DIR
          (a change against an earlier version of edge-agent, interleaved in one run)
      .venv/bin/python bench/ingest.py --only edge-ct edge-ct-base --baseline-source DIR --latency 0
          (the same, with CT routed to ct-demo in both; edge-ct-procs and edge-ct-procs-base in receiver processes;
          add --workloads ct4 to measure CT over four associations alone, in a third of the time)
      .venv/bin/python bench/ingest.py --only storescp-fork orthanc edge-nothing edge-ct --receiver-cpus 0 0-1
          (how each receiver scales from one CPU to two, side by side in one run)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest_data import Template, Workload, ct_template, dx_template, write_series, write_studies
from bench.ingest_latency import LatencyResult, measure_cr_latency
from bench.ingest_peers import ORTHANC, REPO, EdgeAgent, Orthanc, Receiver, Storescp, histogram_mean_ms
from bench.ingest_procstat import TreeSampler, rss_bytes, system_busy_seconds, tree, tree_cpu_seconds, wait_idle

STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
T = TypeVar("T")
SEND_TIMEOUT_SECONDS = 900.0
BASELINES = ("storescp", "storescp-fork", "orthanc")
WORKLOADS = {"ct1": "CT, 1 association", "ct4": "CT, 4 associations", "dx": "DX 15.7 MB"}


LABELS = {
    "storescp": "dcmtk storescp (no fsync)",
    "storescp-fork": "dcmtk storescp --fork (no fsync)",
    "orthanc": "Orthanc (fsync)",
    "edge-nothing": "edge-agent, nothing routed (receive + spool + journal)",
    "edge-ct": "edge-agent, CT routed to ct-demo (inference while receiving)",
    "edge-nothing-procs": "edge-agent, nothing routed, in receiver processes",
    "edge-ct-procs": "edge-agent, CT routed to ct-demo, in receiver processes",
    "edge-base": "edge-agent from --baseline-source, nothing routed",
    "edge-ct-base": "edge-agent from --baseline-source, CT routed to ct-demo",
    "edge-ct-procs-base": "edge-agent from --baseline-source, CT routed to ct-demo, in receiver processes",
}

RECEIVERS = tuple(LABELS)


def _cpu_list(text: str) -> tuple[str, frozenset[int] | None]:
    """'0', '0-3', '0,2,4-5' -> (the text, a set of CPU numbers, as taskset -c reads them); 'all' -> no pinning."""
    if text == "all":
        return text, None
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus or not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"{text!r}: not CPUs this machine lets the bench use")
    return text, frozenset(cpus)


def make_receiver(key: str, root: Path, edge_agent_source: Path = REPO, baseline_source: Path | None = None,
                  cpus: frozenset[int] | None = None, on: str = "", receiver_processes: int = 2) -> Receiver:
    """The receiver ``key``; with ``on`` (a --receiver-cpus spec) its key and label say on which CPUs it runs."""
    name = f"{key}@{on}" if on else key
    folder, label = root / name, LABELS[key] + (f", on CPUs {on}" if on else "")
    baseline = key.endswith("-base")
    if baseline and baseline_source is None:
        raise SystemExit(f"{key} needs --baseline-source DIR")
    source = baseline_source if baseline and baseline_source is not None else edge_agent_source
    if key.endswith(("-procs", "-procs-base")):
        return EdgeAgent(name, label.replace("receiver processes", f"{receiver_processes} receiver processes"),
                         folder, "EDGE_AGENT", cpus=cpus, routed=key.startswith("edge-ct"), source=source,
                         receiver_processes=receiver_processes)
    if baseline:
        return EdgeAgent(name, label, folder, "EDGE_AGENT", cpus=cpus, routed=key == "edge-ct-base", source=source)
    if key.startswith("storescp"):
        return Storescp(name, label, folder, "STORESCP", cpus=cpus, fork=key == "storescp-fork")
    if key == "orthanc":
        return Orthanc(name, label, folder, "ORTHANC", cpus=cpus)
    return EdgeAgent(name, label, folder, "EDGE_AGENT", cpus=cpus, routed=key == "edge-ct", source=edge_agent_source)


@dataclass
class Measurement:
    receiver: str
    workload: str
    rep: int
    instances: int
    bytes: int
    wall_seconds: float
    cpu_receiving_seconds: float
    cpu_settled_seconds: float
    settle_seconds: float
    peak_rss_bytes: int
    stored: int
    others_cpu_share: float  # CPU the rest of the machine used in the window, as a share of all cores
    problems: list[str] = field(default_factory=list)
    sender_cpu_seconds: float = 0.0  # the storescu senders' (and this process's own) CPU while sending


def send(workload: Workload, port: int, called_aet: str, logs: Path) -> list[str]:
    """Run one storescu per association, all at once; return what went wrong."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = []
    try:
        for i, files in enumerate(workload.groups):
            with (logs / f"storescu-{i}.log").open("wb") as log:
                cmd = [STORESCU, "-aet", "BENCH", "-aec", called_aet, "127.0.0.1", str(port), *map(str, files)]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        codes = [p.wait(SEND_TIMEOUT_SECONDS) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [f"storescu {i} exited with {rc}: {(logs / f'storescu-{i}.log').read_text()[-300:]}"
            for i, rc in enumerate(codes) if rc != 0]


def measure(receiver: Receiver, workload: Workload, rep: int, logs: Path) -> Measurement:
    before = receiver.counters()
    ncpu = os.cpu_count() or 1
    with TreeSampler(receiver.pid) as sampler:
        cpu0, busy0, own0 = tree_cpu_seconds(receiver.pid), system_busy_seconds(), _own_cpu_seconds()
        started = time.perf_counter()
        problems = send(workload, receiver.port, receiver.called_aet, logs)
        ended = time.perf_counter()
        cpu1, busy1, own1 = tree_cpu_seconds(receiver.pid), system_busy_seconds(), _own_cpu_seconds()
        receiver.settle(before, workload.instances, workload.series_count)
        settled = time.perf_counter()
        cpu2 = tree_cpu_seconds(receiver.pid)
    wall = ended - started
    stored = receiver.stored_since(before)
    if stored != workload.instances:
        problems.append(f"stored {stored} of {workload.instances}")
    problems += receiver.notes
    receiver.notes.clear()
    others = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (own1 - own0)) / (wall * ncpu)
    return Measurement(receiver.key, workload.name, rep, workload.instances, workload.total_bytes, wall, cpu1 - cpu0,
                       cpu2 - cpu0, settled - ended, sampler.peak_rss_bytes, stored, others, problems,
                       own1 - own0)


def _own_cpu_seconds() -> float:
    """This process and its waited-for children (the storescu senders)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def wait_quiet(receivers: list[Receiver], max_share: float, timeout_seconds: float = 30.0) -> float:
    """Wait until the rest of the machine (other users' processes) leaves the cores nearly idle for a second.

    This machine may be shared: a test suite running beside the bench takes cores from whichever receiver
    is being measured. Returns the share the rest used in the last second (1.0 = every core busy).
    """
    ncpu = os.cpu_count() or 1
    deadline = time.monotonic() + timeout_seconds
    while True:
        busy0, own0 = system_busy_seconds(), _own_cpu_seconds()
        ours0 = sum(tree_cpu_seconds(r.pid) for r in receivers)
        time.sleep(1.0)
        ours = sum(tree_cpu_seconds(r.pid) for r in receivers) - ours0
        share = max(0.0, system_busy_seconds() - busy0 - ours - (_own_cpu_seconds() - own0)) / ncpu
        if share <= max_share or time.monotonic() > deadline:
            return share


def make_workload(name: str, templates: dict[str, Template], folder: Path, ct: int, dx: int) -> Workload:
    shutil.rmtree(folder, ignore_errors=True)
    if name == "dx":
        w = write_studies(templates["dx"], folder, dx, name)
    else:
        w = write_series(templates["ct"], folder, ct, 1 if name == "ct1" else 4, name)
    os.sync()  # the senders' files are written back now, not during a receiver's fsyncs
    return w


def order_for(rep: int, items: list[T]) -> list[T]:
    """The order of repetition ``rep``: as given, reversed, every other one, that reversed; then again, rotated.

    With the six receivers of a full run, no item follows the same item twice in the first four, so a slot
    that favours or handicaps whoever is measured in it touches each receiver in at most one repetition, and
    the median leaves it out. Right after Orthanc is such a slot: in three full runs the edge-agent measured
    there, whichever version it was, was slower and used more CPU per instance (why is not pinned down).
    Rotation alone kept who follows whom the same in every repetition.
    """
    interleaved = items[::2] + items[1::2]
    pattern = (items, items[::-1], interleaved, interleaved[::-1])[rep % 4]
    shift = (rep // 4) % max(1, len(items))
    return list(pattern[shift:] + pattern[:shift])


def run(args: argparse.Namespace, root: Path, stack: ExitStack) -> tuple[list[Measurement], dict[str, int],
                                                                         LatencyResult | None, list[str]]:
    notes: list[str] = []
    receivers: list[Receiver] = []
    # edge-ct-base and edge-ct-procs-base only when asked for (--only): a full run with a baseline compares the
    # receive path.
    default = [k for k in RECEIVERS
               if k not in ("edge-ct-base", "edge-ct-procs-base") and (k != "edge-base" or args.baseline_source)]
    specs = args.receiver_cpus or [("", None)]
    if len(specs) == 1:  # every receiver on the same CPUs: the usual table, with a note
        if specs[0][1] is not None:
            notes.append(f"every receiver ran on CPUs {specs[0][0]} only")
        specs = [("", specs[0][1])]
    for key in args.only or default:
        if key == "orthanc" and not os.access(ORTHANC, os.X_OK):
            notes.append("Orthanc is not installed here (apt-get install orthanc): its row is empty")
            continue
        for on, cpus in specs:
            r = make_receiver(key, root, args.edge_agent_source, args.baseline_source, cpus, on,
                              args.receiver_processes)
            stack.callback(r.stop)
            print(f"starting {r.label} ...", flush=True)
            r.start()
            receivers.append(r)
            LABELS.setdefault(r.key, r.label)
    idle_rss: dict[str, int] = {}
    for r in receivers:
        wait_idle(r.pid, timeout_seconds=120)
        idle_rss[r.key] = rss_bytes(tree(r.pid))
    print("building workloads ...", flush=True)
    templates = {"ct": ct_template(), "dx": dx_template()}
    logs = root / "logs"
    logs.mkdir()
    results: list[Measurement] = []
    for rep in range(args.reps):
        order = order_for(rep, receivers)
        for name in args.workloads:
            workload = make_workload(name, templates, root / "send", args.ct, args.dx)
            for r in order:
                if args.quiet_share > 0 and (share := wait_quiet(receivers, args.quiet_share)) > args.quiet_share:
                    print(f"the rest of the machine still uses {share:.0%} of it; measuring anyway", flush=True)
                m = measure(r, workload, rep, logs)
                results.append(m)
                print(f"rep {rep + 1}/{args.reps} {name:3} {r.key:13} {m.wall_seconds:7.2f} s "
                      f"{m.instances / m.wall_seconds:7.1f}/s {m.bytes / 1e6 / m.wall_seconds:7.1f} MB/s "
                      f"cpu {m.cpu_receiving_seconds * 1000 / m.instances:6.1f} ms/inst "
                      f"(settled {m.cpu_settled_seconds * 1000 / m.instances:6.1f}, {m.settle_seconds:.1f} s) "
                      f"rss {m.peak_rss_bytes / 2**20:6.0f} MB others {m.others_cpu_share:4.0%}"
                      + (f"  PROBLEMS: {'; '.join(m.problems)}" if m.problems else ""), flush=True)
                r.after_workload()
                os.sync()
        shutil.rmtree(root / "send", ignore_errors=True)
    routed = next((r for r in receivers if r.key.partition("@")[0] == "edge-ct"), None)
    latency = cr_latency(routed, args.latency) if routed is not None and args.latency > 0 else None
    return results, idle_rss, latency, notes


DAEMON_MEANS = (
    ("preprocessing per CR", "edge_agent_stage_duration_seconds", {"stage": "preprocess"}),
    ("engine call per batch", "edge_agent_inference_compute_seconds", {"model": "cxr-nodule"}),
)


def cr_latency(routed: EdgeAgent, sends: int) -> LatencyResult:
    """Success-to-finding for single CRs on the (now idle) daemon with the routes as shipped."""
    assert routed.nats is not None
    print(f"CR latency: {sends} sends ...", flush=True)
    wait_idle(routed.pid)
    before = routed.metrics()
    latency = asyncio.run(measure_cr_latency(routed.nats.url, routed.port, routed.called_aet, sends))
    after = routed.metrics()
    for what, name, labels in DAEMON_MEANS:
        mean = histogram_mean_ms(before, after, name, **labels)
        if mean is not None:
            latency.daemon_means_ms[what] = mean
    print(latency.summary(), flush=True)
    if latency.breakdown():
        print(latency.breakdown(), flush=True)
    return latency


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def columns(results: list[Measurement], key: str) -> dict[str, float | None]:
    mine = [m for m in results if m.receiver == key]

    def rate(workload: str, per: Callable[[Measurement], float]) -> float | None:
        return _median([per(m) / m.wall_seconds for m in mine if m.workload == workload])

    def cpu_ms(attr: str) -> float | None:
        reps = sorted({m.rep for m in mine})
        per_rep = []
        for rep in reps:
            ct = [m for m in mine if m.rep == rep and m.workload in ("ct1", "ct4")]
            if ct:
                per_rep.append(sum(getattr(m, attr) for m in ct) * 1000 / sum(m.instances for m in ct))
        return _median(per_rep)

    return {
        "ct1": rate("ct1", lambda m: m.instances),
        "ct4": rate("ct4", lambda m: m.instances),
        "dx": rate("dx", lambda m: m.bytes / 1e6),
        "cpu": cpu_ms("cpu_receiving_seconds"),
        "cpu_settled": cpu_ms("cpu_settled_seconds"),
        "rss": max((m.peak_rss_bytes for m in mine), default=0) / 2**20 or None,
    }


HEADERS = {"ct1": "CT, 1 association", "ct4": "CT, 4 associations", "dx": "DX 15.7 MB",
           "cpu": "CPU per CT instance, receiving", "cpu_settled": "CPU per CT instance, until settled",
           "rss": "peak RSS"}
FORMATS = {"ct1": "{:.0f}/s", "ct4": "{:.0f}/s", "dx": "{:.0f} MB/s", "cpu": "{:.1f} ms", "cpu_settled": "{:.1f} ms",
           "rss": "{:.0f} MB"}


def tables(results: list[Measurement], labels: dict[str, str], idle_rss: dict[str, int]) -> str:
    cols = {key: columns(results, key) for key in labels}
    lines = ["| receiver | " + " | ".join(HEADERS.values()) + " | idle RSS |",
             "|---|" + "---:|" * (len(HEADERS) + 1)]
    for key, label in labels.items():
        cells = [FORMATS[c].format(v) if (v := cols[key][c]) is not None else "-" for c in HEADERS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {idle_rss.get(key, 0) / 2**20:.0f} MB |")
    if any("@" in key for key in cols):  # --receiver-cpus: each receiver against itself on fewer CPUs
        return "\n".join([*lines, "", scaling(cols, labels)])
    lines += ["", "Ratios (edge-agent / baseline; above 1 is faster for the rates, costlier for CPU and RSS):", "",
              "| edge-agent / baseline | " + " | ".join(HEADERS.values()) + " |", "|---|" + "---:|" * len(HEADERS)]
    for mine in ("edge-nothing", "edge-ct", "edge-ct-procs"):
        for base in (*BASELINES, "edge-base", "edge-ct-base", "edge-ct-procs-base"):
            if mine in cols and base in cols:
                cells = [f"{a / b:.2f}x" if (a := cols[mine][c]) and (b := cols[base][c]) else "-" for c in HEADERS]
                lines.append(f"| {labels[mine]} / {labels[base]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling(cols: dict[str, dict[str, float | None]], labels: dict[str, str]) -> str:
    """Each receiver on each further set of CPUs against itself on the first (--receiver-cpus)."""
    lines = ["Ratios (a receiver on more CPUs / the same receiver on the first CPUs given; above 1 is faster for the "
             "rates, costlier for CPU and RSS):", "",
             "| receiver | " + " | ".join(HEADERS.values()) + " |", "|---|" + "---:|" * len(HEADERS)]
    keys = list(cols)
    for i, key in enumerate(keys):
        base = next((k for k in keys[:i] if k.partition("@")[0] == key.partition("@")[0]), None)
        if base is None:
            continue
        cells = [f"{a / b:.2f}x" if (a := cols[key][c]) and (b := cols[base][c]) else "-" for c in HEADERS]
        lines.append(f"| {labels[key]} / {labels[base].rpartition(', on CPUs ')[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: list[Measurement], labels: dict[str, str]) -> str:
    lines = ["| receiver | workload | runs | wall s (median) | instances/s min-median-max | MB/s (median) | "
             "CPU ms/instance receiving | until settled | sender's CPU ms/instance | settle s | others' CPU (max) | "
             "problems |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, label in labels.items():
        for w in WORKLOADS:
            ms = [m for m in results if m.receiver == key and m.workload == w]
            if not ms:
                continue
            rates = sorted(m.instances / m.wall_seconds for m in ms)
            probs = "; ".join(sorted({p for m in ms for p in m.problems})) or "none"
            lines.append(
                f"| {label} | {WORKLOADS[w]} | {len(ms)} | {statistics.median(m.wall_seconds for m in ms):.2f} | "
                f"{rates[0]:.1f}-{statistics.median(rates):.1f}-{rates[-1]:.1f} | "
                f"{statistics.median(m.bytes / 1e6 / m.wall_seconds for m in ms):.0f} | "
                f"{statistics.median(m.cpu_receiving_seconds * 1000 / m.instances for m in ms):.2f} | "
                f"{statistics.median(m.cpu_settled_seconds * 1000 / m.instances for m in ms):.2f} | "
                f"{statistics.median(m.sender_cpu_seconds * 1000 / m.instances for m in ms):.2f} | "
                f"{statistics.median(m.settle_seconds for m in ms):.1f} | "
                f"{max(m.others_cpu_share for m in ms):.0%} | {probs.replace('|', '/')} |")
    return "\n".join(lines)


def machine(edge_agent_source: Path) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = []
    for cmd in ([ORTHANC, "--version"], ["/usr/bin/storescp", "--version"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout
            versions.append(next(line.strip(" $") for line in out.splitlines() if line.strip()))
        except (OSError, StopIteration, subprocess.TimeoutExpired):
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    source = (f"this checkout (commit {commit}, uncommitted changes included)" if edge_agent_source == REPO
              else f"{edge_agent_source} (this checkout is at commit {commit})")
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}; {', '.join(versions)}; edge-agent run from {source}")


def report(args: argparse.Namespace, results: list[Measurement], idle_rss: dict[str, int],
           latency: LatencyResult | None, notes: list[str], command: str, minutes: float) -> str:
    labels = {k: LABELS[k] for k in dict.fromkeys(m.receiver for m in results)}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"- command: `{command}`", f"- machine: {machine(args.edge_agent_source)}",
           f"- date: {now}; {minutes:.1f} minutes in all; {args.reps} repetition(s), medians; workloads: "
           + ", ".join(WORKLOADS[w] for w in args.workloads) + f"; {args.ct} CT instances of 0.53 MB per CT "
           f"workload, {args.dx} DX of 15.7 MB", "",
           tables(results, labels, idle_rss), "", "Every run:", "", details(results, labels), ""]
    if latency is not None:
        out += [f"CR latency (edge-agent, routes as shipped, idle): {latency.summary()}", ""]
        if latency.breakdown():
            out += [f"CR latency, {latency.breakdown()}", ""]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--ct", type=int, help="CT instances per CT workload (default 500; 40 with --quick)")
    ap.add_argument("--dx", type=int, help="DX instances in the DX workload (default 20; 3 with --quick)")
    ap.add_argument("--latency", type=int, help="CRs sent for the Success-to-finding latency (default 50, 5 with "
                    "--quick; 0 skips it)")
    ap.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    ap.add_argument("--only", nargs="+", choices=RECEIVERS, help="run only these receivers")
    ap.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS),
                    help="run only these workloads (default: all; e.g. 'ct4' for a side-by-side run about "
                         "CT over four associations); the CPU columns come from the CT workloads")
    ap.add_argument("--markdown", type=Path, help="also write the tables (with command and machine) to this file")
    ap.add_argument("--json", type=Path, help="also write every measurement as JSON")
    ap.add_argument("--quiet-share", type=float, default=0.15,
                    help="before each measurement, wait (up to 30 s) until other processes use at most this share "
                    "of the machine for a second (default 0.15; 0 does not wait)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the bench and everything it starts at this niceness (e.g. -10 as root, so that other "
                    "users' jobs on a shared machine take less from the receivers; no effect on an idle machine)")
    ap.add_argument("--netns", action="store_true", help="run in a private network namespace (needs root)")
    ap.add_argument("--edge-agent-source", type=Path, default=REPO,
                    help="run edge-agent from this source tree (default: this checkout), e.g. a snapshot made with "
                    "'git archive HEAD | tar -x -C DIR'")
    ap.add_argument("--baseline-source", type=Path,
                    help="an earlier edge-agent source tree to run as the receivers edge-base (and, with --only, "
                         "edge-ct-base), beside this one")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, received files)")
    ap.add_argument("--receiver-cpus", type=_cpu_list, nargs="+", metavar="CPUS",
                    help="run each receiver once per CPUS given, pinned to those CPUs (and so every process it "
                         "starts), in the same interleaved run: e.g. '0 all' (all: not pinned), '0-1 0-7 0-15'. How "
                         "each receiver scales with cores; the senders and nats-server may use every CPU. A pinned "
                         "edge-agent runs one preprocessing worker per CPU it may use")
    ap.add_argument("--receiver-processes", type=int, default=2, metavar="N",
                    help="dicom.receiver_processes of the receivers edge-nothing-procs and edge-ct-procs (default 2)")
    args = ap.parse_args(argv)
    args.edge_agent_source = args.edge_agent_source.resolve()
    args.baseline_source = args.baseline_source.resolve() if args.baseline_source else None
    small = args.quick
    args.reps = args.reps or (1 if small else 3)
    args.ct = args.ct or (40 if small else 500)
    args.dx = args.dx or (3 if small else 20)
    args.latency = args.latency if args.latency is not None else (5 if small else 50)
    raw_argv = argv if argv is not None else sys.argv[1:]
    if args.netns and os.environ.get("EDGE_INGEST_NETNS") != "1":
        # Loopback only, and nothing else on the machine can reach (or collide with) the receivers' ports.
        script = f"ip link set lo up && exec {shlex.join([sys.executable, __file__, *raw_argv])}"
        os.execvpe("unshare", ["unshare", "-n", "--", "sh", "-c", script], {**os.environ, "EDGE_INGEST_NETNS": "1"})
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every receiver and sender started below
    python = Path(sys.executable)
    python_shown = ".venv/bin/python" if python.parent == REPO / ".venv" / "bin" else str(python)
    command = f"{python_shown} bench/ingest.py " + shlex.join(raw_argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so that the ExitStack below stops every receiver
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="edge-ingest-"))
    try:
        with ExitStack() as stack:
            results, idle_rss, latency, notes = run(args, root, stack)
            print("stopping receivers ...", flush=True)
    except KeyboardInterrupt:
        print("interrupted: every receiver started has been stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = report(args, results, idle_rss, latency, notes, command, (time.monotonic() - started) / 60)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in results], indent=1))
    if args.keep:
        print(f"work folder: {root}")
    return 1 if any(m.problems for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
