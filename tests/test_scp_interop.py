"""Interoperability with real senders (issue 9, hard limits).

dcmtk's storescu proposing every transfer syntax it can, several presentation contexts in one association,
dcmtk and pynetdicom associations at once, whole studies as a PACS forwards them (SR, RT structure set, RT
plan, XA, multi-frame US, ECG), and Orthanc sending from its REST API. Each stored instance is checked
against what was sent: its dataset byte for byte where the sender sends a file's dataset as it is (pynetdicom),
element for element where the sender re-encodes it (dcmtk, and Orthanc, which sends with dcmtk: both drop group
lengths and trailing padding), and with dcmtk's ``dcmftest``.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config

from tests.dicomfiles import (
    CT_J2KI,
    CT_SMALL,
    MR_SMALL_BIG_ENDIAN,
    MR_SMALL_J2K_LOSSLESS,
    MR_SMALL_JPEG_LS_LOSSLESS,
    MR_SMALL_RLE,
    PYDICOM_FILES,
    SC_DEFLATED,
    SC_JPEG_BASELINE,
    SC_JPEG_EXTENDED,
    SC_JPEG_LOSSLESS_SV1,
    SC_JPEG_LS_NEAR_LOSSLESS,
    ReceiverHarness,
    dataset_bytes,
    dcmtk_env,
    make_ct_series,
    running_receiver,
    storescu,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="dcmtk is not installed (apt-get install dcmtk)"),
]

XA_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


@pytest.fixture(autouse=True)
def _chunked_send() -> Iterator[None]:
    # pynetdicom sends a file's dataset as it is on disk, so what arrives can be compared byte for byte.
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def _stored(h: ReceiverHarness) -> dict[str, Path]:
    """SOP Instance UID -> spool file, for every instance the receiver handed on."""
    return {meta.sop_instance_uid: Path(h.spool.path(rec.spool_name)) for meta, rec in h.stored.calls}


def _elements(ds: Dataset) -> list[tuple[Any, Any]]:
    # dcmtk drops group lengths and trailing padding (FFFC,FFFC) when it sends; the rest must arrive unchanged.
    return [(e.tag, e.value) for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC]


def _check_file(path: Path) -> Dataset:
    """A Part 10 file by dcmtk's test, and a dataset pydicom reads whole."""
    res = subprocess.run(["/usr/bin/dcmftest", str(path)], capture_output=True, text=True, timeout=10, check=False)
    assert res.returncode == 0 and res.stdout.startswith("yes:"), res.stdout + res.stderr
    return pydicom.dcmread(path)


def _same_elements(stored: Path, source: Path) -> None:
    got, sent = _check_file(stored), pydicom.dcmread(source)
    assert _elements(got) == _elements(sent)
    assert got.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID


def _same_dataset(stored: Path, source: Path) -> None:
    _check_file(stored)
    assert dataset_bytes(stored) == dataset_bytes(source), f"{source.name}: the stored dataset is not the one sent"


