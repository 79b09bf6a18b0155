"""End to end: the daemon as a subprocess, real nats-server, real dcmtk storescu and pynetdicom SCU."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from edge_agent.dicom.spool import FREE_FILES
from tests.daemon import Daemon, read_findings, storescu, stream_count
from tests.dicomfiles import DATA_STORE, PYDICOM_FILES, fill, make_ct_series, tmpfs

pytestmark = pytest.mark.e2e

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "edge_agent" / "bus" / "finding.schema.json").read_text())
CR_CHEST = DATA_STORE / "RG1_UNCR.dcm"
CR_CHEST_J2K = DATA_STORE / "RG1_J2KR.dcm"
CR_EXTREMITY = DATA_STORE / "RG3_UNCR.dcm"


def fresh_copy(
    src: Path,
    dst_dir: Path,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance_number: int | None = None,
    name: str | None = None,
) -> Path:
    """A copy of a real file under new UIDs, so that every test sends a series of its own."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = dst_dir / (name or f"{src.stem}-{ds.SOPInstanceUID[-12:]}.dcm")
    ds.save_as(out, enforce_file_format=True)
    return out


def pynetdicom_store(port: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    """One C-STORE from the pynetdicom SCU; returns the response status dataset (empty if none came)."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    if assoc.is_established:
        assoc.release()
    return status


def ct_series(src: Path, dst_dir: Path, count: int) -> tuple[str, list[Path]]:
    series_uid, study_uid = generate_uid(), generate_uid()
    files = [
        fresh_copy(
            src, dst_dir, series_uid=series_uid, study_uid=study_uid, instance_number=i + 1, name=f"slice{i:04d}.dcm"
        )
        for i in range(count)
    ]
    return series_uid, files


def _assert_no_patient_data(text: str, *uids: str) -> None:
    for uid in uids:
        assert uid not in text


def test_cr_chest_via_dcmtk_gives_one_finding_and_metrics(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    assert d.http("/readyz")[0] == 200
    assert d.http("/healthz")[0] == 200
    f = fresh_copy(CR_CHEST, tmp_path / "in")
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    result = storescu(d.dicom_port, f)
    assert result.returncode == 0, result.stderr

    [finding] = read_findings(nats_server.url, 1)
    jsonschema.validate(finding, SCHEMA)
    assert finding["series_instance_uid"] == ds.SeriesInstanceUID
    assert finding["study_instance_uid"] == ds.StudyInstanceUID
    assert finding["model"]["name"] == "cxr-nodule"
    assert finding["modality"] == "CR"
    assert finding["route"] == "chest-radiograph"
    assert finding["priority"] in ("urgent", "routine")
    # The heat map reaches viewers: a PNG beside the spool, named by finding id, in the model's input size.
    image = d.tmp / "state" / finding["heatmap"]["image"]
    assert finding["heatmap"]["image"] == f"heatmaps/{finding['finding_id']}.png"
    png = image.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", png[16:24]) == (256, 256)

    d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="published")
    assert d.metric("edge_agent_instances_total", outcome="stored") == 1
    assert d.metric("edge_agent_associations_total", outcome="accepted") >= 1
    assert d.metric("edge_agent_ready") == 1
    _, text = d.http("/metrics")
    assert all(line.startswith(("# ", "edge_agent_")) or not line for line in text.splitlines())
    _assert_no_patient_data(text, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID, "STORESCU")
    # Released after the ack: nothing is left in the spool.
    d.wait_metric("edge_agent_spool_bytes", 0, at_most=0)
    assert d.terminate() == 0
    log = d.log()
    assert "shutdown:" in log
    _assert_no_patient_data(
        log,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
        ds.SOPInstanceUID,
        str(ds.get("AccessionNumber", "")) or "\x00",
        str(ds.get("PatientID", "")) or "\x00",
    )


def test_compressed_and_cross_sectional_via_pynetdicom(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    cr = fresh_copy(CR_CHEST_J2K, tmp_path / "in")
    ct_uid, ct_files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 5)
    mr = fresh_copy(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm", tmp_path / "in")
    mr_rle = fresh_copy(PYDICOM_FILES / "MR_small_RLE.dcm", tmp_path / "in")
    files = [cr, *ct_files, mr, mr_rle]
    datasets = [pydicom.dcmread(p) for p in files]

    ae = AE(ae_title="PYNETDICOM")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", d.dicom_port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()

    found = read_findings(nats_server.url, 4)
    by_series = {f["series_instance_uid"]: f for f in found}
    assert len(found) == 4
    assert by_series[ct_uid]["model"]["name"] == "ct-demo"
    assert by_series[ct_uid]["instance_count"] == 5
    assert by_series[datasets[0].SeriesInstanceUID]["model"]["name"] == "cxr-nodule"
    for f in found:
        jsonschema.validate(f, SCHEMA)


def _nice_values(pid: int) -> dict[int, int]:
    """tid -> niceness, for every thread of ``pid`` (Linux keeps one per thread)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def test_preprocessing_and_inference_run_below_the_receiver(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    # pipeline.inference_niceness (default 10): the worker processes and the engine threads (with the threads
    # ONNX Runtime starts for itself) run that much lower than the daemon's own threads.
    d = daemon(pipeline={"inference_niceness": 7}).start()
    assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
    read_findings(nats_server.url, 1)  # both stages have run
    assert d.proc is not None
    base = os.getpriority(os.PRIO_PROCESS, 0)
    threads = _nice_values(d.proc.pid)
    assert threads[d.proc.pid] == base  # the main thread: the pipeline's loop, the bus, HTTP
    lowered = [tid for tid, nice in threads.items() if nice == min(19, base + 7)]
    assert 1 <= len(lowered) < len(threads) - 1  # the engines' threads, not the receiver's loop and the rest
    workers = [kid for kid in _children(d.proc.pid)
               if b"resource_tracker" not in Path(f"/proc/{kid}/cmdline").read_bytes()]
    assert len(workers) == 2  # preprocess_workers
    for w in workers:  # every thread of theirs: its main one, BLAS's, ...; a heat map's is lower still (+10)
        nice = _nice_values(w)
        assert nice[w] == min(19, base + 7) and set(nice.values()) <= {min(19, base + 7), min(19, base + 17)}
    assert d.terminate() == 0


def test_a_series_no_route_matches_is_recorded_and_released(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    free = Path(d.config["state_dir"]) / "spool" / "free"
    # Ready means the files the first instances go to are being made (dicom/spool.py), all empty.
    before = len(list(free.iterdir()))
    assert 0 < before <= FREE_FILES
    result = storescu(d.dicom_port, fresh_copy(CR_EXTREMITY, tmp_path / "in"))  # BodyPartExamined EXTREMITY
    assert result.returncode == 0, result.stderr
    d.wait_metric("edge_agent_series_total", 1, outcome="unrouted")
    d.wait_metric("edge_agent_spool_bytes", 0, at_most=0)
    assert stream_count(nats_server.url) == 0
    # After the release free/ holds as many as before or more, and no kept file holds anything of the instance.
    deadline = time.monotonic() + 10
    while len(list(free.iterdir())) < before and time.monotonic() < deadline:
        time.sleep(0.1)
    kept = list(free.iterdir())
    assert len(kept) >= before
    # The instance's file was kept whole as a slot for the next instances to be written over (dicom/spool.py):
    # zeroed, nothing of the instance left in it. The rest are empty.
    slots = [p for p in kept if p.suffix == ".slot"]
    assert len(slots) == 1 and slots[0].stat().st_size >= CR_EXTREMITY.stat().st_size
    assert slots[0].read_bytes() == bytes(slots[0].stat().st_size)
    assert {p.stat().st_size for p in kept if p.suffix == ".free"} == {0}


def test_kept_spool_files_are_made_again_while_no_association_is_open(daemon: Any, tmp_path: Path) -> None:
    # spool.retention keep: nothing released, so nothing goes back to free/ but what the idle ticks make.
    d = daemon(**{"spool.retention": "keep"}).start()
    free = Path(d.config["state_dir"]) / "spool" / "free"
    series = [pydicom.dcmread(f) for f in make_ct_series(tmp_path / "ct", 12)]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(series[0].SOPClassUID, series[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", d.dicom_port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in series] == [0] * 12
        time.sleep(0.2)  # past any idle tick's making that was under way when the association came
        during = len(list(free.iterdir()))
        time.sleep(2.5)  # two ticks or more: none makes files while an association is open
        assert len(list(free.iterdir())) == during < FREE_FILES
    finally:
        assoc.release()
    deadline = time.monotonic() + 10
    while len(list(free.iterdir())) <= during and time.monotonic() < deadline:
        time.sleep(0.1)
    sizes = [p.stat().st_size for p in free.iterdir()]
    assert len(sizes) > during and set(sizes) == {0}
    assert len(list((Path(d.config["state_dir"]) / "spool" / "instances").glob("*/*.dcm"))) == 12


def test_wrong_calling_aet_is_rejected(daemon: Any, tmp_path: Path) -> None:
    d = daemon(**{"dicom.allowed_calling_aets": ["MODALITY1"]}).start()
    result = storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in"), calling_aet="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr or "rejected" in result.stderr.lower()
    d.wait_metric("edge_agent_associations_total", 1, outcome="rejected_calling_aet")
    assert d.metric("edge_agent_instances_total", outcome="stored") == 0
    assert "INTRUDER" not in d.log()
    ok = storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in"), calling_aet="MODALITY1")
    assert ok.returncode == 0, ok.stderr


def test_a_study_as_a_pacs_forwards_it_is_taken_whole(daemon: Any, tmp_path: Path) -> None:
    # An RT structure set and a structured report beside the images: accepted (a refused context is a failed
    # transfer to a forwarding PACS, which retries for ever), recorded, left unrouted, released.
    d = daemon().start()
    sent = []
    for name in ("rtstruct.dcm", "test-SR.dcm"):
        ds = pydicom.dcmread(PYDICOM_FILES / name, force=True)
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        implicit = ds.original_encoding[0]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        sent.append(ds)
    ae = AE(ae_title="PYNETDICOM")
    for ds in sent:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", d.dicom_port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        for ds in sent:
            assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    d.wait_metric("edge_agent_series_total", 2, outcome="unrouted")
    d.wait_metric("edge_agent_instances_total", 2, outcome="stored")


def test_undecodable_pixels_fail_the_series_and_the_daemon_keeps_serving(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    d = daemon().start()
    bad = fresh_copy(CR_CHEST, tmp_path / "bad")
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a valid header, pixel data cut short
    ds.save_as(bad, enforce_file_format=True)
    result = storescu(d.dicom_port, bad)
    assert result.returncode == 0, result.stderr  # stored as received: decoding is not on the receive path
    d.wait_metric("edge_agent_instances_total", 1, outcome="decode_failed")
    d.wait_metric("edge_agent_series_total", 1, outcome="failed")
    good = storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in"))
    assert good.returncode == 0
    assert len(read_findings(nats_server.url, 1)) == 1
    assert d.http("/readyz")[0] == 200


def test_a_dataset_that_does_not_parse_gets_a_failure_status(daemon: Any, tmp_path: Path) -> None:
    d = daemon().start()
    ds = pydicom.dcmread(fresh_copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "in"))
    del ds.SeriesInstanceUID  # a C-STORE the assembler could never place
    status = pynetdicom_store(d.dicom_port, ds)
    assert status.Status in (0xC000, 0xA900)
    d.wait_metric("edge_agent_instances_total", 1, outcome="cannot_understand")
    assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0


def test_spool_below_watermark_answers_out_of_resources(daemon: Any, tmp_path: Path) -> None:
    d = daemon(**{"spool.min_free_bytes": 2**62}).start()
    ds = pydicom.dcmread(fresh_copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "in"))
    status = pynetdicom_store(d.dicom_port, ds)
    assert status.Status == 0xA700
    d.wait_metric("edge_agent_instances_total", 1, outcome="out_of_resources")


def test_kill9_after_success_before_publish_gives_the_finding_exactly_once(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    nats_server.stop()  # the finding can only wait in the outbox
    d = daemon().start()
    f = fresh_copy(CR_CHEST, tmp_path / "in")
    assert storescu(d.dicom_port, f).returncode == 0
    d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="queued")
    d.kill9()
    nats_server.start()
    d.start()
    [finding] = read_findings(nats_server.url, 1)
    assert finding["series_instance_uid"] == pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
    d.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="published")
    assert d.terminate() == 0
    assert stream_count(nats_server.url) == 1


def test_kill9_while_a_series_is_open_resumes_it(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon(**{"routes.1.quiet_seconds": 30}).start()
    series_uid, files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 4)
    assert storescu(d.dicom_port, *files).returncode == 0
    d.wait_metric("edge_agent_instances_total", 4, outcome="stored")
    d.kill9()
    d.config_path.write_text(d.config_path.read_text().replace("quiet_seconds: 30", "quiet_seconds: 0.5"))
    d.start()
    [finding] = read_findings(nats_server.url, 1)
    assert finding["series_instance_uid"] == series_uid
    assert finding["instance_count"] == 4


def test_broker_down_while_studies_arrive(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    nats_server.stop()
    sent = [fresh_copy(CR_CHEST, tmp_path / "in") for _ in range(3)]
    for f in sent:
        assert storescu(d.dicom_port, f).returncode == 0
    d.wait_metric("edge_agent_findings_total", 3, model="cxr-nodule", outcome="queued")
    assert d.metric("edge_agent_broker_connected") == 0
    assert d.http("/readyz")[0] == 200  # receiving does not depend on the broker
    nats_server.start()
    found = read_findings(nats_server.url, 3)
    assert {f["series_instance_uid"] for f in found} == {
        pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in sent
    }
    d.wait_metric("edge_agent_outbox_pending", 0, at_most=0)
    assert stream_count(nats_server.url) == 3


def test_sigterm_drains_and_says_what_it_did_and_a_second_forces(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
    read_findings(nats_server.url, 1)
    assert d.proc is not None
    d.proc.send_signal(15)
    d.wait_note("STOPPING=1")
    assert d.proc.wait(60) == 0
    assert re.search(r"shutdown: \d+ series finished", d.log())

    # A second SIGTERM while draining (the broker is gone, so the flush would wait) exits at once.
    nats_server.stop()
    d.close()
    d2 = Daemon(d.config_path, tmp_path).start()
    assert storescu(d2.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
    d2.wait_metric("edge_agent_findings_total", 1, model="cxr-nodule", outcome="queued")
    assert d2.proc is not None
    d2.proc.send_signal(15)
    d2.wait_note("STOPPING=1")
    d2.proc.send_signal(15)
    try:
        assert d2.proc.wait(8) == 0
    finally:
        d2.close()
    assert "forcing exit" in d2.log()


def test_send_cli_and_metrics_endpoint(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    d = daemon().start()
    folder = tmp_path / "study"
    fresh_copy(CR_CHEST, folder)
    (folder / "notes.txt").write_text("not DICOM")
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "send", str(folder), "--port", str(d.dicom_port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(read_findings(nats_server.url, 1)) == 1
    shutil.rmtree(folder)


def test_watchdog_comes_from_the_loop_tick_and_status_is_reported(daemon: Any) -> None:
    d = daemon().start(env={"WATCHDOG_USEC": "400000"})  # 0.4 s: the loop must tick at least every 0.2 s
    d.wait_note("STATUS=", timeout_seconds=5)
    for _ in range(3):  # it keeps beating, not just once at start
        d.notes.clear()
        d.wait_note("WATCHDOG=1", timeout_seconds=2)
    # A stopped (SIGSTOP) event loop sends no heartbeat: the watchdog is not fed from a thread.
    assert d.proc is not None
    d.proc.send_signal(19)
    try:
        assert d.notify is not None
        d.notify.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while True:
                d.notify.recv(4096)  # drain what was sent before the stop
        d.notify.settimeout(1.0)
        with pytest.raises(TimeoutError):
            d.notify.recv(4096)
    finally:
        d.proc.send_signal(18)
    d.notes.clear()
    d.wait_note("WATCHDOG=1", timeout_seconds=5)


def test_tail_cli_prints_findings_as_they_arrive(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    d = daemon().start()
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "tail",
            "--config",
            str(d.config_path),
            "--all",
            "--count",
            "1",
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    f = fresh_copy(CR_CHEST, tmp_path / "in")
    assert storescu(d.dicom_port, f).returncode == 0
    out, err = tail.communicate(timeout=90)
    assert tail.returncode == 0, err
    [line] = out.strip().splitlines()
    assert json.loads(line)["series_instance_uid"] == pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID


def test_a_full_disk_makes_the_daemon_not_ready_and_refuse_then_it_recovers(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    with tmpfs("64m") as disk:
        d = daemon(state_dir=str(disk / "state"), **{"spool.min_free_bytes": 16 * 2**20}).start()
        assert d.http("/readyz")[0] == 200
        fill(disk, leave_bytes=8 * 2**20)  # a real file system below the 16 MB watermark
        ds = pydicom.dcmread(fresh_copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "in"))
        assert pynetdicom_store(d.dicom_port, ds).Status == 0xA700
        d.wait_metric("edge_agent_ready", 0, at_most=0)
        code, body = d.http("/readyz")
        assert code == 503 and "spool below its free-space watermark" in body
        assert d.http("/healthz")[0] == 200  # alive, just not ready: no restart loop

        # Nothing free at all: pynetdicom cannot even buffer the dataset, so the association is aborted
        # (the sender keeps the study and retries); the daemon keeps serving.
        (disk / "more").mkdir()
        fill(disk / "more", leave_bytes=0)
        status = pynetdicom_store(d.dicom_port, ds)
        assert "Status" not in status or status.Status == 0xA700  # no Success: the sender keeps the study
        assert d.http("/readyz")[0] == 503

        (disk / "filler").unlink()
        (disk / "more" / "filler").unlink()
        d.wait_metric("edge_agent_ready", 1)
        assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
        assert len(read_findings(nats_server.url, 1)) == 1
        assert d.terminate() == 0


def test_a_heat_map_that_cannot_be_stored_does_not_hold_the_finding_back(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    d = daemon()
    (tmp_path / "state").mkdir(parents=True)
    (tmp_path / "state" / "heatmaps").write_text("a file where the folder should be")
    d.start()
    assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
    [finding] = read_findings(nats_server.url, 1)
    assert finding["heatmap"]["image"] is None and finding["heatmap"]["bbox"]
    assert "heat map not stored" in d.log()


def test_the_operating_point_a_site_chooses_is_the_threshold_its_findings_use(daemon: Any, nats_server: Any,
                                                                              tmp_path: Path) -> None:
    from edge_agent.inference.card import load_card

    card = load_card(Path(__file__).resolve().parent.parent / "engines" / "cxr-nodule")
    high = float(card.operating_points["high_specificity"].threshold)
    d = daemon(**{"models.cxr-nodule.operating_point": "high_specificity"}).start()
    assert storescu(d.dicom_port, fresh_copy(CR_CHEST, tmp_path / "in")).returncode == 0
    [finding] = read_findings(nats_server.url, 1)
    [result] = finding["labels"]
    assert result["threshold"] == pytest.approx(high, abs=1e-6)
    assert result["threshold"] != pytest.approx(float(card.thresholds["nodule"]), abs=1e-6)
    assert result["positive"] == (result["score"] >= high)
