"""DICOM pixel data -> 2-D frames of stored values, with what the instance says about showing them.

``decode_frames`` reads one instance and returns each frame as the file holds it, plus the
attributes that turn stored values into something to look at: Rescale Slope and Intercept (the
Modality LUT), the VOI window, MONOCHROME1. It knows nothing of models; ``inference/preprocess.py``
turns a frame into a model's input as the model card says.

Uncompressed little-endian grey-scale data is not copied: a frame is a read-only view on the pixel
data bytes that ``dcmread`` read (pydicom's ``pixel_array`` would copy it and rewrite every sample
to clear the unused high bits, which took 10 ms of the 15 ms it spent on a 1955x1841 CR); the bits
are corrected here only when a sample actually uses them. Such a file is not even parsed by pydicom when its
header is plain (``_fast_read``): ``dcmread`` and the attribute look-ups took 0.8 ms of the 1.0 ms a 512x512 CT
slice took to decode, on every routed instance, and ``fastheader.locate`` finds the pixel data and the fifteen
attributes that describe it in a tenth of that. Anything it does not read exactly as pydicom would (functional
groups, a Modality LUT, a character set or value it does not know) goes to pydicom instead;
tests/test_pixels_fast.py holds the two paths equal on every DICOM file the tests have and on generated
headers. Everything else goes through pydicom.

No message raised or logged here carries a value read from the file: a DecodeError names the step
that failed, the exception type, and the transfer syntax, never a UID or a name.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_rescale
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edge_agent.dicom import fastheader
from edge_agent.dicom.header import dataset_offset, stored_end
from edge_agent.dicom.quiet import kinds, pydicom_warnings
from edge_agent.errors import DecodeError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# A hostile or broken header can claim gigabytes of pixels; refuse before allocating them.
MAX_DECODED_BYTES = 2 * 1024**3

# ITU-R BT.601 luma: what a grey-scale model trained on converted colour images most likely saw.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# Native encodings whose Pixel Data bytes are the samples, little-endian (PS3.5 8.1.1, A.1-A.3; a
# Deflated dataset is inflated by dcmread).
_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
# (Bits Allocated, Pixel Representation) -> the samples' dtype.
_NATIVE_DTYPES: dict[tuple[int, int], np.dtype[Any]] = {
    (8, 0): np.dtype("u1"),
    (8, 1): np.dtype("i1"),
    (16, 0): np.dtype("<u2"),
    (16, 1): np.dtype("<i2"),
}


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI LUT window (PS3.3 C.11.2.1.2) in modality units."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: 2-D stored values, plus how the instance says to map and show them.

    ``stored`` is an integer array as the file holds the samples (often a read-only view on the file's
    bytes), or float32 where decoding had to compute the values: the luma of a colour frame, a
    non-linear Modality LUT applied, float pixel data. Modality units are
    ``stored * rescale_slope + rescale_intercept`` (``modality()``).
    """

    stored: npt.NDArray[Any]
    window: Window | None
    # MONOCHROME1: the lowest value is white. Inverted after windowing (preprocess), because the
    # instance's window is defined on the un-inverted modality values.
    monochrome1: bool
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    photometric: str = "MONOCHROME2"
    # Acquisition facts that input-drift monitoring follows (issue 10); device attributes, never patient data.
    pixel_spacing_mm: float | None = None  # Pixel Spacing's row spacing, else Imager Pixel Spacing's
    manufacturer: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return int(self.stored.shape[0]), int(self.stored.shape[1])

    def modality(self) -> FloatArray:
        """The frame in modality units (Rescale Slope and Intercept applied), as a new float32 array."""
        out = self.stored.astype(np.float32)
        if self.rescale_slope != 1.0 or self.rescale_intercept != 0.0:
            out *= np.float32(self.rescale_slope)
            out += np.float32(self.rescale_intercept)
        return out


def _ts_name(ds: Dataset | _Attributes) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(getattr(uid, "name", "unknown transfer syntax"))


