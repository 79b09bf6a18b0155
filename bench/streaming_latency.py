"""Time from the last slice's C-STORE Success to the finding on JetStream, for 1, 100 and 500 slices.

Streaming means each slice is decoded and inferred as it lands, so this delay must not grow with the
series' length. The series carry Images in Acquisition, so completion is decided by count, not by a
quiet time. Run:  .venv/bin/python bench/streaming_latency.py [--repeats 3] [--slices 1 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import pydicom
import pydicom.data
from nats.js.api import DeliverPolicy
from pydicom.uid import generate_uid
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon, write_config
from tests.natsutil import nats_server_binary
from tests.netutil import free_port

# A real 512x512 CT slice from the pydicom-data wheel.
CT_SOURCE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data" / "693_UNCR.dcm"


def make_series(n: int, source: Path) -> tuple[str, list[pydicom.Dataset]]:
    base = pydicom.dcmread(source)
    series_uid, study_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.InstanceNumber = i + 1
        ds.ImagesInAcquisition = n
        out.append(ds)
    return series_uid, out


async def _wait_finding(url: str, series_uid: str, timeout_seconds: float) -> float:
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe("edge.findings.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        deadline = time.monotonic() + timeout_seconds
        while True:
            msg = await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))
            if json.loads(msg.data)["series_instance_uid"] == series_uid:
                return time.time()
    finally:
        await nc.close()


def run_once(daemon: Daemon, url: str, n: int, source: Path) -> tuple[float, float]:
    series_uid, datasets = make_series(n, source)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="EDGE_AGENT")
    started = time.time()
    for ds in datasets:
        status = assoc.send_c_store(ds)
        assert status.Status == 0, hex(status.Status)
    last_success = time.time()
    assoc.release()
    published = asyncio.run(_wait_finding(url, series_uid, 600))
    return last_success - started, published - last_success


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, nargs="+", default=[1, 100, 500])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ct-file", type=Path, default=CT_SOURCE, help="the CT slice to send (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="pipeline.preprocess_workers")
    ap.add_argument(
        "--pools",
        nargs="+",
        default=["process", "thread"],
        choices=["process", "thread"],
        help="pipeline.preprocess_pool values to compare, each with a daemon of its own, in this run",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    port = free_port()
    nats_proc = subprocess.Popen(
        [nats_server_binary() or "nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    print(
        f"{os.cpu_count()} CPUs, {args.workers} preprocessing workers, {args.repeats} runs per size, "
        f"slice {args.ct_file.name}"
    )
    rows = []
    try:
        for pool in args.pools:
            folder = tmp / pool
            folder.mkdir()
            overrides = {
                "routes.1.quiet_seconds": 30,
                "logging.level": "WARNING",
                "pipeline.preprocess_workers": args.workers,
                "pipeline.preprocess_pool": pool,
            }
            daemon = Daemon(write_config(folder, url, **overrides), folder)
            try:
                daemon.start()
                run_once(daemon, url, 1, args.ct_file)  # warm the path once
                for n in args.slices:
                    sends, delays = [], []
                    for _ in range(args.repeats):
                        send, delay = run_once(daemon, url, n, args.ct_file)
                        sends.append(send)
                        delays.append(delay)
                    rows.append(
                        (pool, n, statistics.median(sends), statistics.median(delays), min(delays), max(delays))
                    )
            finally:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.terminate()
                daemon.close()
    finally:
        nats_proc.terminate()
        nats_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{'pool':>7} | {'slices':>6} | {'send all (s)':>12} | {'last Success -> finding, median (ms)':>37} | "
        f"{'min (ms)':>8} | {'max (ms)':>8}"
    )
    print("-" * 94)
    for pool, n, send, med, lo, hi in rows:
        print(f"{pool:>7} | {n:>6} | {send:>12.2f} | {med * 1000:>37.1f} | {lo * 1000:>8.1f} | {hi * 1000:>8.1f}")


if __name__ == "__main__":
    main()
