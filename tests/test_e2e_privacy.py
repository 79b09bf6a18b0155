"""Privacy on the bus, end to end (issue 10): a real CT series through the daemon, the stream's raw bytes read back.

With ``privacy.pseudonymise`` no identifier of the files sent (any UID, accession number, patient name or ID,
institution, AE title ...) is in any byte the stream holds (subject, headers, payload), and a series' two
revisions carry the same pseudonymised series UID. Without it, the same sweep finds the identifiers: the
positive control that shows the sweep would see them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_agent.bus.finding import load_schema, message_id
from edge_agent.bus.pseudonym import finding_message_id
from edge_agent.privacy import KEY_ENV, Pseudonymiser
from tests.daemon import Daemon, read_findings, storescu
from tests.dicomfiles import CT_SMALL

pytestmark = pytest.mark.e2e

KEY = "6f1c0b9e4d2a7358e1f0c9b8a7d6e5f4c3b2a1908f7e6d5c4b3a291807f6e5d4"
CALLING_AET = "CT_ROOM_7_SCU"
CALLED_AET = "TRIAGE_BOX_7"
# Identifying values put into the files, beside the UIDs and whatever else CT_small.dcm already carries.
PATIENT = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-4471-2209",
    "OtherPatientIDs": "NHS-943-476-5919",
    "PatientBirthDate": "19610423",
    "AccessionNumber": "ACC7781234",
    "InstitutionName": "St Example General Hospital",
    "InstitutionAddress": "1 Example Road, Exampleton",
    "ReferringPhysicianName": "Referrer^Robert",
    "StationName": "CTROOM7",
    "StudyID": "STUDY-88231",
}
# Text VRs that can name a person, a place or a device; UIDs of the standard itself (SOP classes, transfer
# syntaxes) identify nothing.
TEXT_VRS = {"AE", "LO", "LT", "PN", "SH", "ST", "UT", "DA"}
STANDARD_UID_ROOT = "1.2.840.10008."


def make_series(folder: Path, count: int) -> list[Path]:
    """``count`` slices of one CT series with fixed UIDs (the test is the same on every run) and patient data."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(CT_SMALL)
    study = generate_uid(entropy_srcs=["test_e2e_privacy", "study"])
    series = generate_uid(entropy_srcs=["test_e2e_privacy", "series"])
    out = []
    for i in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["test_e2e_privacy", "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        path = folder / f"slice{i + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def identifiers(paths: list[Path]) -> set[str]:
    """Every identifying value in the files: all UIDs but the standard's, and every text value long enough to
    be told apart from the digits of a timing (purely numeric ones only from 10 digits on)."""
    found: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            for value in values:
                text = str(value).strip() if value is not None else ""
                uid = elem.VR == "UI" and text and not text.startswith(STANDARD_UID_ROOT)
                words = elem.VR in TEXT_VRS and len(text) >= 6 and (not text.isdigit() or len(text) >= 10)
                if uid or words:
                    found.add(text)
    found.update({CALLING_AET, CALLED_AET})
    return found


async def _raw_messages(url: str, stream: str) -> list[dict[str, Any]]:
    """Every message of the stream as JetStream stores it: subject, header block and payload, undecoded."""
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
        out = []
        for seq in range(info["state"]["first_seq"], info["state"]["last_seq"] + 1):
            reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(), timeout=5)
            message = json.loads(reply.data)["message"]
            out.append({
                "subject": message["subject"].encode(),
                "headers": base64.b64decode(message.get("hdrs", "")),
                "data": base64.b64decode(message.get("data", "")),
            })
        return out
    finally:
        await nc.close()


def raw_messages(url: str, stream: str = "EDGE_FINDINGS") -> list[dict[str, Any]]:
    return asyncio.run(_raw_messages(url, stream))


def expected_uid(uid: str) -> str:
    digest = hmac.new(KEY.encode(), b"uid\x1f" + uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def send_two_revisions(d: Daemon, url: str, files: list[Path]) -> tuple[list[dict[str, Any]], list[float]]:
    """Slice 1, its finding, then slice 2 of the same series: new data after a finding opens revision 1. With the
    findings, when the journal opened each revision (what finding ids are made from, with the series UID)."""
    opened = []
    for n, path in enumerate(files, start=1):
        result = storescu(d.dicom_port, path, calling_aet=CALLING_AET, called_aet=CALLED_AET)
        assert result.returncode == 0, result.stderr
        found = read_findings(url, n)
        assert len(found) == n, d.log()
        with contextlib.closing(sqlite3.connect(Path(d.config["state_dir"]) / "journal.sqlite3")) as db:
            opened.append(float(db.execute("SELECT first_received FROM series").fetchone()[0]))
    return found, opened


def test_pseudonymised_findings_carry_no_identifier_and_revisions_still_join(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "in", 2)
    secret = identifiers(files)
    ds = pydicom.dcmread(files[0])
    assert {ds.SeriesInstanceUID, ds.StudyInstanceUID, *PATIENT.values()} <= secret | {"19610423"}
    d = daemon(**{"privacy.pseudonymise": True, "dicom.ae_title": CALLED_AET}).start(env={KEY_ENV: KEY})

    (first, second), opened = send_two_revisions(d, nats_server.url, files)
    messages = raw_messages(nats_server.url)
    assert len(messages) == 2
    for message in messages:
        published = message["subject"] + b"\n" + message["headers"] + b"\n" + message["data"]
        leaked = sorted(s for s in secret if s.encode() in published)
        assert not leaked, leaked
        assert PATIENT["PatientBirthDate"].encode() not in published

    schema = load_schema()
    p = Pseudonymiser(KEY.encode())
    for revision, finding in enumerate((first, second)):
        jsonschema.validate(finding, schema)
        assert finding["pseudonymised"] is True and finding["revision"] == revision
        # A subscriber holding the key can compute the pseudonym of a series it knows; nobody else can.
        assert finding["series_instance_uid"] == expected_uid(ds.SeriesInstanceUID)
        assert finding["study_instance_uid"] == expected_uid(ds.StudyInstanceUID)
        assert finding["accession_number"] == p.accession(PATIENT["AccessionNumber"])
        assert finding["calling_ae_title"] == p.ae_title(CALLING_AET)
        assert finding["called_ae_title"] == p.ae_title(CALLED_AET)
        model, version = finding["model"]["name"], finding["model"]["version"]
        assert finding["finding_id"] == finding_message_id(ds.SeriesInstanceUID, model, version, revision,
                                                           opened[revision], p)
        assert finding["finding_id"] != message_id(ds.SeriesInstanceUID, model, version, revision, opened[revision])
    assert expected_uid(pydicom.dcmread(files[0]).SOPInstanceUID) in first["sop_instance_uids"]
    assert expected_uid(pydicom.dcmread(files[1]).SOPInstanceUID) in second["sop_instance_uids"]
    assert first["finding_id"] != second["finding_id"]
    # The header the stream de-duplicates by is the finding id, so it is keyed too.
    for message, finding in zip(messages, (first, second), strict=True):
        assert f"Nats-Msg-Id: {finding['finding_id']}".encode() in message["headers"]

    assert d.terminate() == 0
    log = d.log()
    assert KEY not in log
    assert "findings pseudonymised (privacy.pseudonymise)" in log
    assert not sorted(s for s in secret - {CALLED_AET} if s in log)


def test_without_pseudonymise_the_same_sweep_finds_the_identifiers(
    daemon: Any, nats_server: Any, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "in", 1)
    ds = pydicom.dcmread(files[0])
    d = daemon(**{"dicom.ae_title": CALLED_AET}).start(env={KEY_ENV: KEY})  # a key alone changes nothing
    result = storescu(d.dicom_port, files[0], calling_aet=CALLING_AET, called_aet=CALLED_AET)
    assert result.returncode == 0, result.stderr
    [finding] = read_findings(nats_server.url, 1)
    [message] = raw_messages(nats_server.url)
    for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, PATIENT["AccessionNumber"],
                  CALLING_AET, CALLED_AET):
        assert value.encode() in message["data"], value
    assert finding["pseudonymised"] is False
    with contextlib.closing(sqlite3.connect(Path(d.config["state_dir"]) / "journal.sqlite3")) as db:
        opened = float(db.execute("SELECT first_received FROM series").fetchone()[0])
    assert finding["finding_id"] == message_id(ds.SeriesInstanceUID, finding["model"]["name"],
                                               finding["model"]["version"], 0, opened)
    assert finding["series_instance_uid"] == ds.SeriesInstanceUID
    assert d.terminate() == 0
