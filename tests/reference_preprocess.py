"""The preprocessing of edge_agent before issue 9, frozen: the oracle the new code is measured against.

A copy of ``edge_agent/dicom/pixels.py`` as it was (decode to float32 modality units, card-driven
windowing, area averaging from cumulative sums, letterbox placement), kept unchanged so that
tests/test_preprocess_equivalence.py and bench/preprocess.py compare the new path with the old one
on the same files. Do not "fix" or speed it up: its value is that it is the old behaviour.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_rescale

from edge_agent.errors import DecodeError
from edge_agent.inference.card import ModelCard, Preprocessing, WindowSpec

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# A hostile or broken header can claim gigabytes of pixels; refuse before allocating them.
MAX_DECODED_BYTES = 2 * 1024**3

# ITU-R BT.601 luma: what a grey-scale model trained on converted colour images most likely saw.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# warnings.catch_warnings swaps process-global state and is not thread-safe before Python 3.14, and
# decoding runs in a thread pool. pydicom and the pylibjpeg decoders hold the GIL while they work
# (measured: two threads decode no faster than one), so serialising this part costs no throughput.
_PYDICOM_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI LUT window (PS3.3 C.11.2.1.2) in modality units."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: 2-D float32 pixels in modality units, plus how the instance says to show it."""

    pixels: FloatArray
    window: Window | None
    # MONOCHROME1: the lowest value is white. Inverted after windowing (preprocess), because the
    # instance's window is defined on the un-inverted modality values.
    monochrome1: bool
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    photometric: str = "MONOCHROME2"


def _ts_name(ds: Dataset) -> str:
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


def _item(ds: Dataset, groups: str, index: int | None, sequence: str) -> Dataset | None:
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


def _frame_attr(ds: Dataset, index: int, sequence: str) -> Dataset:
    """Where a frame's attribute lives: per-frame group, then shared group, then the top level.

    Enhanced multi-frame objects (PS3.3 C.7.6.16) keep Rescale and VOI in functional groups.
    """
    return (
        _item(ds, "PerFrameFunctionalGroupsSequence", index, sequence)
        or _item(ds, "SharedFunctionalGroupsSequence", None, sequence)
        or ds
    )


