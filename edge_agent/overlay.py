"""The heat map over the image it was computed on, in the image's own geometry, for a person to look at.

The bare heat map (``<finding id>.png``) is in the model's input geometry: letterboxed or stretched to the
input size, with no anatomy. The overlay (``<finding id>.overlay.png``) undoes that placement: the image is
decoded again from the spool, windowed and inverted as the model saw it, kept at its own aspect ratio, and
the part of the heat map that covered the image (``preprocess.placement``) is stretched back onto it. The
hottest region's box is drawn as the finding gives it, and every overlay is stamped "NOT FOR DIAGNOSTIC USE".

CPU work (a decode and two resizes): the pipeline runs ``write_overlay`` in its worker pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.dicom.pixels import decode_frames
from edge_agent.errors import DecodeError
from edge_agent.inference.card import Preprocessing
from edge_agent.inference.preprocess import display_grey, placement, resize
from edge_agent.png import write_png

STAMP = "NOT FOR DIAGNOSTIC USE"
# The overlay's long side: large enough to see anatomy and read the stamp, small enough to fetch quickly.
MAX_SIDE = 1024
MIN_SIDE = 512
# How much of the heat map's colour shows over the image at the map's peak (1.0); none at 0.
MAX_ALPHA = 0.6
FONT = cv2.FONT_HERSHEY_SIMPLEX
STAMP_BAND_RGB = (180, 0, 0)
BOX_RGB = (255, 255, 255)

Image = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class OverlayText:
    """The words under the picture: which model said what (no patient data)."""

    model: str
    label: str
    score: float
    threshold: float

    def lines(self) -> list[str]:
        return [
            f"{self.model}: {self.label} score {self.score:.3f} (threshold {self.threshold:g})",
            "colour: the model's heat map (blue low, red high); box: its hottest region",
        ]


def display_size(shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the overlay for an image of ``shape``: its aspect ratio, long side within the limits."""
    rows, cols = shape
    longest = max(rows, cols)
    scale = min(MAX_SIDE / longest, max(1.0, MIN_SIDE / longest))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def heat_on_image(
    heatmap: npt.NDArray[np.float32], prep: Preprocessing, source_shape: tuple[int, int], size: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """The heat map in the image's own geometry at ``size``: the part that lay over the image in the model
    input (the letterbox cut off), stretched back to the image's aspect ratio. Values in [0, 1]."""
    in_h, in_w = prep.resize
    full = cv2.resize(np.asarray(heatmap, dtype=np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    place = placement(source_shape, prep)
    region = np.ascontiguousarray(
        full[place.top : place.top + place.height, place.left : place.left + place.width], dtype=np.float32
    )
    return np.clip(resize(region, size[0], size[1]), 0.0, 1.0)


def blend(grey: npt.NDArray[np.float64], heat: npt.NDArray[np.float32]) -> Image:
    """RGB: the grey image, coloured by the heat map (JET colours), more where the map is hotter."""
    grey8 = np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)
    base = np.repeat(grey8[:, :, None], 3, axis=2).astype(np.float32)
    colour_bgr = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = (MAX_ALPHA * heat)[:, :, None]
    return np.round(base * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _fit_scale(text: str, width: int, height: int) -> float:
    """The largest font scale (at most 1.2) at which ``text`` fits ``width`` x ``height`` pixels."""
    (w, h), base = cv2.getTextSize(text, FONT, 1.0, 2)
    return max(0.3, min(1.2, width / max(w, 1), height / max(h + base, 1)))


def _band(width: int, lines: list[str], rgb: tuple[int, int, int], line_height: int, thickness: int) -> Image:
    band = np.zeros((line_height * len(lines) + 8, width, 3), dtype=np.uint8)
    band[:] = rgb
    for i, line in enumerate(lines):
        scale = _fit_scale(line, width - 16, line_height - 6)
        (w, h), _ = cv2.getTextSize(line, FONT, scale, thickness)
        x = max(8, (width - w) // 2)
        y = 4 + i * line_height + (line_height + h) // 2
        cv2.putText(band, line, (x, y), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return band


def stamp(picture: Image, text: OverlayText | None) -> Image:
    """The picture with the "NOT FOR DIAGNOSTIC USE" band above it and the words (if any) below it."""
    width = picture.shape[1]
    line_height = max(18, min(40, width // 24))
    parts = [_band(width, [STAMP], STAMP_BAND_RGB, line_height + 8, 2), picture]
    if text is not None:
        parts.append(_band(width, text.lines(), (0, 0, 0), line_height, 1))
    return np.concatenate(parts, axis=0)


def draw_box(picture: Image, box: tuple[float, float, float, float] | None) -> None:
    """The finding's box (fractions of the image: x0, y0, x1, y1) on the picture."""
    if box is None:
        return
    h, w = picture.shape[:2]
    x0, y0, x1, y1 = box
    thickness = max(1, min(h, w) // 300)
    top_left = (round(x0 * (w - 1)), round(y0 * (h - 1)))
    bottom_right = (round(x1 * (w - 1)), round(y1 * (h - 1)))
    cv2.rectangle(picture, top_left, bottom_right, BOX_RGB, thickness, cv2.LINE_AA)


def render_overlay(
    source: Path,
    frame_index: int,
    prep: Preprocessing,
    heatmap: npt.NDArray[np.float32],
    box: tuple[float, float, float, float] | None,
    text: OverlayText | None,
) -> Image:
    """The overlay of ``heatmap`` on frame ``frame_index`` of the DICOM file ``source``, as RGB."""
    frames = decode_frames(source)
    if not 0 <= frame_index < len(frames):
        raise DecodeError(f"the instance has {len(frames)} frame(s); frame {frame_index} is not one of them")
    frame = frames[frame_index]
    size = display_size(frame.shape)
    picture = blend(display_grey(frame, prep, *size), heat_on_image(heatmap, prep, frame.shape, size))
    draw_box(picture, box)
    return stamp(picture, text)


def write_overlay(
    path: Path,
    source: Path,
    frame_index: int,
    prep: Preprocessing,
    heatmap: npt.NDArray[np.float32],
    box: tuple[float, float, float, float] | None,
    text: OverlayText | None,
) -> None:
    """Render the overlay and write it as a PNG at ``path`` (atomically). Runs in a worker process."""
    picture = render_overlay(source, frame_index, prep, heatmap, box, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, picture)
