"""Decoded frames -> model input tensors, exactly as a model card says: window, invert, resize, place, normalise.

Pure, CPU-bound functions: callers run them in the worker pool (``workers.py``).

Every step from stored value to model input is affine but one: Rescale Slope and Intercept, a LINEAR
VOI window, min-max scaling, the MONOCHROME1 inversion and the normalisation are affine, and area
averaging and bilinear interpolation commute with affine maps (their weights sum to 1). The step that
is not, the window's clip to [0, 1], equals a clip of the stored values to the two values the window
maps to 0 and 1. So the stored integers are clipped straight into float32 (the model's dtype), a strip
of rows at a time that the area average reads while it is still in cache, and the affine steps run on
the model-sized result. No full-size float copy of a shrinking frame is made. A SIGMOID window is
evaluated pixel by pixel instead.

Against the implementation before issue 9 (kept as ``tests/reference_preprocess.py``) the inputs agree
to float32 rounding; tests/test_preprocess_equivalence.py holds the bound and says why it is enough.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.dicom.pixels import Frame, Window, decode_frames
from edge_agent.inference.card import ModelCard, Preprocessing, WindowSpec
from edge_agent.workers import Slot

FloatArray = npt.NDArray[np.float32]

# The worker pool is the parallelism (one process per core); OpenCV's own thread pool on top of it
# would only oversubscribe the cores. Its per-image work is a millisecond or less, too short to split.
cv2.setNumThreads(1)


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


def _window_affine(window: Window) -> tuple[float, float]:
    """(a, b) with the window's output ``clip(a * x + b, 0, 1)`` for a modality value x (not SIGMOID)."""
    c, w = window.center, window.width
    if window.function == "LINEAR_EXACT" or w <= 1.0:
        return 1.0 / w, 0.5 - c / w
    return 1.0 / (w - 1.0), 0.5 - (c - 0.5) / (w - 1.0)


# ---- resizing ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _area_bands(n_in: int, n_out: int) -> tuple[tuple[int, int, FloatArray], ...]:
    """For each output pixel of an area-average shrink: (first, stop, weights) over the input pixels it covers.

    Output pixel j covers input span [j*scale, (j+1)*scale); each input pixel weighs its overlap with it.
    Every band is computed at once (0.4 ms for a 1955-row CR going to 256 rows, against 2.7 ms band by
    band), with the same float64 operations in the same order as one band at a time, so the weights are
    the same bits (tests/test_preprocess.py holds them to the band-by-band loop). A worker computes them
    once per (n_in, n_out): a new detector size pays this on its first image in each worker.
    """
    scale = n_in / n_out
    j = np.arange(n_out, dtype=np.float64)
    start = j * scale
    stop = np.minimum((j + 1.0) * scale, float(n_in))
    first = np.floor(start).astype(np.intp)
    last = np.minimum(np.ceil(stop).astype(np.intp), n_in)
    counts = last - first
    offsets = np.zeros(n_out, dtype=np.intp)
    np.cumsum(counts[:-1], out=offsets[1:])
    # The input pixel of each (band, member) pair, bands laid end to end.
    i = np.arange(int(counts.sum()), dtype=np.intp) - np.repeat(offsets - first, counts)
    overlap = np.minimum(np.repeat(stop, counts), i + 1.0) - np.maximum(np.repeat(start, counts), i)
    weights = (overlap / np.repeat(np.add.reduceat(overlap, offsets), counts)).astype(np.float32)
    weights.setflags(write=False)  # the views below share it, and the cache hands them out
    return tuple(zip(first.tolist(), last.tolist(), np.split(weights, offsets[1:]), strict=True))


# Output rows per strip when a shrink converts its source as it goes: the strip's float32 rows (about
# 2 MB for a 2k-wide radiograph) are still in cache when the dot products read them.
_STRIP_ROWS = 32