def _with_meta(ds: Dataset, path: Path, syntax: UID = ImplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_ls_near_lossless(tmp: Path) -> Path:
    # pydicom's JPEG-LS near-lossless file lacks the Study and Series UIDs every stored instance needs.
    ds = pydicom.dcmread(SC_JPEG_LS_NEAR_LOSSLESS)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    out = tmp / "jls-near-lossless.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


# -- dcmtk storescu ------------------------------------------------------------------------------------

# (storescu option, file, the transfer syntax the instance arrives in). Without -R storescu proposes the
# storage SOP classes it knows with the option's syntaxes: 128 presentation contexts, the most one association
# may have. It sends a compressed file only in its own syntax, and transcodes between uncompressed ones (and
# to Deflated).
STORESCU_SYNTAXES = [
    ("-x=", CT_SMALL, ExplicitVRLittleEndian),
    ("-xe", CT_SMALL, ExplicitVRLittleEndian),
    ("-xb", MR_SMALL_BIG_ENDIAN, ExplicitVRBigEndian),
    ("-xi", CT_SMALL, ImplicitVRLittleEndian),
    ("-xd", CT_SMALL, DeflatedExplicitVRLittleEndian),
    ("-xd", SC_DEFLATED, DeflatedExplicitVRLittleEndian),
    ("-xs", SC_JPEG_LOSSLESS_SV1, UID("1.2.840.10008.1.2.4.70")),
    ("-xy", SC_JPEG_BASELINE, UID("1.2.840.10008.1.2.4.50")),
    ("-xx", SC_JPEG_EXTENDED, UID("1.2.840.10008.1.2.4.51")),
    ("-xv", MR_SMALL_J2K_LOSSLESS, UID("1.2.840.10008.1.2.4.90")),
    ("-xw", CT_J2KI, UID("1.2.840.10008.1.2.4.91")),
    ("-xt", MR_SMALL_JPEG_LS_LOSSLESS, UID("1.2.840.10008.1.2.4.80")),
    ("-xu", None, UID("1.2.840.10008.1.2.4.81")),  # made by _jpeg_ls_near_lossless
    ("-xr", MR_SMALL_RLE, UID("1.2.840.10008.1.2.5")),
]


@pytest.mark.parametrize(("option", "source", "syntax"), STORESCU_SYNTAXES,
                         ids=[f"{o}-{s.name if s else 'jls-near-lossless'}" for o, s, _ in STORESCU_SYNTAXES])
def test_storescu_proposing_each_transfer_syntax(tmp_path: Path, option: str, source: Path | None,
                                                 syntax: UID) -> None:
    source = source or _jpeg_ls_near_lossless(tmp_path)
    with running_receiver(tmp_path) as h:
        res = storescu(h.port, [source], extra=(option,), timeout_seconds=30)
        assert res.returncode == 0, res.stderr
        ((meta, _),) = h.stored.wait_for(1)
        assert meta.transfer_syntax_uid == syntax
        (stored,) = _stored(h).values()
        _same_elements(stored, source)
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax


# A storescu profile (its --config-file format) with one presentation context per SOP class and syntax, so
# that each file goes in its own syntax, all in one association.
_PROFILE = """
[[TransferSyntaxes]]
{syntaxes}
[[PresentationContexts]]
[Contexts]
{contexts}
[[Profiles]]
[Interop]
PresentationContexts = Contexts
"""


def test_one_association_with_a_context_per_sop_class_and_syntax(tmp_path: Path) -> None:
    # pydicom's four MR files are one instance in four syntaxes: each is sent as an instance of its own.
    files = [CT_SMALL, CT_J2KI, SC_DEFLATED, SC_JPEG_BASELINE, SC_JPEG_EXTENDED, SC_JPEG_LOSSLESS_SV1,
             *(_renamed(f, tmp_path) for f in (MR_SMALL_BIG_ENDIAN, MR_SMALL_RLE, MR_SMALL_J2K_LOSSLESS,
                                                MR_SMALL_JPEG_LS_LOSSLESS))]
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                    for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)})
    profile = tmp_path / "storescu.cfg"
    profile.write_text(_PROFILE.format(
        syntaxes="\n".join(f"[TS{i}]\nTransferSyntax1 = {ts}" for i, (_, ts) in enumerate(pairs)),
        contexts="\n".join(f"PresentationContext{i + 1} = {sop}\\TS{i}" for i, (sop, _) in enumerate(pairs))))
    with running_receiver(tmp_path) as h:
        res = storescu(h.port, files, extra=("-xf", str(profile), "Interop"), timeout_seconds=30)
        assert res.returncode == 0, res.stderr
        h.stored.wait_for(len(files))
        stored = _stored(h)
        assert len(pairs) == len(files) and h.associations("accepted") == 1
        for source in files:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            path = stored[ds.SOPInstanceUID]
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            _same_elements(path, source)


