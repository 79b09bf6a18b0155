"""Real DICOM test files (shipped in the pydicom, pydicom-data and pynetdicom wheels) and test helpers.

Paths are built directly: pydicom's ``get_testdata_file`` goes to the internet for a name it does not
know, and hangs. Also: a receiver harness (a real Receiver on a free loopback port, with a real
Journal and Spool) and a real tmpfs mount for disk-full tests.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pynetdicom
from pydicom.uid import generate_uid

from tests.netutil import free_port

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
DATA_STORE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data"
PYNETDICOM_FILES = Path(str(pynetdicom.__file__)).parent / "tests" / "dicom_files"

# pydicom's own test files
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"  # CT, Explicit VR LE, 128x128
CT_J2KI = PYDICOM_FILES / "693_J2KI.dcm"  # CT, JPEG 2000 (lossy)
MR_SMALL = PYDICOM_FILES / "MR_small.dcm"  # MR, Explicit VR LE, 64x64
MR_SMALL_RLE = PYDICOM_FILES / "MR_small_RLE.dcm"
MR_SMALL_BIG_ENDIAN = PYDICOM_FILES / "MR_small_bigendian.dcm"
MR_SMALL_IMPLICIT = PYDICOM_FILES / "MR_small_implicit.dcm"
MR_SMALL_J2K_LOSSLESS = PYDICOM_FILES / "MR_small_jp2klossless.dcm"
MR_SMALL_JPEG_LS_LOSSLESS = PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm"
SC_JPEG_BASELINE = PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm"  # Secondary Capture, JPEG Baseline
SC_JPEG_EXTENDED = PYDICOM_FILES / "JPGExtended.dcm"  # Secondary Capture, JPEG Extended
SC_JPEG_LS_NEAR_LOSSLESS = PYDICOM_FILES / "JPEGLSNearLossless_16.dcm"
SC_DEFLATED = PYDICOM_FILES / "image_dfl.dcm"  # Secondary Capture, Deflated Explicit VR LE
RT_DOSE = PYDICOM_FILES / "rtdose.dcm"  # RT Dose Storage: a SOP class the receiver does not accept
# pydicom-data's files
RG1_UNCR = DATA_STORE / "RG1_UNCR.dcm"  # CR chest 1955x1841, Explicit VR LE, 7.2 MB
RG3_UNCR = DATA_STORE / "RG3_UNCR.dcm"  # CR 1760x1760
RG1_J2KR = DATA_STORE / "RG1_J2KR.dcm"  # CR, JPEG 2000 lossless
RG3_J2KI = DATA_STORE / "RG3_J2KI.dcm"  # CR, JPEG 2000 (lossy)
CT_693_UNCR = DATA_STORE / "693_UNCR.dcm"  # CT 512x512
MR2_UNCR = DATA_STORE / "MR2_UNCR.dcm"
SC_JPEG_LOSSLESS_SV1 = DATA_STORE / "JPEG-LL.dcm"  # Secondary Capture, JPEG Lossless SV1
EMRI_SMALL = DATA_STORE / "emri_small.dcm"  # Enhanced MR, multi-frame


def make_ct_series(folder: Path, count: int, *, source: Path = CT_SMALL, images_in_acquisition: bool = False,
                   series_description: str | None = None) -> list[Path]:
    """Write ``count`` copies of a real CT file as one new series (fresh UIDs), in slice order.

    Each slice gets its own SOP Instance UID, Instance Number and z position; the pixel data is the
    source's. With ``images_in_acquisition`` the slices say how many the series has.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source)
    study_uid, series_uid = generate_uid(), generate_uid()
    position = [float(v) for v in template.get("ImagePositionPatient", [0.0, 0.0, 0.0])]
    thickness = float(template.get("SliceThickness", 1.0) or 1.0)
    out = []
    for i in range(count):
        ds = template.copy()
        uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [position[0], position[1], position[2] + i * thickness]
        ds.SliceLocation = position[2] + i * thickness
        if images_in_acquisition:
            ds.ImagesInAcquisition = count
        if series_description is not None:
            ds.SeriesDescription = series_description
        path = folder / f"slice{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble, 'DICM' and the File Meta group."""
    with open(path, "rb") as f:
        head = f.read(132)
        if head[128:132] != b"DICM":
            raise ValueError(f"{path} is not a Part 10 file")
        pos = 132
        while True:
            tag = f.read(4)
            if len(tag) < 4 or struct.unpack("<H", tag[:2])[0] != 0x0002:
                return pos
            vr = f.read(2)
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                f.read(2)
                length = struct.unpack("<I", f.read(4))[0]
                pos += 12 + length
            else:
                length = struct.unpack("<H", f.read(2))[0]
                pos += 8 + length
            f.seek(pos)


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file as encoded, without preamble and File Meta."""
    return path.read_bytes()[dataset_offset(path):]


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: TCP_NODELAY on, as the daemon's own sockets have it."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files: list[Path], *, calling_aet: str = "MODALITY", called_aet: str = "EDGE_AGENT",
             extra: tuple[str, ...] = (), timeout_seconds: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's storescu (by full path: the venv has pynetdicom's app of the same name)."""
    cmd = ["/usr/bin/storescu", "-aet", calling_aet, "-aec", called_aet, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_seconds, check=False)


