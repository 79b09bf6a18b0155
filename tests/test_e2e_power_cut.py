"""End to end, a power cut after a Success: the spool, not the journal, is the record of truth.

The receiver commits its journal rows without an fsync of their own (journal.py); its files are fsynced,
named with a digest of their content, before the Success. A power cut can therefore lose the last rows but
never the files. These tests make the state such a cut leaves (the daemon killed, the lost rows deleted from
the journal as SQLite's WAL would have lost them) and check what the next start does with it.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from edge_agent.dicom.digest import name_part
from edge_agent.dicom.header import file_digest, stored_size
from edge_agent.dicom.spool import read_mark
from tests.daemon import read_findings, storescu
from tests.dicomfiles import PYDICOM_FILES
from tests.test_e2e import ct_series

pytestmark = pytest.mark.e2e


def journal_rows(state: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(state / "journal.sqlite3")
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


def lose_series(state: Path, series_uid: str) -> None:
    """What a power cut does to a series whose every commit was the receiver's: its rows are gone."""
    journal_rows(state, "DELETE FROM instances WHERE series_id=(SELECT id FROM series WHERE series_uid=?)",
                 (series_uid,))
    journal_rows(state, "DELETE FROM series WHERE series_uid=?", (series_uid,))


def test_instances_whose_rows_a_power_cut_lost_are_recorded_again(daemon: Any, nats_server: Any,
                                                                  tmp_path: Path) -> None:
    d = daemon(**{"routes.1.quiet_seconds": 30}).start()
    series_uid, files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 4)
    assert storescu(d.dicom_port, *files).returncode == 0
    d.wait_metric("edge_agent_instances_total", 4, outcome="stored")
    d.kill9()
    state = tmp_path / "state"
    held = sorted(state.glob("spool/instances/*/*.dcm"))
    assert len(held) == 4
    # Every name ends with the first 16 hex digits of its content's digest.
    assert all(p.stem[16:] == name_part(file_digest(p)) for p in held)
    lose_series(state, series_uid)
    # One placed before the digests were BLAKE3: its name carries the first 16 hex digits of a SHA-256.
    legacy = held[1].with_name(f"{held[1].stem[:16]}{file_digest(held[1], legacy_sha256=True)[:16]}.dcm")
    legacy_digest = file_digest(held[1])  # taken now: once its finding is acknowledged the file is released
    held[1].rename(legacy)
    # And a file renamed in whose data never reached the disk: its content does not match its name.
    torn = held[0].with_name(f"{'0' * 16}{held[0].stem[16:]}.dcm")
    data = bytearray(held[0].read_bytes())
    data[-64:] = bytes(64)
    torn.write_bytes(bytes(data))

    d.config_path.write_text(d.config_path.read_text().replace("quiet_seconds: 30", "quiet_seconds: 0.5"))
    d.start()
    [finding] = read_findings(nats_server.url, 1)
    assert finding["series_instance_uid"] == series_uid
    assert finding["instance_count"] == 4
    assert "4 stored instance(s) whose journal rows were lost recorded again" in d.log()
    assert "1 unrecorded spool file(s) incomplete or unreadable" in d.log()
    assert not torn.exists()
    # The legacy-named file was recorded under its name, with its BLAKE3 digest (a re-send is compared by it).
    legacy_name = f"{legacy.parent.name}/{legacy.name}"
    assert journal_rows(state, "SELECT content_digest FROM instances WHERE spool_name=?", (legacy_name,)) == \
        [(legacy_digest,)]
    # Recorded as they arrived: the calling AE title came back from the File Meta.
    [(calling,)] = journal_rows(state, "SELECT calling_aet FROM series WHERE series_uid=?", (series_uid,))
    assert calling == "STORESCU"
    assert d.terminate() == 0


