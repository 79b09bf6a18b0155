"""The daemon's durable state: one SQLite database in WAL mode.

Tables: ``series`` (one row per Series Instance UID), ``instances`` (one row per stored SOP
instance, naming its spool file), ``jobs`` (one row per model run over a series revision) and
``outbox`` (findings waiting for a JetStream PubAck). Every state change is one transaction, so
that a SIGKILL at any point leaves a state the next start resumes from.

The journal is used from pynetdicom's association threads (a Success is answered only after the
instance's row is committed) and from the event loop; one lock serialises the connection.
``synchronous=FULL`` because a commit here stands behind a DICOM Success: with NORMAL, WAL mode
may lose the last transactions on power loss (not on a process crash).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edge_agent.errors import JournalError

SCHEMA_VERSION = 1


class SeriesState(StrEnum):
    OPEN = "open"  # instances are still arriving
    COMPLETE = "complete"  # the assembler closed it and a route picked a model; the finding is being made
    QUEUED = "queued"  # the finding is in the outbox
    PUBLISHED = "published"  # JetStream acknowledged the finding; the spool files may be kept a while
    RELEASED = "released"  # the spool files are gone; the row remains as history
    UNROUTED = "unrouted"  # no route matched; recorded, then released
    FAILED = "failed"  # could not be processed; files kept for an operator


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series(
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    image_type TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    manufacturer TEXT NOT NULL DEFAULT '',
    calling_aet TEXT NOT NULL DEFAULT '',
    called_aet TEXT NOT NULL DEFAULT '',
    expected_count INTEGER,
    revision INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    state TEXT NOT NULL,
    route TEXT,
    model TEXT,
    note TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS instances(
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL DEFAULT '',
    instance_number INTEGER,
    spool_name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    UNIQUE(series_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS jobs(
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    revision INTEGER NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    series_id INTEGER NOT NULL REFERENCES series(id),
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    acked_at REAL,
    stream_seq INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state);
"""


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver reads from a stored instance's header (no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str = ""
    transfer_syntax_uid: str = ""
    accession: str = ""
    modality: str = ""
    body_part: str = ""
    image_type: str = ""  # backslash-joined, as in the data element
    series_description: str = ""
    manufacturer: str = ""
    instance_number: int | None = None
    expected_count: int | None = None  # Images in Acquisition, when the modality says
    calling_aet: str = ""
    called_aet: str = ""


@dataclass(frozen=True)
class Recorded:
    series_id: int
    instance_id: int
    revision: int
    new_series: bool
    replaced_spool_name: str | None  # a re-sent instance replaces its earlier file; delete this one
    reopened: bool  # the series had been closed and is open again under a new revision
    spool_name: str


@dataclass(frozen=True)
class SeriesRow:
    id: int
    series_uid: str
    study_uid: str
    accession: str
    modality: str
    body_part: str
    sop_class_uid: str
    image_type: str
    series_description: str
    manufacturer: str
    calling_aet: str
    called_aet: str
    expected_count: int | None
    revision: int
    first_received: float
    last_received: float
    state: SeriesState
    route: str | None
    model: str | None
    note: str | None
    instance_count: int = 0


@dataclass(frozen=True)
class InstanceRow:
    id: int
    series_id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    spool_name: str
    size_bytes: int
    received_at: float


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


@dataclass
class Counts:
    by_series_state: dict[str, int] = field(default_factory=dict)
    outbox_pending: int = 0
    spool_bytes: int = 0
    spool_files: int = 0