def _shrink_rows(image: npt.NDArray[Any], n_out: int, convert: _ToFloat32 | None = None) -> FloatArray:
    """Area-average axis 0 down to ``n_out`` rows: one small dot product per output row.

    Each output row mixes the ~scale input rows under it, read once, in order; for a 1955x1841 CR going to
    256 rows that takes 0.8 ms, against 4 ms for OpenCV's general (non-integer factor) INTER_AREA. With
    ``convert``, ``image`` holds stored values and is turned into float32 one strip of rows at a time, so the
    float32 frame is never made whole (measured: 1 ms less for that CR than converting it first).
    """
    bands = _area_bands(image.shape[0], n_out)
    out = np.empty((n_out, image.shape[1]), dtype=np.float32)
    if convert is None:
        for j, (first, stop, weights) in enumerate(bands):
            np.dot(weights, image[first:stop], out=out[j])
        return out
    rows = min(image.shape[0], int(np.ceil(_STRIP_ROWS * image.shape[0] / n_out)) + 2)
    buffer = np.empty((rows, image.shape[1]), dtype=np.float32)
    for j0 in range(0, n_out, _STRIP_ROWS):
        strip_bands = bands[j0 : j0 + _STRIP_ROWS]
        top, bottom = strip_bands[0][0], strip_bands[-1][1]
        strip = buffer[: bottom - top]
        convert(image[top:bottom], strip)
        for j, (first, stop, weights) in enumerate(strip_bands, start=j0):
            np.dot(weights, strip[first - top : stop - top], out=out[j])
    return out


def _resize_columns(image: FloatArray, width: int) -> FloatArray:
    """Axis 1 of a resize: area averaging down (as rows of the transpose), bilinear up."""
    if width < image.shape[1]:
        return np.asarray(cv2.transpose(_shrink_rows(np.asarray(cv2.transpose(image)), width)), dtype=np.float32)
    if width > image.shape[1]:
        size = (width, image.shape[0])
        return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    return image


def _whole_factors(shape: tuple[int, int], height: int, width: int) -> bool:
    return height <= shape[0] and width <= shape[1] and shape[0] % height == 0 and shape[1] % width == 0


