"""The log formats: JSON lines for journald, with the series and finding a line is about (pure, fast)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from edge_agent.config import LoggingConfig, parse_config
from edge_agent.errors import ConfigError
from edge_agent.logs import ContextFilter, JsonFormatter, LogFormat, log_context, set_log_context

FINDING = "ab" * 32


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("edge_agent.test_logs")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, out
    finally:
        log.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_context(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = captured
    log.info("plain %s", "line")
    with log_context(series_id=42, finding_id=FINDING):
        log.warning("about the series")
        with log_context(series_id=7):
            log.info("inner")
        log.info("outer again")
    log.info("given on the call", extra={"series_id": 9})
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        log.exception("failed")
    records = lines(out)
    assert len(records) == 6  # the traceback's newlines are escaped: still one line each
    first = records[0]
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "edge_agent.test_logs", "plain line")
    assert str(first["time"]).endswith("Z") and str(first["time"])[10] == "T"
    assert (records[1]["series_id"], records[1]["finding_id"]) == (42, FINDING)
    assert (records[2]["series_id"], records[2]["finding_id"]) == (7, FINDING)
    assert records[3]["series_id"] == 42
    assert records[4]["series_id"] == 9 and "finding_id" not in records[4]
    assert "ValueError: broken\nacross lines" in str(records[5]["exception"])


def test_a_task_names_its_series_for_itself_only(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = captured

    async def series(series_id: int) -> None:
        set_log_context(series_id=series_id)
        await asyncio.sleep(0)
        await asyncio.to_thread(log.info, "in a thread of series %d", series_id)  # a thread carries it too
        log.info("series %d", series_id)

    async def main() -> None:
        await asyncio.gather(series(1), series(2))
        log.info("the loop's own")

    asyncio.run(main())
    records = lines(out)
    assert all(r["message"].endswith(str(r["series_id"])) for r in records[:-1])  # type: ignore[union-attr]
    assert "series_id" not in records[-1]


def test_the_format_is_a_config_key() -> None:
    assert LoggingConfig().format is LogFormat.TEXT
    minimal = {"site": "a", "state_dir": "/s"}
    assert parse_config({**minimal, "logging": {"format": "json"}}, env={}).logging.format is LogFormat.JSON
    with pytest.raises(ConfigError) as info:
        parse_config({**minimal, "logging": {"format": "xml"}}, env={})
    assert dict(info.value.problems) == {"logging.format": "'xml' is not one of: text, json"}
