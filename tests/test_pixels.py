"""Decoding and preprocessing on real DICOM files from the pydicom, pydicom-data and pynetdicom wheels."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pydicom
import pydicom.data
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from edge_agent.dicom.pixels import (
    Frame,
    Window,
    apply_window,
    decode_frames,
    load_instance,
    placement,
    preprocess,
    resize,
)
from edge_agent.errors import DecodeError
from edge_agent.inference.card import Preprocessing, load_card

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
DATA_STORE = Path(data_store.__file__).parent / "data"
PYNETDICOM_FILES = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"
ENGINES = Path(__file__).resolve().parent.parent / "engines"


def plain(**kw: object) -> Preprocessing:
    """Preprocessing without normalisation, so outputs are the windowed [0, 1] values."""
    base: dict[str, object] = {"resize": (64, 64), "normalise": {"mean": 0.0, "std": 1.0}}
    base.update(kw)
    return Preprocessing.model_validate(base)


def stored_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_cr_lossless_jpeg2000_decodes_equal_to_uncompressed() -> None:
    raw = decode_frames(DATA_STORE / "RG1_UNCR.dcm")
    j2k = decode_frames(DATA_STORE / "RG1_J2KR.dcm")
    assert len(raw) == len(j2k) == 1
    assert raw[0].pixels.shape == (1955, 1841)
    assert raw[0].pixels.dtype == np.float32
    np.testing.assert_array_equal(raw[0].pixels, j2k[0].pixels)
    assert raw[0].monochrome1 and j2k[0].monochrome1
    assert raw[0].window == Window(15000.0, 30000.0)


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_multi_frame_in_every_lossless_syntax_equals_uncompressed(name: str) -> None:
    ref = decode_frames(DATA_STORE / "emri_small.dcm")
    got = decode_frames(DATA_STORE / name)
    assert len(ref) == len(got) == 10
    for a, b in zip(ref, got, strict=True):
        assert a.pixels.shape == (64, 64)
        np.testing.assert_array_equal(a.pixels, b.pixels)
    # Each frame is its own slice, not one frame repeated.
    assert not np.array_equal(ref[0].pixels, ref[5].pixels)


@pytest.mark.parametrize(
    "path",
    [
        PYDICOM_FILES / "MR_small_RLE.dcm",
        PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm",
        PYDICOM_FILES / "MR_small_jp2klossless.dcm",
        PYDICOM_FILES / "MR_small_bigendian.dcm",
        PYDICOM_FILES / "MR_small_implicit.dcm",
        PYNETDICOM_FILES / "MRImageStorage_JPG2000_Lossless.dcm",
    ],
    ids=lambda p: p.name,
)
def test_single_frame_transfer_syntaxes_equal_uncompressed(path: Path) -> None:
    ref = decode_frames(PYDICOM_FILES / "MR_small.dcm")[0]
    got = decode_frames(path)[0]
    np.testing.assert_array_equal(ref.pixels, got.pixels)
    assert got.window == Window(600.0, 1600.0)


def test_jpeg_lossless_equals_uncompressed() -> None:
    ref = decode_frames(DATA_STORE / "SC_rgb.dcm")[0]
    got = decode_frames(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm")[0]  # JPEG Lossless, SV1
    np.testing.assert_array_equal(ref.pixels, got.pixels)
    assert decode_frames(DATA_STORE / "JPEG-LL.dcm")[0].pixels.shape == (1024, 256)


def test_deflated_and_jpeg_baseline_decode() -> None:
    deflated = decode_frames(PYNETDICOM_FILES / "SCImageStorage_Deflated.dcm")
    assert deflated[0].pixels.shape == (512, 512)
    # JPEG baseline (YBR_FULL) against the same file decompressed by dcmtk's dcmdjpeg.
    jpeg = decode_frames(PYDICOM_FILES / "SC_rgb_dcmtk_+eb+cy+n1.dcm")[0]
    rgb = decode_frames(DATA_STORE / "SC_rgb_dcmtk_ebcyn1_dcmd.dcm")[0]
    assert np.abs(jpeg.pixels - rgb.pixels).max() < 8.0


def test_rescale_slope_and_intercept_give_modality_units() -> None:
    path = PYDICOM_FILES / "CT_small.dcm"
    frame = decode_frames(path)[0]
    np.testing.assert_array_equal(frame.pixels, stored_pixels(path).astype(np.float32) - 1024.0)
    assert (frame.rescale_slope, frame.rescale_intercept) == (1.0, -1024.0)
    mr = decode_frames(DATA_STORE / "MR2_UNCR.dcm")[0]
    ds = pydicom.dcmread(DATA_STORE / "MR2_UNCR.dcm")
    expected = stored_pixels(DATA_STORE / "MR2_UNCR.dcm").astype(np.float32) * np.float32(
        float(ds.RescaleSlope)
    ) + np.float32(float(ds.RescaleIntercept))
    np.testing.assert_allclose(mr.pixels, expected, rtol=1e-6)


def test_enhanced_multi_frame_reads_rescale_and_window_from_functional_groups() -> None:
    path = DATA_STORE / "eCT_Supplemental.dcm"
    frames = decode_frames(path)
    assert len(frames) == 2
    stored = stored_pixels(path)
    np.testing.assert_array_equal(frames[1].pixels, stored[1].astype(np.float32) - 1024.0)
    assert frames[0].window == Window(49.0, 102.0)


def test_colour_becomes_luminance() -> None:
    path = DATA_STORE / "SC_rgb.dcm"
    frame = decode_frames(path)[0]
    rgb = stored_pixels(path).astype(np.float32)
    assert frame.pixels.shape == rgb.shape[:2]
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(frame.pixels, expected, atol=1e-3)
    assert frame.window is None and not frame.monochrome1
    two = decode_frames(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm")
    assert len(two) == 2 and two[0].pixels.ndim == 2
    ybr = decode_frames(DATA_STORE / "SC_ybr_full_uncompressed.dcm")[0]
    assert np.abs(ybr.pixels - frame.pixels).max() < 4.0


def test_palette_colour_becomes_grey() -> None:
    frames = decode_frames(DATA_STORE / "OBXXXX1A_rle_2frame.dcm")
    assert len(frames) == 2
    assert frames[0].pixels.shape == (600, 800)
    assert frames[0].pixels.max() > frames[0].pixels.min()


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    src = PYDICOM_FILES / "MR_small.dcm"
    mono1 = _rewrite(src, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    m2 = decode_frames(src)[0]
    m1 = decode_frames(mono1)[0]
    assert m1.monochrome1 and not m2.monochrome1
    np.testing.assert_array_equal(m1.pixels, m2.pixels)  # decode keeps modality values
    prep = plain()
    np.testing.assert_allclose(preprocess(m1, prep), 1.0 - preprocess(m2, prep), atol=1e-6)
    np.testing.assert_array_equal(preprocess(m1, plain(invert_monochrome1=False)), preprocess(m2, prep))


def test_real_monochrome1_radiograph_shows_bone_bright() -> None:
    card = load_card(ENGINES / "cxr-demo")
    frame = decode_frames(DATA_STORE / "RG3_UNCR.dcm")[0]
    x = preprocess(frame, card.preprocessing)
    assert x.shape == (1, 256, 256) and x.dtype == np.float32
    # In MONOCHROME1 low stored values are white: after inversion the brightest input pixel must come from
    # (one of) the lowest stored values.
    flat = np.asarray(preprocess(frame, Preprocessing.model_validate({"resize": (1760, 1760)})))
    assert flat.reshape(-1)[np.argmin(frame.pixels)] == flat.max()


def test_padded_pixel_data_decodes_despite_pydicom_warning() -> None:
    # pydicom warns about the excess padding; under filterwarnings=error this would fail if not handled.
    frames = decode_frames(PYDICOM_FILES / "MR_small_padded.dcm")
    np.testing.assert_array_equal(frames[0].pixels, decode_frames(PYDICOM_FILES / "MR_small.dcm")[0].pixels)


def test_truncated_pixel_data_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"decoding pixel data \(Explicit VR Little Endian\): ValueError"):
        decode_frames(PYDICOM_FILES / "MR_truncated.dcm")


def test_file_cut_short_is_a_decode_error(tmp_path: Path) -> None:
    data = (DATA_STORE / "RG1_J2KR.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as info:
        decode_frames(cut)
    ds = pydicom.dcmread(DATA_STORE / "RG1_J2KR.dcm", stop_before_pixels=True)
    # The message names the step, never values from the file.
    values = [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.get("PatientName", ""))]
    assert not [v for v in values if v and v in str(info.value)]
    assert info.value.__cause__ is None


def test_corrupt_compressed_stream_is_a_decode_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small_jp2klossless.dcm")
    frame = bytearray(ds.PixelData)
    frame[100:] = b"\xff" * (len(frame) - 100)
    ds.PixelData = bytes(frame)
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(DecodeError, match="JPEG 2000"):
        decode_frames(tmp_path / "bad.dcm")


def test_not_dicom_missing_file_and_no_pixels_are_decode_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file\n")
    with pytest.raises(DecodeError, match="reading the file"):
        decode_frames(text)
    with pytest.raises(DecodeError, match="reading the file: FileNotFoundError"):
        decode_frames(tmp_path / "missing.dcm")
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_frames(PYDICOM_FILES / "rtplan.dcm")


def test_header_claiming_huge_pixel_data_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.NumberOfFrames = 200_000
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(DecodeError, match="refused"):
        decode_frames(tmp_path / "huge.dcm")


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
    path = PYDICOM_FILES / "CT_small.dcm"
    frame = decode_frames(path)[0]
    prep = plain(resize=(128, 128), rescale=False, window={"center": 1024.0, "width": 4096.0})
    expected = apply_window(stored_pixels(path).astype(np.float32), Window(1024.0, 4096.0))
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
