"""The spool: durable moves, strict names, free-space watermark, real disk-full, orphans."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

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
