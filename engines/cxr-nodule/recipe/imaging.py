"""Numpy-only image operations for the simulator: sampling, blurs, projection, detector and processing.

Everything here is deterministic given its inputs and a ``numpy.random.Generator``; nothing needs
scipy, so the smoke data set can be made in the daemon's own environment.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

# Linear attenuation of water at an effective energy of ~60 keV (a 110-125 kVp chest beam after
# filtration); mu(HU) = mu_water * (1 + HU / 1000), the usual first-order conversion.
MU_WATER_PER_MM = 0.0206


def hu_to_mu(hu: F32, bone_boost: float = 1.0) -> F32:
    """HU -> linear attenuation per mm; ``bone_boost`` > 1 mimics a lower kVp (bone photo-absorption)."""
    mu = MU_WATER_PER_MM * (1.0 + np.clip(hu, -1000.0, 3000.0) / 1000.0)
    if bone_boost != 1.0:
        bone = np.clip((hu - 200.0) / 800.0, 0.0, 1.0)
        mu = mu * (1.0 + (bone_boost - 1.0) * bone)
    return np.asarray(mu, dtype=np.float32)


def sample2d(image: F32, rows: npt.NDArray[np.floating], cols: npt.NDArray[np.floating]) -> F32:
    """Bilinear sample of ``image`` at fractional (rows, cols); zero outside the image."""
    h, w = image.shape
    # A one-pixel zero border turns "outside" into ordinary indices: no masks on the hot path.
    padded = np.zeros((h + 2, w + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = image
    flat = padded.ravel()
    r = np.clip(np.asarray(rows, dtype=np.float32) + 1.0, 0.0, h + 0.999)
    c = np.clip(np.asarray(cols, dtype=np.float32) + 1.0, 0.0, w + 0.999)
    r0 = r.astype(np.int64)
    c0 = c.astype(np.int64)
    fr = r - r0
    fc = c - c0
    i00 = r0 * (w + 2) + c0
    top = flat[i00] * (1.0 - fc) + flat[i00 + 1] * fc
    bottom = flat[i00 + w + 2] * (1.0 - fc) + flat[i00 + w + 3] * fc
    return np.asarray(top * (1.0 - fr) + bottom * fr, dtype=np.float32)


def rotate_axial(volume: npt.NDArray[np.generic], degrees: float, *, nearest: bool = False) -> npt.NDArray[np.generic]:
    """Rotate every axial slice of a [Z, Y, X] volume about its centre (patient rotation about the long axis)."""
    if degrees == 0.0:
        return volume
    _, ny, nx = volume.shape
    t = np.deg2rad(degrees)
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    src_y = cy + (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
    src_x = cx + (yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
    if nearest:
        ry = np.clip(np.rint(src_y).astype(np.int64), 0, ny - 1)
        rx = np.clip(np.rint(src_x).astype(np.int64), 0, nx - 1)
        inside = (src_y >= -0.5) & (src_y <= ny - 0.5) & (src_x >= -0.5) & (src_x <= nx - 0.5)
        out = volume[:, ry, rx]
        out[:, ~inside] = 0
        return out
    out = np.empty(volume.shape, dtype=np.float32)
    for z in range(volume.shape[0]):
        out[z] = sample2d(volume[z].astype(np.float32), src_y, src_x)
    return out


def _pad_reflect(image: F32, pad: int) -> F32:
    pad = int(min(pad, image.shape[0] - 1, image.shape[1] - 1))
    return np.pad(image, pad, mode="reflect") if pad > 0 else image


def gaussian_blur(image: F32, sigma_px: float) -> F32:
    """Gaussian blur through the FFT, with reflected borders so edges do not wrap around."""
    if sigma_px <= 0.05:
        return image.astype(np.float32, copy=True)
    pad = int(np.ceil(3.0 * sigma_px))
    padded = _pad_reflect(image.astype(np.float32), pad)
    used = (padded.shape[0] - image.shape[0]) // 2
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape)
    return np.asarray(out[used : used + image.shape[0], used : used + image.shape[1]], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a [Z, Y, X] volume (y = depth, anterior first) is projected onto the detector."""

    rows: int
    cols: int
    pitch_mm: float  # detector pixel pitch
    view: str  # "PA": detector against the chest (anterior); "AP": detector behind the back
    sid_mm: float | None  # source-image distance; None = parallel beam
    tilt_degrees: float  # cranio-caudal tilt (lordotic posture)
    offset_mm: tuple[float, float]  # where the volume centre lands relative to the detector centre (row, col)
    gap_mm: float = 30.0  # skin (volume edge) to detector


