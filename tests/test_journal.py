"""The journal: every state change one transaction, revisions, the outbox, and what survives a reopen."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import JournalError
from edge_agent.journal import InstanceMeta, Journal, SeriesState

CR = "1.2.840.10008.5.1.4.1.1.1"


def meta(sop: str, series: str = "1.2.3", **kw: Any) -> InstanceMeta:
    return InstanceMeta(sop_instance_uid=sop, sop_class_uid=CR, series_uid=series, modality="CR", **kw)


def test_instances_group_into_series_and_a_resend_replaces_the_file(journal: Journal) -> None:
    a = journal.record_instance(meta("1"), "f1", 10)
    b = journal.record_instance(meta("2", expected_count=2), "f2", 20)
    again = journal.record_instance(meta("1"), "f3", 30)
    assert a.new_series and not b.new_series and a.series_id == b.series_id
    assert again.replaced_spool_name == "f1" and again.instance_id == a.instance_id
    [series] = journal.series_in(SeriesState.OPEN)
    assert (series.instance_count, series.expected_count) == (2, 2)
    assert [i.spool_name for i in journal.instances(a.series_id)] == ["f3", "f2"]
    assert journal.counts().spool_bytes == 50


def test_a_finding_for_a_stale_revision_is_refused(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    assert journal.set_series_state(r.series_id, SeriesState.COMPLETE, revision=0, route="x", model="m")
    # More instances after completion: the series re-opens under revision 1.
    again = journal.record_instance(meta("2"), "f2", 1)
    assert again.reopened and again.revision == 1
    assert not journal.enqueue_finding(r.series_id, 0, "m", "id-0", "s", b"{}")
    assert not journal.set_series_state(r.series_id, SeriesState.COMPLETE, revision=0)
    assert journal.enqueue_finding(r.series_id, 1, "m", "id-1", "s", b"{}")
    assert [row.msg_id for row in journal.pending_outbox()] == ["id-1"]


def test_the_outbox_keeps_a_finding_until_it_is_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = Journal(path)
    r = j.record_instance(meta("1"), "f1", 1)
    assert j.enqueue_finding(r.series_id, 0, "m", "id", "edge.findings.a.CR.m", b'{"x":1}')
    assert j.enqueue_finding(r.series_id, 0, "m", "id", "edge.findings.a.CR.m", b'{"x":1}')  # same id: one row
    j.outbox_attempt_failed(j.pending_outbox()[0].id, "timeout")
    j.close()
    # As after a crash: a new connection sees exactly what was committed.
    j = Journal(path)
    [row] = j.pending_outbox()
    assert (row.msg_id, row.payload, row.subject) == ("id", b'{"x":1}', "edge.findings.a.CR.m")
    assert j.series(r.series_id).state == SeriesState.QUEUED
    assert j.ack_finding(row.id, stream_seq=7) == r.series_id
    assert j.pending_outbox() == []
    assert j.series(r.series_id).state == SeriesState.PUBLISHED
    assert j.releasable(older_than=0) == []  # released only after the retention time
    [(sid, names)] = j.releasable(older_than=float("inf"))
    assert (sid, names) == (r.series_id, ["f1"])
    j.mark_released(sid)
    assert j.series(sid).state == SeriesState.RELEASED and j.counts().spool_files == 0
    j.close()


def test_a_released_series_that_comes_back_starts_a_new_revision(journal: Journal) -> None:
    r = journal.record_instance(meta("1"), "f1", 1)
    journal.enqueue_finding(r.series_id, 0, "m", "id", "s", b"{}")
    journal.ack_finding(journal.pending_outbox()[0].id, 1)
    journal.mark_released(r.series_id)
    back = journal.record_instance(meta("2"), "f2", 1)
    assert back.reopened and back.revision == 1 and back.replaced_spool_name is None
    assert [i.spool_name for i in journal.instances(r.series_id)] == ["f2"]


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
