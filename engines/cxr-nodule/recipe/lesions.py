"""Nodules and look-alikes, rendered in 3-D on the anatomy's own voxel grid (with partial volume).

A lesion is a small box of HU *differences* (lesion HU minus the lung it replaces), clipped to the
lung mask, so insertion goes through exactly the same projection, noise and processing as the
anatomy around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from anatomy import HEART, LUNG, RIB, Anatomy

F32 = npt.NDArray[np.float32]

# Nodule sizes: uniform on 4-30 mm (the range), so the large, learnable nodules are common and
# every size bin still has enough cases to state the smallest reliably found nodule.
MIN_SIZE_MM = 4.0
MAX_SIZE_MM = 30.0
# Where nodules are drawn from: mostly the open lung while the hard places are not yet learned.
PLACE_WEIGHTS = {"retrocardiac": 0.05, "apex": 0.05, "below_diaphragm": 0.05, "lung": 0.85}

_SUBVOXEL_MM = 0.5  # supersampling step: partial volume for 4 mm nodules on 2.5 mm slices


@dataclass(frozen=True, slots=True)
class Lesion:
    """A rendered 3-D lesion: HU differences in a box whose corner sits at voxel ``origin`` (z, y, x)."""

    delta_hu: F32
    origin: tuple[int, int, int]
    centre_mm: tuple[float, float, float]  # (z, y, x) in array millimetres


@dataclass(frozen=True, slots=True)
class NoduleSpec:
    size_mm: float
    kind: str  # solid, part-solid, ground-glass
    shape: str  # round, lobulated, spiculated
    contrast_scale: float  # 1 = physical contrast; 0 = the null control


def draw_nodule(rng: np.random.Generator, contrast_scale: float = 1.0) -> NoduleSpec:
    """Sizes uniform on 4-30 mm; mostly solid, with part-solid and ground-glass ones."""
    size = float(rng.uniform(MIN_SIZE_MM, MAX_SIZE_MM))
    kind = str(rng.choice(["solid", "part-solid", "ground-glass"], p=[0.75, 0.17, 0.08]))
    shape = str(rng.choice(["round", "lobulated", "spiculated"], p=[0.45, 0.3, 0.25]))
    return NoduleSpec(size, kind, shape, contrast_scale)


def _grid(spacing: tuple[float, float, float], half_mm: float) -> tuple[list[npt.NDArray[np.float64]], list[int]]:
    """Sub-voxel coordinates (mm, centred) of a box of voxels, and the supersampling factor per axis."""
    axes, factors = [], []
    for sp in spacing:
        n = int(np.ceil(half_mm / sp)) * 2 + 1
        f = max(1, int(np.ceil(sp / _SUBVOXEL_MM)))
        sub = (np.arange(n * f) + 0.5) / f * sp - n * sp / 2
        axes.append(sub)
        factors.append(f)
    return axes, factors


def _downsample(sub: npt.NDArray[np.float64], factors: list[int]) -> F32:
    nz, ny, nx = (s // f for s, f in zip(sub.shape, factors, strict=True))
    fz, fy, fx = factors
    return np.asarray(sub.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5)), dtype=np.float32)


def _fractions(spec: NoduleSpec, spacing: tuple[float, float, float], rng: np.random.Generator) -> tuple[F32, F32]:
    """(solid, ground-glass) volume fractions per voxel for one nodule, centred in its box."""
    r = spec.size_mm / 2
    reach = r * (1.6 if spec.shape == "spiculated" else 1.25) + 2.0
    axes, factors = _grid(spacing, reach)
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    # Slightly ellipsoidal, randomly oriented.
    axes_scale = rng.uniform(0.85, 1.15, 3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pts = np.stack([zz, yy, xx], axis=-1) @ q / axes_scale
    dist = np.linalg.norm(pts, axis=-1)
    inside = dist <= r
    if spec.shape == "lobulated":
        for _ in range(int(rng.integers(3, 7))):
            d = rng.normal(size=3)
            c = d / np.linalg.norm(d) * r * rng.uniform(0.4, 0.7)
            inside |= np.linalg.norm(pts - c, axis=-1) <= r * rng.uniform(0.45, 0.65)
    elif spec.shape == "spiculated":
        inside = dist <= r * 0.9
        for _ in range(int(rng.integers(6, 14))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            length = r * rng.uniform(1.2, 1.6)
            t = np.clip(pts @ d, 0.0, length)
            spoke = np.linalg.norm(pts - t[..., None] * d, axis=-1)
            width = rng.uniform(0.4, 0.9) * (1.0 - t / length) + 0.2
            inside |= spoke <= width
    inside_f = inside.astype(np.float64)
    if spec.kind == "solid":
        return _downsample(inside_f, factors), np.zeros_like(_downsample(inside_f, factors))
    if spec.kind == "ground-glass":
        return np.zeros_like(_downsample(inside_f, factors)), _downsample(inside_f, factors)
    core = (dist <= r * rng.uniform(0.35, 0.6)).astype(np.float64)
    return _downsample(core, factors), _downsample(inside_f * (1 - core), factors)


def _place(
    frac_shape: tuple[int, ...], centre_vox: npt.NDArray[np.int64], shape: tuple[int, ...]
) -> tuple[int, int, int] | None:
    origin = tuple(int(c - s // 2) for c, s in zip(centre_vox, frac_shape, strict=True))
    if any(o < 0 or o + s > n for o, s, n in zip(origin, frac_shape, shape, strict=True)):
        return None
    return origin  # type: ignore[return-value]


def _box(anatomy: Anatomy, origin: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    return tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))  # type: ignore[return-value]


def candidate_voxels(anatomy: Anatomy) -> dict[str, npt.NDArray[np.int64]]:
    """Lung voxels grouped by the hard places: behind the heart, the apex, and anywhere in the lung."""
    lung = anatomy.labels == LUNG
    heart_column = (anatomy.labels == HEART).any(axis=1)  # [Z, X]: the ray passes through the heart
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    apex_limit = zs.min() + 0.15 * (zs.max() - zs.min())
    z_index = np.arange(lung.shape[0])[:, None, None]
    # Columns with little lung in them (posterior recesses seen through liver and diaphragm) are a place
    # of their own: drawn only as often as the other hard places, not in proportion to their volume.
    thin = _thin_lung_columns(anatomy)
    return {
        "retrocardiac": np.argwhere(lung & heart_column[:, None, :]),
        "apex": np.argwhere(lung & (z_index < apex_limit)),
        "below_diaphragm": np.argwhere(lung & thin[:, None, :] & ~heart_column[:, None, :]),
        "lung": np.argwhere(lung & ~thin[:, None, :]),
    }


def _thin_lung_columns(anatomy: Anatomy) -> npt.NDArray[np.bool_]:
    """[Z, X]: rays that cross less than a third of the thickest lung path (lung bases behind the dome)."""
    path = (anatomy.labels == LUNG).sum(axis=1).astype(np.float32)
    return np.asarray((path > 0) & (path < path.max() / 3.0), dtype=bool)


def location_of(anatomy: Anatomy, centre_vox: npt.NDArray[np.int64], apex_limit: float) -> str:
    """Where a nodule sits as seen on a frontal radiograph."""
    z, _, x = (int(v) for v in centre_vox)
    column = anatomy.labels[z, :, x]
    if (column == HEART).any():
        return "behind_heart"
    if (column == LUNG).sum() < (anatomy.labels == LUNG).sum(axis=1).max() / 3.0:
        return "below_diaphragm"
    if z < apex_limit:
        return "apex"
    if (column == RIB).any():
        return "over_rib"
    return "lung_field"


def insert_nodule(
    anatomy: Anatomy,
    spec: NoduleSpec,
    candidates: dict[str, npt.NDArray[np.int64]],
    rng: np.random.Generator,
    place: str | None = None,
) -> tuple[Lesion, float] | None:
    """A nodule inside the lung mask; returns the lesion and its contrast (HU above the replaced lung)."""
    solid_frac, ggo_frac = _fractions(spec, anatomy.spacing_mm, rng)
    solid_hu = rng.uniform(0, 60)
    ggo_hu = rng.uniform(-700, -350)
    pool = place or str(rng.choice(list(PLACE_WEIGHTS), p=list(PLACE_WEIGHTS.values())))
    for _ in range(40):
        voxels = candidates[pool] if len(candidates[pool]) else candidates["lung"]
        centre = voxels[rng.integers(len(voxels))]
        origin = _place(solid_frac.shape, centre, anatomy.hu.shape)
        if origin is None:
            continue
        box = _box(anatomy, origin, solid_frac.shape)
        lung = (anatomy.labels[box] == LUNG).astype(np.float32)
        occupied = solid_frac + ggo_frac
        # Mostly inside the lung (a juxtapleural nodule may touch the wall), never mostly in the mediastinum.
        if float((occupied * lung).sum()) < 0.85 * float(occupied.sum()):
            continue
        lung_hu = anatomy.hu[box]
        delta = (solid_frac * (solid_hu - lung_hu) + ggo_frac * (ggo_hu - lung_hu)) * lung * spec.contrast_scale
        local_lung = float(np.median(lung_hu[lung > 0]))
        contrast = (solid_hu if spec.kind != "ground-glass" else ggo_hu) - local_lung
        centre_mm = tuple(float(c * s) for c, s in zip(centre, anatomy.spacing_mm, strict=True))
        return Lesion(delta.astype(np.float32), origin, centre_mm), contrast * spec.contrast_scale  # type: ignore[arg-type]
    return None


def insert_lookalike(
    anatomy: Anatomy, kind: str, candidates: dict[str, npt.NDArray[np.int64]], rng: np.random.Generator
) -> Lesion | None:
    """An in-lung look-alike: a vessel seen end-on, or a calcified granuloma (both benign: label 0)."""
    sp = anatomy.spacing_mm
    if kind == "vessel_end_on":
        radius, length, value = rng.uniform(1.5, 3.5), rng.uniform(15, 35), 40.0
    else:
        radius, length, value = rng.uniform(1.0, 3.0), 0.0, rng.uniform(600, 1200)
    axes, factors = _grid(sp, max(radius, length / 2) + 2.0)
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    if length > 0:
        # A vessel running along the beam (y), so it projects as a dense dot.
        inside = (np.sqrt(zz**2 + xx**2) <= radius) & (np.abs(yy) <= length / 2)
    else:
        inside = np.sqrt(zz**2 + yy**2 + xx**2) <= radius
    frac = _downsample(inside.astype(np.float64), factors)
    voxels = candidates["lung"]
    for _ in range(40):
        centre = voxels[rng.integers(len(voxels))]
        origin = _place(frac.shape, centre, anatomy.hu.shape)
        if origin is None:
            continue
        box = _box(anatomy, origin, frac.shape)
        lung = (anatomy.labels[box] == LUNG).astype(np.float32)
        delta = frac * (value - anatomy.hu[box]) * lung
        centre_mm = tuple(float(c * s) for c, s in zip(centre, sp, strict=True))
        return Lesion(delta.astype(np.float32), origin, centre_mm)  # type: ignore[arg-type]
    return None


def rotate_lesion(
    lesion: Lesion, degrees: float, volume_shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> Lesion:
    """The lesion as it sits in the volume rotated by ``degrees`` about its long axis (see rotate_axial)."""
    if degrees == 0.0:
        return lesion
    from imaging import rotate_axial

    _, ny, nx = volume_shape
    _cz, cy, cx = (c / s for c, s in zip(lesion.centre_mm, spacing, strict=True))
    t = np.deg2rad(degrees)
    oy, ox = (ny - 1) / 2.0, (nx - 1) / 2.0
    # rotate_axial samples src = R(dst); the forward map of a point is the inverse rotation.
    new_y = oy + (cy - oy) * np.cos(t) + (cx - ox) * np.sin(t)
    new_x = ox - (cy - oy) * np.sin(t) + (cx - ox) * np.cos(t)
    box = rotate_axial(lesion.delta_hu, degrees).astype(np.float32)
    _bz, by, bx = box.shape
    origin = (lesion.origin[0], round(new_y) - by // 2, round(new_x) - bx // 2)
    return Lesion(box, origin, (lesion.centre_mm[0], new_y * spacing[1], new_x * spacing[2]))


def external_objects(
    rows: int, cols: int, pitch_mm: float, anchors: dict[str, tuple[float, float]], rng: np.random.Generator
) -> tuple[F32, list[str]]:
    """Line integrals of things outside the lungs: nipple shadows and ECG electrodes with their leads."""
    out = np.zeros((rows, cols), dtype=np.float32)
    kinds: list[str] = []
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    if rng.random() < 0.35:
        kinds.append("nipple")
        radius = rng.uniform(4, 8) / pitch_mm
        sides = (
            ["nipple_right", "nipple_left"]
            if rng.random() < 0.7
            else [str(rng.choice(["nipple_right", "nipple_left"]))]
        )
        for side in sides:
            r0, c0 = anchors[side]
            r0 += rng.normal(0, 8)
            c0 += rng.normal(0, 8)
            d2 = ((rr - r0) ** 2 + (cc - c0) ** 2) / radius**2
            # A soft-tissue hemisphere in air: path length sqrt(R^2 - r^2).
            out += 0.0206 * radius * pitch_mm * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    if rng.random() < 0.3:
        kinds.append("ecg_electrode")
        for _ in range(int(rng.integers(1, 4))):
            r0, c0 = rng.uniform(0.15, 0.85) * rows, rng.uniform(0.1, 0.9) * cols
            d = np.sqrt((rr - r0) ** 2 + (cc - c0) ** 2) * pitch_mm
            out += np.where(d < rng.uniform(9, 12), 0.006, 0.0).astype(np.float32)  # foam and gel pad
            out += np.where(d < rng.uniform(1.8, 3.0), rng.uniform(0.4, 0.9), 0.0).astype(np.float32)  # metal snap
            # The lead: a smooth random curve leaving the snap towards the image edge.
            angle, r, c = rng.uniform(0, 2 * np.pi), r0, c0
            for _ in range(int(3 * max(rows, cols))):
                angle += rng.normal(0, 0.03)
                r += np.sin(angle)
                c += np.cos(angle)
                if not (0 <= r < rows and 0 <= c < cols):
                    break
                out[int(r), int(c)] += 0.08
    return out, kinds