def _renamed(source: Path, tmp: Path) -> Path:
    """A copy of ``source`` as a new instance (a new SOP Instance UID), in the same transfer syntax."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = tmp / f"renamed-{source.name}"
    ds.save_as(out, enforce_file_format=True)
    return out


# -- several associations at once -------------------------------------------------------------------------


def test_four_storescu_and_four_pynetdicom_associations_at_once(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 48)
    parts = [files[i::8] for i in range(8)]
    barrier = threading.Barrier(4)
    peak: list[int] = []
    statuses: list[int] = []
    errors: list[BaseException] = []

    def pynetdicom_scu(part: list[Path]) -> None:
        try:
            ae = AE(ae_title=f"PYSCU{len(part)}")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(pydicom.dcmread(part[0], stop_before_pixels=True).SOPClassUID,
                                     ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
            assert assoc.is_established
            try:
                # All four are associated before any sends: they overlap, whatever the scheduler does.
                if barrier.wait(timeout=20) == 0:
                    peak.append(h.receiver.active_associations())
                statuses.extend(int(assoc.send_c_store(p).Status) for p in part)
            finally:
                assoc.release()
        except BaseException as exc:
            errors.append(exc)

    with running_receiver(tmp_path) as h:
        dcmtk = [subprocess.Popen(["/usr/bin/storescu", "-aet", "DCMTK", "-aec", "EDGE_AGENT", "127.0.0.1",
                                   str(h.port), *map(str, part)], env=dcmtk_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for part in parts[:4]]
        threads = [threading.Thread(target=pynetdicom_scu, args=(part,)) for part in parts[4:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        for p in dcmtk:
            _, err = p.communicate(timeout=40)
            assert p.returncode == 0, err
        assert errors == [] and statuses == [0] * 24
        h.stored.wait_for(48)
        assert peak and peak[0] >= 4
        assert h.associations("accepted") == 8
        stored = _stored(h)
        for i, part in enumerate(parts):
            for source in part:
                path = stored[pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID]
                (_same_elements if i < 4 else _same_dataset)(path, source)


# -- whole studies, as a PACS forwards them ----------------------------------------------------------------


def _study(tmp: Path) -> list[Path]:
    """A structured report, an RT structure set, an RT plan, an XA, a multi-frame US and an ECG waveform."""
    rtstruct = pydicom.dcmread(PYDICOM_FILES / "rtstruct.dcm", force=True)  # no File Meta in pydicom's copy
    xa = pydicom.dcmread(CT_SMALL)
    xa.SOPClassUID = xa.file_meta.MediaStorageSOPClassUID = UID(XA_IMAGE_STORAGE)
    xa.SOPInstanceUID = xa.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    xa.Modality = "XA"
    xa.save_as(tmp / "xa.dcm", enforce_file_format=True)
    return [PYDICOM_FILES / "test-SR.dcm", _with_meta(rtstruct, tmp / "rtstruct.dcm"), PYDICOM_FILES / "rtplan.dcm",
            tmp / "xa.dcm", PYDICOM_FILES / "examples_ybr_color.dcm", PYDICOM_FILES / "waveform_ecg.dcm"]


def _check_study_member(path: Path) -> None:
    ds = _check_file(path)
    if ds.Modality == "US":
        assert ds.pixel_array.shape == (30, 240, 320, 3)  # 30 frames of JPEG Baseline, decoded
    elif ds.Modality == "ECG":
        assert ds.waveform_array(0).shape[1] == ds.WaveformSequence[0].NumberOfWaveformChannels


def test_a_whole_study_from_pynetdicom_is_accepted_and_stored_as_sent(tmp_path: Path) -> None:
    study = _study(tmp_path)
    with running_receiver(tmp_path) as h:
        ae = AE(ae_title="PACS")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study]
        for ds in headers:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        try:
            assert len(assoc.accepted_contexts) == len(study) and not assoc.rejected_contexts
            assert [int(assoc.send_c_store(p).Status) for p in study] == [0] * len(study)
        finally:
            assoc.release()
        h.stored.wait_for(len(study))
        stored = _stored(h)
        assert sorted(m.modality for m, _ in h.stored.calls) == ["ECG", "RTPLAN", "RTSTRUCT", "SR", "US", "XA"]
        for source, ds in zip(study, headers, strict=True):
            _same_dataset(stored[ds.SOPInstanceUID], source)
            _check_study_member(stored[ds.SOPInstanceUID])


def test_a_whole_study_from_storescu_is_accepted(tmp_path: Path) -> None:
    study = _study(tmp_path)
    with running_receiver(tmp_path) as h:
        # -xy: JPEG Baseline for the US, and the uncompressed syntaxes for the rest.
        res = storescu(h.port, study, calling_aet="PACS", extra=("-xy",), timeout_seconds=30)
        assert res.returncode == 0, res.stderr
        h.stored.wait_for(len(study))
        stored = _stored(h)
        for source in study:
            path = stored[pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID]
            _same_elements(path, source)
            _check_study_member(path)


# -- Orthanc -------------------------------------------------------------------------------------------


def _unclaimed_port() -> int:
    """A port free on every address now, below the kernel's ephemeral range (so free_port() and outgoing
    connections, which draw from that range, do not hand it to anyone else meanwhile)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


