"""Named DICOM status codes, and the pure mapping from a failure to the status a peer is given.

Codes from PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7 Annex C (general statuses).
The C-STORE handler never raises (a raised exception becomes pynetdicom's catch-all 0xC211):
each failure maps to one of these, with the metric outcome that counts it.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass

from edge_agent.dicom.header import SopClassMismatchError
from edge_agent.dicom.spool import SpoolFullError
from edge_agent.errors import DecodeError, JournalError

SUCCESS = 0x0000
# Warnings (PS3.4 B.2.3): the instance was stored, with some liberty taken.
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
# Failures.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# Outcome label values of metrics.instances (bounded, never from the peer).
OUTCOME_STORED = "stored"
OUTCOME_DUPLICATE = "duplicate"  # the same content as the instance held: nothing changed
OUTCOME_REPLACED = "replaced"  # a known SOP instance with new content: the new content replaces it
OUTCOME_OUT_OF_RESOURCES = "out_of_resources"
OUTCOME_BACKPRESSURE = "backpressure"  # inference is behind: refused before storing (issue 9)
OUTCOME_CANNOT_UNDERSTAND = "cannot_understand"
OUTCOME_PROCESSING_FAILURE = "processing_failure"

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Answer:
    """The status a C-STORE gets, and the outcome label it is counted under."""

    status: int
    outcome: str


STORED = Answer(SUCCESS, OUTCOME_STORED)
STORED_DUPLICATE = Answer(SUCCESS, OUTCOME_DUPLICATE)
STORED_REPLACED = Answer(SUCCESS, OUTCOME_REPLACED)
SPOOL_FULL = Answer(OUT_OF_RESOURCES, OUTCOME_OUT_OF_RESOURCES)
# PS3.4 B.2.3: 0xA7xx is a transient refusal; the sender keeps the instance and retries later.
BACKPRESSURE = Answer(OUT_OF_RESOURCES, OUTCOME_BACKPRESSURE)
RECEIVE_FAILED = Answer(PROCESSING_FAILURE, OUTCOME_PROCESSING_FAILURE)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the cause chain, or SQLite's own 'database or disk is full'."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return True
        if isinstance(cur, sqlite3.Error) and getattr(cur, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def answer_for(exc: BaseException) -> Answer:
    """Map a failure in the C-STORE path to its DICOM status and metric outcome."""
    if isinstance(exc, SpoolFullError | MemoryError) or _disk_full(exc):
        # 0xA7xx is a transient refusal: the sender keeps the instance and retries later.
        return Answer(OUT_OF_RESOURCES, OUTCOME_OUT_OF_RESOURCES)
    if isinstance(exc, SopClassMismatchError):
        return Answer(DATASET_DOES_NOT_MATCH_SOP_CLASS, OUTCOME_CANNOT_UNDERSTAND)
    if isinstance(exc, DecodeError):
        return Answer(CANNOT_UNDERSTAND, OUTCOME_CANNOT_UNDERSTAND)
    if isinstance(exc, JournalError | OSError):
        return Answer(PROCESSING_FAILURE, OUTCOME_PROCESSING_FAILURE)
    return Answer(PROCESSING_FAILURE, OUTCOME_PROCESSING_FAILURE)


def is_success(status: int) -> bool:
    """True for Success and the Warning statuses (the instance was stored)."""
    return status == SUCCESS or (status & 0xF000) == 0xB000


def describe(status: int) -> str:
    """A short human name for a status, for reports (``send``) and logs."""
    names = {
        SUCCESS: "success",
        COERCION_OF_DATA_ELEMENTS: "warning: coercion of data elements",
        ELEMENTS_DISCARDED: "warning: elements discarded",
        DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "warning: data set does not match SOP class",
        PROCESSING_FAILURE: "processing failure",
        DUPLICATE_SOP_INSTANCE: "duplicate SOP instance",
        SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
        NOT_AUTHORIZED: "not authorized",
        DATASET_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
        CANNOT_UNDERSTAND: "cannot understand",
        0xC211: "unhandled exception in the peer's handler",
    }
    if status in names:
        return names[status]
    if (status & 0xFF00) == OUT_OF_RESOURCES:
        return "out of resources"
    if (status & 0xFF00) == DATASET_DOES_NOT_MATCH_SOP_CLASS:
        return "data set does not match SOP class"
    if (status & 0xF000) == CANNOT_UNDERSTAND:
        return "cannot understand"
    return f"status 0x{status:04X}"
