"""The journal: every state change one transaction, revisions, the outbox, and what survives a reopen."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.dicom.header import InstanceMeta
from edge_agent.errors import JournalError
from edge_agent.journal import Closing, Journal, SeriesRow, SeriesState
from edge_agent.journal_schema import SCHEMA
from edge_agent.series import Arrival

CR = "1.2.840.10008.5.1.4.1.1.1"


def meta(sop: str, series: str = "1.2.3", **kw: Any) -> InstanceMeta:
    return InstanceMeta(sop_instance_uid=sop, sop_class_uid=CR, series_uid=series, modality="CR", **kw)


def routed(series: SeriesRow, instances: list[Any]) -> tuple[str, str]:
    return ("route", "m")


def close(journal: Journal, series_id: int, revision: int = 0) -> Closing:
    closing = journal.close_series(series_id, revision, routed)
    assert closing is not None
    return closing


def publish(journal: Journal, series_id: int, revision: int = 0, msg_id: str = "id") -> None:
    close(journal, series_id, revision)
    assert journal.outbox.enqueue(series_id, revision, "m", msg_id, "s", b"{}")
    [row] = [r for r in journal.outbox.pending() if r.msg_id == msg_id]
    journal.outbox.ack(row.id, 1)


def test_instances_group_into_series_and_new_content_replaces_the_file(journal: Journal) -> None:
    a = journal.record_instance(meta("1", content_digest="aa"), "f1", 10)
    b = journal.record_instance(meta("2", expected_count=2), "f2", 20)
    again = journal.record_instance(meta("1", content_digest="bb"), "f3", 30)
    assert a.new_series and not b.new_series and a.series_id == b.series_id
    assert again.replaced_spool_name == "f1" and again.instance_id == a.instance_id
    assert again.arrival is Arrival.REPLACED and again.revision == 0 and not again.reopened
    [series] = journal.series_in(SeriesState.OPEN)
    assert (series.instance_count, series.expected_count) == (2, 2)
    assert [i.spool_name for i in journal.instances(a.series_id)] == ["f3", "f2"]
    assert journal.counts().spool_bytes == 50


@pytest.mark.parametrize("state", ["open", "queued", "published", "released"])
def test_an_identical_resend_changes_nothing_in_any_state(journal: Journal, state: str) -> None:
    """Defect 2: a lost C-STORE-RSP or a PACS re-send must not open a revision (or a second finding)."""
    r = journal.record_instance(meta("1", content_digest="same"), "f1", 10)
    if state != "open":
        close(journal, r.series_id)
        journal.outbox.enqueue(r.series_id, 0, "m", "id", "s", b"{}")
    if state in ("published", "released"):
        journal.outbox.ack(journal.outbox.pending()[0].id, 1)
    if state == "released":
        assert journal.claim_releasable(float("inf")) == [(r.series_id, ["f1"])]
    before = journal.series(r.series_id)
    again = journal.record_instance(meta("1", content_digest="same"), "f2", 10)
    assert again.identical and not again.reopened and again.revision == 0
    after = journal.series(r.series_id)
    assert (after.state, after.revision, after.last_received) == (before.state, before.revision, before.last_received)
    assert "f2" not in journal.referenced_spool_names()


def test_a_resend_without_a_hash_is_taken_as_new_content(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 10)
    publish(journal, r.series_id)
    again = journal.record_instance(meta("1"), "f2", 10)
    assert again.arrival is Arrival.REPLACED and again.reopened and again.revision == 1


def test_a_finding_for_a_stale_revision_is_refused(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    closing = close(journal, r.series_id)
    assert closing.routed and closing.series.state is SeriesState.COMPLETE and closing.series.model == "m"
    # More instances after completion: the series re-opens under revision 1.
    again = journal.record_instance(meta("2"), "f2", 1)
    assert again.reopened and again.revision == 1
    assert not journal.outbox.enqueue(r.series_id, 0, "m", "id-0", "s", b"{}")
    assert journal.close_series(r.series_id, 0, routed) is None
    close(journal, r.series_id, 1)
    assert journal.outbox.enqueue(r.series_id, 1, "m", "id-1", "s", b"{}")
    assert [row.msg_id for row in journal.outbox.pending()] == ["id-1"]


def test_closing_takes_exactly_the_instances_committed_before_it(journal: Journal) -> None:
    """Defect 14: an instance committed between reading the instances and closing must not be left out."""
    r = journal.record_instance(meta("1"), "f1", 1)
    seen: list[int] = []

    def decide(series: SeriesRow, instances: list[Any]) -> tuple[str, str]:
        seen.append(len(instances))
        # Another association thread commits now: it waits for the closing transaction, then re-opens.
        t = threading.Thread(target=journal.record_instance, args=(meta("2"), "f2", 1))
        t.start()
        threads.append(t)
        return ("route", "m")

    threads: list[threading.Thread] = []
    closing = journal.close_series(r.series_id, 0, decide)
    threads[0].join()
    assert closing is not None and [i.sop_instance_uid for i in closing.instances] == ["1"] and seen == [1]
    after = journal.series(r.series_id)
    assert (after.state, after.revision, after.instance_count) == (SeriesState.OPEN, 1, 2)


def test_an_unrouted_series_is_recorded_and_releasable(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    closing = journal.close_series(r.series_id, 0, lambda s, i: None)
    assert closing is not None and not closing.routed and closing.series.state is SeriesState.UNROUTED
    assert journal.claim_releasable(float("inf")) == [(r.series_id, ["f1"])]


def test_the_outbox_keeps_a_finding_until_it_is_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = Journal(path)
    r = j.record_instance(meta("1"), "f1", 1)
    close(j, r.series_id)
    assert j.outbox.enqueue(r.series_id, 0, "m", "id", "edge.findings.a.CR.m", b'{"x":1}')
    j.outbox.attempt_failed(j.outbox.pending()[0].id, "timeout")
    j.close()
    # As after a crash: a new connection sees exactly what was committed.
    j = Journal(path)
    [row] = j.outbox.pending()
    assert (row.msg_id, row.payload, row.subject, row.attempts) == ("id", b'{"x":1}', "edge.findings.a.CR.m", 1)
    assert j.series(r.series_id).state == SeriesState.QUEUED
    assert j.outbox.ack(row.id, stream_seq=7) == r.series_id
    assert j.outbox.pending() == []
    assert j.series(r.series_id).state == SeriesState.PUBLISHED
    assert j.claim_releasable(older_than=0) == []  # released only after the retention time
    [(sid, names)] = j.claim_releasable(older_than=float("inf"))
    assert (sid, names) == (r.series_id, ["f1"])
    assert j.series(sid).state == SeriesState.RELEASED and j.counts().spool_files == 0
    assert j.claim_releasable(older_than=float("inf")) == []  # claimed once
    j.close()


def test_a_backed_off_row_lets_later_rows_through(journal: Journal) -> None:
    """Defect 6: one row that keeps failing must not hold back the findings behind it."""
    for sop in ("1", "2"):
        r = journal.record_instance(meta(sop, series=f"s{sop}"), f"f{sop}", 1)
        close(journal, r.series_id)
        journal.outbox.enqueue(r.series_id, 0, "m", f"id{sop}", "s", b"{}")
    first, _ = journal.outbox.pending()
    journal.outbox.attempt_failed(first.id, "stream full", retry_at=time.time() + 60)
    assert [row.msg_id for row in journal.outbox.pending()] == ["id2"]
    assert [row.msg_id for row in journal.outbox.pending(now=time.time() + 61)] == ["id1", "id2"]


def test_a_rejected_finding_is_parked_and_its_series_fails(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    close(journal, r.series_id)
    journal.outbox.enqueue(r.series_id, 0, "m", "id", "s", b"{}")
    [row] = journal.outbox.pending()
    assert journal.outbox.reject(row.id, "too_large: MaxPayloadError") == r.series_id
    assert journal.outbox.pending() == [] and journal.counts().outbox_rejected == 1
    failed = journal.series(r.series_id)
    assert failed.state is SeriesState.FAILED and "too_large" in (failed.note or "")
    assert journal.claim_releasable(float("inf")) == []  # files kept for an operator
    assert journal.outbox.requeue_rejected() == 1
    assert [x.msg_id for x in journal.outbox.pending()] == ["id"]
    assert journal.series(r.series_id).state is SeriesState.QUEUED


def test_an_ack_of_an_earlier_revision_leaves_the_reopened_series_open(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    close(journal, r.series_id)
    journal.outbox.enqueue(r.series_id, 0, "m", "id-0", "s", b"{}")
    journal.record_instance(meta("2"), "f2", 1)
    journal.outbox.ack(journal.outbox.pending()[0].id, 1)
    s = journal.series(r.series_id)
    assert (s.state, s.revision) == (SeriesState.OPEN, 1)
    assert journal.claim_releasable(float("inf")) == []


def test_a_released_series_that_comes_back_starts_a_new_revision(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    publish(journal, r.series_id)
    journal.claim_releasable(float("inf"))
    back = journal.record_instance(meta("2"), "f2", 1)
    assert back.reopened and back.revision == 1 and back.replaced_spool_name is None
    assert [i.spool_name for i in journal.instances(r.series_id)] == ["f2"]
    s = journal.series(r.series_id)
    assert (s.instance_count, s.received_count) == (1, 2)


def test_a_release_claim_and_a_late_instance_never_interleave(journal: Journal) -> None:
    """Defect 4: whichever commits first wins; the journal never holds rows whose files were claimed."""
    for k in range(40):
        r = journal.record_instance(meta(f"{k}.1", series=f"race{k}"), f"a{k}", 1)
        publish(journal, r.series_id, msg_id=f"id{k}")
    claimed: list[tuple[int, list[str]]] = []
    late = [threading.Thread(target=journal.record_instance, args=(meta(f"{k}.2", series=f"race{k}"), f"b{k}", 1))
            for k in range(40)]
    claimer = threading.Thread(target=lambda: claimed.extend(journal.claim_releasable(float("inf"))))
    for i, t in enumerate(late):
        t.start()
        if i == 20:
            claimer.start()
    for t in [*late, claimer]:
        t.join()
    deleted = {name for _, names in claimed for name in names}
    held = journal.referenced_spool_names()
    assert not deleted & held
    for k in range(40):
        s = journal.series_in(SeriesState.OPEN)
        assert f"b{k}" in held  # every late instance is held, in its series' next revision
    assert len(s) == 40 and all(x.revision == 1 for x in s)


def test_pruning_removes_old_history_and_keeps_what_is_live(journal: Journal) -> None:
    old = journal.record_instance(meta("1", series="old"), "f1", 1)
    publish(journal, old.series_id, msg_id="old")
    journal.claim_releasable(float("inf"))
    live = journal.record_instance(meta("2", series="live"), "f2", 1)
    rejected = journal.record_instance(meta("3", series="rej"), "f3", 1)
    close(journal, rejected.series_id)
    journal.outbox.enqueue(rejected.series_id, 0, "m", "rej", "s", b"{}")
    journal.outbox.reject(journal.outbox.pending()[0].id, "too_large")
    assert journal.prune(older_than=0) == {"outbox": 0, "instances": 0, "series": 0}
    assert journal.prune(older_than=time.time() + 1) == {"outbox": 1, "instances": 1, "series": 1}
    assert {s.series_uid for s in journal.series_in(*SeriesState)} == {"live", "rej"}
    assert journal.referenced_spool_names() == {"f2", "f3"} and journal.counts().outbox_rejected == 1
    assert journal.series(live.series_id).state is SeriesState.OPEN


def test_the_prune_cutoff_never_passes_now_and_a_file_placed_after_the_last_change_is_adoptable(
        journal: Journal) -> None:
    day = 86_400.0
    # A prune while the clock was 30 days fast: the cut-off it stores is no later than its own now.
    journal.prune(older_than=time.time() + 23 * day)
    [(stored,)] = journal.read("SELECT value FROM meta WHERE key='prune_cutoff'")
    assert float(stored) <= time.time()
    # One stored in the future by an earlier version (or read by a clock that is now behind) refuses nothing.
    with journal.transaction("a cut-off from a fast clock") as db:
        db.execute("UPDATE meta SET value=? WHERE key='prune_cutoff'", (time.time() + 23 * day,))
    assert journal.adoption_rules()[1] is None
    # A cut-off in the past bounds adoption only up to the journal's last change: rows lost in a power cut are
    # the last ones, so a file placed after that change is adopted whatever the cut-off says.
    then = time.time() - 100
    journal.record_instance(meta("1"), "f1", 1, now=then)
    journal.prune(older_than=time.time() - 10)
    known, placed_after = journal.adoption_rules()
    assert known == {"f1"} and placed_after == then


def test_every_per_tick_query_uses_an_index(journal: Journal) -> None:
    """Defect 10: the gauges, sweeps and the outbox drain must not scan the tables."""
    queries = [
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances WHERE released=0",
        "SELECT spool_name FROM instances WHERE released=0",
        "SELECT id FROM outbox WHERE state='pending' AND next_attempt_at <= 1 ORDER BY id",
        "SELECT id FROM series WHERE state IN ('published', 'unrouted') AND updated_at <= 1",
        "DELETE FROM outbox WHERE state='acked' AND acked_at < 1",
        "DELETE FROM instances WHERE released=1 AND released_at < 1",
    ]
    for sql in queries:
        steps = [str(r[-1]) for r in journal.read("EXPLAIN QUERY PLAN " + sql)]
        # A scan is fine only of a (partial) index: instances_held holds only the rows still held.
        assert all("USING" in step for step in steps if step.startswith(("SCAN", "SEARCH"))), (sql, steps)


def test_an_unclean_stop_republishes_recent_acknowledged_findings(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = Journal(path)
    assert j.begin_run()  # a new journal counts as a clean start
    r = j.record_instance(meta("1"), "f1", 1)
    publish(j, r.series_id)
    j.close()  # no end_run: as after SIGKILL
    j = Journal(path)
    assert not j.begin_run()
    assert j.outbox.republish_recent(window_seconds=0, now=time.time() + 10) == 0
    assert j.outbox.republish_recent(window_seconds=60) == 1
    [row] = j.outbox.pending()
    assert row.msg_id == "id"
    j.end_run()
    j.close()
    j = Journal(path)
    assert j.begin_run()
    j.close()


def test_a_schema_1_journal_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO meta VALUES('schema_version', '1')")
        db.execute("INSERT INTO series(series_uid, first_received, last_received, state, updated_at)"
                   " VALUES('s', 1, 1, 'queued', 1)")
        db.execute("INSERT INTO instances(series_id, sop_instance_uid, spool_name, size_bytes, received_at)"
                   " VALUES(1, 'i', 'f1', 5, 1)")
        db.execute("INSERT INTO outbox(msg_id, subject, payload, series_id, model, state, created_at)"
                   " VALUES('id', 's', x'7b7d', 1, 'm', 'pending', 1)")
    db.close()
    j = Journal(path)
    [row] = j.outbox.pending()
    assert (row.msg_id, row.revision) == ("id", 0)
    j.outbox.ack(row.id, 3)
    assert j.series(1).state is SeriesState.PUBLISHED and j.referenced_spool_names() == {"f1"}
    assert j.read("SELECT value FROM meta WHERE key='schema_version'") == [("3",)]
    assert j.read("SELECT content_digest FROM instances") == [("",)]


def test_a_schema_2_journal_keeps_its_sha256_digests_and_a_resend_after_it_counts_as_changed(tmp_path: Path) -> None:
    """Schema 3 renames content_sha256 to content_digest (BLAKE3 from then on, dicom/digest.py). A held
    instance's SHA-256 is kept as it was; the same instance re-sent after the upgrade cannot be shown to be
    the same, so it is taken as changed content (its series is inferred again, nothing is dropped)."""
    path = tmp_path / "j.sqlite3"
    sha = "9f" * 32
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.replace("content_digest", "content_sha256"))
        db.execute("INSERT INTO meta VALUES('schema_version', '2')")
        db.execute("INSERT INTO series(series_uid, first_received, last_received, state, updated_at)"
                   " VALUES('1.2.3', 1, 1, 'open', 1)")
        db.execute("INSERT INTO instances(series_id, sop_instance_uid, spool_name, size_bytes, received_at,"
                   " content_sha256) VALUES(1, '1', 'f1', 5, 1, ?)", (sha,))
    db.close()
    j = Journal(path)
    assert j.read("SELECT value FROM meta WHERE key='schema_version'") == [("3",)]
    assert j.read("SELECT spool_name, content_digest FROM instances") == [("f1", sha)]
    blake = "blake3:" + "9f" * 32
    again = j.record_instance(meta("1", content_digest=blake), "f2", 5)
    assert again.arrival is Arrival.REPLACED and again.replaced_spool_name == "f1"
    assert j.record_instance(meta("1", content_digest=blake), "f3", 5).identical
    j.close()


V1_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE series(id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL UNIQUE, study_uid TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '', modality TEXT NOT NULL DEFAULT '', body_part TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '', image_type TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '', manufacturer TEXT NOT NULL DEFAULT '',
    calling_aet TEXT NOT NULL DEFAULT '', called_aet TEXT NOT NULL DEFAULT '', expected_count INTEGER,
    revision INTEGER NOT NULL DEFAULT 0, first_received REAL NOT NULL, last_received REAL NOT NULL,
    state TEXT NOT NULL, route TEXT, model TEXT, note TEXT, updated_at REAL NOT NULL);
CREATE INDEX series_state ON series(state);
CREATE TABLE instances(id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL REFERENCES series(id),
    sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL DEFAULT '', transfer_syntax_uid TEXT NOT NULL
    DEFAULT '', instance_number INTEGER, spool_name TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL, released INTEGER NOT NULL DEFAULT 0, UNIQUE(series_id, sop_instance_uid));
CREATE TABLE jobs(id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL REFERENCES series(id), revision INTEGER
    NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL, error TEXT, created_at REAL NOT NULL, finished_at REAL);
CREATE TABLE outbox(id INTEGER PRIMARY KEY, msg_id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL, payload BLOB
    NOT NULL, series_id INTEGER NOT NULL REFERENCES series(id), model TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created_at REAL NOT NULL, acked_at REAL,
    stream_seq INTEGER);
CREATE INDEX outbox_state ON outbox(state);
"""


