"""Logging set-up: text for a terminal, or one JSON object per line for journald and log shippers.

A JSON line carries ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, ``exception`` when
there is a traceback (newlines escaped: still one line), and when known the series' journal id
(``series_id``) and the finding id (``finding_id``, the finding's Nats-Msg-Id), so that every line about
one study can be found with ``jq 'select(.finding_id == "...")'``. They come from ``log_context`` (a
context variable: an asyncio task, and a thread started by ``asyncio.to_thread``, carry their own) or
from ``extra={"series_id": ..., "finding_id": ...}`` on one call.

Neither names a patient: the journal id is a row number and the finding id a SHA-256. Code that logs must
still keep UIDs, names and accession numbers out of its messages (STYLE.md 11); the formatter cannot
know which text is patient data, so it does not try to scrub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

SERIES_ID: ContextVar[int | None] = ContextVar("edge_agent_series_id", default=None)
FINDING_ID: ContextVar[str | None] = ContextVar("edge_agent_finding_id", default=None)
_FIELDS = ("series_id", "finding_id")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


def set_log_context(*, series_id: int | None = None, finding_id: str | None = None) -> None:
    """Name the series and/or finding the current task (or thread) works on, for every line it logs from now.

    Inside an asyncio task this changes only that task's context, so it needs no undoing; elsewhere use
    ``log_context``.
    """
    if series_id is not None:
        SERIES_ID.set(series_id)
    if finding_id is not None:
        FINDING_ID.set(finding_id)


@contextlib.contextmanager
def log_context(*, series_id: int | None = None, finding_id: str | None = None) -> Iterator[None]:
    """Like ``set_log_context``, for the lines logged inside the ``with`` block only."""
    series = SERIES_ID.set(series_id) if series_id is not None else None
    finding = FINDING_ID.set(finding_id) if finding_id is not None else None
    try:
        yield
    finally:
        if finding is not None:
            FINDING_ID.reset(finding)
        if series is not None:
            SERIES_ID.reset(series)


class ContextFilter(logging.Filter):
    """Puts the context's series and finding ids on each record (an ``extra`` given to the call wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "series_id", None) is None:
            record.series_id = SERIES_ID.get()
        if getattr(record, "finding_id", None) is None:
            record.finding_id = FINDING_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: LogFormat | str = LogFormat.TEXT, stream: TextIO | None = None) -> None:
    """Send every log record (edge-agent's, its libraries', Python's warnings) to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if LogFormat(fmt) is LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # A warnings.warn() would otherwise be printed as two lines of text among the JSON ones.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO, including peer AE titles: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class RepeatedLog:
    """A message that may repeat many times a minute (a flood of refusals, a broker that stays away) is logged
    at WARNING the first time and then once per ``every_seconds`` per key; DEBUG in between."""

    def __init__(self, log: logging.Logger, every_seconds: float = 60.0) -> None:
        self._log = log
        self.every_seconds = every_seconds
        self.last: dict[str, float] = {}  # key -> monotonic time it was last logged at its full level

    def due(self, key: str) -> bool:
        """True (and the time noted) when ``key`` was never logged, or not for ``every_seconds``."""
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.every_seconds:
            return False
        self.last[key] = now
        return True

    def warning(self, key: str, msg: str, *args: object) -> None:
        (self._log.warning if self.due(key) else self._log.debug)(msg, *args)
