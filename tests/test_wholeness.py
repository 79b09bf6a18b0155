"""A dataset cut short (dicom/wholeness.py), judged against pydicom's own reading of where each top-level element
ends, on every DICOM file the tests have; and through a real receiver, where a dataset whose last fragment comes
too early is answered 0xC000 and stored nowhere, into a new file or over a kept slot."""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from edge_agent.dicom import wholeness
from edge_agent.dicom.header import dataset_offset
from tests.dicomfiles import CT_SMALL, DATA_STORE, PYDICOM_FILES, running_receiver
from tests.ul import RawPeer

DEFLATED = "1.2.840.10008.1.2.1.99"


def _datasets() -> tuple[list[tuple[str, bytes, bool, bool, set[int]]], list[str]]:
    """(name, dataset bytes, explicit, little, the offsets where pydicom sees a top-level element end) of the whole
    datasets, and the names of those whose last element pydicom finds shorter than its length says."""
    out, short = [], []
    for path in sorted([*PYDICOM_FILES.glob("*.dcm"), *DATA_STORE.glob("*.dcm")]):
        try:
            syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            if syntax == DEFLATED:
                continue  # the receiver checks a Deflated dataset by its deflate stream instead
            raw = path.read_bytes()
            body = raw[dataset_offset(raw[:65536]) :]
            explicit, little = syntax != "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"
            fp = BytesIO(body)
            ends, cut = set(), False
            for raw_element in data_element_generator(fp, not explicit, little):
                ends.add(fp.tell())
                value = raw_element.value
                cut |= raw_element.length != 0xFFFFFFFF and value is not None and len(value) < raw_element.length
        except Exception:  # files pydicom itself cannot walk are not this test's subject
            continue
        if cut:
            short.append(path.name)
        elif ends and max(ends) == len(body):
            out.append((path.name, body, explicit, little, ends))
    return out, short


DATASETS, CUT_SHORT = _datasets()


def _judge(body: bytes, size: int, explicit: bool, little: bool) -> bool:
    data = body[:size]
    return wholeness.cut_short(lambda pos, n: data[pos : pos + n], size, data[:1024], explicit=explicit,
                               little=little)


def test_every_whole_dataset_is_whole_and_the_truncated_files_are_not() -> None:
    assert len(DATASETS) >= 40
    for name, body, explicit, little, _ in DATASETS:
        assert not _judge(body, len(body), explicit, little), name
    assert "MR_truncated.dcm" in CUT_SHORT  # pydicom's own test file, its Pixel Data cut short
    for path in (p for p in [*PYDICOM_FILES.glob("*.dcm"), *DATA_STORE.glob("*.dcm")] if p.name in CUT_SHORT):
        raw = path.read_bytes()
        body = raw[dataset_offset(raw[:65536]) :]
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert _judge(body, len(body), syntax != "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"), path.name


def test_a_dataset_cut_inside_an_element_is_cut_short_and_at_an_element_s_end_is_not() -> None:
    rng = random.Random(9)
    judged = 0
    for name, body, explicit, little, ends in DATASETS:
        cuts = {len(body) - 1, len(body) - 2, len(body) - 100, *(rng.randrange(1, len(body)) for _ in range(25)),
                *(e for e in ends if e < len(body))}
        for cut in (c for c in cuts if c > 0):
            # A dataset that stops between two elements is whole as far as its bytes tell (its later elements
            # are simply absent); one that stops inside an element is cut short.
            assert _judge(body, cut, explicit, little) is (cut not in ends), (name, cut)
            judged += 1
    assert judged > 1000


def _ct() -> tuple[bytes, str, str]:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("into", ["a new file", "a kept slot"])
def test_a_dataset_whose_last_fragment_comes_too_early_is_refused_and_stored_nowhere(tmp_path: Path,
                                                                                     into: str) -> None:
    with running_receiver(tmp_path) as rx:
        peer = RawPeer(rx.port)
        peer.associate()
        data, sop_class, sop_instance = _ct()
        assert peer.store(data, sop_class, sop_instance) == 0x0000
        held = rx.spool_files()
        if into == "a kept slot":
            assert rx.spool._recycle(held[0])  # what a release does: the file becomes a slot to write over
            rx.receiver._loop.call_soon_threadsafe(rx.receiver._drop_spares)  # (files made ahead go first)
            held = []
        data, sop_class, sop_instance = _ct()
        for short in (10000, 1):  # inside Pixel Data; one byte short
            assert peer.store(data[: len(data) - short], sop_class, sop_instance) == 0xC000
        assert rx.spool_files() == held
        assert len(rx.stored.calls) == 1
        assert peer.store(data, sop_class, sop_instance) == 0x0000  # sent again whole: stored
        assert len(rx.spool_files()) == len(held) + 1
        assert rx.stored.wait_for(2)
        peer.release()
        peer.close()