def _window(src: Dataset) -> Window | None:
    center = _first(src.get("WindowCenter"))
    width = _first(src.get("WindowWidth"))
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    function = str(src.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return Window(center, width, function)


def _expected_bytes(ds: Dataset) -> int:
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    # Decoded to float32 later, so count at least 4 bytes a sample.
    return rows * cols * frames * samples * max(bits // 8, 4)


def _read(path: Path) -> tuple[Dataset, np.ndarray[Any, Any], list[str]]:
    """dcmread + pixel decode, with pydicom's warnings captured instead of raised or printed."""
    step = "reading the file"
    with _PYDICOM_LOCK, warnings.catch_warnings(record=True) as caught:
        # pydicom warns about recoverable oddities (excess padding, wrong VR); the file still decodes.
        # Under a warnings-as-errors policy they would turn a readable image into a failure.
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise DecodeError("instance has no pixel data")
            step = f"decoding pixel data ({_ts_name(ds)})"
            if _expected_bytes(ds) > MAX_DECODED_BYTES:
                raise DecodeError(f"pixel data would need more than {MAX_DECODED_BYTES} bytes decoded; refused")
            arr = ds.pixel_array
        except DecodeError:
            raise
        except Exception as exc:
            # `from None`: pydicom's messages may quote element values (UIDs, names).
            raise DecodeError(f"{step}: {type(exc).__name__}") from None
    kinds = sorted({w.category.__name__ for w in caught})
    return ds, arr, kinds


def _frame_stack(arr: np.ndarray[Any, Any], ds: Dataset, frames: int) -> tuple[np.ndarray[Any, Any], str]:
    """The frames as [F, rows, cols] (grey) or [F, rows, cols, 3] (RGB), and the photometric interpretation."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
    if samples == 3:
        # pydicom already converted YBR_* to RGB (its default), so one luma formula fits all.
        return arr.reshape(frames, arr.shape[-3], arr.shape[-2], 3), photometric
    if samples != 1:
        raise DecodeError(f"{samples} samples per pixel is not supported")
    return arr.reshape(frames, arr.shape[-2], arr.shape[-1]), photometric


def decode_frames(path: Path) -> list[Frame]:
    """Decode every frame of a DICOM instance into grey float32 frames in modality units."""
    ds, arr, warned = _read(path)
    if warned:
        # Only the categories: the warning texts may quote element values.
        logger.debug("decode: pydicom warned (%s); decoded anyway", ", ".join(warned))
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if arr.size == 0 or arr.ndim < 2:
            raise DecodeError("pixel data is empty")
        stack, photometric = _frame_stack(arr, ds, frames)
        colour = photometric not in {"MONOCHROME1", "MONOCHROME2"}
        modality_lut = "ModalityLUTSequence" in ds and not colour
        out: list[Frame] = []
        for i in range(frames):
            slope, intercept = 1.0, 0.0
            if stack.ndim == 4:
                # Luma one frame at a time: a long colour cine as float32 all at once would be huge.
                pixels = np.asarray(stack[i].astype(np.float32) @ _LUMA, dtype=np.float32)
            elif modality_lut:
                # A non-linear Modality LUT (rare; mostly old XA/CR): let pydicom apply it as written.
                pixels = np.asarray(apply_rescale(stack[i], ds), dtype=np.float32)
            else:
                pixels = stack[i].astype(np.float32, copy=True)
                if not colour:
                    src = _frame_attr(ds, i, "PixelValueTransformationSequence")
                    slope = _first(src.get("RescaleSlope")) or 1.0
                    intercept = _first(src.get("RescaleIntercept")) or 0.0
                    if slope != 1.0 or intercept != 0.0:
                        pixels = pixels * np.float32(slope) + np.float32(intercept)
            window = None if colour else _window(_frame_attr(ds, i, "FrameVOILUTSequence"))
            if not np.isfinite(pixels).all():
                raise DecodeError("pixel data holds non-finite values")
            out.append(Frame(pixels, window, photometric == "MONOCHROME1", slope, intercept, photometric))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"converting pixel data ({_ts_name(ds)}): {type(exc).__name__}") from None
    return out


def apply_window(pixels: FloatArray, window: Window) -> FloatArray:
    """Map modality values to [0, 1] through a VOI window (PS3.3 C.11.2.1.2)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (pixels - c) / w))
    elif window.function == "LINEAR_EXACT" or w <= 1.0:
        out = (pixels - c) / w + 0.5
    else:
        out = (pixels - (c - 0.5)) / (w - 1.0) + 0.5
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _min_max(pixels: FloatArray) -> FloatArray:
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros_like(pixels, dtype=np.float32)
    return ((pixels - lo) / (hi - lo)).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> FloatArray:
    """[n_out, n_in] weights: area averaging when shrinking (no aliasing), linear when growing."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if n_out <= n_in:
        # Output pixel j covers input span [j*scale, (j+1)*scale); weight = overlap with each input pixel.
        for j in range(n_out):
            start, stop = j * scale, (j + 1) * scale
            first, last = int(np.floor(start)), min(int(np.ceil(stop)), n_in)
            for i in range(first, last):
                m[j, i] = min(stop, i + 1) - max(start, i)
    else:
        for j in range(n_out):
            x = min(max((j + 0.5) * scale - 0.5, 0.0), n_in - 1.0)
            i0 = int(np.floor(x))
            i1 = min(i0 + 1, n_in - 1)
            frac = x - i0
            m[j, i0] += 1.0 - frac
            m[j, i1] += frac
    m /= m.sum(axis=1, keepdims=True)
    out = m.astype(np.float32)
    out.setflags(write=False)
    return out


def _area_shrink(image: npt.NDArray[np.float64], n_out: int, axis: int) -> npt.NDArray[np.float64]:
    """Area-average one axis down to ``n_out`` in O(n) from cumulative sums.

    Gives the same weights as ``_resample_matrix`` (each output pixel is the mean over its span, partial
    input pixels weighted by overlap) without the dense matrix product, which costs O(n_in * n_out) per
    row: 11 ms for a 512x512 CT slice and ~60 ms for a 2k radiograph, against ~1 ms here.
    """
    x = np.moveaxis(image, axis, 0)
    n_in = x.shape[0]
    scale = n_in / n_out
    cs = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    edges[-1] = n_in
    whole = np.minimum(np.floor(edges).astype(np.int64), n_in)
    frac = (edges - whole)[:, None]
    tail = x[np.minimum(whole, n_in - 1)]
    c = cs[whole] + frac * tail  # the integral of the image from 0 up to each edge
    return np.moveaxis((c[1:] - c[:-1]) / scale, 0, axis)


def resize(image: FloatArray, height: int, width: int) -> FloatArray:
    """Resize a 2-D image: area averaging down (from cumulative sums), bilinear up (a small matrix product)."""
    h, w = image.shape
    if (h, w) == (height, width):
        return image.astype(np.float32, copy=False)
    out: npt.NDArray[np.float64] = image.astype(np.float64, copy=False)
    out = _area_shrink(out, height, 0) if height <= h else _resample_matrix(h, height).astype(np.float64) @ out
    out = _area_shrink(out, width, 1) if width <= w else out @ _resample_matrix(w, width).astype(np.float64).T
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the resized image sits inside the model input (letterbox), in input pixels."""

    top: int
    left: int
    height: int
    width: int


