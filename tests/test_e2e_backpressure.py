"""End to end (issue 9): back-pressure under a flood faster than the engine, and ``complete_on_release``.

The daemon runs as a subprocess with a real nats-server; a real pynetdicom SCU sends, as a modality or a PACS
would, and retries what was refused once the daemon is ready again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from tests.daemon import Daemon, read_findings, stream_count
from tests.dicomfiles import make_ct_series
from tests.fault_tools import model_repository
from tests.test_e2e_lifecycle import wait_log

pytestmark = pytest.mark.e2e

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def _association(port: int, paths: list[Path]) -> Any:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for ds in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in map(_header, paths)}:
        ae.add_requested_context(*ds)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    return assoc


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _send(port: int, paths: list[Path], *, abort: bool = False) -> None:
    """One association carrying ``paths``, every one answered Success, ended by a release (or an abort)."""
    assoc = _association(port, paths)
    try:
        for path in paths:
            assert assoc.send_c_store(path).Status == SUCCESS
    finally:
        if abort:
            assoc.abort()
        else:
            assoc.release()


def _wait_ready(d: Daemon, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while d.http("/readyz")[0] != 200:
        assert time.monotonic() < deadline, f"not ready again within {timeout_seconds} s\n{d.log()}"
        time.sleep(0.05)


def test_a_flood_faster_than_the_engine_is_pushed_back_then_resumes_and_nothing_is_lost(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    # An engine far slower than any receive path (two slices a second), so that the flood outruns it even on a
    # busy machine.
    bound, max_batch, workers = 8, 1, 2
    repo, _ = model_repository(tmp_path / "models", seconds_per_image=0.5)
    d: Daemon = daemon(**{
        "model_repository": str(repo),
        "routes.1.model": "ct-slow",
        "routes.1.quiet_seconds": 60,  # the count completes the series, once every slice is in
        "models.ct-slow": {"max_batch": max_batch, "max_queue_delay_ms": 0},
        "pipeline.preprocess_workers": workers,
        "pipeline.max_pending_instances": bound,
    }).start()
    slices = make_ct_series(tmp_path / "ct", 30, images_in_acquisition=True)
    uids = {str(_header(p).SOPInstanceUID) for p in slices}

    refused: list[Path] = []
    seen_refusal = False
    assoc = _association(d.dicom_port, slices)
    try:
        for path in slices:
            answer = assoc.send_c_store(path).Status
            assert answer in (SUCCESS, OUT_OF_RESOURCES)
            if answer == OUT_OF_RESOURCES:
                refused.append(path)
            if answer == OUT_OF_RESOURCES and not seen_refusal:
                seen_refusal = True
                # Until half the bound has been inferred (seconds, with this engine), the daemon says why.
                pending = d.metric("edge_agent_pending_instances")
                code, body = d.http("/readyz")
                assert code == 503, body
                assert any("max_pending_instances" in r for r in json.loads(body)["reasons"]), body
                assert pending > bound // 2  # still refusing after this sample: above the resume mark then
                # Decoded images: the ones being decoded, one batch in the engine and one filling.
                assert d.metric("edge_agent_decoded_instances", model="ct-slow") <= workers + 2 * max_batch
                assert d.http("/healthz")[0] == 200  # behind, not broken
    finally:
        assoc.release()
    assert seen_refusal and refused, "the flood never reached the bound: make the engine slower"
    assert d.metric("edge_agent_instances_total", outcome="backpressure") == len(refused)

    # The sender retries what was refused once the daemon is ready again, as a PACS does.
    for _ in range(20):
        if not refused:
            break
        # /readyz decides afresh; the edge_agent_ready gauge is only set once a tick, so right after a refusal it
        # may still read 1 and a retry sent on it would be refused again, round after round.
        _wait_ready(d, timeout_seconds=60)
        retry, refused = refused, []
        assoc = _association(d.dicom_port, retry)
        try:
            for path in retry:
                if assoc.send_c_store(path).Status != SUCCESS:
                    refused.append(path)
        finally:
            assoc.release()
    assert refused == []

    [finding] = read_findings(nats_server.url, 1, timeout_seconds=90)
    assert set(finding["sop_instance_uids"]) == uids  # every acknowledged instance is covered
    assert finding["instances_failed"] == 0 and finding["revision"] == 0
    d.wait_metric("edge_agent_pending_instances", 0, at_most=0)
    assert d.http("/readyz")[0] == 200
    assert "refusing new instances" in d.log() and "accepting instances again" in d.log()
    for uid in uids:
        assert uid not in d.log()
    assert d.terminate() == 0


def test_complete_on_release_ends_the_series_at_the_release_and_an_abort_leaves_it_to_the_quiet_time(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    quiet = 60.0
    d: Daemon = daemon(**{"routes.1.quiet_seconds": quiet, "routes.1.complete_on_release": True}).start()
    released = make_ct_series(tmp_path / "released", 5)  # no Images in Acquisition: no count to end it
    aborted = make_ct_series(tmp_path / "aborted", 3)
    later = make_ct_series(tmp_path / "later", 2)

    _send(d.dicom_port, released)
    at_release = time.monotonic()
    [first] = read_findings(nats_server.url, 1, timeout_seconds=quiet / 2)
    waited = time.monotonic() - at_release
    assert first["series_instance_uid"] == _header(released[0]).SeriesInstanceUID
    assert first["instances_inferred"] == 5
    assert waited < quiet / 2, f"the finding came {waited:.1f} s after the release"

    # An aborted association may not have sent all of its series: the quiet time rules, not the abort.
    _send(d.dicom_port, aborted, abort=True)
    wait_log(d, "association aborted")  # handled by the receiver before the next association starts
    _send(d.dicom_port, later)
    found = read_findings(nats_server.url, 2, timeout_seconds=quiet / 2)
    assert [f["series_instance_uid"] for f in found] == [
        _header(released[0]).SeriesInstanceUID, _header(later[0]).SeriesInstanceUID
    ]
    d.wait_metric("edge_agent_open_series", 1, at_most=1)
    assert d.metric("edge_agent_open_series") == 1  # the aborted one, still waiting for its quiet time
    assert stream_count(nats_server.url) == 2
    assert d.terminate() == 0