def test_a_replaced_file_left_behind_is_not_adopted(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon(**{"routes.1.quiet_seconds": 30}).start()
    series_uid, [first] = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 1)
    assert storescu(d.dicom_port, first).returncode == 0
    d.wait_metric("edge_agent_instances_total", 1, outcome="stored")
    state = tmp_path / "state"
    [(old_name,)] = journal_rows(state, "SELECT spool_name FROM instances")
    old_bytes = (state / "spool" / "instances" / old_name).read_bytes()

    # The same instance with other content replaces it; the old file is deleted after the commit.
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "corrected"
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    assert storescu(d.dicom_port, second).returncode == 0
    d.wait_metric("edge_agent_instances_total", 1, outcome="replaced")
    d.kill9()
    [(new_name,)] = journal_rows(state, "SELECT spool_name FROM instances")
    assert new_name != old_name
    # Read now: once the finding is acknowledged the series is released and its file deleted.
    new_digest = file_digest(state / "spool" / "instances" / new_name)
    # The deletion that a crash (or a failing disk) kept from happening: the old content is back under its name.
    (state / "spool" / "instances" / old_name).write_bytes(old_bytes)
    assert journal_rows(state, "SELECT spool_name FROM dead_files") == [(old_name,)]

    d.config_path.write_text(d.config_path.read_text().replace("quiet_seconds: 30", "quiet_seconds: 0.5"))
    d.start()
    [finding] = read_findings(nats_server.url, 1)
    assert finding["series_instance_uid"] == series_uid
    # The journal still names the replacing file and its content (released or not), never the old one.
    assert journal_rows(state, "SELECT spool_name, content_digest FROM instances") == [(new_name, new_digest)]
    assert not (state / "spool" / "instances" / old_name).exists()
    assert "recorded again" not in d.log()
    assert journal_rows(state, "SELECT spool_name FROM dead_files") == []
    assert d.terminate() == 0


def test_after_a_clean_stop_nothing_is_adopted(daemon: Any, nats_server: Any, tmp_path: Path) -> None:
    d = daemon().start()
    _, files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 2)
    assert storescu(d.dicom_port, *files).returncode == 0
    read_findings(nats_server.url, 1)
    assert d.terminate() == 0
    state = tmp_path / "state"
    # A file no row knows after a clean stop was never acknowledged: swept, not recorded, even though its
    # content matches its name.
    stray = state / "spool" / "instances" / "20260101"
    stray.mkdir(parents=True, exist_ok=True)
    copy = stray / f"{'1' * 16}{name_part(file_digest(files[0]))}.dcm"
    shutil.copyfile(files[0], copy)
    d.start()
    assert not copy.exists()
    assert "recorded again" not in d.log()
    assert d.terminate() == 0


def wait_for(check: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out: {check.__doc__ or ''}"
        time.sleep(0.05)


def with_slots(daemon: Any, nats_server: Any, tmp_path: Path, count: int) -> Any:
    """A running daemon (CT routed with quiet_seconds 30) whose spool keeps ``count`` slots, from unrouted series
    received and released. Made in this run, not the last: a start empties every slot, whose zeroing a power cut
    may have undone (dicom/spool.py)."""
    free = tmp_path / "state" / "spool" / "free"
    held = tmp_path / "state" / "spool" / "instances"
    d = daemon(**{"routes.1.quiet_seconds": 30, "pipeline.default_quiet_seconds": 0.5}).start()
    # Then two more: the receiver's two spare temp files, made ahead before there was any slot, take them.
    for n, folder in ((count, "first"), (2, "spares")):
        _, files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / folder, n)
        for f in files:  # a modality no route takes: released after the default quiet time, with no finding
            ds = pydicom.dcmread(f)
            ds.Modality = "OT"
            ds.save_as(f, enforce_file_format=True)
        assert storescu(d.dicom_port, *files).returncode == 0
        wait_for(lambda: len(list(free.glob("*.slot"))) >= count and not list(held.glob("*/*.dcm")))
    return d


