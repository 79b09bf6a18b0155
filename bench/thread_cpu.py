"""Where a received instance's CPU goes in the daemon, thread by thread: CPU ms per instance for each thread.

Starts the daemon (`bench/ingest_peers.EdgeAgent`: CT routed to ct-demo with ``--routed``, else nothing routed),
sends one CT workload with dcmtk's storescu (as `bench/ingest.py` does, which waits until the daemon has settled:
every series closed, every finding published), and reads every thread's utime + stime from /proc before and
after, in the daemon's process and its preprocessing workers: the CPU "until settled", thread by thread.
Threads are named from `py-spy dump`, taken after the workload; a thread that is not Python's (ONNX Runtime's
own, for one) has no name there.

Run:  .venv/bin/python bench/thread_cpu.py --routed [--workload ct4] [--ct 1500] [--edge-agent-source DIR]
      [--receiver-processes N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import WORKLOADS, make_receiver, make_workload, measure
from bench.ingest_data import ct_template, dx_template
from bench.ingest_peers import REPO
from bench.ingest_procstat import tree, wait_idle

PY_SPY = Path(sys.executable).parent / "py-spy"
TICKS = os.sysconf("SC_CLK_TCK")


def thread_seconds(pids: list[int]) -> dict[tuple[int, int], float]:
    """(pid, tid) -> CPU seconds so far, for every thread of ``pids``."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            out[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / TICKS
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
    args = parser.parse_args()
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
            pids = tree(daemon.pid)
            before = thread_seconds(pids)
            m = measure(daemon, workload, 0, root / "logs")
            after = thread_seconds(pids)
            names = thread_names(daemon.pid)
        finally:
            daemon.stop()
    per = {k: (after[k] - before.get(k, 0.0)) * 1000 / m.instances for k in after}
    print(f"{daemon.label}, {WORKLOADS[args.workload]}: {m.instances / m.wall_seconds:.0f} instances/s; "
          f"CPU ms per instance, by thread")
    print("| process | thread | ms per instance |")
    print("|---|---|---:|")
    for (pid, tid), ms in sorted(per.items(), key=lambda kv: -kv[1]):
        if ms < 0.01:
            continue
        where = "daemon" if pid == daemon.pid else f"child {pid}"
        name = names.get(tid) or ("(main thread)" if tid == pid else "(not a Python thread, or ended)")
        print(f"| {where} | {name} | {ms:.2f} |")
    print(f"| all | | {sum(per.values()):.2f} |")


if __name__ == "__main__":
    main()
