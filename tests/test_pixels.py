"""Decoding on real DICOM files from the pydicom, pydicom-data and pynetdicom wheels (preprocessing for a model
is tests/test_preprocess.py)."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pydicom
import pydicom.data
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edge_agent.dicom.pixels import Frame, Window, decode_frames
from edge_agent.errors import DecodeError

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
DATA_STORE = Path(data_store.__file__).parent / "data"
PYNETDICOM_FILES = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"


def stored_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_cr_lossless_jpeg2000_decodes_equal_to_uncompressed() -> None:
    raw = decode_frames(DATA_STORE / "RG1_UNCR.dcm")
    j2k = decode_frames(DATA_STORE / "RG1_J2KR.dcm")
    assert len(raw) == len(j2k) == 1
    assert raw[0].shape == (1955, 1841)
    assert raw[0].stored.dtype == np.uint16  # as stored; preprocessing makes the float32 the model wants
    np.testing.assert_array_equal(raw[0].stored, j2k[0].stored)
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
        assert a.stored.shape == (64, 64)
        np.testing.assert_array_equal(a.stored, b.stored)
    # Each frame is its own slice, not one frame repeated.
    assert not np.array_equal(ref[0].stored, ref[5].stored)


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
    np.testing.assert_array_equal(ref.stored, got.stored)
    assert got.window == Window(600.0, 1600.0)


def test_jpeg_lossless_equals_uncompressed() -> None:
    ref = decode_frames(DATA_STORE / "SC_rgb.dcm")[0]
    got = decode_frames(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm")[0]  # JPEG Lossless, SV1
    np.testing.assert_array_equal(ref.stored, got.stored)
    assert decode_frames(DATA_STORE / "JPEG-LL.dcm")[0].stored.shape == (1024, 256)


def test_deflated_and_jpeg_baseline_decode() -> None:
    deflated = decode_frames(PYNETDICOM_FILES / "SCImageStorage_Deflated.dcm")
    assert deflated[0].stored.shape == (512, 512)
    # JPEG baseline (YBR_FULL) against the same file decompressed by dcmtk's dcmdjpeg.
    jpeg = decode_frames(PYDICOM_FILES / "SC_rgb_dcmtk_+eb+cy+n1.dcm")[0]
    rgb = decode_frames(DATA_STORE / "SC_rgb_dcmtk_ebcyn1_dcmd.dcm")[0]
    assert np.abs(jpeg.stored - rgb.stored).max() < 8.0


def test_rescale_slope_and_intercept_give_modality_units() -> None:
    path = PYDICOM_FILES / "CT_small.dcm"
    frame = decode_frames(path)[0]
    np.testing.assert_array_equal(frame.stored, stored_pixels(path))
    np.testing.assert_array_equal(frame.modality(), stored_pixels(path).astype(np.float32) - 1024.0)
    assert (frame.rescale_slope, frame.rescale_intercept) == (1.0, -1024.0)
    mr = decode_frames(DATA_STORE / "MR2_UNCR.dcm")[0]
    ds = pydicom.dcmread(DATA_STORE / "MR2_UNCR.dcm")
    expected = stored_pixels(DATA_STORE / "MR2_UNCR.dcm").astype(np.float32) * np.float32(
        float(ds.RescaleSlope)
    ) + np.float32(float(ds.RescaleIntercept))
    np.testing.assert_allclose(mr.modality(), expected, rtol=1e-6)


def test_enhanced_multi_frame_reads_rescale_and_window_from_functional_groups() -> None:
    path = DATA_STORE / "eCT_Supplemental.dcm"
    frames = decode_frames(path)
    assert len(frames) == 2
    stored = stored_pixels(path)
    np.testing.assert_array_equal(frames[1].modality(), stored[1].astype(np.float32) - 1024.0)
    assert frames[0].window == Window(49.0, 102.0)


def test_colour_becomes_luminance() -> None:
    path = DATA_STORE / "SC_rgb.dcm"
    frame = decode_frames(path)[0]
    rgb = stored_pixels(path).astype(np.float32)
    assert frame.stored.shape == rgb.shape[:2]
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(frame.stored, expected, atol=1e-3)
    assert frame.window is None and not frame.monochrome1
    two = decode_frames(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm")
    assert len(two) == 2 and two[0].stored.ndim == 2
    ybr = decode_frames(DATA_STORE / "SC_ybr_full_uncompressed.dcm")[0]
    assert np.abs(ybr.stored - frame.stored).max() < 4.0


def test_palette_colour_becomes_grey() -> None:
    frames = decode_frames(DATA_STORE / "OBXXXX1A_rle_2frame.dcm")
    assert len(frames) == 2
    assert frames[0].stored.shape == (600, 800)
    assert frames[0].stored.max() > frames[0].stored.min()


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_padded_pixel_data_decodes_despite_pydicom_warning() -> None:
    # pydicom warns about the excess padding; under filterwarnings=error this would fail if not handled.
    frames = decode_frames(PYDICOM_FILES / "MR_small_padded.dcm")
    np.testing.assert_array_equal(frames[0].stored, decode_frames(PYDICOM_FILES / "MR_small.dcm")[0].stored)


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




NATIVE = [
    PYDICOM_FILES / "CT_small.dcm",  # signed 16
    PYDICOM_FILES / "MR_small_implicit.dcm",  # Implicit VR
    PYDICOM_FILES / "image_dfl.dcm",  # Deflated, 8-bit
    DATA_STORE / "RG1_UNCR.dcm",  # 15 of 16 bits, MONOCHROME1
    DATA_STORE / "693_UNCR.dcm",  # signed, 14 of 16 bits
    DATA_STORE / "emri_small.dcm",  # multi-frame, 12 of 16 bits
    DATA_STORE / "eCT_Supplemental.dcm",  # enhanced multi-frame
]


@pytest.mark.parametrize("path", NATIVE, ids=lambda p: p.name)
def test_native_pixel_data_is_a_read_only_view_equal_to_pydicom(path: Path) -> None:
    frames = decode_frames(path)
    expected = stored_pixels(path).reshape(len(frames), *frames[0].shape)
    for frame, want in zip(frames, expected, strict=True):
        assert frame.stored.dtype == want.dtype
        np.testing.assert_array_equal(frame.stored, want)
        # No copy of the pixel data: the frame reads the bytes dcmread read.
        assert not frame.stored.flags.writeable and frame.stored.base is not None


def _with_samples(tmp_path: Path, samples: np.ndarray, *, bits_stored: int, signed: bool, **changes: object) -> Path:
    """MR_small with ``samples`` (16-bit, raw bit patterns) as its pixel data."""
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.Rows, ds.Columns = samples.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = samples.astype("<u2").tobytes()
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "samples.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bits_above_bits_stored_are_cleared_or_sign_extended_as_pydicom_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1 << 12, (7, 5), dtype=np.uint16)
    # Unsigned 12-bit samples with junk in the 4 unused bits (PS3.5 8.1.1 gives them no meaning).
    junk = _with_samples(tmp_path, values | np.uint16(0xA000), bits_stored=12, signed=False)
    np.testing.assert_array_equal(decode_frames(junk)[0].stored, values)
    np.testing.assert_array_equal(decode_frames(junk)[0].stored, stored_pixels(junk))
    # Signed 12-bit samples written without sign extension: 0x0FFF is -1.
    signed = values.astype(np.int16) - 2048
    raw = signed.view(np.uint16) & np.uint16(0x0FFF)
    path = _with_samples(tmp_path, raw, bits_stored=12, signed=True)
    np.testing.assert_array_equal(decode_frames(path)[0].stored, signed)
    np.testing.assert_array_equal(decode_frames(path)[0].stored, stored_pixels(path))
    # Already sign-extended: the view is kept as it is.
    clean = _with_samples(tmp_path, signed.view(np.uint16), bits_stored=12, signed=True)
    frame = decode_frames(clean)[0]
    np.testing.assert_array_equal(frame.stored, signed)
    assert not frame.stored.flags.writeable


def test_rescale_that_overflows_float32_is_a_decode_error(tmp_path: Path) -> None:
    path = _with_samples(tmp_path, np.full((4, 4), 60000, np.uint16), bits_stored=16, signed=False,
                         RescaleSlope="1e36", RescaleIntercept="0")
    with pytest.raises(DecodeError, match="non-finite"):
        decode_frames(path)


def test_modality_applies_slope_and_intercept() -> None:
    frame = Frame(np.array([[0, 10], [20, 30]], np.int16), None, False, rescale_slope=0.5, rescale_intercept=-3.0)
    np.testing.assert_array_equal(frame.modality(), [[-3.0, 2.0], [7.0, 12.0]])
    assert frame.modality().dtype == np.float32 and frame.shape == (2, 2)
