"""Decoding's fast path (dicom/pixels.py, ``_fast_read``) against pydicom's, on real files and generated headers.

The fast path is an optimisation, never a second opinion: wherever it decodes a file, the frames must equal
what the pydicom path makes of the same file, bit for bit, attribute for attribute; where it cannot be sure,
it must leave the file to pydicom.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.dicom import pixels
from edge_agent.dicom.dimse import file_meta
from edge_agent.dicom.pixels import decode_frames
from edge_agent.errors import DecodeError
from tests.dicomfiles import DATA_STORE, PYDICOM_FILES, PYNETDICOM_FILES

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def outcome(path: Path, *, fast_path: bool) -> tuple[str, Any]:
    """What decoding makes of a file: its frames, every field of each, or the DecodeError's words."""
    try:
        frames = decode_frames(path, fast_path=fast_path)
    except DecodeError as exc:
        return "error", str(exc)
    return "frames", [
        (f.stored.dtype.str, f.stored.shape, f.stored.tobytes(), f.window, f.monochrome1, f.rescale_slope,
         f.rescale_intercept, f.photometric, f.pixel_spacing_mm, f.manufacturer)
        for f in frames
    ]


def check_agrees(path: Path) -> bool:
    """Assert the two paths agree on ``path``; True when the fast path read it."""
    read_fast = pixels._fast_read(path) is not None
    if read_fast:
        assert outcome(path, fast_path=True) == outcome(path, fast_path=False), path.name
    return read_fast


def test_the_fast_path_agrees_with_pydicom_on_every_file() -> None:
    files = sorted([*PYDICOM_FILES.glob("*.dcm"), *DATA_STORE.glob("*.dcm"), *PYNETDICOM_FILES.glob("*.dcm")])
    fast = {path.name for path in files if check_agrees(path)}
    # The files the daemon sees most, native CT, MR and CR, Explicit and Implicit VR, take it.
    assert {"CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "693_UNCI.dcm", "RG1_UNCR.dcm", "RG1_UNCI.dcm",
            "MR2_UNCR.dcm", "emri_small.dcm"} <= fast
    # Compressed, Big Endian, Deflated, colour and enhanced files do not.
    assert not fast & {"693_J2KI.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm",
                       "SC_rgb_jpeg_dcmtk.dcm", "RG1_J2KR.dcm"}


# -- generated files ---------------------------------------------------------------------------------------


