"""Logging set-up: text for a terminal, or one JSON object per line for journald and log shippers.

A JSON line carries ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, ``exception`` when
there is a traceback (newlines escaped: still one line), and when known the series' journal id
(``series_id``) and the finding id (``finding_id``, the finding's Nats-Msg-Id), so that every line about
one study can be found with ``jq 'select(.finding_id == "...")'``. They come from ``log_context`` (a
context variable: an asyncio task, and a thread started by ``asyncio.to_thread``, carry their own) or
from ``extra={"series_id": ..., "finding_id": ...}`` on one call.

Neither names a patient: the journal id is a row number and the finding id a SHA-256. Code that logs must
still keep UIDs, names and accession numbers out of its messages (STYLE.md 11); the formatter cannot
know which text is patient data, so it does not try to scrub. What pydicom logs or warns is another matter:
it quotes element values ("Invalid value for VR UI: '<a Series Instance UID>'"), so its text is withheld at
every handler (``WithheldText``): the line says that pydicom logged or warned, and of what kind, never what.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
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


# Libraries whose log lines and warnings may quote DICOM element values (UIDs, names): their text is withheld.
_QUOTING_LIBRARIES = ("pydicom",)
# A captured warning's text, as warnings.formatwarning writes it: "FILE:LINE: CATEGORY: message".
_WARNING_TEXT = re.compile(r"(?P<file>[^\n]*?):\d+: (?P<category>\w+): ")


def _quoting(name: str) -> str | None:
    return next((lib for lib in _QUOTING_LIBRARIES if name == lib or name.startswith(lib + ".")), None)


class WithheldText(logging.Filter):
    """Replaces the text of what a library that quotes element values logged or warned (pydicom's "Invalid value
    for VR UI: '<uid>'") with a line that names only the library and the kind; everything else passes as is."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = _quoting(record.name)
        if library is not None:
            record.msg, record.args = "%s logged a %s message; its text is withheld (it may quote DICOM element " \
                                      "values)", (library, record.levelname.lower())
        elif record.name == "py.warnings":
            match = _WARNING_TEXT.match(record.getMessage())
            source = match.group("file").replace("\\", "/") if match else ""
            library = next((lib for lib in _QUOTING_LIBRARIES if f"/{lib}/" in source), None)
            if library is not None and match is not None:
                record.msg, record.args = "%s warned (%s); its text is withheld (it may quote DICOM element " \
                                          "values)", (library, match.group("category"))
        return True


def withhold_library_text(handler: logging.Handler) -> logging.Handler:
    """``handler``, with what pydicom logs or warns withheld (``WithheldText``); returns it."""
    handler.addFilter(WithheldText())
    return handler


def child_logging(handler: logging.Handler, level: int) -> None:
    """A child process's logging: everything, Python's warnings included, through ``handler`` at ``level``, with
    what pydicom logs or warns withheld (a warning would otherwise go to stderr as it is)."""
    root = logging.getLogger()
    root.handlers = [withhold_library_text(handler)]
    root.setLevel(level)
    logging.captureWarnings(True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


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
    handler = withhold_library_text(logging.StreamHandler(stream if stream is not None else sys.stderr))
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
