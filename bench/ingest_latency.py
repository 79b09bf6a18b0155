"""Time from a CR's C-STORE Success to its finding arriving from the JetStream stream, on an idle daemon.

One association (pynetdicom's SCU, in this process) sends the 1955x1841 chest CR of pydicom-data with fresh
UIDs, one at a time; an ordered JetStream consumer on the findings stream timestamps each arrival with the same
monotonic clock. A finding is delivered by the stream only once stored, so arrival is after the PubAck.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pydicom
from nats.js.api import DeliverPolicy
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from bench.ingest_data import CR_SOURCE

PAUSE_BETWEEN_SENDS_SECONDS = 0.2  # lets the daemon's release and housekeeping of the last one finish
FINDING_TIMEOUT_SECONDS = 60.0


def nearest_rank(values: list[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank: with 50 samples p99 is the largest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5))) - 1]


@dataclass
class LatencyResult:
    sends: int
    latencies_ms: list[float] = field(default_factory=list)
    # Per CR, from its finding's timings.stage_seconds: preprocess, queue and infer (ms), and the rest of its
    # latency (completion, the finding's commit, publishing, delivery from the stream).
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    # Means from the daemon's /metrics over the run: preprocessing per CR, engine call per batch.
    daemon_means_ms: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return nearest_rank(self.latencies_ms, q)

    def breakdown(self) -> str:
        """p50 and p99 of each part of the latency, and the slowest CR's parts."""
        if not self.stages_ms:
            return ""
        parts = ["preprocess", "queue", "infer", "rest"]
        columns = {k: [stage[k] for stage in self.stages_ms] for k in parts}
        cells = ", ".join(f"{k} {nearest_rank(v, 50):.1f}/{nearest_rank(v, 99):.1f}" for k, v in columns.items())
        slowest = self.stages_ms[max(range(len(self.latencies_ms)), key=self.latencies_ms.__getitem__)]
        worst = ", ".join(f"{k} {slowest[k]:.1f}" for k in parts)
        first = ", ".join(f"{stage['preprocess']:.1f}" for stage in self.stages_ms[:4])
        return (f"per CR, p50/p99 ms: {cells} (rest: completion, the finding's commit, publishing and delivery); "
                f"the slowest CR ({max(self.latencies_ms):.1f} ms): {worst}; the first four CRs' preprocess: "
                f"{first} ms")

    def summary(self) -> str:
        if not self.latencies_ms:
            return "no latency measured: " + "; ".join(self.problems)
        means = ", ".join(f"{k} {v:.1f} ms" for k, v in self.daemon_means_ms.items())
        return (f"{len(self.latencies_ms)} of {self.sends} CRs: Success to finding in the stream p50 "
                f"{self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, max {max(self.latencies_ms):.1f} ms"
                f"; the daemon's own means: {means or 'none'}")


async def measure_cr_latency(nats_url: str, port: int, called_aet: str, sends: int,
                             until: Callable[[], bool] | None = None) -> LatencyResult:
    """Send up to ``sends`` CRs, one at a time, each once the last one's finding has come; with ``until``, none
    once it returns True."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    result = LatencyResult(sends)
    template = pydicom.dcmread(CR_SOURCE)
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}

    async def on_finding(msg: Any) -> None:
        arrived = time.monotonic()
        finding = json.loads(msg.data)
        fut = waiting.pop(finding.get("series_instance_uid", ""), None)
        if fut is not None and not fut.done():
            fut.set_result((arrived, finding))

    nc = await nats.connect(nats_url, connect_timeout=5)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title=called_aet)
    try:
        sub = await nc.jetstream().subscribe("edge.findings.>", cb=on_finding, ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.NEW)
        if not assoc.is_established:
            result.problems.append("association not established")
            return result

        def send(ds: pydicom.Dataset) -> tuple[int, float]:
            status = assoc.send_c_store(ds)
            return int(getattr(status, "Status", -1)), time.monotonic()

        for _ in range(sends):
            if until is not None and until():
                break
            ds = template.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            fut: asyncio.Future[tuple[float, dict[str, Any]]] = loop.create_future()
            waiting[ds.SeriesInstanceUID] = fut
            status, succeeded = await asyncio.to_thread(send, ds)
            if status != 0:
                result.problems.append(f"C-STORE status {status:#06x}")
                waiting.pop(ds.SeriesInstanceUID, None)
                continue
            try:
                arrived, finding = await asyncio.wait_for(fut, FINDING_TIMEOUT_SECONDS)
            except TimeoutError:
                result.problems.append(f"no finding within {FINDING_TIMEOUT_SECONDS:.0f} s")
                continue
            latency_ms = (arrived - succeeded) * 1000
            result.latencies_ms.append(latency_ms)
            stages = (finding.get("timings") or {}).get("stage_seconds") or {}
            parts = {k: 1000 * float(stages.get(k) or 0.0) for k in ("preprocess", "queue", "infer")}
            result.stages_ms.append({**parts, "rest": latency_ms - sum(parts.values())})
            await asyncio.sleep(PAUSE_BETWEEN_SENDS_SECONDS)
        await sub.unsubscribe()
    finally:
        if assoc.is_established:
            await asyncio.to_thread(assoc.release)
        await nc.close()
    return result
