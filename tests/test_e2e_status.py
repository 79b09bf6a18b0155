"""`edge-agent status`, GET /status, the heat maps over HTTP, stage timings and JSON logs, on the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_agent.bus.finding import load_schema
from tests.daemon import REPO, read_findings, storescu
from tests.dicomfiles import DATA_STORE
from tests.netutil import free_port

pytestmark = pytest.mark.e2e

CR_CHEST = DATA_STORE / "RG1_UNCR.dcm"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Identifiers put into the sent file: none may appear in any log line.
PATIENT_NAME = "Zebradottir^Quintessa"
PATIENT_ID = "PID-7Q3X9K"
ACCESSION = "ACC-ZX81-44"


def status_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "status", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def identifiable_chest(folder: Path) -> tuple[Path, list[str]]:
    """The CR chest under new UIDs and made-up patient identifiers; returns it and every identifier it carries."""
    ds = pydicom.dcmread(CR_CHEST)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    identifiers = [PATIENT_NAME, "Zebradottir", "Quintessa", PATIENT_ID, ACCESSION, ds.SOPInstanceUID,
                   ds.SeriesInstanceUID, ds.StudyInstanceUID, str(ds.PatientBirthDate), str(ds.StudyID)]
    return path, identifiers


def test_status_stage_timings_heat_maps_and_json_logs_on_a_running_daemon(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    d = daemon(**{"logging.format": "json"}).start()
    config = str(d.config_path)

    before = status_cli("--config", config)
    assert before.returncode == 0, before.stderr
    lines = before.stdout.splitlines()
    assert lines[0].startswith("edge-agent 0.") and f"at http://127.0.0.1:{d.http_port} (site test" in lines[0]
    assert "  ready: yes" in lines
    assert f"  broker: connected to {nats_server.url}, stream EDGE_FINDINGS" in lines
    assert any(line.startswith("    cxr-nodule ") and "on onnxruntime fp32" in line and "no finding yet" in line
               for line in lines), before.stdout

    sent, identifiers = identifiable_chest(tmp_path / "in")
    assert storescu(d.dicom_port, sent).returncode == 0
    [finding] = read_findings(nats_server.url, 1)
    jsonschema.Draft202012Validator(load_schema()).validate(finding)

    # Every stage, measured where the metrics measure it.
    stages = finding["timings"]["stage_seconds"]
    assert set(stages) == {"receive", "preprocess", "queue", "infer", "publish"}, stages
    assert all(isinstance(v, float) and v >= 0 for v in stages.values())
    assert stages["receive"] > 0 and stages["preprocess"] > 0 and stages["infer"] > 0
    assert "published_at" in finding["timings"]

    # The heat map (and the overlay, when stored) from the URL the finding gives, on the daemon's HTTP port.
    heatmap = finding["heatmap"]
    assert heatmap["url"] == f"/heatmaps/{finding['finding_id']}.png"
    code, body = d.http_bytes(heatmap["url"])
    assert code == 200 and body.startswith(PNG_SIGNATURE)
    assert body == (d.tmp / "state" / heatmap["image"]).read_bytes()
    if heatmap.get("overlay_url") is not None:
        # The overlay is drawn once the finding is queued: it may take a moment to appear.
        deadline = time.monotonic() + 20
        while (code := d.http_bytes(heatmap["overlay_url"])[0]) == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, body = d.http_bytes(heatmap["overlay_url"])
        assert code == 200 and body.startswith(PNG_SIGNATURE)
    for bad in ("/heatmaps/../journal.sqlite3", f"/heatmaps/{'0' * 64}.png", "/heatmaps/%2e%2e/edge-agent.lock"):
        assert d.http_bytes(bad)[0] == 404

    after = status_cli("--url", f"127.0.0.1:{d.http_port}", "--json")
    assert after.returncode == 0, after.stderr
    doc = json.loads(after.stdout)
    assert doc["ready"] is True and doc["reasons"] == [] and doc["uptime_seconds"] > 0
    model = doc["models"]["cxr-nodule"]
    assert (model["backend"], model["precision"], model["loaded"]) == ("onnxruntime", "fp32", True)
    assert model["version"] == finding["model"]["version"]
    assert model["last_finding_at"] is not None and isinstance(model["drift"], dict)
    assert doc["outbox"] == {"pending": 0, "rejected": 0, "oldest_pending_at": None,
                             "oldest_pending_age_seconds": None}
    assert doc["broker"] == {"connected": True, "url": nats_server.url, "stream": "EDGE_FINDINGS"}
    assert doc["spool"]["free_bytes"] > 0 and doc["queues"]["pending_instances"] == 0
    assert doc["series"]["open"] == 0 and sum(doc["series"]["by_state"].values()) == 1
    assert not any(identifier in after.stdout for identifier in identifiers)

    # A daemon that does not answer (its process stopped): a clear error and exit 1, not a hang.
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        wedged = status_cli("--config", config, "--timeout", "1")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert wedged.returncode == 1 and wedged.stdout == ""
    assert f"no answer from http://127.0.0.1:{d.http_port}/status within 1 s" in wedged.stderr

    assert d.terminate() == 0
    records = [json.loads(line) for line in d.log().splitlines()]  # every line is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    about = [r for r in records if r.get("finding_id") == finding["finding_id"]]
    assert any(r["logger"] == "edge_agent.pipeline" and isinstance(r.get("series_id"), int) for r in about), about
    text = d.log()
    assert [i for i in identifiers if i in text] == []


def test_status_of_a_daemon_that_is_not_there_or_not_ready(daemon: Any, tmp_path: Path) -> None:
    nobody = free_port()
    gone = status_cli("--url", f"http://127.0.0.1:{nobody}")
    assert gone.returncode == 1
    assert gone.stderr.strip() == (f"edge-agent status: no answer from http://127.0.0.1:{nobody}/status (connection "
                                   "refused): is edge-agent running? (systemctl status edge-agent)")
    # No TensorRT on this machine: the daemon stays up, not ready, and says why.
    d = daemon(**{"models.cxr-nodule.backend": "tensorrt"}).start()
    result = status_cli("--config", str(d.config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  ready: NO" in lines
    assert any(line.startswith("    - engine cxr-nodule") for line in lines), result.stdout
    assert any(line.startswith("    cxr-nodule on tensorrt fp32: NOT LOADED: engine cxr-nodule") for line in lines)
    assert any(line.startswith("  broker: NOT connected to") for line in lines)
    doc = json.loads(status_cli("--config", str(d.config_path), "--json").stdout)
    assert doc["ready"] is False and doc["models"]["cxr-nodule"]["loaded"] is False
    assert doc["models"]["ct-demo"]["loaded"] is True
    missing = status_cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 3