def element(tag: int, vr: bytes, value: bytes, explicit: bool) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if not explicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def sequence_undefined(tag: int, explicit: bool, items: int) -> bytes:
    """A sequence of undefined length holding ``items`` items of undefined length, each with one element."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    head += (b"SQ\0\0" if explicit else b"") + struct.pack("<I", 0xFFFFFFFF)
    body = b""
    for _ in range(items):
        body += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        body += element(0x00081150, b"UI", CT_STORAGE.encode() + b"\0", explicit)
        body += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return head + body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def part10(elements: dict[int, tuple[bytes, bytes]], syntax: str, *, extra: bytes = b"") -> bytes:
    """A Part 10 file: File Meta as the receiver writes it, then the elements in tag order (``extra`` is raw
    bytes placed among them by its own first tag)."""
    explicit = syntax == EXPLICIT
    body = b""
    extra_tag = struct.unpack_from("<HH", extra) if extra else None
    extra_at = (extra_tag[0] << 16 | extra_tag[1]) if extra_tag else None
    for tag in sorted(elements):
        if extra_at is not None and extra_at < tag:
            body, extra_at = body + extra, None
        vr, value = elements[tag]
        body += element(tag, vr, value, explicit)
    if extra_at is not None:
        body += extra
    return file_meta(CT_STORAGE, "1.2.3.4", syntax, "MODALITY", "EDGE") + body


def plain_elements(rows: int = 4, cols: int = 3, frames: int = 1, bits: int = 16,
                   signed: bool = False, pixels_bytes: bytes | None = None) -> dict[int, tuple[bytes, bytes]]:
    count = rows * cols * frames * (bits // 8)
    data = pixels_bytes if pixels_bytes is not None else bytes(range(256)) * (count // 256 + 1)
    data = data[:count]
    if len(data) % 2:
        data += b"\0"
    return {
        0x00080016: (b"UI", CT_STORAGE.encode() + b"\0"),
        0x00080018: (b"UI", b"1.2.3.4\0"),
        0x00080060: (b"CS", b"CT"),
        0x00280002: (b"US", struct.pack("<H", 1)),
        0x00280004: (b"CS", b"MONOCHROME2 "),
        0x00280010: (b"US", struct.pack("<H", rows)),
        0x00280011: (b"US", struct.pack("<H", cols)),
        0x00280100: (b"US", struct.pack("<H", bits)),
        0x00280101: (b"US", struct.pack("<H", bits)),
        0x00280103: (b"US", struct.pack("<H", int(signed))),
        0x7FE00010: (b"OW" if bits == 16 else b"OB", data),
    }


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_plain_files_take_the_fast_path_and_agree(tmp_path: Path, syntax: str) -> None:
    cases = {
        "plain": (plain_elements(), b""),
        "12 bits stored, high bits set": ({**plain_elements(pixels_bytes=b"\xff\xff" * 12),
                                           0x00280101: (b"US", struct.pack("<H", 12))}, b""),
        "signed 8-bit, 3 frames": ({**plain_elements(frames=3, bits=8, signed=True),
                                    0x00280008: (b"IS", b"3 ")}, b""),
        "an undefined-length sequence before the pixels": (plain_elements(),
                                                          sequence_undefined(0x00081140, syntax == EXPLICIT, 2)),
        "window, rescale, spacing, Latin-1 manufacturer": ({
            **plain_elements(),
            0x00080005: (b"CS", b"ISO_IR 100"),
            0x00080070: (b"LO", b" Ac\xe9  me "),
            0x00280030: (b"DS", b"0.5\\0.6 "),
            0x00281050: (b"DS", b"40\\400 "),
            0x00281051: (b"DS", b"350 \\1500"),
            0x00281052: (b"DS", b"-1024 "),
            0x00281053: (b"DS", b"1.5 "),
            0x00281056: (b"CS", b"LINEAR_EXACT"),
        }, b""),
    }
    for name, (elements, extra) in cases.items():
        path = tmp_path / "x.dcm"
        path.write_bytes(part10(elements, syntax, extra=extra))
        assert check_agrees(path), name


@pytest.mark.parametrize("tag", [0x00283000, 0x52009229, 0x52009230])
def test_a_modality_lut_or_functional_groups_go_to_pydicom(tmp_path: Path, tag: int) -> None:
    for syntax in (EXPLICIT, IMPLICIT):
        path = tmp_path / "x.dcm"
        path.write_bytes(part10(plain_elements(), syntax, extra=sequence_undefined(tag, syntax == EXPLICIT, 1)))
        assert pixels._fast_read(path) is None
        # The same file without it takes the fast path: the sequence alone sent it to pydicom.
        path.write_bytes(part10(plain_elements(), syntax))
        assert pixels._fast_read(path) is not None


def test_a_truncated_or_encapsulated_pixel_data_goes_to_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    whole = part10(plain_elements(), EXPLICIT)
    path.write_bytes(whole[:-4])
    assert pixels._fast_read(path) is None
    assert outcome(path, fast_path=True) == outcome(path, fast_path=False)
    encapsulated = plain_elements()
    del encapsulated[0x7FE00010]
    fragments = (struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFFF)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd"
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    path.write_bytes(part10(encapsulated, EXPLICIT, extra=fragments))
    assert pixels._fast_read(path) is None


# Values a modality might write, and some it should not: each path must read them alike, or the fast one refuse.
NUMBERS = [b"1", b"1.5 ", b" -1024", b"1e3 ", b"+2.5", b".5", b"5.", b"0 ", b"-0", b"", b"  ", b"nan ", b"inf ",
           b"1e999", b"40\\400 ", b"1\\", b"\\2", b"abc ", b"1,5 ", b"1_0 ", b"1.5\0", b"00000000000000001",
           b"1.000000000000001", b"0.0\\0.0 ", b"3 ", b"2.0 ", b" 2", b"-3"]
TEXT = [b"MONOCHROME2 ", b"MONOCHROME1 ", b"monochrome2", b" MONOCHROME2", b"RGB ", b"", b"MONOCHROME2\\X ",
        b"LINEAR ", b"SIGMOID ", b"LINEAR_EXACT", b"sigmoid", b"MONOCHROME2\0", b"MONO\0CHROME2"]
MAKERS = [b"ACME ", b"  Ac  me ", b"\xe9t\xe9 ", b"A\\B ", b"X\0", b"\xc3\xa9t\xc3\xa9", b"", b"\xff\xfe"]
CHARSETS = [b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 6 ", b"GB18030 ", b"", b"\\ISO 2022 IR 100"]


# The subsets a well-behaved modality writes: half the generated files draw from these alone.
PLAIN_NUMBERS = [b"1", b"1.5 ", b" -1024", b"1e3 ", b"+2.5", b".5", b"5.", b"0 ", b"-0", b"", b"40\\400 ",
                 b"0.0\\0.0 ", b"3 ", b"2.0 ", b" 2", b"-3", b"1.000000000000001"]
PLAIN_PHOTOMETRIC = [b"MONOCHROME2 ", b"MONOCHROME1 ", b"monochrome2", b" MONOCHROME2"]
PLAIN_FUNCTIONS = [b"LINEAR ", b"SIGMOID ", b"LINEAR_EXACT", b"sigmoid", b""]
PLAIN_MAKERS = [b"ACME ", b"  Ac  me ", b"\xe9t\xe9 ", b""]
PLAIN_CHARSETS = [b"ISO_IR 100", b"ISO_IR 6 ", b""]


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, str]:
    hostile = draw(st.booleans())
    syntax = draw(st.sampled_from([EXPLICIT, IMPLICIT]))
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    frames = draw(st.integers(1, 3))
    bits = draw(st.sampled_from([8, 16]))
    elements = plain_elements(rows, cols, frames, bits, draw(st.booleans()),
                              pixels_bytes=draw(st.binary(min_size=rows * cols * frames * bits // 8,
                                                          max_size=rows * cols * frames * bits // 8)))
    stored = [bits, 12, 10, 7, 0, 17] if hostile else [bits, 7] if bits == 8 else [bits, 12, 10]
    elements[0x00280101] = (b"US", struct.pack("<H", draw(st.sampled_from(stored))))
    elements[0x00280004] = (b"CS", draw(st.sampled_from(TEXT if hostile else PLAIN_PHOTOMETRIC)))
    numbers = st.sampled_from(NUMBERS if hostile else PLAIN_NUMBERS)
    frame_count = [str(frames).encode() + b" "]
    optional = {
        0x00280008: (b"IS", st.sampled_from(frame_count + NUMBERS if hostile else frame_count)),
        0x00080005: (b"CS", st.sampled_from(CHARSETS if hostile else PLAIN_CHARSETS)),
        0x00080070: (b"LO", st.sampled_from(MAKERS if hostile else PLAIN_MAKERS)),
        0x00181164: (b"DS", numbers),
        0x00280030: (b"DS", numbers),
        0x00281050: (b"DS", numbers),
        0x00281051: (b"DS", numbers),
        0x00281052: (b"DS", numbers),
        0x00281053: (b"DS", numbers),
        0x00281056: (b"CS", st.sampled_from(TEXT if hostile else PLAIN_FUNCTIONS)),
        0x00280002: (b"US", st.sampled_from([struct.pack("<H", 1), struct.pack("<H", 3), b"", b"\1\0\1\0"]
                                            if hostile else [struct.pack("<H", 1)])),
    }
    for tag, (vr, values) in optional.items():
        if draw(st.booleans()):
            value = draw(values)
            elements[tag] = (vr, value + b" " if len(value) % 2 else value)
    if hostile and draw(st.booleans()):  # a stated VR that is not the dictionary's
        tag = draw(st.sampled_from(sorted(elements)))
        elements[tag] = (b"UN", elements[tag][1])
    extra = sequence_undefined(0x00081140, syntax == EXPLICIT, draw(st.integers(0, 2))) if draw(st.booleans()) else b""
    return part10(elements, syntax, extra=extra), syntax


FAST_GENERATED: list[str] = []


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers())
def test_generated_headers_read_alike_or_go_to_pydicom(tmp_path_factory: pytest.TempPathFactory,
                                                        case: tuple[bytes, str]) -> None:
    data, _ = case
    path = tmp_path_factory.mktemp("gen") / "x.dcm"
    path.write_bytes(data)
    if check_agrees(path):
        FAST_GENERATED.append(path.name)


def test_generated_headers_took_the_fast_path_often(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The generated files are not all refused (which would leave the comparison above with nothing to compare)."""
    if not FAST_GENERATED:  # run alone
        test_generated_headers_read_alike_or_go_to_pydicom(tmp_path_factory=tmp_path_factory)
    assert len(FAST_GENERATED) >= 75  # a quarter of them


