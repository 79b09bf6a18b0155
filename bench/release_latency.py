"""Time from an association's A-RELEASE to its series' finding on JetStream, with ``complete_on_release``.

The cross-sectional route gets ``complete_on_release: true`` and a quiet time of 60 s; the series carry no
Images in Acquisition, so only the release can end them before the quiet time. One pynetdicom association per
series; an ordered JetStream consumer, subscribed before the first slice is sent, timestamps each finding with
the same clock. The engine time per series (ct-demo's engine calls, from the daemon's /metrics) is printed
beside it: the goal is 100 ms + inference. Run:  .venv/bin/python bench/release_latency.py [--slices 20 100]
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
QUIET_SECONDS = 60


def make_series(n: int, source: Path) -> tuple[str, list[pydicom.Dataset]]:
    base = pydicom.dcmread(source)
    base.pop("ImagesInAcquisition", None)  # nothing but the release may end the series early
    series_uid, study_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.InstanceNumber = i + 1
        out.append(ds)
    return series_uid, out


def engine_seconds(daemon: Daemon) -> float:
    return daemon.metric_total("edge_agent_inference_compute_seconds_sum", model="ct-demo")


async def run_once(daemon: Daemon, url: str, n: int, source: Path) -> tuple[float, float]:
    """(release -> finding, engine seconds spent on the series), in seconds."""
    series_uid, datasets = make_series(n, source)
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe("edge.findings.>", ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.NEW)
        engine_before = await asyncio.to_thread(engine_seconds, daemon)

        def send() -> float:
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="EDGE_AGENT")
            for ds in datasets:
                status = assoc.send_c_store(ds)
                assert status.Status == 0, hex(status.Status)
            released = time.monotonic()
            assoc.release()
            return released

        released = await asyncio.to_thread(send)
        while True:
            msg = await sub.next_msg(timeout=QUIET_SECONDS / 2)
            if json.loads(msg.data)["series_instance_uid"] == series_uid:
                arrived = time.monotonic()
                break
        engine = await asyncio.to_thread(engine_seconds, daemon) - engine_before
        return arrived - released, engine
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ct-file", type=Path, default=CT_SOURCE, help="the CT slice to send (default: %(default)s)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    port = free_port()
    nats_proc = subprocess.Popen(
        [nats_server_binary() or "nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    print(f"{os.cpu_count()} CPUs, {args.repeats} runs per size, slice {args.ct_file.name}, "
          f"quiet_seconds {QUIET_SECONDS}, complete_on_release true")
    rows = []
    overrides = {"routes.1.quiet_seconds": QUIET_SECONDS, "routes.1.complete_on_release": True,
                 "logging.level": "WARNING"}
    daemon = Daemon(write_config(tmp, url, **overrides), tmp)
    try:
        daemon.start()
        asyncio.run(run_once(daemon, url, 1, args.ct_file))  # warm the path once
        for n in args.slices:
            results = [asyncio.run(run_once(daemon, url, n, args.ct_file)) for _ in range(args.repeats)]
            delays = [d for d, _ in results]
            rows.append((n, statistics.median(delays), max(delays), statistics.median(e for _, e in results)))
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.terminate()
        daemon.close()
        nats_proc.terminate()
        nats_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'slices':>6} | {'release -> finding, median (ms)':>31} | {'max (ms)':>8} | "
          f"{'engine time per series (ms)':>27}")
    print("-" * 83)
    for n, med, hi, engine in rows:
        print(f"{n:>6} | {med * 1000:>31.1f} | {hi * 1000:>8.1f} | {engine * 1000:>27.1f}")


if __name__ == "__main__":
    main()