@dataclass
class StoredLog:
    """An on_stored callback that remembers its calls (they come from association threads)."""

    calls: list[tuple[Any, Any]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, meta: Any, recorded: Any) -> None:
        with self._cond:
            self.calls.append((meta, recorded))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_seconds: float = 30.0) -> list[tuple[Any, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, timeout_seconds):
                raise AssertionError(f"on_stored was called {len(self.calls)} times, expected {count}")
            return list(self.calls)


@dataclass
class ReceiverHarness:
    receiver: Any
    spool: Any
    journal: Any
    metrics: Any
    stored: StoredLog

    @property
    def port(self) -> int:
        return int(self.receiver.port)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return float(value) if value is not None else 0.0

    def instances(self, outcome: str) -> float:
        return self.sample("edge_agent_instances_total", outcome=outcome)

    def associations(self, outcome: str) -> float:
        return self.sample("edge_agent_associations_total", outcome=outcome)

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.spool.root / "instances").rglob("*") if p.is_file())


@contextlib.contextmanager
def running_receiver(tmp: Path, *, spool_root: Path | None = None, journal_path: Path | None = None,
                     min_free_bytes: int = 0, admission: Any = None, on_released: Any = None,
                     **dicom: Any) -> Iterator[ReceiverHarness]:
    """A started Receiver on a free loopback port with its own Journal, Spool and Metrics (ReceiverProcesses
    when ``receiver_processes`` is above 1).

    ``admission`` and ``on_released`` are the receiver's hooks.
    """
    from edge_agent.config import DicomConfig
    from edge_agent.dicom.receivers import ReceiverProcesses
    from edge_agent.dicom.scp import Receiver
    from edge_agent.dicom.spool import Spool
    from edge_agent.journal import Journal
    from edge_agent.metrics import Metrics

    dicom.setdefault("host", "127.0.0.1")
    dicom.setdefault("port", free_port())
    journal = Journal(journal_path or tmp / "state" / "journal.db")
    spool = Spool(spool_root or tmp / "spool", min_free_bytes)
    metrics = Metrics()
    stored = StoredLog()
    config = DicomConfig(**dicom)
    kind = ReceiverProcesses if config.receiver_processes > 1 else Receiver
    receiver = kind(config, spool, journal, metrics, stored, admission=admission, on_released=on_released)
    receiver.start()
    try:
        yield ReceiverHarness(receiver, spool, journal, metrics, stored)
    finally:
        receiver.stop(5.0)
        journal.close()


@contextlib.contextmanager
def tmpfs(size: str, *, nr_inodes: int | None = None) -> Iterator[Path]:
    """A real, small tmpfs mount (needs root); the test is skipped with the reason if it cannot mount."""
    import pytest

    where = Path(tempfile.mkdtemp(prefix="edge-tmpfs-"))
    opts = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes is not None else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs for a real disk-full test (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(directory: Path, leave_bytes: int = 0) -> None:
    """Fill a file system until at most ``leave_bytes`` are free (ENOSPC ends the filling)."""
    st = os.statvfs(directory)
    want = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(directory / "filler", "wb") as f:
        block = b"\0" * 65536
        try:
            while want > 0:
                n = f.write(block[: min(len(block), want)])
                want -= n
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass


def fill_inodes(directory: Path) -> int:
    """Create empty files until the file system has no inode left; returns how many were made."""
    made = 0
    d = directory / "inodes"
    try:
        d.mkdir()
        while True:
            (d / str(made)).touch()
            made += 1
    except OSError:
        return made
