"""The outbox: findings between the series that made them and JetStream's PubAck, in the journal.

A row is ``pending`` until the stream acknowledges it (``acked``), or ``rejected`` when the broker
refused it for a reason a retry cannot change (too large, not permitted): a rejected row is parked
with its reason and never blocks the rows behind it (issue 8, defect 6). A transient failure backs
off per row (``next_attempt_at``), so later rows flow meanwhile.

A PubAck is not an fsync: JetStream acknowledges a write before it is on disk and, by default,
syncs every two minutes (nats-server issue #7564). Acknowledged rows therefore keep their payload
(pruned after ``journal.prune_after_days``), and after an unclean stop those acknowledged within
``bus.republish_window_seconds`` are published again; the stream's Nats-Msg-Id de-duplication drops
what it did keep, which is why that window must fit inside the stream's duplicate window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.errors import JournalError
from edge_agent.series import Event, SeriesState

if TYPE_CHECKING:
    from edge_agent.journal import Journal


@dataclass(frozen=True)
class Backlog:
    """What waits in the outbox and when each model's last finding went out (for ``edge-agent status``)."""

    pending: int
    rejected: int
    oldest_pending_at: float | None  # when the oldest pending finding entered the outbox (Unix seconds)
    last_acked_at: dict[str, float]  # model -> when its last finding was acknowledged (rows not yet pruned)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    msg_id: str
    subject: str
    payload: bytes
    series_id: int
    model: str
    attempts: int
    created_at: float
    revision: int = 0


class Outbox:
    """The outbox table's rules; shares the journal's connection, lock and transactions."""

    def __init__(self, journal: Journal) -> None:
        self._j = journal

    def enqueue(self, series_id: int, revision: int, model: str, msg_id: str, subject: str, payload: bytes,
                started: float | None = None) -> bool:
        """Put a finding in the outbox and mark its series QUEUED, in one transaction.

        Returns False if the series moved on to another revision meanwhile (the finding is stale). A
        finding with a message id already in the outbox is not added twice.
        """
        now = time.time()
        with self._j.transaction("queue a finding") as db:
            if not self._j.apply_event(db, series_id, revision, Event.QUEUED):
                return False
            db.execute(
                "INSERT OR IGNORE INTO outbox(msg_id, subject, payload, series_id, model, state, created_at, revision)"
                " VALUES(?,?,?,?,?,?,?,?)",
                (msg_id, subject, payload, series_id, model, "pending", now, revision),
            )
            self._j.record_job(db, series_id, revision, model, "done", None, now if started is None else started)
            return True

    def pending(self, limit: int = 100, now: float | None = None) -> list[OutboxRow]:
        """Pending rows due for a try, oldest first."""
        now = time.time() if now is None else now
        rows = self._j.read(
            "SELECT id, msg_id, subject, payload, series_id, model, attempts, created_at, revision FROM outbox"
            " WHERE state='pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (now, limit),
        )
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7], r[8]) for r in rows]

    def next_due_at(self) -> float | None:
        """When the earliest backed-off pending row is due, or None when none waits."""
        row = self._j.read("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'")
        return None if row[0][0] is None else float(row[0][0])

    def backlog(self) -> Backlog:
        """Pending and rejected counts, the oldest pending row's entry time and the last acknowledgement per model."""
        counts = dict(self._j.read("SELECT state, COUNT(*) FROM outbox WHERE state IN ('pending', 'rejected')"
                                   " GROUP BY state"))
        oldest = self._j.read("SELECT MIN(created_at) FROM outbox WHERE state='pending'")[0][0]
        acked = self._j.read("SELECT model, MAX(acked_at) FROM outbox WHERE state='acked' GROUP BY model")
        return Backlog(int(counts.get("pending", 0)), int(counts.get("rejected", 0)),
                       None if oldest is None else float(oldest), {str(m): float(t) for m, t in acked})

    def attempt_failed(self, outbox_id: int, error: str, retry_at: float = 0.0) -> None:
        with self._j.transaction("record a failed publish") as db:
            db.execute(
                "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_at=? WHERE id=? AND state='pending'",
                (error[:500], retry_at, outbox_id),
            )

    def reject(self, outbox_id: int, reason: str) -> int:
        """Park a finding the broker will never take; its series fails (files kept). Returns the series id."""
        with self._j.transaction("reject a finding") as db:
            row = db.execute("SELECT series_id, revision FROM outbox WHERE id=?", (outbox_id,)).fetchone()
            if row is None:
                raise JournalError(f"no outbox row {outbox_id}")
            db.execute(
                "UPDATE outbox SET state='rejected', attempts=attempts+1, last_error=? WHERE id=? AND state='pending'",
                (reason[:500], outbox_id),
            )
            self._j.apply_event(db, int(row[0]), int(row[1]), Event.REJECTED, ", note=?",
                          (f"finding rejected by the broker: {reason}"[:500],))
            return int(row[0])

    def ack(self, outbox_id: int, stream_seq: int) -> int:
        """Mark a finding acknowledged; its series becomes PUBLISHED if it is the series' current revision.

        Returns the series id.
        """
        now = time.time()
        with self._j.transaction("acknowledge a finding") as db:
            row = db.execute("SELECT series_id, revision, state FROM outbox WHERE id=?", (outbox_id,)).fetchone()
            if row is None:
                raise JournalError(f"no outbox row {outbox_id}")
            series_id = int(row[0])
            db.execute(
                "UPDATE outbox SET state='acked', acked_at=?, stream_seq=?, attempts=attempts+1 WHERE id=?",
                (now, stream_seq, outbox_id),
            )
            # A finding of an earlier revision, acknowledged after the series re-opened, changes nothing.
            self._j.apply_event(db, series_id, int(row[1]), Event.ACKED)
            return series_id

    def requeue_rejected(self) -> int:
        """Give every rejected finding another try (an operator fixed the cause). Returns how many."""
        with self._j.transaction("re-queue rejected findings") as db:
            rows = db.execute("SELECT id, series_id, revision FROM outbox WHERE state='rejected'").fetchall()
            for oid, sid, revision in rows:
                db.execute("UPDATE outbox SET state='pending', next_attempt_at=0 WHERE id=?", (oid,))
                db.execute(
                    "UPDATE series SET state=?, note=NULL, updated_at=? WHERE id=? AND revision=? AND state=?",
                    (SeriesState.QUEUED, time.time(), sid, revision, SeriesState.FAILED),
                )
            return len(rows)

    def republish_recent(self, window_seconds: float, now: float | None = None) -> int:
        """After an unclean stop: publish again what the stream acknowledged in the last ``window_seconds``.

        The broker may have acknowledged those without having them on disk. Returns how many rows.
        """
        now = time.time() if now is None else now
        with self._j.transaction("re-queue recent findings") as db:
            return int(db.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=0 WHERE state='acked' AND acked_at >= ?",
                (now - window_seconds,),
            ).rowcount)
