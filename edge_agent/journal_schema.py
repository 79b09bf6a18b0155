"""The journal's tables, indexes and the migrations between schema versions (SQL only)."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3

SCHEMA = """
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
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at REAL
);
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
    content_digest TEXT NOT NULL DEFAULT '',
    expected_count INTEGER,
    acquisition_number INTEGER,
    released_at REAL,
    UNIQUE(series_id, sop_instance_uid)
);
-- Replaced spool files, named here in the transaction that replaced them, until their deletion is seen.
CREATE TABLE IF NOT EXISTS dead_files(spool_name TEXT PRIMARY KEY);
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
    stream_seq INTEGER,
    revision INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0
);
"""

# An index for every per-tick query (issue 8, defect 10): the gauges, the release and pruning
# steps, the outbox drain and the orphan sweep must not scan tables that grow with every study.
INDEXES = """
CREATE INDEX IF NOT EXISTS series_state ON series(state, updated_at);
CREATE INDEX IF NOT EXISTS instances_held ON instances(series_id, spool_name, size_bytes) WHERE released=0;
CREATE INDEX IF NOT EXISTS instances_released ON instances(released_at) WHERE released=1;
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_id);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_id);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_acked ON outbox(acked_at) WHERE state='acked';
CREATE INDEX IF NOT EXISTS outbox_series ON outbox(series_id);
"""

# Columns that schema 2 added to schema 1's tables: (table, column, declaration).
V2_COLUMNS = (
    ("series", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("series", "retry_at", "REAL"),
    ("instances", "content_sha256", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "expected_count", "INTEGER"),
    ("instances", "acquisition_number", "INTEGER"),
    ("instances", "released_at", "REAL"),
    ("outbox", "revision", "INTEGER NOT NULL DEFAULT 0"),
    ("outbox", "next_attempt_at", "REAL NOT NULL DEFAULT 0"),
)


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Schema ``version`` (1 or 2) -> SCHEMA_VERSION, in place, in the opening transaction: a box upgraded
    mid-study keeps its work."""
    if version == 1:
        for table, column, decl in V2_COLUMNS:
            have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        db.execute("DROP INDEX IF EXISTS outbox_state")  # re-made on (state, next_attempt_at)
    # Schema 3: the digests are BLAKE3 now (dicom/digest.py); the SHA-256 ones schema 2 kept stay as they are.
    db.execute("ALTER TABLE instances RENAME COLUMN content_sha256 TO content_digest")
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
