"""Housekeeping: each step's work, and each step's failure counted and survived (a real journal and spool).

Disk faults are real: tests run as root, where permissions stop nothing, so a spool file becomes a
non-empty directory (unlink raises IsADirectoryError), the heat-map folder becomes a regular file, the
spool's folder disappears. Database faults are real too: the journal's connection is made read-only.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from edge_agent.config import AgentConfig, parse_config
from edge_agent.dicom.header import InstanceMeta, file_digest
from edge_agent.dicom.spool import Spool, ToPlace, read_mark
from edge_agent.housekeeping import (
    HEATMAP_SWEEP_SECONDS,
    ORPHAN_MIN_AGE_SECONDS,
    ORPHAN_SWEEP_SECONDS,
    Housekeeping,
    describe_error,
)
from edge_agent.journal import Journal, SeriesState
from edge_agent.metrics import HOUSEKEEPING_STEPS, Metrics
from tests.dicomfiles import CT_SMALL

CR = "1.2.840.10008.5.1.4.1.1.1"
DAY_SECONDS = 86_400.0


def config(state_dir: Path, **sections: Any) -> AgentConfig:
    return parse_config({"site": "test", "state_dir": str(state_dir), **sections})


class Box:
    """A state directory with a real journal and spool, and the housekeeping under test."""

    def __init__(self, tmp: Path, **sections: Any) -> None:
        self.tmp = tmp
        self.config = config(tmp / "state", **sections)
        self.journal = Journal(self.config.state_dir / "journal.sqlite3")
        self.spool = Spool(self.config.state_dir / "spool", min_free_bytes=0)
        self.metrics = Metrics()
        self.hk = Housekeeping(self.config, self.journal, self.spool, self.metrics)

    def errors(self, step: str) -> float:
        return float(self.metrics.housekeeping_errors.labels(step=step)._value.get())

    def store(self) -> str:
        """One file into the spool (not journalled): its spool name."""
        src = self.tmp / f"in-{time.monotonic_ns()}.dcm"
        src.write_bytes(b"DICM" * 64)
        name, _ = self.spool.store(src)
        return name

    def releasable_series(self, files: int = 1) -> tuple[int, list[str]]:
        """A series of ``files`` instances that no route took: releasable at once."""
        series_uid = generate_uid()
        names = []
        series_id = 0
        for _ in range(files):
            name = self.store()
            meta = InstanceMeta(sop_instance_uid=generate_uid(), sop_class_uid=CR, series_uid=series_uid, modality="CR")
            recorded = self.journal.record_instance(meta, name, 256)
            series_id = recorded.series_id
            names.append(name)
        assert self.journal.close_series(series_id, 0, lambda s, i: None) is not None
        return series_id, names

    def break_journal(self) -> None:
        """Every write now fails inside SQLite ('attempt to write a readonly database')."""
        self.journal._db.execute("PRAGMA query_only=1")

    def mend_journal(self) -> None:
        self.journal._db.execute("PRAGMA query_only=0")


def jam(path: Path) -> None:
    """Turn a spool file into a non-empty directory: unlink() raises IsADirectoryError on it."""
    path.unlink()
    path.mkdir()
    (path / "stuck").write_bytes(b"x")


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def table_rows(box: Box, table: str) -> int:
    with closing(sqlite3.connect(box.journal.path)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    try:
        yield b
    finally:
        b.mend_journal()
        b.journal.close()


# -- release ---------------------------------------------------------------------------------------


def test_release_deletes_the_files_of_claimed_series(box: Box) -> None:
    sid, names = box.releasable_series(files=2)
    box.hk.release_due()
    assert box.journal.series(sid).state == SeriesState.RELEASED
    assert not any(box.spool.path(n).exists() for n in names)
    assert box.errors("release") == 0 and "release" not in box.hk.last_errors
    # Each kept as a slot (dicom/spool.py), counted on the next tick.
    box.hk.update_gauges()
    assert box.metrics.spool_slots._value.get() == len(names) == box.spool.slots()[0]


def test_a_spool_file_that_cannot_be_removed_is_counted_and_left_to_the_orphan_sweep(box: Box) -> None:
    jammed_sid, [jammed] = box.releasable_series()
    sid, [name] = box.releasable_series()
    jam(box.spool.path(jammed))
    box.hk.release_due()  # does not raise
    assert box.errors("release") == 1
    assert box.hk.last_errors["release"].error.startswith("IsADirectoryError [EISDIR]")
    # The claim stands for both series, the other file is gone; the jammed one is no longer referenced.
    assert box.journal.series(jammed_sid).state == box.journal.series(sid).state == SeriesState.RELEASED
    assert not box.spool.path(name).exists()
    assert jammed not in box.journal.referenced_spool_names()
    # Once the fault is mended, the orphan sweep removes what the release left.
    shutil.rmtree(box.spool.path(jammed))
    box.spool.path(jammed).write_bytes(b"x")
    age(box.spool.path(jammed), ORPHAN_MIN_AGE_SECONDS + 60)
    box.hk.tick(now=time.monotonic() + ORPHAN_SWEEP_SECONDS)
    assert not box.spool.path(jammed).exists()
    assert box.errors("orphans") == 0


def test_a_database_error_in_the_release_is_counted_and_the_next_tick_releases(box: Box) -> None:
    sid, [name] = box.releasable_series()
    box.break_journal()
    box.hk.tick()
    assert box.errors("release") == 1
    assert "readonly database" in box.hk.last_errors["release"].error
    assert box.spool.path(name).exists()
    box.mend_journal()
    box.hk.tick()
    assert box.journal.series(sid).state == SeriesState.RELEASED and not box.spool.path(name).exists()
    assert box.errors("release") == 1


def test_keep_retention_releases_nothing(tmp_path: Path) -> None:
    box = Box(tmp_path, spool={"retention": "keep"})
    try:
        sid, [name] = box.releasable_series()
        box.hk.tick()
        assert box.journal.series(sid).state == SeriesState.UNROUTED and box.spool.path(name).exists()
    finally:
        box.journal.close()


# -- heat maps -------------------------------------------------------------------------------------


def test_old_heat_maps_are_removed_every_ten_minutes(box: Box) -> None:
    folder = box.config.state_dir / "heatmaps"
    folder.mkdir()
    old, new, other = folder / "1.png", folder / "2.png", folder / "notes.txt"
    for f in (old, new, other):
        f.write_bytes(b"x")
    for f in (old, other):
        age(f, box.config.heatmaps.retain_days * DAY_SECONDS + 60)
    start = time.monotonic()
    box.hk.tick(now=start)
    assert not old.exists() and new.exists() and other.exists()
    later = folder / "3.png"
    later.write_bytes(b"x")
    age(later, box.config.heatmaps.retain_days * DAY_SECONDS + 60)
    box.hk.tick(now=start + HEATMAP_SWEEP_SECONDS / 2)  # not due yet
    assert later.exists()
    box.hk.tick(now=start + HEATMAP_SWEEP_SECONDS)
    assert not later.exists()


def test_a_heatmaps_path_that_is_not_a_folder_is_counted_and_the_other_steps_run(box: Box) -> None:
    (box.config.state_dir / "heatmaps").write_bytes(b"not a folder")
    sid, _ = box.releasable_series()
    box.hk.tick()
    assert box.errors("heatmaps") == 1
    assert box.hk.last_errors["heatmaps"].error.startswith("NotADirectoryError [ENOTDIR]")
    assert box.journal.series(sid).state == SeriesState.RELEASED
    assert box.metrics.spool_free_bytes._value.get() > 0
    assert {s: box.errors(s) for s in HOUSEKEEPING_STEPS if s != "heatmaps"} == dict.fromkeys(
        set(HOUSEKEEPING_STEPS) - {"heatmaps"}, 0.0
    )


def test_a_heat_map_that_cannot_be_removed_is_counted_and_the_sweep_goes_on(box: Box) -> None:
    folder = box.config.state_dir / "heatmaps"
    folder.mkdir()
    stuck, old = folder / "1.png", folder / "2.png"
    stuck.mkdir()
    (stuck / "x").write_bytes(b"x")
    old.write_bytes(b"x")
    for f in (stuck, old):
        age(f, box.config.heatmaps.retain_days * DAY_SECONDS + 60)
    box.hk.tick()
    assert box.errors("heatmaps") == 1 and not old.exists()


# -- orphans ---------------------------------------------------------------------------------------


def test_the_start_sweep_removes_every_unreferenced_file(box: Box) -> None:
    _, [held] = box.releasable_series()
    orphan = box.store()
    box.hk.remove_orphans_at_start()
    assert box.spool.path(held).exists() and not box.spool.path(orphan).exists()


def test_the_periodic_sweep_leaves_young_files_and_runs_hourly(box: Box) -> None:
    young, old = box.store(), box.store()
    age(box.spool.path(old), ORPHAN_MIN_AGE_SECONDS + 60)
    start = time.monotonic()
    box.hk.tick(now=start)  # the start-up sweep covers the first hour
    assert box.spool.path(old).exists()
    box.hk.tick(now=start + ORPHAN_SWEEP_SECONDS)
    assert not box.spool.path(old).exists() and box.spool.path(young).exists()


def test_an_orphan_that_cannot_be_removed_is_counted_and_the_sweep_goes_on(box: Box) -> None:
    stuck, orphan = box.store(), box.store()
    jam(box.spool.path(stuck))
    box.hk.remove_orphans_at_start()  # does not raise: a daemon with one bad file still starts
    assert box.errors("orphans") == 1
    assert box.hk.last_errors["orphans"].error.startswith("IsADirectoryError")
    assert not box.spool.path(orphan).exists()


def test_a_database_error_in_the_orphan_sweep_removes_nothing(box: Box) -> None:
    _, [held] = box.releasable_series()
    box.journal.close()  # every read now fails
    box.hk.remove_orphans_at_start()
    assert box.errors("orphans") == 1 and box.spool.path(held).exists()
    box.journal = Journal(box.journal.path)  # for the fixture's teardown


# -- pruning ---------------------------------------------------------------------------------------


def test_prune_deletes_released_history_older_than_configured(tmp_path: Path) -> None:
    # A prune_after_days of a nanosecond makes a release history at once.
    box = Box(tmp_path, journal={"prune_after_days": 1e-9 / DAY_SECONDS})
    try:
        box.releasable_series()
        box.hk.release_due()
        assert table_rows(box, "series") == 1
        box.hk.tick()
        assert table_rows(box, "series") == table_rows(box, "instances") == 0
        assert box.errors("prune") == 0
    finally:
        box.journal.close()


def test_a_database_error_in_pruning_is_counted(box: Box) -> None:
    box.break_journal()
    box.hk.tick()
    assert box.errors("prune") == 1
    assert "readonly database" in box.hk.last_errors["prune"].error


# -- gauges ----------------------------------------------------------------------------------------


def test_gauges_come_from_the_journal_and_the_disk(box: Box) -> None:
    box.releasable_series(files=3)
    box.hk.update_gauges()
    assert box.metrics.spool_bytes._value.get() == 3 * 256
    assert box.metrics.spool_free_bytes._value.get() > 0


def test_a_spool_that_is_gone_is_counted_in_gauges(box: Box) -> None:
    shutil.rmtree(box.spool.root)
    box.hk.tick()
    assert box.errors("gauges") == 1
    assert box.hk.last_errors["gauges"].error.startswith("FileNotFoundError [ENOENT]")


# -- logging ---------------------------------------------------------------------------------------


def test_a_failing_step_logs_once_without_paths_then_stays_quiet(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.housekeeping")
    names = []
    for _ in range(3):
        _, [name] = box.releasable_series()
        jam(box.spool.path(name))
        names.append(name)
        box.hk.release_due()
    assert box.errors("release") == 3
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "release" in text and "IsADirectoryError" in text
    assert str(box.tmp) not in text and not any(n.split("/")[1] in text for n in names)


def test_describe_error_names_the_kind_and_never_the_file() -> None:
    exc = IsADirectoryError(21, "Is a directory", "/var/lib/edge-agent/spool/instances/20260101/abc.dcm")
    assert describe_error(exc) == "IsADirectoryError [EISDIR] Is a directory"
    assert describe_error(sqlite3.OperationalError("disk I/O error")) == "OperationalError: disk I/O error"
    assert describe_error(RuntimeError()) == "RuntimeError"


# -- files written over slots, put back ------------------------------------------------------------


def test_a_sealed_file_that_cannot_be_put_back_stops_the_start_and_stays(box: Box) -> None:
    """The orphan sweep that follows would delete it from tmp/: the start stops with the reason instead."""
    data = CT_SMALL.read_bytes()
    box.spool.release(box.store())  # a slot
    path, fd, capacity = box.spool.open_incoming()
    try:
        os.write(fd, data)
        [name] = box.spool.place([ToPlace(path, fd, file_digest(CT_SMALL), len(data), capacity,
                                          "1.2.840.10008.1.2.1")])
    finally:
        os.close(fd)
    stored = box.spool.path(name)
    assert read_mark(stored.read_bytes()) is not None
    temp = box.spool.tmp_dir / "in-0123.dcm"
    stored.rename(temp)
    day = stored.parent
    shutil.rmtree(day)
    day.write_bytes(b"")  # its day's folder cannot be made: a file has that name
    with pytest.raises(OSError):
        box.hk.put_back_at_start()
    assert temp.exists()
    day.unlink()
    assert box.hk.put_back_at_start() == 1 and stored.exists() and not temp.exists()
