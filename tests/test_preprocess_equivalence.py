"""The preprocessing of issue 9 against the one before it (tests/reference_preprocess.py, kept unchanged).

The bound: the model inputs, in normalised units, differ by at most ``INPUT_TOLERANCE`` anywhere. Both
implementations compute in float32, in a different order (the new one clips the stored values, resizes,
and only then applies the affine part of the window; the old one windowed every pixel first), so they
cannot agree bit for bit; measured on every real file here the largest difference is about 1.3e-6.
1e-5 in normalised units is 2.5e-6 of the [0, 1] grey range for the bundled cards (std 0.25): under
1/1500 of one grey level of an 8-bit display, and under 1/400 of one stored-value step in a 1000-unit
window. What it does to the models is measured too: the bundled models' scores on real files move by
at most ``SCORE_TOLERANCE``, a hundredth of verify-engine's own fp32 tolerance (1e-3), and no finding
changes side of its threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

import tests.reference_preprocess as old
from edge_agent.dicom.pixels import Frame, Window, decode_frames
from edge_agent.inference.card import ModelCard, Preprocessing, load_card
from edge_agent.inference.onnxruntime import OnnxRuntimeEngine
from edge_agent.inference.preprocess import load_instance, preprocess, resize
from tests.dicomfiles import DATA_STORE, PYDICOM_FILES, PYNETDICOM_FILES

INPUT_TOLERANCE = 1e-5
SCORE_TOLERANCE = 1e-5

ENGINES = Path(__file__).resolve().parent.parent / "engines"
CARDS = ("ct-demo", "cxr-demo", "cxr-nodule")

REAL = [
    PYDICOM_FILES / "CT_small.dcm",  # CT 128x128, rescale intercept -1024, no window: min-max
    PYDICOM_FILES / "MR_small.dcm",  # MR 64x64 with a window
    PYDICOM_FILES / "MR_small_bigendian.dcm",  # decoded by pydicom
    PYDICOM_FILES / "JPEG2000.dcm",  # compressed, signed
    DATA_STORE / "SC_rgb.dcm",  # colour -> luma
    DATA_STORE / "SC_rgb_32bit_2frame.dcm",  # colour, 32 bits a sample, two frames
    PYDICOM_FILES / "image_dfl.dcm",  # Deflated, 8-bit
    DATA_STORE / "693_UNCR.dcm",  # CT 512x512 with a window: the CT the goal is measured on
    DATA_STORE / "RG1_UNCR.dcm",  # CR 1955x1841 MONOCHROME1: the CR the goal is measured on
    DATA_STORE / "RG3_UNCR.dcm",  # CR 1760x1760 MONOCHROME1
    DATA_STORE / "MR2_UNCR.dcm",  # MR, rescale slope 3.77
    DATA_STORE / "emri_small.dcm",  # multi-frame
    DATA_STORE / "eCT_Supplemental.dcm",  # enhanced multi-frame: rescale and window in functional groups
    DATA_STORE / "OBXXXX1A_rle_2frame.dcm",  # palette colour, 600x800
    DATA_STORE / "JPEG-LL.dcm",  # 1024x256
    PYNETDICOM_FILES / "SCImageStorage_Deflated.dcm",
]


def prep(**kw: object) -> Preprocessing:
    base: dict[str, object] = {"resize": (256, 256), "normalise": {"mean": 0.5, "std": 0.25}}
    base.update(kw)
    return Preprocessing.model_validate(base)


# Card settings the bundled cards do not use, each of which takes its own path through the code.
VARIANTS = {
    "fixed-window": prep(window={"center": 40.0, "width": 400.0}),
    "fixed-window-no-rescale": prep(window={"center": 1024.0, "width": 2048.0}, rescale=False),
    "auto-no-rescale": prep(rescale=False),
    "no-invert": prep(invert_monochrome1=False),
    "upscale": prep(resize=(700, 900)),
    "mixed-scale": prep(resize=(96, 1100)),
    "letterbox-odd": prep(resize=(211, 173), keep_aspect=True),
    "narrow-window": prep(window={"center": 60000.5, "width": 3.0}, rescale=False),
}


def assert_inputs_agree(new: np.ndarray, ref: np.ndarray) -> None:
    assert new.shape == ref.shape and new.dtype == ref.dtype == np.float32
    assert new.flags.c_contiguous
    diff = float(np.abs(new - ref).max())
    assert diff <= INPUT_TOLERANCE, f"max abs difference {diff:.3e} > {INPUT_TOLERANCE:.0e}"


@pytest.fixture(scope="module")
def cards() -> dict[str, ModelCard]:
    return {name: load_card(ENGINES / name) for name in CARDS}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_files_through_every_bundled_card(path: Path, cards: dict[str, ModelCard]) -> None:
    for card in cards.values():
        new, ref = load_instance(path, card), old.load_instance(path, card)
        assert len(new) == len(ref) >= 1
        for a, b in zip(new, ref, strict=True):
            assert_inputs_agree(a, b)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    "path",
    [PYDICOM_FILES / "CT_small.dcm", DATA_STORE / "693_UNCR.dcm", DATA_STORE / "RG3_UNCR.dcm",
     DATA_STORE / "MR2_UNCR.dcm"],
    ids=lambda p: p.name,
)
def test_real_files_through_other_card_settings(path: Path, variant: str) -> None:
    settings = VARIANTS[variant]
    for new_frame, old_frame in zip(decode_frames(path), old.decode_frames(path), strict=True):
        assert_inputs_agree(preprocess(new_frame, settings, 3), old.preprocess(old_frame, settings, 3))


@dataclass(frozen=True)
class Case:
    """A synthetic frame: stored values and how the instance says to show them."""

    name: str
    stored: np.ndarray
    window: Window | None = None
    monochrome1: bool = False
    slope: float = 1.0
    intercept: float = 0.0

    def frames(self) -> tuple[Frame, old.Frame]:
        """The frame as each implementation holds it (the old one held float32 modality values)."""
        modality = self.stored.astype(np.float32)
        if self.slope != 1.0 or self.intercept != 0.0:
            modality = modality * np.float32(self.slope) + np.float32(self.intercept)
        w = self.window
        old_window = None if w is None else old.Window(w.center, w.width, w.function)
        return (
            Frame(self.stored, w, self.monochrome1, self.slope, self.intercept),
            old.Frame(modality, old_window, self.monochrome1, self.slope, self.intercept),
        )


def synthetic_cases() -> list[Case]:
    rng = np.random.default_rng(9)
    u12 = rng.integers(0, 4096, (333, 517)).astype(np.uint16)
    ct = rng.integers(-1024, 3000, (512, 512)).astype(np.int16)
    high = (60000 + rng.integers(0, 8, (300, 200))).astype(np.uint16)
    return [
        Case("u16-min-max", u12),
        Case("u16-window", u12, Window(2000.0, 1500.0)),
        Case("u16-window-exact", u12, Window(2000.0, 1500.0, "LINEAR_EXACT")),
        Case("u16-window-width-below-1", u12, Window(2000.0, 0.5)),
        Case("u16-sigmoid", u12, Window(2000.0, 800.0, "SIGMOID")),
        Case("u16-monochrome1", u12, Window(1000.0, 3000.0), monochrome1=True),
        Case("i16-ct-window", ct, Window(40.0, 400.0)),
        Case("i16-rescaled", ct, Window(40.0, 400.0), intercept=-1024.0),
        Case("i16-negative-slope", ct, Window(-300.0, 900.0), slope=-0.5, intercept=10.0),
        Case("i16-negative-slope-min-max", ct, slope=-2.0, intercept=7.0),
        Case("u8", rng.integers(0, 256, (97, 61)).astype(np.uint8)),
        Case("i8", rng.integers(-128, 128, (61, 97)).astype(np.int8), Window(0.0, 100.0)),
        Case("u16-far-from-zero", high),
        Case("u16-narrow-window-far-from-zero", high, Window(60003.5, 4.0)),
        Case("flat", np.full((40, 30), 123, np.uint16)),
        Case("one-pixel", np.array([[7]], np.int16), Window(0.0, 20.0)),
        Case("one-row", rng.integers(0, 4096, (1, 700)).astype(np.uint16)),
        Case("one-column", rng.integers(0, 4096, (700, 1)).astype(np.uint16)),
        Case("float-luma", (rng.random((300, 400)) * 255).astype(np.float32)),
    ]


SIZES = {
    "square": {"resize": (256, 256)},
    "letterbox": {"resize": (256, 256), "keep_aspect": True},
    "upscale": {"resize": (1024, 1100)},
    "non-square-odd": {"resize": (129, 67)},
    "mixed": {"resize": (50, 800)},
}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("case", synthetic_cases(), ids=lambda c: c.name)
def test_synthetic_edge_cases(case: Case, size: str) -> None:
    new_frame, old_frame = case.frames()
    settings = prep(**SIZES[size])
    assert_inputs_agree(preprocess(new_frame, settings), old.preprocess(old_frame, settings))


@pytest.mark.parametrize("shape", [(1955, 1841), (512, 512), (5, 3), (3, 5), (1, 1), (2, 9)])
@pytest.mark.parametrize("to", [(256, 241), (256, 256), (17, 1), (9, 700), (640, 480)])
def test_resize_matches_the_old_resize(shape: tuple[int, int], to: tuple[int, int]) -> None:
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    got, want = resize(image, *to), old.resize(image, *to)
    assert got.shape == want.shape == to and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= 1e-6


def test_bundled_models_score_real_files_the_same(cards: dict[str, ModelCard]) -> None:
    files = [p for p in REAL if p.name in {"CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "RG1_UNCR.dcm",
                                            "RG3_UNCR.dcm", "MR2_UNCR.dcm", "eCT_Supplemental.dcm"}]
    for card in cards.values():
        engine = OnnxRuntimeEngine(card, intra_op_threads=1, max_batch=16)
        engine.load()
        try:
            new = np.stack([x for p in files for x in load_instance(p, card)])
            ref = np.stack([x for p in files for x in old.load_instance(p, card)])
            got, want = engine.infer(new).scores, engine.infer(ref).scores
        finally:
            engine.close()
        assert float(np.abs(got - want).max()) <= SCORE_TOLERANCE, card.name
        thresholds = np.array([card.thresholds[label] for label in card.labels], dtype=np.float32)
        np.testing.assert_array_equal(got >= thresholds, want >= thresholds)


def test_reference_is_the_pre_issue_9_code() -> None:
    # The oracle must stay the old behaviour: float32 modality values, cumulative-sum area averaging.
    frame = old.decode_frames(PYDICOM_FILES / "CT_small.dcm")[0]
    assert frame.pixels.dtype == np.float32
    np.testing.assert_array_equal(frame.pixels, pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm").pixel_array - 1024.0)
    assert hasattr(old, "_area_shrink")