def test_the_fast_path_holds_no_copy_of_the_pixels() -> None:
    [frame] = decode_frames(DATA_STORE / "693_UNCR.dcm")
    assert pixels._fast_read(DATA_STORE / "693_UNCR.dcm") is not None
    assert not frame.stored.flags.writeable and not frame.stored.flags.owndata  # a view on the file's bytes


def test_a_negative_frame_count_is_refused_alike(tmp_path: Path) -> None:
    """Number of Frames -3 parses as an integer; the fast path must leave it to pydicom's error, not raise its own."""
    path = tmp_path / "x.dcm"
    path.write_bytes(part10({**plain_elements(frames=3), 0x00280008: (b"IS", b"-3")}, EXPLICIT))
    assert outcome(path, fast_path=True) == outcome(path, fast_path=False)
    assert outcome(path, fast_path=True)[0] == "error"


MUTATED = {name: part10({**plain_elements(rows=6, cols=5), 0x00280008: (b"IS", b"1 "),
                         0x00281050: (b"DS", b"40\\400 "), 0x00281051: (b"DS", b"350 "),
                         0x00281053: (b"DS", b"1.5 ")}, syntax)
           for name, syntax in (("explicit", EXPLICIT), ("implicit", IMPLICIT))}


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(MUTATED)), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                  min_size=1, max_size=4))
def test_a_damaged_header_decodes_alike_or_fails_with_a_decode_error(
        tmp_path_factory: pytest.TempPathFactory, name: str, flips: list[tuple[int, int]]) -> None:
    """Bytes of the dataset's header overwritten (a hostile or broken sender): whichever path reads the file,
    decoding ends in frames or a DecodeError, never another exception, and the fast path agrees with pydicom."""
    data = bytearray(MUTATED[name])
    start = data.index(b"\x08\x00\x16\x00")  # the dataset's first element, after the File Meta
    header = len(data) - 6 * 5 * 2 - 12  # up to the Pixel Data element
    for where, value in flips:
        data[start + where % (header - start)] = value
    path = tmp_path_factory.mktemp("damaged") / "x.dcm"
    path.write_bytes(bytes(data))
    check_agrees(path)  # raises (and fails) on anything but frames or a DecodeError