def resize(image: FloatArray, height: int, width: int) -> FloatArray:
    """Resize a 2-D float32 image: area averaging down, bilinear (half-pixel centres) up, per axis."""
    h, w = image.shape
    if (h, w) == (height, width):
        return image.astype(np.float32, copy=False)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if _whole_factors((h, w), height, width):
        # Whole-number factors: OpenCV's INTER_AREA averages k x k blocks, exactly what area averaging is.
        return np.asarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), dtype=np.float32)
    if height < h:
        return _resize_columns(_shrink_rows(image, height), width)
    if height > h:
        image = np.asarray(cv2.resize(image, (w, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    return _resize_columns(image, width)


# ---- one frame -> one model input ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tone:
    """grey = clip(a * x + b, 0, 1) for a stored value x. The x outside [lo, hi] are clipped (a window), or
    there are none (min-max: lo and hi are the frame's extremes)."""

    a: float
    b: float
    lo: float
    hi: float
    clipped: bool


def _window_for(frame: Frame, prep: Preprocessing) -> Window | None:
    """The card's fixed window, else the instance's own (in modality units, so only with rescale), else None."""
    if isinstance(prep.window, WindowSpec):
        return Window(prep.window.center, prep.window.width)
    return frame.window if prep.rescale else None


# Depths cv2.minMaxLoc takes as they are; others (uint32, 64-bit integers) go to numpy.
_MIN_MAX_DTYPES = frozenset(np.dtype(t) for t in ("u1", "i1", "u2", "i2", "i4", "f4", "f8"))


def _extremes(stored: npt.NDArray[Any]) -> tuple[float, float]:
    """The smallest and largest stored value, in one pass (numpy's min and max take two)."""
    if stored.dtype in _MIN_MAX_DTYPES:
        lo, hi, _, _ = cv2.minMaxLoc(stored)
        return float(lo), float(hi)
    return float(stored.min()), float(stored.max())


def _tone(frame: Frame, prep: Preprocessing, extremes: tuple[float, float]) -> _Tone | None:
    """The frame's stored values -> grey in [0, 1], or None when that map is not a clipped affine one (SIGMOID).

    ``extremes``: the frame's smallest and largest stored value.
    """
    # The window applies to modality units, slope * stored + intercept, or to the stored values themselves
    # when the model was trained on those (rescale: false).
    slope, intercept = (frame.rescale_slope, frame.rescale_intercept) if prep.rescale else (1.0, 0.0)
    window = _window_for(frame, prep)
    if window is None:
        lo, hi = extremes
        if hi <= lo:
            return _Tone(0.0, 0.0, lo, hi, clipped=False)
        # Min-max in modality units: the stored extremes map to 0 and 1, swapped by a negative slope.
        a = (1.0 if slope > 0 else -1.0) / (hi - lo)
        return _Tone(a, -lo * a if slope > 0 else hi / (hi - lo), lo, hi, clipped=False)
    if window.function == "SIGMOID":
        return None
    wa, wb = _window_affine(window)
    a, b = wa * slope, wa * intercept + wb
    if a == 0.0:
        return _Tone(0.0, b, 0.0, 0.0, clipped=False)
    lo, hi = sorted((-b / a, (1.0 - b) / a))
    # A window that holds every value clips nothing, and the full-size pass is then a plain conversion.
    return _Tone(a, b, lo, hi, clipped=not lo <= extremes[0] <= extremes[1] <= hi)


# float32 keeps 24 bits: averaging values far from 0 that span a narrow range (a 10-unit window at stored
# 60000) would keep only a few bits of the window, so such values are shifted down to start at 0 first.
_SHIFT_ABOVE_SPANS = 256.0


@dataclass(frozen=True, slots=True)
class _ToFloat32:
    """Stored values -> float32, clipped to [lo, hi] (when ``clipped``) and less ``offset``."""

    lo: np.float32
    hi: np.float32
    clipped: bool
    offset: np.float32

    @classmethod
    def for_tone(cls, tone: _Tone) -> _ToFloat32:
        lo, hi = np.float32(tone.lo), np.float32(tone.hi)
        shift = max(abs(tone.lo), abs(tone.hi)) > _SHIFT_ABOVE_SPANS * (tone.hi - tone.lo)
        return cls(lo, hi, tone.clipped, lo if shift else np.float32(0.0))

    def __call__(self, stored: npt.NDArray[Any], out: FloatArray) -> None:
        if self.offset:
            np.subtract(stored, self.offset, out=out, dtype=np.float32)
            if self.clipped:
                np.clip(out, self.lo - self.offset, self.hi - self.offset, out=out)
        elif self.clipped:
            np.clip(stored, self.lo, self.hi, out=out)  # one pass, integers in and float32 out
        else:
            out[...] = stored  # the same pass, twice as fast as a clip


def _resize_stored(stored: npt.NDArray[Any], convert: _ToFloat32, height: int, width: int) -> FloatArray:
    """``resize`` of the frame as ``convert`` makes it float32; a shrink converts a strip of rows at a time."""
    if height < stored.shape[0] and not _whole_factors(stored.shape, height, width):
        return _resize_columns(_shrink_rows(stored, height, convert), width)
    full = np.empty(stored.shape, dtype=np.float32)
    convert(stored, full)
    return resize(full, height, width)


def _grey_per_pixel(frame: Frame, prep: Preprocessing) -> FloatArray:
    """The grey image the slow way, pixel by pixel, for a window that is not piecewise affine (SIGMOID)."""
    window = _window_for(frame, prep)
    assert window is not None
    return apply_window(frame.modality() if prep.rescale else frame.stored.astype(np.float32), window)


def _grey(frame: Frame, prep: Preprocessing, height: int, width: int) -> npt.NDArray[np.float64]:
    """The frame windowed to [0, 1] (and inverted, for MONOCHROME1) at ``height`` x ``width``."""
    tone = _tone(frame, prep, _extremes(frame.stored))
    grey: npt.NDArray[np.float64]
    if tone is None:
        grey = resize(_grey_per_pixel(frame, prep), height, width).astype(np.float64)
    elif tone.a == 0.0:
        grey = np.full((height, width), tone.b, dtype=np.float64)
    else:
        convert = _ToFloat32.for_tone(tone)
        # The affine part on the model-sized image, and in float64, where a * x + b loses no digits.
        grey = _resize_stored(frame.stored, convert, height, width).astype(np.float64)
        grey *= tone.a
        grey += tone.a * float(convert.offset) + tone.b
    np.clip(grey, 0.0, 1.0, out=grey)  # also what float rounding put a hair outside the window
    if frame.monochrome1 and prep.invert_monochrome1:
        np.subtract(1.0, grey, out=grey)
    return grey


def display_grey(frame: Frame, prep: Preprocessing, height: int, width: int) -> npt.NDArray[np.float64]:
    """The frame's grey values as the model saw them (window, inversion) but not placed in the model's input:
    the whole frame resized to ``height`` x ``width`` (the caller keeps its aspect ratio), in [0, 1]."""
    return _grey(frame, prep, height, width)


def preprocess(frame: Frame, prep: Preprocessing, channels: int = 1) -> FloatArray:
    """One frame -> the model's input [C, H, W] float32: window, invert, resize, place, normalise."""
    place = placement(frame.shape, prep)
    grey = _grey(frame, prep, place.height, place.width)
    out_h, out_w = prep.resize
    out = np.empty((channels, out_h, out_w), dtype=np.float32)
    mean, std = np.float32(prep.normalise.mean), np.float32(prep.normalise.std)
    if (place.height, place.width) != (out_h, out_w):
        out[0] = (np.float32(0.0) - mean) / std  # the letterbox is black before normalisation
    region = out[0, place.top : place.top + place.height, place.left : place.left + place.width]
    np.subtract(grey, mean, out=region, casting="same_kind")
    region /= std
    out[1:] = out[0]
    return out


@dataclass(frozen=True, slots=True)
class Prepared:
    """One frame as the model's input, with the facts input-drift monitoring compares (issue 10)."""

    tensor: FloatArray
    # The frame's (rows, columns): a letterboxed model's heat-map box is given in fractions of the image, which
    # needs the image's own shape (issue 8, defect 12).
    source_shape: tuple[int, int]
    # Mean and standard deviation of the input's image region (the letterbox left out), in normalised units.
    input_mean: float
    input_std: float
    pixel_spacing_mm: float | None
    manufacturer: str


def prepare(frame: Frame, prep: Preprocessing, channels: int = 1) -> Prepared:
    """``preprocess`` and the input statistics of its result."""
    tensor = preprocess(frame, prep, channels)
    place = placement(frame.shape, prep)
    region = tensor[0, place.top : place.top + place.height, place.left : place.left + place.width]
    mean, std = cv2.meanStdDev(region)
    return Prepared(
        tensor, frame.shape, float(mean[0, 0]), float(std[0, 0]), frame.pixel_spacing_mm, frame.manufacturer
    )


def load_instance_prepared(path: Path, card: ModelCard) -> list[Prepared]:
    """Decode an instance and prepare each of its frames for ``card``'s model (what a worker runs)."""
    channels = card.input_shape[0]
    return [prepare(frame, card.preprocessing, channels) for frame in decode_frames(path)]


def load_instance_prepared_into(path: Path, card: ModelCard, slot: Slot | None) -> tuple[list[Prepared], bool]:
    """``load_instance_prepared``, with the first frame's input written into ``slot`` (what a worker runs).

    The second value says whether it was: then that frame's ``tensor`` is an empty array, and the caller reads
    the input from the slot (``Arena.read``).
    """
    prepared = load_instance_prepared(path, card)
    if slot is None or not prepared or not slot.write(prepared[0].tensor):
        return prepared, False
    prepared[0] = dataclasses.replace(prepared[0], tensor=_EMPTY)
    return prepared, True


_EMPTY: FloatArray = np.empty(0, np.float32)


# The synthetic image a worker warms up on: the size class of a digital radiograph's detector (a 43 cm
# square at 0.2 mm is 2150 pixels), 16 bits. A CT slice (512 x 512) fits in the memory it leaves faulted in.
WARM_UP_SHAPE = (2048, 2048)


def warm_up(models: Sequence[tuple[Preprocessing, int]]) -> None:
    """Prepare a synthetic image twice for each (preprocessing, channels): what a worker runs as it starts.

    A new worker's first two large images are slow: their allocations fault fresh memory in (about 3400 and
    2500 pages for the 1955x1841 CR), after which freed memory is reused. Measured on that CR in fresh
    processes (``bench/preprocess.py``): first call 14.9 ms, second 9.9 ms, then 4.2 ms; after this warm-up
    5.9 ms and 4.0 ms. The file's bytes, which decoding reads into one buffer, are a buffer of the same size
    here, written as a read writes it. This is also the first use of OpenCV's and numpy's paths in the
    process.
    """
    rows, cols = WARM_UP_SHAPE
    for _ in range(2):
        for prep, channels in models:
            stored = np.empty((rows, cols), np.uint16)
            stored[:] = np.arange(cols, dtype=np.uint16) % 4096  # a ramp: an auto window has a range to map
            prepare(Frame(stored, None, False), prep, channels)
            del stored


def load_instance(path: Path, card: ModelCard) -> list[FloatArray]:
    """Decode an instance and preprocess each of its frames for ``card``'s model."""
    channels = card.input_shape[0]
    return [preprocess(frame, card.preprocessing, channels) for frame in decode_frames(path)]