def test_journal_from_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(JournalError, match="schema 99"):
        Journal(path)


def test_a_file_that_is_not_a_database_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError):
        Journal(path)


def test_concurrent_association_threads_each_commit(journal: Journal) -> None:
    def store(t: int) -> None:
        for i in range(50):
            journal.record_instance(meta(f"{t}.{i}", series=f"9.{t % 3}"), f"n{t}-{i}", 1)

    threads = [threading.Thread(target=store, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = journal.counts()
    assert counts.spool_files == 300 and counts.by_series_state == {"open": 3}


def test_the_requeue_command_gives_rejected_findings_another_try(tmp_path: Path) -> None:
    import yaml

    from edge_agent.cli import main
    from edge_agent.config import DEFAULT_CONFIG_PATH

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["model_repository"] = str(DEFAULT_CONFIG_PATH.parent.parent / "engines")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(raw))
    j = Journal(tmp_path / "state" / "journal.sqlite3")
    r = j.record_instance(meta("1"), "f1", 1)
    close(j, r.series_id)
    j.outbox.enqueue(r.series_id, 0, "m", "id", "s", b"{}")
    j.outbox.reject(j.outbox.pending()[0].id, "too_large")
    assert main(["requeue-rejected", "--config", str(config)]) == 0  # beside an open connection, as a daemon's
    assert [row.msg_id for row in j.outbox.pending()] == ["id"]
    j.close()


def test_writers_in_other_processes_take_turns_on_the_lock_file(tmp_path: Path) -> None:
    import fcntl
    import os

    journal = Journal(tmp_path / "journal.db")
    journal.share_with_processes()
    other = os.open(tmp_path / "journal.db.lock", os.O_RDWR)  # another process's writer, as flock sees it
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (journal.record_instance(meta("1.1"), "a.dcm", 1), done.set()))
        writer.start()
        assert not done.wait(0.3), "a write went ahead while another process held the lock"
        fcntl.flock(other, fcntl.LOCK_UN)
        assert done.wait(5)
        writer.join()
        assert journal.read("SELECT COUNT(*) FROM instances") == [(1,)]
    finally:
        os.close(other)
    journal.close()
    assert journal._writers is None
