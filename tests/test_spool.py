"""The spool: durable moves, strict names, free-space watermark, real disk-full, orphans."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_agent.dicom import digest, pixels
from edge_agent.dicom import spool as spool_module
from edge_agent.dicom.header import dataset_offset, file_digest, stored_size
from edge_agent.dicom.pixels import decode_frames
from edge_agent.dicom.spool import Spool, SpoolFullError, ToPlace, read_mark
from edge_agent.errors import EdgeAgentError
from tests.dicomfiles import CT_SMALL, MR_SMALL_IMPLICIT, fill, fill_inodes, tmpfs

NAME = re.compile(r"^\d{8}/[0-9a-f]{32}\.dcm$")


def _src(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / "incoming.dcm"
    p.write_bytes(data)
    return p


def test_store_on_the_same_file_system_moves_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    src = _src(spool.tmp_dir, data)
    name, size = spool.store(src)
    assert NAME.match(name)
    assert size == len(data)
    assert spool.path(name).read_bytes() == data
    assert not src.exists()
    assert spool.path(name).parent.parent == tmp_path / "spool" / "instances"


def test_store_across_file_systems_copies_durably_and_removes_the_source(tmp_path: Path) -> None:
    with tmpfs("8m") as mnt:
        spool = Spool(mnt / "spool", 0)
        data = CT_SMALL.read_bytes()
        src = _src(tmp_path, data)
        assert os.stat(src).st_dev != os.stat(spool.tmp_dir).st_dev
        name, size = spool.store(src)
        assert spool.path(name).read_bytes() == data and size == len(data)
        assert not src.exists()
        assert [p.name for p in spool.path(name).parent.iterdir()] == [Path(name).name]  # no .part left


def test_names_are_random_and_never_from_the_content(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    names = {spool.store(_src(tmp_path / str(i), b"same bytes"))[0] for i in range(5)}
    assert len(names) == 5


@pytest.mark.parametrize("bad", [
    "../etc/passwd", "/etc/passwd", "20260101/../../x.dcm", "20260101/" + "A" * 32 + ".dcm",
    "20260101/" + "a" * 31 + ".dcm", "2026010/" + "a" * 32 + ".dcm", "tmp/../journal.db", "tmp/.hidden",
    "tmp/a/b", "", "20260101/" + "a" * 32 + ".dcm/..", "20260101\\" + "a" * 32 + ".dcm",
    "20260101/" + "a" * 32 + ".dcm\n",
])
def test_path_refuses_anything_but_a_spool_name(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool", 0)
    with pytest.raises(ValueError):
        spool.path(bad)
    with pytest.raises(ValueError):
        spool.remove(bad)
    with pytest.raises(ValueError):
        spool.release(bad)


def test_remove_deletes_and_tolerates_a_missing_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    name, _ = spool.store(_src(tmp_path, b"x"))
    spool.remove(name)
    assert not spool.path(name).exists()
    spool.remove(name)


def test_watermark(tmp_path: Path) -> None:
    free = Spool(tmp_path / "probe", 0).free_bytes()
    assert free > 0
    assert Spool(tmp_path / "a", 0).has_room()
    roomy = Spool(tmp_path / "b", 1)
    assert roomy.has_room(extra_bytes=0)
    assert not roomy.has_room(extra_bytes=free * 2)
    assert not Spool(tmp_path / "c", free * 2 + 10**12).has_room()


def test_a_full_disk_raises_spool_full_and_leaves_no_partial_file(tmp_path: Path) -> None:
    with tmpfs("1m") as mnt:
        spool = Spool(mnt / "spool", 0)
        src = _src(tmp_path, os.urandom(2 * 1024 * 1024))
        with pytest.raises(SpoolFullError) as info:
            spool.store(src)
        assert isinstance(info.value, OSError) and isinstance(info.value, EdgeAgentError)
        assert info.value.errno == errno.ENOSPC
        assert [p for p in (mnt / "spool" / "instances").rglob("*") if p.is_file()] == []
        assert src.exists()  # nothing was moved: the sender still has its copy to retry with


def test_no_inode_left_is_spool_full_too(tmp_path: Path) -> None:
    with tmpfs("16m", nr_inodes=64) as mnt:
        spool = Spool(mnt / "spool", 0)
        assert fill_inodes(mnt) > 0
        with pytest.raises(SpoolFullError):
            spool.store(_src(tmp_path, b"data"))
        assert [p for p in (mnt / "spool" / "instances").rglob("*") if p.is_file()] == []


def test_writable(tmp_path: Path) -> None:
    with tmpfs("1m") as mnt:
        spool = Spool(mnt / "spool", 0)
        assert spool.writable()
        fill(mnt)
        # A full disk may still allow an empty file but not the probe's byte; either way it says so.
        assert not spool.writable()
        (mnt / "filler").unlink()
        assert spool.writable()
        res = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, check=False)
        if res.returncode == 0:
            assert not spool.writable()


def test_orphans_lists_unreferenced_and_stale_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    kept, _ = spool.store(_src(tmp_path / "1", b"a"))
    lost, _ = spool.store(_src(tmp_path / "2", b"b"))
    day = kept.split("/")[0]
    part = spool.root / "instances" / day / ("." + "c" * 32 + ".part")
    part.write_bytes(b"half")
    temp = spool.tmp_dir / "tmpabc123.dcm"
    temp.write_bytes(b"left by an aborted association")
    (spool.root / "instances" / day / "README").write_text("not ours")  # ignored, never removed
    found = spool.orphans({kept})
    assert sorted(found) == sorted([lost, f"{day}/.{'c' * 32}.part", "tmp/tmpabc123.dcm"])
    for name in found:
        spool.remove(name)
    assert spool.orphans({kept}) == []
    assert spool.path(kept).exists()
    assert (spool.root / "instances" / day / "README").exists()


def test_orphans_spares_files_younger_than_min_age(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    spool.store(_src(tmp_path / "1", b"a"))  # young: spared
    old, _ = spool.store(_src(tmp_path / "2", b"b"))
    an_hour_ago = time.time() - 3600
    os.utime(spool.path(old), (an_hour_ago, an_hour_ago))
    assert spool.orphans(set(), min_age_seconds=600) == [old]


def _placed(spool: Spool, data: bytes, syntax: str = "1.2.840.10008.1.2.1") -> str:
    """An instance received as the receiver does it: a temp file from open_incoming, written, placed."""
    path, fd, capacity = spool.open_incoming()
    try:
        os.write(fd, data)
        [name] = spool.place([ToPlace(path, fd, digest.finish(digest.hasher(data[dataset_offset(data):]
                                                                           if data[128:132] == b"DICM" else data)),
                                      len(data), capacity, syntax)])
    finally:
        os.close(fd)
    return name


def test_a_released_file_is_zeroed_into_a_slot_and_becomes_the_next_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    free_before = spool.free_bytes()
    name = _placed(spool, b"PATIENT^NAME" * 4096)
    inode = os.stat(spool.path(name)).st_ino
    spool.release(name)
    assert not spool.path(name).exists() and spool.free_files() == 0
    [kept] = (tmp_path / "spool" / "free").iterdir()
    # Nothing of the instance is left in it; it is rounded up, with room for padding after a same-size instance.
    assert kept.suffix == ".slot" and kept.stat().st_ino == inode and kept.read_bytes() == bytes(65536)
    assert spool.slots() == (1, 65536)
    assert spool.free_bytes() >= free_before - 65536 * 2  # its blocks count as free space
    path, fd, capacity = spool.open_incoming()
    os.close(fd)
    assert path.parent == spool.tmp_dir and path.stat().st_ino == inode and capacity == 65536
    assert spool.slots() == (0, 0) and list((tmp_path / "spool" / "free").iterdir()) == []


def _slot_of(spool: Spool, size: int) -> None:
    spool.release(_placed(spool, b"x" * size))


@pytest.mark.parametrize("source", [CT_SMALL, MR_SMALL_IMPLICIT])
def test_an_instance_written_over_a_slot_is_sealed_in_place_and_reads_as_itself(
        tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = source.read_bytes()
    _slot_of(spool, len(data))
    [slot] = (tmp_path / "spool" / "free").iterdir()
    inode, capacity = slot.stat().st_ino, slot.stat().st_size
    synced: list[Path] = []
    real_fsync_dir = spool_module._fsync_dir
    monkeypatch.setattr(spool_module, "_fsync_dir", lambda p: (synced.append(p), real_fsync_dir(p)))
    syntax = str(pydicom.dcmread(source).file_meta.TransferSyntaxUID)
    name = _placed(spool, data, syntax)
    stored = spool.path(name)
    # Same file, same size: nothing of the file system's to commit, so today's folder was not fsynced.
    assert stored.stat().st_ino == inode and stored.stat().st_size == capacity and synced == []
    raw = stored.read_bytes()
    assert read_mark(raw) == (len(data), name)
    assert raw[128:len(data)] == data[128:]
    # One valid DICOM file: the instance, then Data Set Trailing Padding to the slot's end.
    ds, original = pydicom.dcmread(stored), pydicom.dcmread(source)
    assert (0xFFFC, 0xFFFC) in ds and len(ds[0xFFFC, 0xFFFC].value) == capacity - len(data) - (
        8 if syntax == "1.2.840.10008.1.2" else 12)
    # (CT_small.dcm ends with padding of its own: its file then holds two, which pydicom and dcmtk read, the
    # second ignored.)
    for d in (ds, original):
        d.pop((0xFFFC, 0xFFFC), None)
    assert ds == original
    # Its digest, size and pixels are the instance's.
    assert file_digest(stored) == file_digest(source) and stored_size(stored) == len(data)
    assert Spool.name_matches(name, file_digest(stored))
    [frame] = decode_frames(stored)
    [expected] = decode_frames(source)
    assert np.array_equal(frame.stored, expected.stored) and frame.window == expected.window
    assert pixels._fast_read(stored) is not None  # read without pydicom, up to the mark's end


def test_a_file_that_outgrows_its_slot_or_cannot_be_padded_is_cut_to_size_and_its_folder_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    synced: list[Path] = []
    real_fsync_dir = spool_module._fsync_dir
    monkeypatch.setattr(spool_module, "_fsync_dir", lambda p: (synced.append(p), real_fsync_dir(p)))
    cases = [
        (data + bytes(70_000), "1.2.840.10008.1.2.1"),  # larger than the slot
        (data + bytes(65536 - 10 - len(data)), "1.2.840.10008.1.2.1"),  # 10 bytes left: no padding fits
        (data, "1.2.840.10008.1.2.1.99"),  # Deflated: nothing may follow the deflated stream
        (data + b"\0", "1.2.840.10008.1.2.1"),  # an odd end
    ]
    for content, syntax in cases:
        _slot_of(spool, len(data))
        synced.clear()
        name = _placed(spool, content, syntax)
        stored = spool.path(name)
        assert stored.read_bytes() == content, syntax
        assert read_mark(stored.read_bytes()) is None and stored_size(stored) == len(content)
        assert synced == [stored.parent]
        spool.remove(name)


def test_slots_stop_at_their_byte_cap_and_a_release_past_it_is_emptied(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SLOT_BYTES", 65536)
    spool = Spool(tmp_path / "spool", 0)
    names = [_placed(spool, b"PATIENT^NAME" * 100) for _ in range(2)]
    for name in names:
        spool.release(name)
    assert spool.slots() == (1, 65536) and spool.free_files() == 1
    free = sorted((tmp_path / "spool" / "free").iterdir(), key=lambda p: p.suffix)
    assert [(p.suffix, p.stat().st_size) for p in free] == [(".free", 0), (".slot", 65536)]


def test_a_release_clears_the_mark_of_a_file_emptied_rather_than_kept(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    _slot_of(spool, len(data))
    name = _placed(spool, data)
    assert read_mark(spool.path(name).read_bytes()) is not None
    monkeypatch.setattr(spool_module, "SLOT_BYTES", 0)
    cleared: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: (cleared.append(fd), real_fdatasync(fd)))
    spool.release(name)
    [kept] = (tmp_path / "spool" / "free").iterdir()
    assert kept.suffix == ".free" and kept.stat().st_size == 0 and len(cleared) == 1


def _slots_and_a_sealed_instance(tmp_path: Path) -> tuple[Spool, bytes, str]:
    """A spool with three slots, then an instance written over one of them: (spool, its bytes, its name)."""
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    spool.release_all([_placed(spool, b"x" * len(data)) for _ in range(3)])
    return spool, data, _placed(spool, data)


def test_at_start_slots_are_emptied_and_a_marked_one_is_left_for_its_owner(tmp_path: Path) -> None:
    spool, data, name = _slots_and_a_sealed_instance(tmp_path)
    free = tmp_path / "spool" / "free"
    # What a power cut can leave: the instance's renames out of free/ and into instances/ lost (its mark kept),
    # and a slot whose size is no slot's (not made by the spool).
    misplaced = free / ("c" * 32 + ".slot")
    os.rename(spool.path(name), misplaced)
    (free / ("d" * 32 + ".slot")).write_bytes(b"x" * 1000)
    again = Spool(tmp_path / "spool", 0)
    # Every unmarked slot is now an empty kept file (tests/test_spool_power_cut.py says why).
    assert again.slots() == (0, 0) and again.free_files() == 3 and misplaced.exists()
    assert sorted((p.suffix, p.stat().st_size) for p in free.iterdir() if p != misplaced) == [(".free", 0)] * 3
    assert again.misplaced() == [(misplaced, name)]
    assert again.put_back(misplaced, name) and spool.path(name).read_bytes()[128:len(data)] == data[128:]
    assert again.misplaced() == []
    # Its slot is not handed out meanwhile.
    assert all(again.open_incoming()[0].stat().st_ino != spool.path(name).stat().st_ino for _ in range(2))


def test_misplaced_finds_marked_files_in_tmp_too_and_put_back_never_overwrites(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    _slot_of(spool, len(data))
    name = _placed(spool, data)
    temp = spool.tmp_dir / "in-abc.dcm"
    os.link(spool.path(name), temp)
    os.link(spool.path(name), spool.tmp_dir / "overlay-abc.dcm")  # the overlay's link: another name, not moved
    assert spool.misplaced() == [(temp, name)]
    assert not spool.put_back(temp, name)  # a file has that name already
    spool.path(name).unlink()
    assert spool.put_back(temp, name) and not temp.exists() and read_mark(spool.path(name).read_bytes())


def test_release_all_releases_every_name_and_returns_the_errors(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    names = [_placed(spool, b"instance %d" % i * 100) for i in range(5)]
    assert spool.release_all([*names, "not a spool name"]) != []
    assert not any(spool.path(n).exists() for n in names) and spool.slots()[0] == 5
    assert spool.release_all(names) == []  # already gone: fine


def test_refill_stops_at_the_cap_and_a_release_past_it_is_unlinked(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "FREE_FILES", 3)
    monkeypatch.setattr(spool_module, "SLOT_BYTES", 0)
    spool = Spool(tmp_path / "spool", 0)
    names = [_placed(spool, b"x" * 100) for _ in range(2)]
    assert spool.refill(limit=2) == 2 and spool.refill() == 1 and spool.refill() == 0
    assert spool.free_files() == 3
    for name in names:
        spool.release(name)
        assert not spool.path(name).exists()
    assert len(list((tmp_path / "spool" / "free").iterdir())) == 3
    spool.release(names[0])  # already gone: fine, nothing kept


def test_temp_files_and_missing_files_are_never_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    temp = spool.tmp_dir / "in-abc.dcm"
    temp.write_bytes(b"half an instance")
    spool.release("tmp/in-abc.dcm")
    spool.release("20260101/" + "a" * 32 + ".dcm")
    assert not temp.exists() and spool.free_files() == 0


def test_at_start_empty_free_files_are_kept_and_anything_else_there_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    assert spool.refill(limit=4) == 4
    free = tmp_path / "spool" / "free"
    # A released instance renamed in whose truncation a power cut undid, and something that is no free file.
    (free / ("b" * 32 + ".free")).write_bytes(b"PATIENT^NAME")
    (free / "stray").write_bytes(b"")
    (free / "folder.free").mkdir()
    again = Spool(tmp_path / "spool", 0)
    assert again.free_files() == 4
    assert sorted(p.stat().st_size for p in free.iterdir()) == [0, 0, 0, 0]


def test_a_kept_file_removed_behind_the_spools_back_is_made_anew(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    assert spool.refill(limit=1) == 1
    [kept] = (tmp_path / "spool" / "free").iterdir()
    kept.unlink()
    path, fd, capacity = spool.open_incoming()
    os.close(fd)
    assert path.exists() and path.read_bytes() == b"" and spool.free_files() == 0 and capacity == 0


def test_kept_files_still_take_instances_when_no_inode_is_left(tmp_path: Path) -> None:
    with tmpfs("16m", nr_inodes=64) as mnt:
        spool = Spool(mnt / "spool", 0)
        _placed(spool, b"first")  # today's folder exists
        assert spool.refill(limit=2) == 2
        assert fill_inodes(mnt) > 0
        names = [_placed(spool, b"instance %d" % i) for i in range(2)]
        assert [spool.path(n).read_bytes() for n in names] == [b"instance 0", b"instance 1"]
        with pytest.raises(OSError) as info:
            spool.open_incoming()  # none kept, none can be made
        assert info.value.errno == errno.ENOSPC


def test_refill_stops_at_its_time_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    assert spool.refill(within_seconds=0.0) == 0
    assert spool.refill(limit=5, within_seconds=60.0) == 5 and spool.free_files() == 5


def test_a_file_with_another_name_is_unlinked_not_emptied(tmp_path: Path) -> None:
    # The pipeline reads a heat-map overlay's image through a hard link made before the release.
    spool = Spool(tmp_path / "spool", 0)
    name = _placed(spool, b"the image the overlay is drawn from")
    link = spool.tmp_dir / "overlay-0123.dcm"
    os.link(spool.path(name), link)
    spool.release(name)
    assert not spool.path(name).exists() and spool.free_files() == 0
    assert link.read_bytes() == b"the image the overlay is drawn from"
    assert list((tmp_path / "spool" / "free").iterdir()) == []


def test_remove_unlinks_so_an_open_reader_keeps_what_it_read(tmp_path: Path) -> None:
    # A replaced instance may be being decoded when its file is removed: its data must stay what it was, and
    # never become the next instance's.
    spool = Spool(tmp_path / "spool", 0)
    name = _placed(spool, b"the first version")
    with open(spool.path(name), "rb") as reader:
        spool.remove(name)
        assert spool.free_files() == 0
        _placed(spool, b"another patient's instance")
        assert reader.read() == b"the first version"


def test_refill_leaves_a_tenth_of_the_inodes_to_everything_else(tmp_path: Path) -> None:
    with tmpfs("16m", nr_inodes=200) as mnt:
        spool = Spool(mnt / "spool", 0)
        made = spool.refill()
        st = os.statvfs(mnt)
        assert made > 0 and st.f_favail == st.f_files // 10
        assert spool.refill() == 0


def test_the_next_instance_gets_a_slot_of_the_last_ones_size_and_none_smaller(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    small, large = CT_SMALL.read_bytes(), CT_SMALL.read_bytes() + bytes(300_000)
    spool.release_all([_placed(spool, small), _placed(spool, large), _placed(spool, small)])
    sizes = sorted(p.stat().st_size for p in (tmp_path / "spool" / "free").iterdir())
    assert sizes == [65536, 65536, 393216]
    # The last placed was small: a small slot, though the large one was kept last.
    name = _placed(spool, small)
    assert spool.path(name).stat().st_size == 65536 and read_mark(spool.path(name).read_bytes())
    # Now a large one (its hint is still the small size: a small slot, outgrown and cut), then the next large
    # takes the large slot.
    first = _placed(spool, large)
    assert spool.path(first).stat().st_size == len(large) and read_mark(spool.path(first).read_bytes()) is None
    second = _placed(spool, large)
    assert spool.path(second).stat().st_size == 393216 and read_mark(spool.path(second).read_bytes())
    # Larger than any slot left: an empty file, and the slot stays for an instance it fits.
    spool.release(first)  # kept: a slot of 393216 again
    spool._hint = 10_000_000
    _, fd, capacity = spool.open_incoming()
    os.close(fd)
    assert capacity == 0 and spool.slots() == (1, 393216)


def test_a_receiver_process_takes_its_share_of_slots_and_never_a_marked_one(tmp_path: Path) -> None:
    spool, _, name = _slots_and_a_sealed_instance(tmp_path)
    free = tmp_path / "spool" / "free"
    os.rename(spool.path(name), free / ("0" * 32 + ".slot"))  # marked, in free/: a power cut's leftover
    taker = Spool(tmp_path / "spool", 0, taker=(0, 1))
    taken = []
    for _ in range(3):
        _, fd, capacity = taker.open_incoming()
        os.close(fd)
        taken.append(capacity)
    assert taken == [65536, 65536, 0] and (free / ("0" * 32 + ".slot")).exists()


def test_a_release_on_a_full_disk_empties_the_file_instead_of_keeping_a_slot(tmp_path: Path) -> None:
    with tmpfs("8m") as mnt:
        spool = Spool(mnt / "spool", 0)
        name = _placed(spool, CT_SMALL.read_bytes())
        fill(mnt)  # rounding the file up to a slot's size needs blocks there are none of
        spool.release(name)
        [kept] = (mnt / "spool" / "free").iterdir()
        assert kept.suffix == ".free" and kept.stat().st_size == 0 and spool.slots() == (0, 0)


def test_a_file_linked_while_it_is_released_keeps_its_data_for_that_link(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    data = CT_SMALL.read_bytes()
    name = _placed(spool, data)
    link = spool.tmp_dir / "overlay-abc.dcm"
    real_rename = os.rename

    def rename(src: Path, dst: Path) -> None:
        if str(dst).endswith(".slot"):
            os.link(src, link)  # the pipeline's overlay link, made between the release's check and its rename
        real_rename(src, dst)

    monkeypatch.setattr(spool_module.os, "rename", rename)
    spool.release(name)
    assert link.read_bytes()[128:len(data)] == data[128:]  # only its mark was cleared
    assert spool.slots() == (0, 0) and list((tmp_path / "spool" / "free").iterdir()) == []