def slab_integrals(mu: F32, spacing_mm: tuple[float, float, float], slabs: int) -> tuple[F32, npt.NDArray[np.float64]]:
    """Line integrals along y summed per slab: ([S, Z, X], slab-centre depths in mm from the anterior edge)."""
    ny = mu.shape[1]
    edges = np.linspace(0, ny, slabs + 1).round().astype(int)
    out = np.stack([mu[:, a:b, :].sum(axis=1) * spacing_mm[1] for a, b in itertools.pairwise(edges)])
    depths = (edges[:-1] + edges[1:]) / 2.0 * spacing_mm[1]
    return out.astype(np.float32), depths


def project(
    slab_images: F32,
    depths_mm: npt.NDArray[np.float64],
    spacing_mm: tuple[float, float, float],
    depth_total_mm: float,
    geo: Geometry,
) -> F32:
    """Per-slab magnification (cone beam) and tilt shift, summed on the detector: the line-integral image."""
    _, nz, nx = slab_images.shape
    dz, _, dx = spacing_mm
    rr, cc = np.meshgrid(np.arange(geo.rows, dtype=np.float64), np.arange(geo.cols, dtype=np.float64), indexing="ij")
    # Detector coordinates in mm relative to where the volume centre lands.
    v = (rr - (geo.rows - 1) / 2.0) * geo.pitch_mm - geo.offset_mm[0]
    u = (cc - (geo.cols - 1) / 2.0) * geo.pitch_mm - geo.offset_mm[1]
    out = np.zeros((geo.rows, geo.cols), dtype=np.float32)
    for image, depth in zip(slab_images, depths_mm, strict=True):
        to_detector = (depth if geo.view == "PA" else depth_total_mm - depth) + geo.gap_mm
        magnification = 1.0 if geo.sid_mm is None else geo.sid_mm / (geo.sid_mm - to_detector)
        shift = (depth - depth_total_mm / 2.0) * np.tan(np.deg2rad(geo.tilt_degrees))
        z_mm = (v - shift) / magnification
        x_mm = u / magnification
        out += sample2d(image, z_mm / dz + (nz - 1) / 2.0, x_mm / dx + (nx - 1) / 2.0)
    return out


def detector_position(
    z_mm: float, x_mm: float, depth_mm: float, depth_total_mm: float, geo: Geometry
) -> tuple[float, float]:
    """Detector (row, col) where a point (mm from the volume centre; depth from the anterior edge) lands."""
    to_detector = (depth_mm if geo.view == "PA" else depth_total_mm - depth_mm) + geo.gap_mm
    magnification = 1.0 if geo.sid_mm is None else geo.sid_mm / (geo.sid_mm - to_detector)
    shift = (depth_mm - depth_total_mm / 2.0) * np.tan(np.deg2rad(geo.tilt_degrees))
    v = z_mm * magnification + shift
    u = x_mm * magnification
    row = (v + geo.offset_mm[0]) / geo.pitch_mm + (geo.rows - 1) / 2.0
    col = (u + geo.offset_mm[1]) / geo.pitch_mm + (geo.cols - 1) / 2.0
    return float(row), float(col)


