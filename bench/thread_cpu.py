"""Where a received instance's CPU goes in the daemon, thread by thread: CPU ms per instance for each thread.

Starts the daemon (`bench/ingest_peers.EdgeAgent`: CT routed to ct-demo with ``--routed``, else nothing routed),
sends one CT workload with dcmtk's storescu (as `bench/ingest.py` does, which waits until the daemon has settled:
every series closed, every finding published), and reads every thread's utime + stime from /proc before and
after, in the daemon's process and its preprocessing workers: the CPU "until settled", thread by thread.
Threads are named from `py-spy dump`, taken after the workload; a thread that is not Python's (ONNX Runtime's
own, for one) has no name there.

Run:  .venv/bin/python bench/thread_cpu.py --routed [--workload ct4] [--ct 1500] [--edge-agent-source DIR]
      [--receiver-processes N] [--warm] [--profile OUT.txt] [--perf OUT.data]

Each thread's CPU is split into user time (its own code) and system time (the kernel's on its behalf: socket
reads, file writes, page faults, fsyncs). With ``--perf`` the whole machine is also recorded with `perf record
-a -g` while the measured workload runs (senders and kernel threads included), for `perf report -i OUT.data`.

With ``--profile`` it also samples the daemon with ``py-spy record`` while the workload runs and writes the
collapsed stacks (one line per stack, thread first) to OUT.txt, and prints, for the busiest threads, the functions
where their samples end, and what share of the receiving threads' busy samples end in the receive path's own
PDU and DIMSE parsing (the most a compiled parser could take away).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import WORKLOADS, make_receiver, make_workload, measure
from bench.ingest_data import ct_template, dx_template
from bench.ingest_peers import REPO
from bench.ingest_procstat import tree, wait_idle

PY_SPY = Path(sys.executable).parent / "py-spy"
TICKS = os.sysconf("SC_CLK_TCK")


def thread_seconds(pids: list[int]) -> dict[tuple[int, int], tuple[float, float]]:
    """(pid, tid) -> (user, system) CPU seconds so far, for every thread of ``pids``."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            out[(pid, int(tid))] = (int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return out


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from py-spy (empty when py-spy is missing or may not attach)."""
    try:
        dump = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                              text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in re.findall(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routed", action="store_true", help="the routes as shipped (CT to ct-demo)")
    parser.add_argument("--workload", choices=[w for w in WORKLOADS if w != "dx"], default="ct4")
    parser.add_argument("--ct", type=int, default=1500, help="CT slices sent")
    parser.add_argument("--edge-agent-source", type=Path, default=REPO)
    parser.add_argument("--receiver-processes", type=int, default=1, metavar="N", help="dicom.receiver_processes")
    parser.add_argument("--warm", action="store_true",
                        help="send the workload once before measuring, as on a box that has taken studies before "
                             "(its spool keeps released files as slots)")
    parser.add_argument("--profile", type=Path, help="also write py-spy's collapsed stacks of the daemon here")
    parser.add_argument("--perf", type=Path, metavar="OUT",
                        help="also record the whole machine with `perf record -a -g` into OUT while the measured "
                             "workload runs (kernel time included; read it with `perf report -i OUT`)")
    args = parser.parse_args()
    if args.profile and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy beside this Python ({PY_SPY}): .venv/bin/pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="edge-threads-") as folder:
        root = Path(folder)
        key = ("edge-ct" if args.routed else "edge-nothing") + ("-procs" if args.receiver_processes > 1 else "")
        daemon = make_receiver(key, root, args.edge_agent_source.resolve(),
                               receiver_processes=args.receiver_processes)
        daemon.start()
        try:
            wait_idle(daemon.pid, timeout_seconds=120)
            workload = make_workload(args.workload, {"ct": ct_template(), "dx": dx_template()}, root / "send",
                                     args.ct, 1)
            (root / "logs").mkdir()
            if args.warm:
                measure(daemon, workload, 0, root / "logs")
                workload = make_workload(args.workload, {"ct": ct_template(), "dx": dx_template()}, root / "send",
                                         args.ct, 1)
            pids = tree(daemon.pid)
            spy = start_profile(daemon.pid, args.profile) if args.profile else None
            perf = start_perf(args.perf) if args.perf else None
            before = thread_seconds(pids)
            m = measure(daemon, workload, 0, root / "logs")
            after = thread_seconds(pids)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=120)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            names = thread_names(daemon.pid)
        finally:
            daemon.stop()
    per = {k: tuple((a - b) * 1000 / m.instances for a, b in zip(after[k], before.get(k, (0.0, 0.0)), strict=True))
           for k in after}
    print(f"{daemon.label}, {WORKLOADS[args.workload]}: {m.instances / m.wall_seconds:.0f} instances/s; "
          f"CPU ms per instance, by thread (user: the thread's own code; system: the kernel's, on its behalf)")
    print("| process | thread | ms per instance | user | system |")
    print("|---|---|---:|---:|---:|")
    for (pid, tid), (user, system) in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        if user + system < 0.01:
            continue
        where = "daemon" if pid == daemon.pid else f"child {pid}"
        name = names.get(tid) or ("(main thread)" if tid == pid else "(not a Python thread, or ended)")
        print(f"| {where} | {name} | {user + system:.2f} | {user:.2f} | {system:.2f} |")
    users, systems = sum(u for u, _ in per.values()), sum(s for _, s in per.values())
    print(f"| all | | {users + systems:.2f} | {users:.2f} | {systems:.2f} |")
    if args.profile and args.profile.exists():
        print_leaves(args.profile)
        print_parsing_share(args.profile)


def start_perf(out: Path) -> subprocess.Popen[bytes]:
    """``perf record`` of every CPU, with call graphs, until it is sent SIGINT."""
    perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf's own start (its first sample)
    return perf


def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(PY_SPY), "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
                             "--threads", "--subprocesses", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_leaves(path: Path, threads: int = 4, top: int = 15) -> None:
    """For the threads with the most samples: where their samples end (own time) and what they pass through (time
    with callees). py-spy counts a thread blocked in a read or a select as busy too, so read the shares beside
    the CPU table above."""
    samples: Counter[str] = Counter()
    own: dict[str, Counter[str]] = {}
    passed: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith("thread (")), None)
        if at is None:
            continue
        who = (frames[at - 1][:40] + " " if at else "") + frames[at]
        samples[who] += int(count)
        own.setdefault(who, Counter())[frames[-1]] += int(count)
        for frame in dict.fromkeys(frames[at + 1:]):
            passed.setdefault(who, Counter())[frame] += int(count)
    for who, total in samples.most_common(threads):
        print(f"\n{who}: {total} samples")
        for title, counts in (("own time", own[who]), ("with callees", passed[who])):
            print(f"  {title}:")
            for frame, n in counts.most_common(top):
                print(f"  {100 * n / total:5.1f}%  {frame}")


# Where the receive path's own parsing runs: the connection's PDU/PDV state machine and the codecs it calls.
_PARSING = re.compile(r"^(_Connection\.\w+ \(edge_agent/dicom/scp\.py:"
                      r"|\w[\w.]* \(edge_agent/dicom/(dimse|acse|assembler)\.py:)")


def print_parsing_share(path: Path) -> None:
    """Of the receiving threads' busy samples (a thread blocked in its select left out), the share that ends in
    PDU and DIMSE parsing, against the share ending anywhere else (system calls, the digest, the spool)."""
    busy = parsing = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith("thread (") and f.endswith("dicom-receiver") for f in frames):
            continue
        if frames[-1].startswith("EpollSelector.select "):
            continue
        busy += int(count)
        parsing += int(count) if _PARSING.match(frames[-1]) else 0
    if busy:
        print(f"\ndicom-receiver threads: {busy} busy samples, {100 * parsing / busy:.1f}% ending in PDU/DIMSE parsing")


if __name__ == "__main__":
    main()
