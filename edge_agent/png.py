"""A minimal PNG writer (8-bit greyscale or RGB), so that heat maps and plots need no imaging library."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of a uint8 array shaped [H, W] (grey) or [H, W, 3] (RGB)."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    colour_type = 0 if image.ndim == 2 else 2
    rows = np.ascontiguousarray(image).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rows], axis=1).tobytes()  # filter 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    )


def write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(image))
    os.replace(tmp, path)
