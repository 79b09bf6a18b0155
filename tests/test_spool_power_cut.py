"""The spool's slots, adoption and the orphan sweep across power cuts, clock jumps and idle hours.

A power cut's state is made by hand, as tests/test_e2e_power_cut.py does: the writes and renames that no fsync
covered are dropped (or undone), the journal rows committed without an fsync are never written.
"""

from __future__ import annotations

import os
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from edge_agent.dicom import digest
from edge_agent.dicom import spool as spool_module
from edge_agent.dicom.header import dataset_offset
from edge_agent.dicom.spool import Spool, ToPlace, read_mark
from edge_agent.housekeeping import ORPHAN_MIN_AGE_SECONDS
from tests.dicomfiles import CT_SMALL
from tests.test_housekeeping import Box, age

DAY_SECONDS = 86_400.0
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _placed(spool: Spool, data: bytes) -> tuple[str, int]:
    """An instance received as the receiver does it: ``(spool name, the capacity of the file it was given)``."""
    path, fd, capacity = spool.open_incoming()
    try:
        os.write(fd, data)
        content = digest.finish(digest.hasher(data[dataset_offset(data):]))
        [name] = spool.place([ToPlace(path, fd, content, len(data), capacity, EXPLICIT_LE)])
    finally:
        os.close(fd)
    return name, capacity


def _instance(body: bytes) -> bytes:
    return bytes(128) + b"DICM" + body


def _ct(window_center: int) -> bytes:
    """CT_small.dcm with its own Window Center: the same SOP instance, another content."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.WindowCenter = window_center
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_slot_whose_zeroing_a_power_cut_lost_carries_nothing_into_the_next_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    secret = b"PATIENT-A^SECRET-MRN-123456;"
    name_a, _ = _placed(spool, _instance(secret * 2000))
    # The release zeroes the instance's bytes in the page cache only, after the file left instances/: a power
    # cut before the writeback loses that zeroing (the preamble and the size were flushed).
    real_zero = spool_module._zero
    monkeypatch.setattr(spool_module, "_zero",
                        lambda fd, start, end: None if start == 128 else real_zero(fd, start, end))
    spool.release(name_a)
    monkeypatch.setattr(spool_module, "_zero", real_zero)
    [slot] = (tmp_path / "spool" / "free").iterdir()
    assert secret in slot.read_bytes()  # the state a power cut leaves
    # The next start: whatever it held is gone before any instance is written over it.
    again = Spool(tmp_path / "spool", 0)
    name_b, capacity = _placed(again, _instance(b"PATIENT-B" * 10))
    assert secret not in again.path(name_b).read_bytes()
    # The slot was emptied at start into a kept empty file, which took the instance the old way.
    assert capacity == 0 and again.slots() == (0, 0) and list((tmp_path / "spool" / "free").iterdir()) == []
    # Released in this run, a slot is handed out again, zeroed.
    again.release(name_b)
    name_c, capacity = _placed(again, _instance(b"PATIENT-C!"))
    raw = again.path(name_c).read_bytes()
    assert capacity == 65536 and read_mark(raw) is not None and b"PATIENT-B" not in raw


def test_adoption_records_two_contents_of_one_instance_in_the_order_they_were_written(tmp_path: Path) -> None:
    box = Box(tmp_path)
    spool = box.spool
    older, newer = _ct(40), _ct(400)
    spool.release_all([_placed(spool, _instance(bytes(len(older) - 132)))[0] for _ in range(2)])  # two slots
    (n1, cap1), (n2, cap2) = _placed(spool, older), _placed(spool, newer)
    assert cap1 > 0 and cap2 > 0  # both sealed in place: they name themselves in their marks
    # A power cut: both rows lost (never committed here), both renames into instances/ lost.
    t1, t2 = spool.tmp_dir / "in-1.dcm", spool.tmp_dir / "in-2.dcm"
    os.rename(spool.path(n1), t1)
    os.rename(spool.path(n2), t2)
    assert box.hk.put_back_at_start() == 2
    # Written in that order (mtime); put back in whatever order tmp/ listed them: here the older one last, which
    # its ctime says.
    p1, p2 = spool.path(n1), spool.path(n2)
    written = p2.stat().st_mtime_ns
    os.utime(p1, ns=(written - 10**9, written - 10**9))
    while p1.stat().st_ctime_ns <= p2.stat().st_ctime_ns:
        os.utime(p1, ns=(written - 10**9, written - 10**9))
    assert box.hk.adopt_at_start() == 2
    box.hk.remove_orphans_at_start()
    [(held,)] = box.journal.read("SELECT spool_name FROM instances WHERE released=0")
    assert held == n2 and p2.exists() and not p1.exists()
    assert pydicom.dcmread(p2).WindowCenter == 400


def test_a_clock_once_days_fast_keeps_no_acknowledged_instance_from_adoption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Box(tmp_path)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 30 * DAY_SECONDS)
    box.hk._prune()  # one prune while the clock is 30 days ahead
    monkeypatch.setattr(time, "time", real_time)
    # The clock is right again. An instance is placed and acknowledged; its row is lost in a power cut.
    name, _ = _placed(box.spool, CT_SMALL.read_bytes())
    box.hk.put_back_at_start()
    assert box.hk.adopt_at_start() == 1
    box.hk.remove_orphans_at_start()
    assert box.spool.path(name).exists()
    assert box.journal.read("SELECT spool_name FROM instances") == [(name,)]


def test_the_running_sweep_never_takes_a_temp_file_the_receiver_holds(tmp_path: Path) -> None:
    box = Box(tmp_path)
    box.releasable_series(1)
    box.hk.release_due()
    [slot] = (box.spool.root / "free").iterdir()
    assert slot.suffix == ".slot"
    age(slot, 2 * 3600)  # released two hours ago
    # The receiver's spares, made ahead (dicom/scp.py): one from the slot, one made now, which then waits
    # through an idle hour.
    spares = [box.spool.open_incoming(), box.spool.open_incoming()]
    assert [capacity > 0 for _, _, capacity in spares] == [True, False]
    age(spares[1][0], ORPHAN_MIN_AGE_SECONDS + 100)
    box.hk._remove_orphans(ORPHAN_MIN_AGE_SECONDS)
    assert all(path.exists() for path, _, _ in spares)
    data = _instance(b"x" * 1000)
    for path, fd, capacity in spares:
        os.write(fd, data)
        box.spool.place([ToPlace(path, fd, "0" * 64, len(data), capacity, EXPLICIT_LE)])
        os.close(fd)
    # One left behind (closed, old) is still swept.
    stale = box.spool.tmp_dir / "in-left.dcm"
    stale.write_bytes(b"half an instance")
    age(stale, ORPHAN_MIN_AGE_SECONDS + 100)
    box.hk._remove_orphans(ORPHAN_MIN_AGE_SECONDS)
    assert not stale.exists()


def test_a_slot_keeps_its_size_however_often_it_is_reused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = _instance(b"x" * (512 * 1024 - 132))
    sizes = []
    for _ in range(6):
        name, _ = _placed(spool, data)
        spool.release(name)
        sizes.append(spool.slots()[1])
    assert sizes == [589824] * 6  # 512 KiB + 16, rounded up to 64 KiB
    # A small instance written over a large slot: released, the slot shrinks to what it held, all zeros.
    spool._hint = 0
    name, capacity = _placed(spool, _instance(b"y" * 1000))
    assert capacity == 589824
    spool.release(name)
    [slot] = (tmp_path / "spool" / "free").iterdir()
    assert spool.slots() == (1, 65536) and slot.read_bytes() == bytes(65536)
