"""Preprocessing for a model card (window, invert, resize, place, normalise) on real DICOM files and small
synthetic frames. Equality with the implementation before issue 9 is tests/test_preprocess_equivalence.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_agent.dicom.pixels import Frame, Window, decode_frames
from edge_agent.inference.card import Preprocessing, load_card
from edge_agent.inference.preprocess import (
    _area_bands,
    apply_window,
    load_instance,
    placement,
    preprocess,
    resize,
    warm_up,
)
from tests.dicomfiles import CT_SMALL, DATA_STORE, MR_SMALL, RG1_UNCR, RG3_UNCR

ENGINES = Path(__file__).resolve().parent.parent / "engines"


def plain(**kw: object) -> Preprocessing:
    """Preprocessing without normalisation, so outputs are the windowed [0, 1] values."""
    base: dict[str, object] = {"resize": (64, 64), "normalise": {"mean": 0.0, "std": 1.0}}
    base.update(kw)
    return Preprocessing.model_validate(base)


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    src = MR_SMALL
    mono1 = _rewrite(src, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    m2 = decode_frames(src)[0]
    m1 = decode_frames(mono1)[0]
    assert m1.monochrome1 and not m2.monochrome1
    np.testing.assert_array_equal(m1.stored, m2.stored)  # decoding keeps the stored values
    prep = plain()
    np.testing.assert_allclose(preprocess(m1, prep), 1.0 - preprocess(m2, prep), atol=1e-6)
    np.testing.assert_array_equal(preprocess(m1, plain(invert_monochrome1=False)), preprocess(m2, prep))


def test_real_monochrome1_radiograph_shows_bone_bright() -> None:
    card = load_card(ENGINES / "cxr-demo")
    frame = decode_frames(RG3_UNCR)[0]
    x = preprocess(frame, card.preprocessing)
    assert x.shape == (1, 256, 256) and x.dtype == np.float32
    # In MONOCHROME1 low stored values are white: after inversion the brightest input pixel must come from
    # (one of) the lowest stored values.
    flat = np.asarray(preprocess(frame, Preprocessing.model_validate({"resize": (1760, 1760)})))
    assert flat.reshape(-1)[np.argmin(frame.stored)] == flat.max()


def test_apply_window_follows_ps3_3_linear_formula() -> None:
    window = Window(center=40.0, width=400.0)
    values = np.array([-1000.0, 40.0 - 0.5 - 199.5, 40.0, 40.0 - 0.5 + 199.5, 3000.0], dtype=np.float32)
    out = apply_window(values, window)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5 + 0.5 / 399.0, 1.0, 1.0], atol=1e-6)
    sig = apply_window(np.array([40.0], dtype=np.float32), Window(40.0, 400.0, "SIGMOID"))
    assert sig[0] == pytest.approx(0.5)


def test_preprocess_fixed_window_auto_window_and_min_max() -> None:
    pixels = np.array([[-1000.0, 0.0], [40.0, 1000.0]], dtype=np.float32)
    with_window = Frame(pixels, Window(40.0, 400.0), monochrome1=False)
    without = Frame(pixels, None, monochrome1=False)
    fixed = preprocess(without, plain(resize=(2, 2), window={"center": 500.0, "width": 3000.0}))
    np.testing.assert_allclose(fixed[0], apply_window(pixels, Window(500.0, 3000.0)))
    auto = preprocess(with_window, plain(resize=(2, 2)))
    np.testing.assert_allclose(auto[0], apply_window(pixels, Window(40.0, 400.0)))
    minmax = preprocess(without, plain(resize=(2, 2)))
    np.testing.assert_allclose(minmax[0], [[0.0, 0.5], [0.52, 1.0]], atol=1e-6)
    flat = preprocess(Frame(np.full((4, 4), 7.0, np.float32), None, False), plain(resize=(2, 2)))
    np.testing.assert_array_equal(flat, np.zeros((1, 2, 2), np.float32))


def test_preprocess_without_rescale_undoes_the_modality_lut() -> None:
    path = CT_SMALL
    frame = decode_frames(path)[0]
    prep = plain(resize=(128, 128), rescale=False, window={"center": 1024.0, "width": 4096.0})
    expected = apply_window(pydicom.dcmread(path).pixel_array.astype(np.float32), Window(1024.0, 4096.0))
    np.testing.assert_allclose(preprocess(frame, prep)[0], expected, atol=1e-6)


def test_preprocess_normalises_and_replicates_channels() -> None:
    frame = Frame(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), None, False)
    out = preprocess(frame, plain(resize=(2, 2), normalise={"mean": 0.5, "std": 0.25}), channels=3)
    assert out.shape == (3, 2, 2) and out.flags.c_contiguous
    np.testing.assert_allclose(out[2], (np.array([[0, 1 / 3], [2 / 3, 1]]) - 0.5) / 0.25, atol=1e-6)


def test_resize_area_averages_when_shrinking_and_is_bilinear_when_growing() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(resize(image, 2, 2), image.reshape(2, 2, 2, 2).mean(axis=(1, 3)))
    const = np.full((3, 5), 2.5, np.float32)
    np.testing.assert_allclose(resize(const, 7, 11), np.full((7, 11), 2.5))
    ramp = np.array([[0.0, 1.0]], np.float32)
    np.testing.assert_allclose(resize(ramp, 1, 4), [[0.0, 0.25, 0.75, 1.0]])
    odd = resize(np.ones((1955, 1841), np.float32), 256, 241)
    np.testing.assert_allclose(odd, np.ones((256, 241)), rtol=1e-5)


def _bands_one_by_one(n_in: int, n_out: int) -> list[tuple[int, int, np.ndarray]]:
    """The area-average bands as preprocessing computed them before they were computed all at once."""
    scale = n_in / n_out
    bands = []
    for j in range(n_out):
        start, stop = j * scale, min((j + 1) * scale, float(n_in))
        first, last = int(np.floor(start)), min(int(np.ceil(stop)), n_in)
        overlap = np.asarray([min(stop, i + 1) - max(start, i) for i in range(first, last)], dtype=np.float64)
        bands.append((first, last, (overlap / overlap.sum()).astype(np.float32)))
    return bands


@pytest.mark.parametrize("n_in", [*range(1, 40), 97, 511, 512, 513, 1841, 1955, 2048, 3001])
def test_area_bands_are_the_band_by_band_weights_bit_for_bit(n_in: int) -> None:
    outs = {n for n in [*range(1, 40), 224, 256, 300, n_in // 3, n_in - 1, n_in] if 1 <= n <= n_in}
    for n_out in sorted(outs):
        got = _area_bands.__wrapped__(n_in, n_out)
        want = _bands_one_by_one(n_in, n_out)
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want], (n_in, n_out)
        for (_, _, g), (_, _, w) in zip(got, want, strict=True):
            assert g.dtype == np.float32 and not g.flags.writeable
            assert g.tobytes() == w.tobytes(), (n_in, n_out)


def test_letterbox_keeps_aspect_and_pads_with_black() -> None:
    prep = plain(resize=(64, 64), keep_aspect=True)
    frame = Frame(np.tile(np.arange(50, dtype=np.float32), (100, 1)), None, False)
    place = placement((100, 50), prep)
    assert (place.top, place.left, place.height, place.width) == (0, 16, 64, 32)
    out = preprocess(frame, prep)[0]
    assert np.all(out[:, :16] == 0.0) and np.all(out[:, 48:] == 0.0)
    assert out[:, 16:48].max() > 0.9


def test_load_instance_gives_one_input_per_frame() -> None:
    card = load_card(ENGINES / "ct-demo")
    inputs = load_instance(DATA_STORE / "emri_small_jpeg_2k_lossless.dcm", card)
    assert len(inputs) == 10
    assert all(x.shape == (1, 256, 256) and x.dtype == np.float32 for x in inputs)


def test_warm_up_runs_for_every_shipped_card() -> None:
    cards = [load_card(d) for d in sorted(ENGINES.iterdir()) if (d / "model.yaml").exists()]
    assert len(cards) >= 3
    warm_up([(card.preprocessing, card.input_shape[0]) for card in cards])


_FIRST_CALL = """
import resource, sys
from pathlib import Path
from edge_agent.inference.card import load_card
from edge_agent.inference.preprocess import load_instance_prepared, warm_up
card = load_card(Path(sys.argv[1]))
if sys.argv[3] == "warm":
    warm_up([(card.preprocessing, card.input_shape[0])])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
load_instance_prepared(Path(sys.argv[2]), card)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_after_the_warm_up_a_workers_first_radiograph_finds_its_memory_faulted_in() -> None:
    """The warm-up's purpose, counted in page faults (not timed): a fresh process's first 1955x1841 CR."""

    def faults(mode: str) -> int:
        args = [sys.executable, "-c", _FIRST_CALL, str(ENGINES / "cxr-nodule"), str(RG1_UNCR), mode]
        return int(subprocess.run(args, capture_output=True, text=True, check=True).stdout)

    cold, warm = faults("cold"), faults("warm")
    assert cold > 1000  # the CR's 7 MB of file and its float32 strips, faulted in on first use
    assert warm < cold / 3, (cold, warm)