def _first(value: Any) -> float | None:
    """The first value of a possibly multi-valued numeric element, or None."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        return None
    try:
        seq = list(value) if isinstance(value, Sequence) else [value]
        return float(seq[0]) if seq else None
    except (TypeError, ValueError, IndexError):
        return None


def _item(ds: Dataset | _Attributes, groups: str, index: int | None, sequence: str) -> Dataset | None:
    """Item 0 of ``sequence`` inside a functional group (per-frame ``index``, or the shared one)."""
    seq = ds.get(groups)
    if not seq:
        return None
    if index is not None:
        if index >= len(seq):
            return None
        seq_item = seq[index]
    else:
        seq_item = seq[0]
    inner = seq_item.get(sequence)
    return inner[0] if inner else None


def _frame_attr(ds: Dataset | _Attributes, index: int, sequence: str) -> Dataset | _Attributes:
    """Where a frame's attribute lives: per-frame group, then shared group, then the top level.

    Enhanced multi-frame objects (PS3.3 C.7.6.16) keep Rescale and VOI in functional groups.
    """
    return (
        _item(ds, "PerFrameFunctionalGroupsSequence", index, sequence)
        or _item(ds, "SharedFunctionalGroupsSequence", None, sequence)
        or ds
    )


def _window(src: Dataset | _Attributes) -> Window | None:
    center = _first(src.get("WindowCenter"))
    width = _first(src.get("WindowWidth"))
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    function = str(src.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return Window(center, width, function)


def _spacing_mm(src: Dataset | _Attributes, ds: Dataset | _Attributes) -> float | None:
    """The row spacing in mm: Pixel Spacing (0028,0030) where it applies, else Imager Pixel Spacing (0018,1164)."""
    for value in (src.get("PixelSpacing"), ds.get("ImagerPixelSpacing")):
        spacing = _first(value)
        if spacing is not None and np.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def _int_attr(ds: Dataset | _Attributes, keyword: str, default: int) -> int:
    return int(ds.get(keyword, default) or default)


def _expected_bytes(ds: Dataset | _Attributes) -> int:
    rows = _int_attr(ds, "Rows", 0)
    cols = _int_attr(ds, "Columns", 0)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    bits = _int_attr(ds, "BitsAllocated", 8)
    # Preprocessing converts to float32, so count at least 4 bytes a sample.
    return rows * cols * frames * samples * max(bits // 8, 4)


def _native_samples(ds: Dataset | _Attributes, data: Any) -> np.ndarray[Any, Any] | None:
    """Grey-scale native pixel data as a read-only [frames, rows, cols] view on ``data`` (the Pixel Data bytes), or
    None when the encoding is not one read here (pydicom then decodes it)."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if uid not in _NATIVE_LITTLE_ENDIAN or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return None
    if _int_attr(ds, "SamplesPerPixel", 1) != 1 or data is None:
        return None
    allocated, stored = _int_attr(ds, "BitsAllocated", 0), _int_attr(ds, "BitsStored", 0)
    dtype = _NATIVE_DTYPES.get((allocated, _int_attr(ds, "PixelRepresentation", 0)))
    rows, cols, frames = _int_attr(ds, "Rows", 0), _int_attr(ds, "Columns", 0), _int_attr(ds, "NumberOfFrames", 1)
    count = rows * cols * frames
    if dtype is None or not 0 < stored <= allocated or count <= 0 or not isinstance(data, bytes | memoryview):
        return None
    if len(data) < count * dtype.itemsize:
        return None  # pydicom names the shortfall
    arr: np.ndarray[Any, Any] = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, cols)
    if stored < allocated:
        # PS3.5 8.1.1: the bits above Bits Stored carry no defined value. Most writers leave them clear (or
        # sign-extended), and then the samples are already right; otherwise shift them out as pydicom does.
        shift = allocated - stored
        if dtype.kind == "u":
            wrong = int(arr.max()) >= 1 << stored
        else:
            wrong = int(arr.min()) < -(1 << (stored - 1)) or int(arr.max()) >= 1 << (stored - 1)
        if wrong:
            arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


