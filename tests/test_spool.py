"""The spool: durable moves, strict names, free-space watermark, real disk-full, orphans."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from edge_agent.dicom import digest
from edge_agent.dicom import spool as spool_module
from edge_agent.dicom.spool import Spool, SpoolFullError
from edge_agent.errors import EdgeAgentError
from tests.dicomfiles import CT_SMALL, fill, fill_inodes, tmpfs

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


def _placed(spool: Spool, data: bytes) -> str:
    """An instance received as the receiver does it: a temp file from open_incoming, written, placed."""
    path, fd = spool.open_incoming()
    try:
        os.write(fd, data)
        [name] = spool.place([(path, fd, digest.finish(digest.hasher(data)))])
    finally:
        os.close(fd)
    return name


def test_a_released_file_is_emptied_and_becomes_the_next_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    name = _placed(spool, b"PATIENT^NAME" * 4096)
    inode = os.stat(spool.path(name)).st_ino
    spool.release(name)
    assert not spool.path(name).exists() and spool.free_files() == 1
    [kept] = (tmp_path / "spool" / "free").iterdir()
    assert kept.stat().st_ino == inode and kept.stat().st_size == 0  # nothing of the instance is left in it
    path, fd = spool.open_incoming()
    os.close(fd)
    assert path.parent == spool.tmp_dir and path.stat().st_ino == inode and path.read_bytes() == b""
    assert spool.free_files() == 0 and list((tmp_path / "spool" / "free").iterdir()) == []


def test_refill_stops_at_the_cap_and_a_release_past_it_is_unlinked(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "FREE_FILES", 3)
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
    path, fd = spool.open_incoming()
    os.close(fd)
    assert path.exists() and path.read_bytes() == b"" and spool.free_files() == 0


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
