"""The ROC plot as a PNG a reader understands on its own: title, labelled axes, legend and caption.

Drawn with OpenCV (already a dependency for preprocessing) and written by ``edge_agent.png``: no plotting
library. The words come from ``RocText``, built from the report by the caller, so they can be checked
without looking at pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.png import encode_png

Image = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
BLACK: Colour = (0, 0, 0)
GRID: Colour = (228, 228, 228)
CHANCE: Colour = (150, 150, 150)
CURVE: Colour = (31, 119, 180)
OPERATING_POINT: Colour = (214, 39, 40)
FONT = cv2.FONT_HERSHEY_SIMPLEX
TITLE_SCALE = 0.6
TEXT_SCALE = 0.45
LINE_HEIGHT = 20


@dataclass(frozen=True, slots=True)
class RocText:
    """Every word on the ROC plot."""

    title: str
    curve: str  # legend entry of the curve, e.g. "ROC curve, AUC 0.689 (95% CI 0.652-0.725)"
    operating_point: tuple[str, ...] = ()  # legend entry of the red point, one line each
    caption: str = ""  # below the plot: what was measured on what, and how to read it
    x_label: str = "False positive rate (1 - specificity)"
    y_label: str = "True positive rate (sensitivity)"
    chance: str = "chance (AUC 0.5)"


def text_width(text: str, scale: float = TEXT_SCALE, thickness: int = 1) -> int:
    """Width in pixels of ``text`` in the plot's font."""
    (width, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    return int(width)


def wrap(text: str, width: int, scale: float = TEXT_SCALE) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (a longer single word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and text_width(candidate, scale) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def put_text(canvas: Image, text: str, x: int, y: int, scale: float = TEXT_SCALE, colour: Colour = BLACK,
             thickness: int = 1) -> None:
    """Draw ``text`` with its baseline's left end at (x, y)."""
    cv2.putText(canvas, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def _vertical_text(canvas: Image, text: str, x: int, y_centre: int) -> None:
    """``text`` written bottom to top, its left edge at x, centred on y_centre."""
    (width, height), baseline = cv2.getTextSize(text, FONT, TEXT_SCALE, 1)
    strip = np.full((height + baseline + 4, width + 4, 3), 255, dtype=np.uint8)
    put_text(strip, text, 2, height + 2)
    turned = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    top = max(0, y_centre - turned.shape[0] // 2)
    bottom = min(canvas.shape[0], top + turned.shape[0])
    canvas[top:bottom, x : x + turned.shape[1]] = turned[: bottom - top]


def _dashed(canvas: Image, p0: tuple[int, int], p1: tuple[int, int], colour: Colour, dash: int = 8) -> None:
    length = float(np.hypot(p1[0] - p0[0], p1[1] - p0[1]))
    steps = max(1, int(length // dash))
    for k in range(0, steps, 2):
        a, b = k / steps, min(k + 1, steps) / steps
        start = (round(p0[0] + a * (p1[0] - p0[0])), round(p0[1] + a * (p1[1] - p0[1])))
        end = (round(p0[0] + b * (p1[0] - p0[0])), round(p0[1] + b * (p1[1] - p0[1])))
        cv2.line(canvas, start, end, colour, 1, cv2.LINE_AA)


def roc_png(
    points: Sequence[tuple[float, float]],
    operating_point: tuple[float, float] | None = None,
    text: RocText | None = None,
    side: int = 440,
) -> bytes:
    """The ROC plot as PNG bytes: axes with ticks and labels, the chance diagonal, the curve, the operating
    point, a legend, the title above and the caption below."""
    return encode_png(roc_image(points, operating_point, text, side))


def roc_image(
    points: Sequence[tuple[float, float]],
    operating_point: tuple[float, float] | None = None,
    text: RocText | None = None,
    side: int = 440,
) -> Image:
    """``roc_png``'s picture as an RGB array."""
    words = text or RocText(title="ROC curve", curve="ROC curve")
    left, top, right = 80, 50, 40
    width = left + side + right
    caption = wrap(words.caption, width - 30) if words.caption else []
    height = top + side + 70 + LINE_HEIGHT * len(caption) + 10
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)

    def xy(fpr: float, tpr: float) -> tuple[int, int]:
        return round(left + fpr * side), round(top + (1.0 - tpr) * side)

    put_text(canvas, words.title, 15, 30, TITLE_SCALE, BLACK, 2)
    for t in np.linspace(0.0, 1.0, 11):  # a light grid every 0.1
        cv2.line(canvas, xy(t, 0.0), xy(t, 1.0), GRID, 1)
        cv2.line(canvas, xy(0.0, t), xy(1.0, t), GRID, 1)
    _dashed(canvas, xy(0.0, 0.0), xy(1.0, 1.0), CHANCE)
    cv2.rectangle(canvas, xy(0.0, 1.0), xy(1.0, 0.0), BLACK, 1)
    for t in np.linspace(0.0, 1.0, 6):  # ticks and their values every 0.2
        label = f"{t:.1f}"
        x, y = xy(t, 0.0)
        cv2.line(canvas, (x, y), (x, y + 5), BLACK, 1)
        put_text(canvas, label, x - text_width(label) // 2, y + 20)
        x, y = xy(0.0, t)
        cv2.line(canvas, (x - 5, y), (x, y), BLACK, 1)
        put_text(canvas, label, x - 10 - text_width(label), y + 5)
    put_text(canvas, words.x_label, left + (side - text_width(words.x_label)) // 2, top + side + 45)
    _vertical_text(canvas, words.y_label, 12, top + side // 2)
    curve = np.array([xy(f, t) for f, t in points], dtype=np.int32)
    if len(curve) >= 2:
        cv2.polylines(canvas, [curve.reshape(-1, 1, 2)], False, CURVE, 3, cv2.LINE_AA)
    if operating_point is not None:
        x, y = xy(*operating_point)
        cv2.rectangle(canvas, (x - 5, y - 5), (x + 5, y + 5), OPERATING_POINT, -1)
    _legend(canvas, words, operating_point is not None, xy(1.0, 0.0))
    for i, line in enumerate(caption):
        put_text(canvas, line, 15, top + side + 75 + i * LINE_HEIGHT)
    return canvas


def _legend(canvas: Image, words: RocText, has_point: bool, bottom_right: tuple[int, int]) -> None:
    """The legend in the plot's lower right corner, where a ROC curve seldom goes."""
    entries: list[tuple[str, str]] = [("curve", words.curve), ("chance", words.chance)]
    if has_point:
        entries += [("point" if i == 0 else "", line) for i, line in enumerate(words.operating_point)]
    inner = max(text_width(t) for _, t in entries) + 40
    x1, y1 = bottom_right[0] - 8, bottom_right[1] - 8
    x0, y0 = x1 - inner - 10, y1 - LINE_HEIGHT * len(entries) - 10
    cv2.rectangle(canvas, (x0, y0), (x1, y1), WHITE, -1)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), CHANCE, 1)
    for i, (kind, line) in enumerate(entries):
        base = y0 + 5 + LINE_HEIGHT * (i + 1) - 5
        mid = base - 5
        if kind == "curve":
            cv2.line(canvas, (x0 + 8, mid), (x0 + 36, mid), CURVE, 3, cv2.LINE_AA)
        elif kind == "chance":
            _dashed(canvas, (x0 + 8, mid), (x0 + 36, mid), CHANCE, dash=5)
        elif kind == "point":
            cv2.rectangle(canvas, (x0 + 17, mid - 5), (x0 + 27, mid + 5), OPERATING_POINT, -1)
        put_text(canvas, line, x0 + 44, base)

