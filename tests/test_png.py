"""The PNG writer: a file any PNG reader accepts (signature, CRCs, IHDR) with the pixels put in."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge_agent.png import encode_png, write_png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        i += 12 + n
    return out


@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 3)])
def test_round_trip(shape: tuple[int, ...], tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    chunks = _chunks((tmp_path / "x.png").read_bytes())
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (h, w, depth, colour) == (shape[0], shape[1], 8, 0 if len(shape) == 2 else 2)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(h, -1)
    assert (raw[:, 0] == 0).all()
    assert np.array_equal(raw[:, 1:].reshape(shape), image)
    assert not list(tmp_path.glob(".*.tmp"))


def test_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))