class _Orthanc:
    """A real Orthanc with its own ports and storage, that knows our receiver as the modality ``edge``."""

    def __init__(self, tmp: Path, receiver_port: int) -> None:
        assert ORTHANC is not None
        # Its ports come from below the kernel's ephemeral range (_unclaimed_port), where no connection is
        # given one on its own; one may still be taken before Orthanc binds it. That, and only that, is tried
        # again on new ports.
        for attempt in range(5):
            if self._start(tmp, receiver_port):
                return
            in_use = "already in use" in (tmp / "orthanc.log").read_text(errors="replace")
            if not in_use or attempt == 4:
                raise AssertionError(f"Orthanc did not start: see {tmp / 'orthanc.log'}")
            (tmp / "orthanc.log").rename(tmp / f"orthanc-{attempt + 1}.log")

    def _start(self, tmp: Path, receiver_port: int) -> bool:
        assert ORTHANC is not None
        self.http = _unclaimed_port()
        config = {
            "Name": "edge-agent-interop", "StorageDirectory": str(tmp / "orthanc"),
            "IndexDirectory": str(tmp / "orthanc"),
            "HttpPort": self.http, "DicomPort": _unclaimed_port(), "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "DicomScuTimeout": 20, "HttpTimeout": 20,
            "DicomModalities": {"edge": ["EDGE_AGENT", "127.0.0.1", receiver_port]},
        }
        (tmp / "orthanc.json").write_text(json.dumps(config))
        self.log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.call("GET", "/system")
                return True
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    return False
                time.sleep(0.05)

    def call(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)")
def test_orthanc_sends_to_us_from_its_rest_api(tmp_path: Path) -> None:
    sources = [CT_SMALL, MR_SMALL_RLE, SC_JPEG_BASELINE, SC_DEFLATED, PYDICOM_FILES / "test-SR.dcm",
               PYDICOM_FILES / "waveform_ecg.dcm"]
    with running_receiver(tmp_path) as h:
        orthanc = _Orthanc(tmp_path, h.port)
        try:
            ids = [orthanc.call("POST", "/instances", p.read_bytes())["ID"] for p in sources]
            job = orthanc.call("POST", "/modalities/edge/store",
                               json.dumps({"Resources": ids, "Synchronous": True}).encode())
        finally:
            orthanc.stop()
        assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(sources)
        h.stored.wait_for(len(sources))
        assert {m.calling_aet for m, _ in h.stored.calls} == {"ORTHANC"}
        stored = _stored(h)
        for source in sources:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            path = stored[ds.SOPInstanceUID]
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            _same_elements(path, source)