def smooth_field(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> F32:
    """A smooth random field with unit peak amplitude (white noise low-passed at ``scale_px``)."""
    field = gaussian_blur(rng.standard_normal(shape).astype(np.float32), scale_px)
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def warp(image: F32, d_rows: F32, d_cols: F32) -> F32:
    """Backward warp: out(p) = image(p + d(p))."""
    rr, cc = np.meshgrid(
        np.arange(image.shape[0], dtype=np.float32), np.arange(image.shape[1], dtype=np.float32), indexing="ij"
    )
    # Clamp at the border so the warp never pulls in zeros (an artificial edge).
    rows = np.clip(rr + d_rows, 0, image.shape[0] - 1.001)
    cols = np.clip(cc + d_cols, 0, image.shape[1] - 1.001)
    return sample2d(image, rows, cols)


def warped_position(row: float, col: float, d_rows: F32, d_cols: F32) -> tuple[float, float]:
    """Where the input point (row, col) appears after ``warp`` (fixed-point inversion of the field)."""
    r, c = row, col
    for _ in range(8):
        ri = int(np.clip(round(r), 0, d_rows.shape[0] - 1))
        ci = int(np.clip(round(c), 0, d_rows.shape[1] - 1))
        r, c = row - float(d_rows[ri, ci]), col - float(d_cols[ri, ci])
    return r, c


@dataclass(frozen=True, slots=True)
class Exposure:
    """Dose, scatter and detector of one exposure."""

    photons_per_px: float  # unattenuated quanta per pixel (dose)
    scatter_fraction: float  # scatter-to-primary ratio at the mean transmission (after any grid)
    blur_px: float  # detector (scintillator) blur
    electronic_noise: float  # additive read noise, in quanta


def expose(line_integrals: F32, exposure: Exposure, rng: np.random.Generator) -> F32:
    """Beer-Lambert, scatter, Poisson quanta, read noise and detector blur -> log signal (-ln I/I0)."""
    primary = exposure.photons_per_px * np.exp(-line_integrals.astype(np.float64))
    # Scatter is a broad low-pass of the primary: it lowers contrast most where the chest is thick.
    scatter = exposure.scatter_fraction * gaussian_blur(primary.astype(np.float32), 40.0).astype(np.float64)
    counts = rng.poisson(np.maximum(primary + scatter, 0.0)).astype(np.float64)
    counts += rng.normal(0.0, exposure.electronic_noise, size=counts.shape)
    counts = gaussian_blur(counts.astype(np.float32), exposure.blur_px).astype(np.float64)
    reference = exposure.photons_per_px * (1.0 + exposure.scatter_fraction)
    return np.asarray(np.log(reference / np.maximum(counts, 1.0)), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Processing:
    """A vendor's image processing chain, from the log signal to stored pixel values."""

    lut: str  # "linear", "sigmoid", "gamma"
    unsharp_gain: float
    unsharp_sigma_mm: float
    equalise: float  # 0..1: large-scale dynamic range compression
    bits: int
    monochrome1: bool


def process(log_signal: F32, proc: Processing, pitch_mm: float, rng: np.random.Generator) -> npt.NDArray[np.uint16]:
    """Vendor-style processing -> unsigned integers of ``proc.bits`` bits (MONOCHROME1 inverted)."""
    x = log_signal.astype(np.float32)
    # Histogram analysis on the body only: direct exposure (air) would otherwise squeeze the lungs' range.
    # The log signal is anchored (0 = unattenuated beam), so the body is wherever more than ~2 cm of water
    # equivalent was crossed: every chest path, lungs included, is thicker than that, whether or not the
    # image has any direct exposure at all.
    body = x > 0.4
    if body.sum() < 0.1 * x.size:
        body = np.ones_like(x, dtype=bool)
    if proc.equalise > 0:
        # Large-scale dynamic range compression (what multi-scale processing does to the mediastinum).
        background = gaussian_blur(x, 50.0 / pitch_mm)
        x = x - proc.equalise * (background - float(background[body].mean()))
    if proc.unsharp_gain > 0:
        x = x + proc.unsharp_gain * (x - gaussian_blur(x, proc.unsharp_sigma_mm / pitch_mm))
    # A chest tone scale: the window spans the body from the darkest lung to the dense mediastinum and
    # abdomen, with a little head room at both ends, so no anatomy is clipped (lungs crushed to black hid
    # most nodules); the LUT's shape then decides how much of the grey scale the lungs get.
    lo, hi = np.percentile(x[body], [rng.uniform(0.2, 1.0), rng.uniform(97.0, 99.5)])
    span = max(float(hi - lo), 1e-6)
    lo, hi = lo - rng.uniform(0.0, 0.05) * span, hi + rng.uniform(0.0, 0.05) * span
    t = np.clip((x - lo) / max(float(hi - lo), 1e-6), -0.05, 1.05)
    if proc.lut == "sigmoid":
        k = rng.uniform(3.0, 5.0)
        t = 1.0 / (1.0 + np.exp(-k * (t - 0.5)))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif proc.lut == "gamma":
        t = np.clip(t, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    t = np.clip(t, 0.0, 1.0)
    top = (1 << proc.bits) - 1
    stored = np.rint(t * top)
    if proc.monochrome1:
        stored = top - stored
    return np.asarray(stored, dtype=np.uint16)
