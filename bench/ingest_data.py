"""The workloads of bench/ingest.py, made from real DICOM files shipped in the pydicom-data wheel.

- CT: 693_UNCR.dcm, a real 512x512 16-bit CT slice (0.5 MB), copied into one series of N slices per workload.
- DX: RG1_UNCR.dcm, a real 1955x1841 chest CR, resampled (nearest neighbour) to 2800x2800 16-bit and relabelled
  as a DX (Digital X-Ray For Presentation): 15.7 MB each, every one its own study.
- CR: RG1_UNCR.dcm as it is, for the Success-to-finding latency.

Every workload gets fresh UIDs, so no receiver ever sees an instance twice (Orthanc would skip a duplicate and
edge-agent counts it as one). Copies are written from a template by replacing fixed-width placeholders in the
header bytes: 500 slices take well under a second, outside the timed window.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

DATA_STORE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data"
CT_SOURCE = DATA_STORE / "693_UNCR.dcm"
CR_SOURCE = DATA_STORE / "RG1_UNCR.dcm"
DX_SIDE_PIXELS = 2800

# pydicom's UID root, then fixed-width numbers: every UID has the same length, so the header's lengths hold.
_UID_ROOT = "1.2.826.0.1.3680043.8.498"
_RUN = os.getpid() * 1000 + int.from_bytes(os.urandom(2), "big") % 1000
_counter = itertools.count(1)
_PLACEHOLDERS = {"study": 1, "series": 2, "instance": 3}


def _uid(kind: int, number: int, run: int = _RUN) -> str:
    # A leading 1 keeps every component free of leading zeros (PS3.5 9.1) at a fixed width.
    return f"{_UID_ROOT}.1{run:011d}.{kind}.1{number:08d}"


def _placeholder(name: str) -> bytes:
    return _uid(_PLACEHOLDERS[name], 0, run=0).encode()


INSTANCE_NUMBER_PLACEHOLDER = b"999999"  # IS, 6 characters
Z_PLACEHOLDER = b"+99999.25"  # DS, 9 characters; padded to 10 by the encoder with a space


@dataclass(frozen=True)
class Template:
    """A Part 10 file split at its Pixel Data: the header, with placeholders, and the pixel bytes after it."""

    header: bytes
    tail: bytes
    sop_class_uid: str

    @property
    def file_bytes(self) -> int:
        return len(self.header) + len(self.tail)

    def instance(self, study: str, series: str, sop: str, number: int, z_mm: float) -> bytes:
        head = (
            self.header.replace(_placeholder("study"), study.encode())
            .replace(_placeholder("series"), series.encode())
            .replace(_placeholder("instance"), sop.encode())
            .replace(INSTANCE_NUMBER_PLACEHOLDER, f"{number:06d}".encode())
            .replace(Z_PLACEHOLDER, f"{z_mm:+09.2f}".encode())
        )
        return head + self.tail


def _template(ds: Dataset) -> Template:
    ds.StudyInstanceUID = _placeholder("study").decode()
    ds.SeriesInstanceUID = _placeholder("series").decode()
    ds.SOPInstanceUID = _placeholder("instance").decode()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = INSTANCE_NUMBER_PLACEHOLDER.decode()
    x, y = [*ds.get("ImagePositionPatient", []), 0.0, 0.0][:2]
    ds.ImagePositionPatient = [f"{float(x):.2f}", f"{float(y):.2f}", Z_PLACEHOLDER.decode()]
    ds.SliceLocation = Z_PLACEHOLDER.decode()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    pixel_tag = b"\xe0\x7f\x10\x00"
    cut = raw.rindex(pixel_tag)  # the top-level Pixel Data is the last element of these files
    header, tail = raw[:cut], raw[cut:]
    for name, expected in (("study", 1), ("series", 1), ("instance", 2)):
        if header.count(_placeholder(name)) != expected:
            raise RuntimeError(f"template: {name} UID placeholder found {header.count(_placeholder(name))} times")
    for placeholder, expected in ((INSTANCE_NUMBER_PLACEHOLDER, 1), (Z_PLACEHOLDER, 2)):
        if header.count(placeholder) != expected:
            raise RuntimeError(f"template: placeholder {placeholder!r} found {header.count(placeholder)} times")
    return Template(header, tail, str(ds.SOPClassUID))


def ct_template() -> Template:
    return _template(pydicom.dcmread(CT_SOURCE))


def dx_template() -> Template:
    """RG1's pixels resampled to 2800x2800 and labelled as a DX For Presentation (body part CHEST, as RG1)."""
    ds = pydicom.dcmread(CR_SOURCE)
    pixels = ds.pixel_array
    rows = np.arange(DX_SIDE_PIXELS) * pixels.shape[0] // DX_SIDE_PIXELS
    cols = np.arange(DX_SIDE_PIXELS) * pixels.shape[1] // DX_SIDE_PIXELS
    big = np.ascontiguousarray(pixels[np.ix_(rows, cols)].astype(np.uint16))
    ds.Rows, ds.Columns = DX_SIDE_PIXELS, DX_SIDE_PIXELS
    ds.PixelData = big.tobytes()
    ds.Modality = "DX"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.PresentationIntentType = "FOR PRESENTATION"
    return _template(ds)


def cr_template() -> Template:
    return _template(pydicom.dcmread(CR_SOURCE))


def new_uid(kind: str) -> str:
    return _uid(_PLACEHOLDERS[kind] + 3, next(_counter))


@dataclass(frozen=True)
class Workload:
    """Files on disk, ready to send: ``groups`` are the file lists of the concurrent associations."""

    name: str
    groups: list[list[Path]]
    series_count: int
    total_bytes: int

    @property
    def instances(self) -> int:
        return sum(len(g) for g in self.groups)


def write_series(template: Template, folder: Path, count: int, associations: int, name: str) -> Workload:
    """One study with one series of ``count`` slices, split over ``associations`` in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = new_uid("study"), new_uid("series")
    paths = []
    for i in range(count):
        path = folder / f"ct{i + 1:05d}.dcm"
        path.write_bytes(template.instance(study, series, new_uid("instance"), i + 1, i * 1.25))
        paths.append(path)
    per = -(-count // associations)
    groups = [paths[k : k + per] for k in range(0, count, per)]
    return Workload(name, groups, 1, count * template.file_bytes)


def write_studies(template: Template, folder: Path, count: int, name: str) -> Workload:
    """``count`` single-image studies (radiographs), sent over one association."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"dx{i + 1:04d}.dcm"
        path.write_bytes(template.instance(new_uid("study"), new_uid("series"), new_uid("instance"), 1, 0.0))
        paths.append(path)
    return Workload(name, [paths], count, count * template.file_bytes)