class Journal:
    """Thread-safe access to the state database. Every public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            with self._tx() as db:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise JournalError(f"journal {path} has schema {row[0]}, this build knows {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from exc

    # -- the receive path -------------------------------------------------------------------------

    def record_instance(
        self, meta: InstanceMeta, spool_name: str, size_bytes: int, now: float | None = None
    ) -> Recorded:
        """Record a stored instance. Creates its series, or re-opens a closed one under a new revision."""
        now = time.time() if now is None else now
        try:
            with self._tx() as db:
                row = db.execute(
                    "SELECT id, state, revision FROM series WHERE series_uid=?", (meta.series_uid,)
                ).fetchone()
                new_series = row is None
                reopened = False
                if row is None:
                    cur = db.execute(
                        "INSERT INTO series(series_uid, study_uid, accession, modality, body_part, sop_class_uid,"
                        " image_type, series_description, manufacturer, calling_aet, called_aet, expected_count,"
                        " revision, first_received, last_received, state, updated_at)"
                        " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?,?)",
                        (
                            meta.series_uid,
                            meta.study_uid,
                            meta.accession,
                            meta.modality,
                            meta.body_part,
                            meta.sop_class_uid,
                            meta.image_type,
                            meta.series_description,
                            meta.manufacturer,
                            meta.calling_aet,
                            meta.called_aet,
                            meta.expected_count,
                            now,
                            now,
                            SeriesState.OPEN,
                            now,
                        ),
                    )
                    series_id = int(cur.lastrowid or 0)
                    revision = 0
                else:
                    series_id, state, revision = int(row[0]), str(row[1]), int(row[2])
                    if state != SeriesState.OPEN:
                        # New instances after a series was closed: the finding must be made again over
                        # the whole series, under a new revision (and so a new message id).
                        revision += 1
                        reopened = True
                        db.execute(
                            "UPDATE series SET state=?, revision=?, route=NULL, model=NULL, note=NULL,"
                            " first_received=?, last_received=?, updated_at=? WHERE id=?",
                            (SeriesState.OPEN, revision, now, now, now, series_id),
                        )
                    else:
                        db.execute(
                            "UPDATE series SET last_received=?, updated_at=?,"
                            " expected_count=COALESCE(?, expected_count) WHERE id=?",
                            (now, now, meta.expected_count, series_id),
                        )
                old = db.execute(
                    "SELECT id, spool_name, released FROM instances WHERE series_id=? AND sop_instance_uid=?",
                    (series_id, meta.sop_instance_uid),
                ).fetchone()
                replaced = None
                fields = (
                    meta.sop_class_uid,
                    meta.transfer_syntax_uid,
                    meta.instance_number,
                    spool_name,
                    size_bytes,
                    now,
                )
                if old is not None:
                    replaced = None if int(old[2]) else str(old[1])
                    db.execute(
                        "UPDATE instances SET sop_class_uid=?, transfer_syntax_uid=?, instance_number=?,"
                        " spool_name=?, size_bytes=?, received_at=?, released=0 WHERE id=?",
                        (*fields, int(old[0])),
                    )
                    instance_id = int(old[0])
                else:
                    cur = db.execute(
                        "INSERT INTO instances(sop_class_uid, transfer_syntax_uid, instance_number, spool_name,"
                        " size_bytes, received_at, series_id, sop_instance_uid) VALUES(?,?,?,?,?,?,?,?)",
                        (*fields, series_id, meta.sop_instance_uid),
                    )
                    instance_id = int(cur.lastrowid or 0)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot record instance: {exc}") from exc
        return Recorded(series_id, instance_id, revision, new_series, replaced, reopened, spool_name)

    # -- series -----------------------------------------------------------------------------------

    _SERIES_COLS = (
        "s.id, s.series_uid, s.study_uid, s.accession, s.modality, s.body_part, s.sop_class_uid, s.image_type,"
        " s.series_description, s.manufacturer, s.calling_aet, s.called_aet, s.expected_count, s.revision,"
        " s.first_received, s.last_received, s.state, s.route, s.model, s.note,"
        " (SELECT COUNT(*) FROM instances i WHERE i.series_id=s.id)"
    )

    @staticmethod
    def _series(row: tuple[Any, ...]) -> SeriesRow:
        vals = list(row)
        vals[16] = SeriesState(vals[16])
        return SeriesRow(*vals)

    def series(self, series_id: int) -> SeriesRow:
        rows = self._read(f"SELECT {self._SERIES_COLS} FROM series s WHERE s.id=?", (series_id,))
        if not rows:
            raise JournalError(f"no series with id {series_id}")
        return self._series(rows[0])

    def series_in(self, *states: SeriesState) -> list[SeriesRow]:
        marks = ",".join("?" * len(states))
        rows = self._read(
            f"SELECT {self._SERIES_COLS} FROM series s WHERE s.state IN ({marks}) ORDER BY s.id", tuple(states)
        )
        return [self._series(r) for r in rows]

    def instances(self, series_id: int) -> list[InstanceRow]:
        rows = self._read(
            "SELECT id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number,"
            " spool_name, size_bytes, received_at FROM instances WHERE series_id=? AND released=0"
            " ORDER BY COALESCE(instance_number, 0), id",
            (series_id,),
        )
        return [InstanceRow(*r) for r in rows]

    def set_series_state(
        self,
        series_id: int,
        state: SeriesState,
        *,
        revision: int | None = None,
        route: str | None = None,
        model: str | None = None,
        note: str | None = None,
    ) -> bool:
        """Move a series to ``state``. With ``revision``, only if the series is still at that revision.

        Returns False (and changes nothing) when the series was re-opened meanwhile.
        """
        now = time.time()
        with self._tx() as db:
            sql = (
                "UPDATE series SET state=?, route=COALESCE(?, route), model=COALESCE(?, model),"
                " note=COALESCE(?, note), updated_at=? WHERE id=?"
            )
            args: tuple[Any, ...] = (state, route, model, note, now, series_id)
            if revision is not None:
                sql += " AND revision=?"
                args += (revision,)
            cur = db.execute(sql, args)
            return cur.rowcount == 1

    def start_job(self, series_id: int, revision: int, model: str) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs(series_id, revision, model, state, created_at) VALUES(?,?,?,?,?)",
                (series_id, revision, model, "running", time.time()),
            )
            return int(cur.lastrowid or 0)

    def finish_job(self, job_id: int, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, error=?, finished_at=? WHERE id=?",
                ("failed" if error else "done", error, time.time(), job_id),
            )

    # -- the outbox -------------------------------------------------------------------------------

    def enqueue_finding(
        self, series_id: int, revision: int, model: str, msg_id: str, subject: str, payload: bytes
    ) -> bool:
        """Put a finding in the outbox and mark its series QUEUED, in one transaction.

        Returns False if the series moved on to another revision meanwhile (the finding is stale).
        A finding with a message id already in the outbox is not added twice.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, updated_at=? WHERE id=? AND revision=?",
                (SeriesState.QUEUED, now, series_id, revision),
            )
            if cur.rowcount != 1:
                return False
            db.execute(
                "INSERT OR IGNORE INTO outbox(msg_id, subject, payload, series_id, model, state, created_at)"
                " VALUES(?,?,?,?,?,?,?)",
                (msg_id, subject, payload, series_id, model, "pending", now),
            )
            return True

    def pending_outbox(self, limit: int = 100) -> list[OutboxRow]:
        rows = self._read(
            "SELECT id, msg_id, subject, payload, series_id, model, attempts, created_at FROM outbox"
            " WHERE state='pending' ORDER BY id LIMIT ?",
            (limit,),
        )
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def outbox_attempt_failed(self, outbox_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts=attempts+1, last_error=? WHERE id=?", (error[:500], outbox_id))

    def ack_finding(self, outbox_id: int, stream_seq: int) -> int:
        """Mark a finding acknowledged; its series becomes PUBLISHED when no other finding waits for it.

        Returns the series id.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT series_id FROM outbox WHERE id=?", (outbox_id,)).fetchone()
            if row is None:
                raise JournalError(f"no outbox row {outbox_id}")
            series_id = int(row[0])
            db.execute(
                "UPDATE outbox SET state='acked', acked_at=?, stream_seq=?, attempts=attempts+1 WHERE id=?",
                (now, stream_seq, outbox_id),
            )
            waiting = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE series_id=? AND state='pending'", (series_id,)
            ).fetchone()[0]
            if not waiting:
                db.execute(
                    "UPDATE series SET state=?, updated_at=? WHERE id=? AND state=?",
                    (SeriesState.PUBLISHED, now, series_id, SeriesState.QUEUED),
                )
            return series_id

    # -- releasing spool files --------------------------------------------------------------------

    def releasable(self, older_than: float) -> list[tuple[int, list[str]]]:
        """Series that may give up their spool files: published (or unrouted) before ``older_than``."""
        rows = self._read(
            "SELECT id FROM series WHERE state IN (?, ?) AND updated_at <= ? ORDER BY id",
            (SeriesState.PUBLISHED, SeriesState.UNROUTED, older_than),
        )
        out = []
        for (sid,) in rows:
            names = [
                str(r[0])
                for r in self._read("SELECT spool_name FROM instances WHERE series_id=? AND released=0", (sid,))
            ]
            out.append((int(sid), names))
        return out

    def mark_released(self, series_id: int, final_state: SeriesState = SeriesState.RELEASED) -> None:
        """Record that a series' files were removed. Only from PUBLISHED/UNROUTED (a re-opened series is left)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, updated_at=? WHERE id=? AND state IN (?, ?)",
                (final_state, time.time(), series_id, SeriesState.PUBLISHED, SeriesState.UNROUTED),
            )
            if cur.rowcount:
                db.execute("UPDATE instances SET released=1 WHERE series_id=?", (series_id,))

    def counts(self) -> Counts:
        c = Counts()
        for state, n in self._read("SELECT state, COUNT(*) FROM series GROUP BY state"):
            c.by_series_state[str(state)] = int(n)
        c.outbox_pending = int(self._read("SELECT COUNT(*) FROM outbox WHERE state='pending'")[0][0])
        row = self._read("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances WHERE released=0")[0]
        c.spool_files, c.spool_bytes = int(row[0]), int(row[1])
        return c

    def referenced_spool_names(self) -> set[str]:
        return {str(r[0]) for r in self._read("SELECT spool_name FROM instances WHERE released=0")}