# -- the fast path: a plain native grey-scale file, read without pydicom ----------------------------------

_PIXEL_DATA = 0x7FE00010
# keyword -> (tag, VR) of what decoding reads from a file with no functional groups.
_FAST_ELEMENTS: dict[str, tuple[int, bytes]] = {
    "SpecificCharacterSet": (0x00080005, b"CS"),
    "Manufacturer": (0x00080070, b"LO"),
    "ImagerPixelSpacing": (0x00181164, b"DS"),
    "SamplesPerPixel": (0x00280002, b"US"),
    "PhotometricInterpretation": (0x00280004, b"CS"),
    "NumberOfFrames": (0x00280008, b"IS"),
    "Rows": (0x00280010, b"US"),
    "Columns": (0x00280011, b"US"),
    "PixelSpacing": (0x00280030, b"DS"),
    "BitsAllocated": (0x00280100, b"US"),
    "BitsStored": (0x00280101, b"US"),
    "PixelRepresentation": (0x00280103, b"US"),
    "WindowCenter": (0x00281050, b"DS"),
    "WindowWidth": (0x00281051, b"DS"),
    "RescaleIntercept": (0x00281052, b"DS"),
    "RescaleSlope": (0x00281053, b"DS"),
    "VOILUTFunction": (0x00281056, b"CS"),
}
# Present at all, these send the file to pydicom: a Modality LUT, functional groups, float pixel data.
_FAST_REFUSED = frozenset({0x00283000, 0x52009229, 0x52009230, 0x7FE00008, 0x7FE00009})
_FAST_WANTED = frozenset({tag for tag, _ in _FAST_ELEMENTS.values()} | _FAST_REFUSED | {_PIXEL_DATA})
_FAST_SYNTAXES: dict[str, bool] = {str(ImplicitVRLittleEndian): False, str(ExplicitVRLittleEndian): True}
_TRANSFER_SYNTAX = frozenset({0x00020010})
# One DS or IS value as pydicom reads it without a warning (PS3.5 6.2: at most 16 and 12 characters).
_DS_VALUE = re.compile(rb" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS_VALUE = re.compile(rb" *[+-]?[0-9]+ *")


class _Slow(Exception):
    """The file needs pydicom."""


@dataclass(frozen=True, slots=True)
class _FileMeta:
    TransferSyntaxUID: UID  # pydicom's keyword: _ts_name and _native_samples read it so


class _Attributes:
    """What decoding reads of a dataset, as pydicom's ``Dataset.get`` gives it, from ``_fast_read``."""

    def __init__(self, values: dict[str, Any], syntax: str) -> None:
        self._values = values
        self.file_meta = _FileMeta(UID(syntax))

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values


def _numbers(raw: bytes, pattern: re.Pattern[bytes], most: int, kind: type) -> Any:
    """A DS or IS value as pydicom's ``get`` gives it: None when empty, a number, or a list of them."""
    if not raw.strip(b" "):
        return None
    parts = raw.split(b"\\")
    if any(not pattern.fullmatch(p) or len(p.strip(b" ")) > most for p in parts):
        raise _Slow
    values = [kind(p) for p in parts]
    if kind is float and not all(math.isfinite(v) for v in values):
        raise _Slow
    return values[0] if len(values) == 1 else values


def _fast_value(vr: bytes, raw: bytes, encoding: str) -> Any:
    if vr == b"US":
        if len(raw) != 2:
            raise _Slow
        return int.from_bytes(raw, "little")
    if vr == b"DS":
        return _numbers(raw, _DS_VALUE, 16, float)
    if vr == b"IS":
        return _numbers(raw, _IS_VALUE, 12, int)
    try:
        text = raw.decode(encoding if vr == b"LO" else "ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        raise _Slow from None
    if "\\" in text or "\0" in text:
        raise _Slow  # multi-valued, or a NUL inside: pydicom's own reading rules
    return text


def _fast_read(path: Path) -> tuple[_Attributes, np.ndarray[Any, Any]] | None:
    """A native, Little Endian, grey-scale file's attributes and pixels, or None when pydicom must read it."""
    try:
        with open(path, "rb") as f:
            # The File Meta first: a compressed or Big Endian file, which pydicom reads, is not read whole here too.
            head = f.read(65536)
            try:
                start = dataset_offset(head)
            except DecodeError:
                return None
            # The File Meta group alone (Explicit VR whatever the dataset's syntax).
            meta = fastheader.locate(head[:start], True, _TRANSFER_SYNTAX, 0x0002FFFF, whole=True, start=132)
            if meta is None or 0x00020010 not in meta:
                return None
            pos, length, _ = meta[0x00020010]
            syntax = head[pos : pos + length].decode("latin-1").rstrip("\0 ")
            explicit = _FAST_SYNTAXES.get(syntax)
            if explicit is None:
                return None
            f.seek(0)
            end = stored_end(head)  # a file written over a slot: padding follows its instance
            buf = f.read() if end is None else f.read(end)
    except OSError:
        return None  # pydicom names the failure
    found = fastheader.locate(buf, explicit, _FAST_WANTED, _PIXEL_DATA, whole=True, start=start)
    if found is None or _PIXEL_DATA not in found or not _FAST_REFUSED.isdisjoint(found):
        return None
    charset = found.get(0x00080005)
    encoding = fastheader.encoding_of(b"" if charset is None else buf[charset[0] : charset[0] + charset[1]])
    if encoding is None:
        return None
    values: dict[str, Any] = {}
    try:
        for keyword, (tag, vr) in _FAST_ELEMENTS.items():
            if tag not in found:
                continue
            pos, length, stated = found[tag]
            if length == fastheader.UNDEFINED or (stated is not None and stated != vr):
                return None
            values[keyword] = _fast_value(vr, buf[pos : pos + length], encoding)
    except _Slow:
        return None
    pos, length, stated = found[_PIXEL_DATA]
    if length == fastheader.UNDEFINED or (stated is not None and stated not in (b"OB", b"OW")):
        return None
    attributes = _Attributes(values, syntax)
    if _expected_bytes(attributes) > MAX_DECODED_BYTES:
        return None  # pydicom's path refuses it, in its words
    arr = _native_samples(attributes, memoryview(buf)[pos : pos + length])
    return None if arr is None else (attributes, arr)


def _read(path: Path) -> tuple[Dataset, np.ndarray[Any, Any], list[str]]:
    """dcmread + pixel decode, with pydicom's warnings captured instead of raised or printed."""
    step = "reading the file"
    with pydicom_warnings() as caught:
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise DecodeError("instance has no pixel data")
            step = f"decoding pixel data ({_ts_name(ds)})"
            if _expected_bytes(ds) > MAX_DECODED_BYTES:
                raise DecodeError(f"pixel data would need more than {MAX_DECODED_BYTES} bytes decoded; refused")
            arr = _native_samples(ds, ds.get("PixelData"))
            if arr is None:
                arr = ds.pixel_array
        except DecodeError:
            raise
        except Exception as exc:
            # `from None`: pydicom's messages may quote element values (UIDs, names).
            raise DecodeError(f"{step}: {type(exc).__name__}") from None
    return ds, arr, kinds(caught)


def _frame_stack(arr: np.ndarray[Any, Any], ds: Dataset | _Attributes, frames: int) -> tuple[np.ndarray[Any, Any], str]:
    """The frames as [F, rows, cols] (grey) or [F, rows, cols, 3] (RGB), and the photometric interpretation."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if photometric == "PALETTE COLOR":
        assert isinstance(ds, Dataset)  # the fast path reads grey-scale files only
        arr = apply_color_lut(arr, ds)
        samples = 3
    if samples == 3:
        # pydicom already converted YBR_* to RGB (its default), so one luma formula fits all.
        return arr.reshape(frames, arr.shape[-3], arr.shape[-2], 3), photometric
    if samples != 1:
        raise DecodeError(f"{samples} samples per pixel is not supported")
    return arr.reshape(frames, arr.shape[-2], arr.shape[-1]), photometric


def _finite_in_modality_units(stored: np.ndarray[Any, Any], slope: float, intercept: float) -> bool:
    """Whether every sample stays finite in float32 once Rescale Slope and Intercept are applied."""
    if stored.dtype.kind == "f":
        values = stored if slope == 1.0 and intercept == 0.0 else stored.astype(np.float32) * np.float32(slope)
        return bool(np.isfinite(values).all() and np.isfinite(np.float32(intercept)))
    # Integers: only the extremes can overflow, and the dtype's bounds are checked before the data's.
    limit = float(np.finfo(np.float32).max)
    info = np.iinfo(stored.dtype)
    if abs(slope) * max(abs(int(info.min)), int(info.max)) + abs(intercept) < limit:
        return True
    extremes = np.array([stored.min(), stored.max()], dtype=np.float64)
    return bool(np.all(np.abs(extremes * slope + intercept) < limit))


def decode_frames(path: Path, *, fast_path: bool = True) -> list[Frame]:
    """Decode every frame of a DICOM instance into grey frames of stored values (see ``Frame``).

    ``fast_path=False`` reads every file with pydicom: the reference the fast path is held equal to.
    """
    fast = _fast_read(path) if fast_path else None
    ds: Dataset | _Attributes
    warned: list[str] = []
    if fast is not None:
        ds, arr = fast
    else:
        ds, arr, warned = _read(path)
    if warned:
        # Only the categories: the warning texts may quote element values.
        logger.debug("decode: pydicom warned (%s); decoded anyway", ", ".join(warned))
    try:
        frames = _int_attr(ds, "NumberOfFrames", 1)
        if frames < 1:
            raise DecodeError("Number of Frames is below 1")
        if arr.size == 0 or arr.ndim < 2:
            raise DecodeError("pixel data is empty")
        stack, photometric = _frame_stack(arr, ds, frames)
        colour = photometric not in {"MONOCHROME1", "MONOCHROME2"}
        modality_lut = "ModalityLUTSequence" in ds and not colour
        manufacturer = " ".join(str(ds.get("Manufacturer", "") or "").split())
        out: list[Frame] = []
        for i in range(frames):
            slope, intercept = 1.0, 0.0
            if stack.ndim == 4:
                # Luma one frame at a time: a long colour cine as float32 all at once would be huge.
                stored = np.asarray(stack[i].astype(np.float32) @ _LUMA, dtype=np.float32)
            elif modality_lut:
                # A non-linear Modality LUT (rare; mostly old XA/CR): let pydicom apply it as written.
                assert isinstance(ds, Dataset)  # the fast path refuses a Modality LUT
                stored = np.asarray(apply_rescale(stack[i], ds), dtype=np.float32)
            else:
                stored = stack[i] if stack.dtype.kind in "iu" else stack[i].astype(np.float32, copy=False)
                if not colour:
                    src = _frame_attr(ds, i, "PixelValueTransformationSequence")
                    slope = _first(src.get("RescaleSlope")) or 1.0
                    intercept = _first(src.get("RescaleIntercept")) or 0.0
            window = None if colour else _window(_frame_attr(ds, i, "FrameVOILUTSequence"))
            finite = np.isfinite(slope) and np.isfinite(intercept)
            if not (finite and _finite_in_modality_units(stored, slope, intercept)):
                raise DecodeError("pixel data holds non-finite values")
            spacing = _spacing_mm(_frame_attr(ds, i, "PixelMeasuresSequence"), ds)
            monochrome1 = photometric == "MONOCHROME1"
            out.append(Frame(stored, window, monochrome1, slope, intercept, photometric, spacing, manufacturer))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"converting pixel data ({_ts_name(ds)}): {type(exc).__name__}") from None
    return out
