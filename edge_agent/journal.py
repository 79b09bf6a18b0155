"""The daemon's durable state: one SQLite database in WAL mode, the store behind ``series.py``.

Tables: ``series`` (one row per Series Instance UID), ``instances`` (one row per stored SOP
instance, naming its spool file and its content hash), ``jobs`` (one row per finished model run
over a series revision) and ``outbox`` (findings waiting for, or holding, a JetStream PubAck; see
``outbox.py``). Every state change is one transaction that applies the pure rules of ``series.py``
to the state it reads, so that a SIGKILL at any point leaves a state the next start resumes from.

The journal is used from pynetdicom's association threads (a Success is answered only after the
instance's row is committed) and, through ``asyncio.to_thread``, from the event loop; one lock
serialises the connection. ``synchronous=FULL`` for every transaction but the receiver's: with NORMAL,
WAL mode may lose the last transactions on power loss (not on a process crash). The receiver records its
instances with NORMAL (``record_instances(durable=False)``): there the spool file is the record of truth. Its
data and name are fsynced before the Success, its name carries a digest of its content, and after an unclean
stop ``Spool.adoptable`` finds the files whose rows were lost and the daemon records them again. For that,
the journal remembers which unreferenced files are dead (``dead_files``: replaced content whose deletion may
not have happened) and the cut-off of its last prune (a released row pruned away no longer names its file).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.dicom.header import InstanceMeta
from edge_agent.errors import JournalError
from edge_agent.journal_schema import INDEXES, SCHEMA, SCHEMA_VERSION, migrate
from edge_agent.records import Closing, Counts, InstanceRow, Recorded, SeriesRow
from edge_agent.series import (
    RELEASABLE_STATES,
    Event,
    SeriesState,
    allowed_from,
    on_arrival,
    transition,
)

# InstanceMeta lives in dicom/header.py; re-exported while importers move there.
__all__ = ["Closing", "Counts", "InstanceMeta", "InstanceRow", "Journal", "Recorded", "SeriesRow", "SeriesState"]

# decide(series, instances) -> (route name, model name), or None when no route matches.
Decide = Callable[[SeriesRow, list[InstanceRow]], tuple[str, str] | None]


class Journal:
    """Thread-safe access to the state database. Every public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._writers: int | None = None  # the lock file's fd, once shared with other processes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            with self._tx() as db:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) in (1, 2):
                    migrate(db, int(row[0]))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise JournalError(f"journal {path} has schema {row[0]}, this build knows {SCHEMA_VERSION}")
            self._db.executescript(INDEXES)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        from edge_agent.outbox import Outbox  # the outbox shares this connection and its lock

        self.outbox = Outbox(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._writers is not None:
                os.close(self._writers)
                self._writers = None

    def share_with_processes(self) -> None:
        """Other processes write to this database too (receiver processes): writers take turns on a lock file
        beside it (``flock``, woken as soon as it is free) instead of SQLite's busy handler, which sleeps 1 ms,
        then 2, 5, 10 ... between tries."""
        if self._writers is None:
            lock = self.path.with_name(self.path.name + ".lock")
            try:
                self._writers = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as exc:
                raise JournalError(f"cannot open the journal's lock file {lock}: {exc.strerror}") from exc

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            writers = self._writers
            if writers is not None:
                fcntl.flock(writers, fcntl.LOCK_EX)
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                if not durable:
                    # Every other commit is FULL; one fsyncs the WAL, and with it the NORMAL commits before it.
                    self._db.execute("PRAGMA synchronous=FULL")
                if writers is not None:
                    fcntl.flock(writers, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self, what: str, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; a SQLite failure becomes a JournalError naming ``what``.

        ``durable=False`` commits without fsyncing the WAL (see the module docstring for who may).
        """
        try:
            with self._tx(durable) as db:
                yield db
        except sqlite3.Error as exc:
            raise JournalError(f"journal: cannot {what}: {exc}") from exc

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from exc

    # -- the receive path -------------------------------------------------------------------------

    def record_instance(
        self, meta: InstanceMeta, spool_name: str, size_bytes: int, now: float | None = None
    ) -> Recorded:
        """Record a stored instance, applying the revision rule (``series.on_arrival``).

        An identical re-send changes nothing: the caller removes its new file (``Recorded.identical``).
        """
        now = time.time() if now is None else now
        with self.transaction("record an instance") as db:
            return self._record(db, meta, spool_name, size_bytes, now)

    def record_instances(
        self, stored: Sequence[tuple[InstanceMeta, str, int]], now: float | None = None, *, durable: bool = True
    ) -> list[Recorded]:
        """``record_instance`` for each ``(meta, spool_name, size_bytes)``, all in one transaction (one commit).

        The receiver groups the instances that finished arriving together, across associations, and commits
        them with ``durable=False``: its spool files are durable and adoptable (see the module docstring).
        """
        now = time.time() if now is None else now
        with self.transaction("record instances", durable) as db:
            return [self._record(db, meta, name, size, now) for meta, name, size in stored]

    def _record(self, db: sqlite3.Connection, meta: InstanceMeta, spool_name: str, size_bytes: int,
                now: float) -> Recorded:
        row = db.execute("SELECT id, state, revision FROM series WHERE series_uid=?", (meta.series_uid,)).fetchone()
        old = None
        if row is not None:
            old = db.execute(
                "SELECT id, spool_name, released, content_digest FROM instances"
                " WHERE series_id=? AND sop_instance_uid=?",
                (int(row[0]), meta.sop_instance_uid),
            ).fetchone()
        state = None if row is None else SeriesState(row[1])
        decision = on_arrival(
            state, 0 if row is None else int(row[2]), None if old is None else str(old[3]), meta.content_digest
        )
        if row is not None and old is not None and not decision.changes_series:
            return Recorded(int(row[0]), int(old[0]), decision.revision, False, None, False, spool_name,
                            decision.arrival)
        if row is None:
            series_id = self._insert_series(db, meta, now)
        else:
            series_id = int(row[0])
            if decision.reopens:
                db.execute(
                    "UPDATE series SET state=?, revision=?, route=NULL, model=NULL, note=NULL, attempts=0,"
                    " retry_at=NULL, first_received=?, last_received=?, updated_at=?,"
                    " expected_count=? WHERE id=?",
                    (SeriesState.OPEN, decision.revision, now, now, now, meta.expected_count, series_id),
                )
            else:
                db.execute(
                    "UPDATE series SET last_received=?, updated_at=?,"
                    " expected_count=COALESCE(?, expected_count) WHERE id=?",
                    (now, now, meta.expected_count, series_id),
                )
        fields = (
            meta.sop_class_uid,
            meta.transfer_syntax_uid,
            meta.instance_number,
            spool_name,
            size_bytes,
            now,
            meta.content_digest,
            meta.expected_count,
            meta.acquisition_number,
        )
        replaced = None
        if old is not None:
            replaced = None if int(old[2]) else str(old[1])
            if replaced is not None:
                # Its file is deleted after this commit; until then (or if that fails) it must not be adopted.
                db.execute("INSERT OR IGNORE INTO dead_files(spool_name) VALUES(?)", (replaced,))
            db.execute(
                "UPDATE instances SET sop_class_uid=?, transfer_syntax_uid=?, instance_number=?, spool_name=?,"
                " size_bytes=?, received_at=?, content_digest=?, expected_count=?, acquisition_number=?,"
                " released=0, released_at=NULL WHERE id=?",
                (*fields, int(old[0])),
            )
            instance_id = int(old[0])
        else:
            cur = db.execute(
                "INSERT INTO instances(sop_class_uid, transfer_syntax_uid, instance_number, spool_name,"
                " size_bytes, received_at, content_digest, expected_count, acquisition_number, series_id,"
                " sop_instance_uid) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (*fields, series_id, meta.sop_instance_uid),
            )
            instance_id = int(cur.lastrowid or 0)
        return Recorded(
            series_id, instance_id, decision.revision, row is None, replaced, decision.reopens, spool_name,
            decision.arrival,
        )

    @staticmethod
    def _insert_series(db: sqlite3.Connection, meta: InstanceMeta, now: float) -> int:
        cur = db.execute(
            "INSERT INTO series(series_uid, study_uid, accession, modality, body_part, sop_class_uid,"
            " image_type, series_description, manufacturer, calling_aet, called_aet, expected_count,"
            " revision, first_received, last_received, state, updated_at)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?,?)",
            (
                meta.series_uid, meta.study_uid, meta.accession, meta.modality, meta.body_part,
                meta.sop_class_uid, meta.image_type, meta.series_description, meta.manufacturer,
                meta.calling_aet, meta.called_aet, meta.expected_count, now, now, SeriesState.OPEN, now,
            ),
        )
        return int(cur.lastrowid or 0)

    # -- reading series ---------------------------------------------------------------------------

    _SERIES_COLS = (
        "s.id, s.series_uid, s.study_uid, s.accession, s.modality, s.body_part, s.sop_class_uid, s.image_type,"
        " s.series_description, s.manufacturer, s.calling_aet, s.called_aet, s.expected_count, s.revision,"
        " s.first_received, s.last_received, s.state, s.route, s.model, s.note, s.attempts, s.retry_at,"
        " (SELECT COUNT(*) FROM instances i WHERE i.series_id=s.id AND i.released=0),"
        " (SELECT COUNT(*) FROM instances i WHERE i.series_id=s.id)"
    )
    _INSTANCE_COLS = (
        "id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number, spool_name,"
        " size_bytes, received_at, expected_count, acquisition_number"
    )

    @staticmethod
    def _series(row: tuple[Any, ...]) -> SeriesRow:
        vals = list(row)
        vals[16] = SeriesState(vals[16])
        return SeriesRow(*vals)

    def series(self, series_id: int) -> SeriesRow:
        rows = self.read(f"SELECT {self._SERIES_COLS} FROM series s WHERE s.id=?", (series_id,))
        if not rows:
            raise JournalError(f"no series with id {series_id}")
        return self._series(rows[0])

    def series_in(self, *states: SeriesState) -> list[SeriesRow]:
        marks = ",".join("?" * len(states))
        rows = self.read(
            f"SELECT {self._SERIES_COLS} FROM series s WHERE s.state IN ({marks}) ORDER BY s.id", tuple(states)
        )
        return [self._series(r) for r in rows]

    _HELD_INSTANCES = (
        f"SELECT {_INSTANCE_COLS} FROM instances WHERE series_id=? AND released=0"
        " ORDER BY COALESCE(instance_number, 0), id"
    )

    def instances(self, series_id: int) -> list[InstanceRow]:
        """The instances a series holds (not released), in instance-number order."""
        return [InstanceRow(*r) for r in self.read(self._HELD_INSTANCES, (series_id,))]

    def snapshot(self, series_id: int) -> tuple[SeriesRow, list[InstanceRow]]:
        """A series and the instances it holds, read together (one read transaction)."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    srow = self._db.execute(f"SELECT {self._SERIES_COLS} FROM series s WHERE s.id=?",
                                            (series_id,)).fetchone()
                    irows = self._db.execute(self._HELD_INSTANCES, (series_id,)).fetchall()
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from exc
        if srow is None:
            raise JournalError(f"no series with id {series_id}")
        return self._series(srow), [InstanceRow(*r) for r in irows]

    # -- the series' life -------------------------------------------------------------------------

    def close_series(self, series_id: int, revision: int, decide: Decide) -> Closing | None:
        """End an open series in one transaction: route it (``decide``) and take the instances it holds.

        An instance committed before this transaction is in the list; one committed after it finds the
        series closed and opens the next revision. None when the series is no longer open at ``revision``.
        """
        now = time.time()
        with self.transaction("close a series") as db:
            srow = db.execute(f"SELECT {self._SERIES_COLS} FROM series s WHERE s.id=?", (series_id,)).fetchone()
            if srow is None:
                return None
            series = self._series(srow)
            if series.state is not SeriesState.OPEN or series.revision != revision:
                return None
            instances = [InstanceRow(*r) for r in db.execute(self._HELD_INSTANCES, (series_id,))]
            decided = decide(series, instances)
            if decided is None:
                state = transition(series.state, Event.CLOSED_UNROUTED)
                route, model, note = None, None, "no route matched"
            else:
                state, (route, model), note = transition(series.state, Event.CLOSED_ROUTED), decided, None
            db.execute(
                "UPDATE series SET state=?, route=?, model=?, note=?, updated_at=? WHERE id=?",
                (state, route, model, note, now, series_id),
            )
        closed = SeriesRow(**{**series.__dict__, "state": state, "route": route, "model": model, "note": note})
        return Closing(closed, instances, decided is not None)

    def apply_event(self, db: sqlite3.Connection, series_id: int, revision: int | None, event: Event,
              sets: str = "", args: tuple[Any, ...] = ()) -> bool:
        """Apply ``event`` to a series inside ``db``'s transaction, if its state (and revision) allow it."""
        sources = allowed_from(event)
        row = db.execute("SELECT state, revision FROM series WHERE id=?", (series_id,)).fetchone()
        if row is None or SeriesState(row[0]) not in sources or (revision is not None and int(row[1]) != revision):
            return False
        new_state = transition(SeriesState(row[0]), event)
        db.execute(f"UPDATE series SET state=?, updated_at=?{sets} WHERE id=?",
                   (new_state, time.time(), *args, series_id))
        return True

    def record_job(self, db: sqlite3.Connection, series_id: int, revision: int, model: str, state: str,
             error: str | None, started: float) -> None:
        db.execute(
            "INSERT INTO jobs(series_id, revision, model, state, error, created_at, finished_at) VALUES(?,?,?,?,?,?,?)",
            (series_id, revision, model, state, error, started, time.time()),
        )

    def defer_series(self, series_id: int, revision: int, model: str, note: str, retry_at: float,
                     started: float) -> bool:
        """A transient failure: the series stays complete and is tried again at ``retry_at``."""
        with self.transaction("defer a series") as db:
            sets = ", note=?, attempts=attempts+1, retry_at=?"
            if not self.apply_event(db, series_id, revision, Event.DEFERRED, sets, (note[:500], retry_at)):
                return False
            self.record_job(db, series_id, revision, model, "deferred", note[:500], started)
            return True

    def fail_series(self, series_id: int, revision: int, model: str | None, note: str, started: float) -> bool:
        """A permanent failure: the series' files are kept for an operator."""
        with self.transaction("fail a series") as db:
            if not self.apply_event(db, series_id, revision, Event.FAILED, ", note=?", (note[:500],)):
                return False
            self.record_job(db, series_id, revision, model or "-", "failed", note[:500], started)
            return True

    # -- releasing spool files --------------------------------------------------------------------

    def claim_releasable(self, older_than: float) -> list[tuple[int, list[str]]]:
        """Claim the release of every published (or unrouted) series last changed before ``older_than``.

        Each claim is one transaction that moves the series to RELEASED and marks its instances released
        before any file is deleted (issue 8, defect 4): an instance arriving after the claim opens the next
        revision without the claimed files; one arriving before it re-opened the series, which is then not
        claimed. The caller deletes the returned files; a crash in between leaves orphans for the sweep.
        """
        states = tuple(RELEASABLE_STATES)
        marks = ",".join("?" * len(states))
        candidates = self.read(
            f"SELECT id, revision FROM series WHERE state IN ({marks}) AND updated_at <= ? ORDER BY id",
            (*states, older_than),
        )
        out: list[tuple[int, list[str]]] = []
        for sid, revision in candidates:
            now = time.time()
            with self.transaction("claim a release") as db:
                if not self.apply_event(db, int(sid), int(revision), Event.RELEASE_CLAIMED):
                    continue
                names = [str(r[0]) for r in db.execute(
                    "SELECT spool_name FROM instances WHERE series_id=? AND released=0", (sid,))]
                db.execute("UPDATE instances SET released=1, released_at=? WHERE series_id=? AND released=0",
                           (now, sid))
            out.append((int(sid), names))
        return out

    def prune(self, older_than: float, now: float | None = None) -> dict[str, int]:
        """Delete history older than ``older_than``: released instances and series, acknowledged findings.

        Acknowledged outbox payloads carry patient identifiers: they are kept only as long as a re-publish
        after an unclean stop may need them (``outbox.py``), then pruned. Rejected findings are kept.
        """
        now = time.time() if now is None else now
        with self.transaction("prune") as db:
            # Files older than this may belong to rows pruned here: never adopt them (``adoption_rules``). It
            # never goes down (a shorter prune_after_days), and never past now: a clock that was once days fast
            # would otherwise leave it in the future, and every file placed before it unadoptable.
            db.execute(
                "INSERT INTO meta(key, value) VALUES('prune_cutoff', ?) ON CONFLICT(key)"
                " DO UPDATE SET value=MIN(MAX(CAST(value AS REAL), excluded.value), ?)",
                (min(older_than, now), now),
            )
            outbox = db.execute("DELETE FROM outbox WHERE state='acked' AND acked_at < ?", (older_than,)).rowcount
            instances = db.execute(
                "DELETE FROM instances WHERE released=1 AND released_at < ?", (older_than,)
            ).rowcount
            gone = "(SELECT id FROM series WHERE state=? AND updated_at < ? AND NOT EXISTS" \
                   " (SELECT 1 FROM instances i WHERE i.series_id=series.id)" \
                   " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.series_id=series.id))"
            args = (SeriesState.RELEASED, older_than)
            db.execute(f"DELETE FROM jobs WHERE series_id IN {gone}", args)
            series = db.execute(f"DELETE FROM series WHERE id IN {gone}", args).rowcount
        return {"outbox": outbox, "instances": instances, "series": series}

    # -- gauges and sweeps ------------------------------------------------------------------------

    def counts(self) -> Counts:
        c = Counts()
        for state, n in self.read("SELECT state, COUNT(*) FROM series GROUP BY state"):
            c.by_series_state[str(state)] = int(n)
        for state, n in self.read(
            "SELECT state, COUNT(*) FROM outbox WHERE state IN ('pending', 'rejected') GROUP BY state"
        ):
            if state == "pending":
                c.outbox_pending = int(n)
            else:
                c.outbox_rejected = int(n)
        row = self.read("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances WHERE released=0")[0]
        c.spool_files, c.spool_bytes = int(row[0]), int(row[1])
        return c

    def referenced_spool_names(self) -> set[str]:
        return {str(r[0]) for r in self.read("SELECT spool_name FROM instances WHERE released=0")}

    def adoption_rules(self, now: float | None = None) -> tuple[set[str], float | None]:
        """What adoption must leave alone: every spool name a row knows (held, released, or dead), and the time
        before which a file was placed too early to be adopted (None: no such time).

        That is the last prune's cut-off (a file placed before it may be one whose released row was pruned, and
        whose deletion failed for as long), but only as far as the wall clock can be trusted with it, because a
        file refused here is deleted, and it may be an acknowledged instance: a cut-off later than ``now`` (stored
        by a clock that was fast, or read by one that is slow) refuses nothing, and no file placed after the
        journal's last change (a series' ``updated_at``) is refused, whatever the clock said at the prune: the
        rows lost in a power cut are the last ones.
        """
        now = time.time() if now is None else now
        known = {str(r[0]) for r in
                 self.read("SELECT spool_name FROM instances UNION SELECT spool_name FROM dead_files")}
        row = self.read("SELECT value FROM meta WHERE key='prune_cutoff'")
        if not row or float(row[0][0]) > now:
            return known, None
        cutoff = float(row[0][0])
        newest = self.read("SELECT MAX(updated_at) FROM series")[0][0]
        return known, cutoff if newest is None else min(cutoff, float(newest))

    def dead_spool_names(self) -> list[str]:
        return [str(r[0]) for r in self.read("SELECT spool_name FROM dead_files")]

    def forget_dead(self, names: Sequence[str]) -> None:
        """Drop dead files' names once their files are gone."""
        if names:
            with self.transaction("forget deleted files") as db:
                db.executemany("DELETE FROM dead_files WHERE spool_name=?", [(n,) for n in names])

    # -- clean and unclean stops ------------------------------------------------------------------

    def begin_run(self) -> bool:
        """Mark the daemon running; returns whether the previous run ended cleanly (True on a new journal)."""
        with self.transaction("mark the start") as db:
            row = db.execute("SELECT value FROM meta WHERE key='clean_stop'").fetchone()
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('clean_stop', '0')")
        return row is None or row[0] == "1"

    def end_run(self) -> None:
        """Mark a clean stop: everything in flight is journalled and the broker connection was drained."""
        with self.transaction("mark a clean stop") as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('clean_stop', '1')")