def test_instances_sealed_in_place_whose_renames_a_power_cut_undid_are_put_back(daemon: Any, nats_server: Any,
                                                                             tmp_path: Path) -> None:
    """A file written over a slot is not named in a folder fsync (dicom/spool.py): its renames out of free/ and
    into instances/ may be lost by a power cut, and its mark says where it belongs."""
    state = tmp_path / "state"
    free = state / "spool" / "free"
    d = with_slots(daemon, nats_server, tmp_path, 10)
    lost_uid, lost = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "lost", 4)
    kept_uid, kept = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "kept", 3)
    assert storescu(d.dicom_port, *lost).returncode == 0
    assert storescu(d.dicom_port, *kept).returncode == 0
    d.wait_metric("edge_agent_instances_total", 7, outcome="stored")
    d.kill9()
    names = dict(journal_rows(state, "SELECT i.spool_name, s.series_uid FROM instances i JOIN series s "
                                     "ON s.id = i.series_id"))
    lost_names = sorted(n for n, uid in names.items() if uid == lost_uid)
    kept_names = sorted(n for n, uid in names.items() if uid == kept_uid)
    held = state / "spool" / "instances"
    # Every one was written over a slot and sealed in place: marked with its own name.
    assert all(read_mark((held / n).read_bytes()) == (stored_size(held / n), n) for n in lost_names + kept_names)

    # The lost series: its rows gone, one file back in tmp/ and one in free/, where the lost renames left them.
    lose_series(state, lost_uid)
    (held / lost_names[0]).rename(state / "spool" / "tmp" / "in-0123.dcm")
    (held / lost_names[1]).rename(free / f"{'a' * 32}.slot")
    # The kept series: its rows kept, one file back in free/.
    (held / kept_names[0]).rename(free / f"{'b' * 32}.slot")
    # And a copy whose data never reached the disk: its content does not match the name in its mark.
    torn = free / f"{'c' * 32}.slot"
    data = bytearray((held / lost_names[2]).read_bytes())
    data[1000:1064] = bytes(64)
    torn.write_bytes(bytes(data))

    d.config_path.write_text(d.config_path.read_text().replace("quiet_seconds: 30", "quiet_seconds: 0.5"))
    d.start()
    findings = {f["series_instance_uid"]: f for f in read_findings(nats_server.url, 2)}
    assert findings[lost_uid]["instance_count"] == 4 and findings[kept_uid]["instance_count"] == 3
    assert "3 stored instance(s) found outside the spool's folders (their renames lost) put back" in d.log()
    assert "4 stored instance(s) whose journal rows were lost recorded again" in d.log()
    assert not torn.exists()
    assert d.terminate() == 0


def test_a_sealed_file_found_outside_its_folder_after_a_clean_stop_is_put_back(daemon: Any, nats_server: Any,
                                                                             tmp_path: Path) -> None:
    """On a file system where an fsync does not carry other files' renames (btrfs), even a clean stop may leave
    a sealed file's renames undone: the put-back runs at every start, before the orphan sweep empties tmp/."""
    state = tmp_path / "state"
    d = with_slots(daemon, nats_server, tmp_path, 4)
    series_uid, files = ct_series(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct", 3)
    assert storescu(d.dicom_port, *files).returncode == 0
    d.wait_metric("edge_agent_instances_total", 3, outcome="stored")
    assert d.terminate() == 0
    [(name,)] = journal_rows(state, "SELECT i.spool_name FROM instances i JOIN series s ON s.id = i.series_id "
                                    "WHERE s.series_uid = ? LIMIT 1", (series_uid,))
    held = state / "spool" / "instances" / name
    assert read_mark(held.read_bytes()) is not None
    held.rename(state / "spool" / "tmp" / "in-4567.dcm")
    d.config_path.write_text(d.config_path.read_text().replace("quiet_seconds: 30", "quiet_seconds: 0.5"))
    d.start()
    findings = {f["series_instance_uid"]: f for f in read_findings(nats_server.url, 1)}
    assert findings[series_uid]["instance_count"] == 3
    assert "1 stored instance(s) found outside the spool's folders (their renames lost) put back" in d.log()
    assert "recorded again" not in d.log()
    assert d.terminate() == 0