def placement(source_shape: tuple[int, int], prep: Preprocessing) -> Placement:
    """The region of the model input that holds the image, for a source of (rows, columns)."""
    out_h, out_w = prep.resize
    if not prep.keep_aspect:
        return Placement(0, 0, out_h, out_w)
    rows, cols = source_shape
    scale = min(out_h / rows, out_w / cols)
    h = max(1, min(out_h, round(rows * scale)))
    w = max(1, min(out_w, round(cols * scale)))
    return Placement((out_h - h) // 2, (out_w - w) // 2, h, w)


def preprocess(frame: Frame, prep: Preprocessing, channels: int = 1) -> FloatArray:
    """One frame -> the model's input [C, H, W] float32: window, invert, resize, normalise."""
    pixels = frame.pixels
    if not prep.rescale and (frame.rescale_slope != 1.0 or frame.rescale_intercept != 0.0):
        # The model was trained on stored values; the instance's window (modality units) then no longer fits.
        pixels = (pixels - np.float32(frame.rescale_intercept)) / np.float32(frame.rescale_slope)
    if isinstance(prep.window, WindowSpec):
        grey = apply_window(pixels, Window(prep.window.center, prep.window.width))
    elif frame.window is not None and prep.rescale:
        grey = apply_window(pixels, frame.window)
    else:
        grey = _min_max(pixels)
    if frame.monochrome1 and prep.invert_monochrome1:
        grey = 1.0 - grey
    place = placement((int(grey.shape[0]), int(grey.shape[1])), prep)
    out_h, out_w = prep.resize
    canvas = np.zeros((out_h, out_w), dtype=np.float32)
    canvas[place.top : place.top + place.height, place.left : place.left + place.width] = resize(
        grey, place.height, place.width
    )
    canvas = (canvas - np.float32(prep.normalise.mean)) / np.float32(prep.normalise.std)
    return np.ascontiguousarray(np.broadcast_to(canvas, (channels, out_h, out_w)), dtype=np.float32)


def load_instance(path: Path, card: ModelCard) -> list[FloatArray]:
    """Decode an instance and preprocess each of its frames for ``card``'s model."""
    return [x for x, _ in load_instance_shaped(path, card)]


def load_instance_shaped(path: Path, card: ModelCard) -> list[tuple[FloatArray, tuple[int, int]]]:
    """Like ``load_instance``, with each frame's source (rows, columns): a letterboxed model's heat-map box
    is given in fractions of the image, which needs the image's own shape (issue 8, defect 12)."""
    channels = card.input_shape[0]
    out = []
    for frame in decode_frames(path):
        rows, cols = frame.pixels.shape[:2]
        out.append((preprocess(frame, card.preprocessing, channels), (int(rows), int(cols))))
    return out
