"""The outbox publisher and `tail`, against a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import closing
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from edge_agent.bus.connection import describe_error, redact
from edge_agent.bus.finding import SCHEMA_VERSION, build_finding, decode, encode, message_id, subject
from edge_agent.bus.publisher import Publisher, row_backoff_seconds, subject_covers
from edge_agent.bus.tail import tail
from edge_agent.config import BusConfig
from edge_agent.dicom.header import InstanceMeta
from edge_agent.errors import BusError
from edge_agent.journal import Journal, SeriesState
from edge_agent.metrics import STREAM_SETTINGS, Metrics
from tests.natsutil import NatsServer
from tests.test_finding import make_input

STREAM = "EDGE_FINDINGS"
PREFIX = "edge.findings"


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def bus_config(url: str, **changes: Any) -> BusConfig:
    options: dict[str, Any] = {"reconnect_wait_seconds": 0.05, "publish_timeout_seconds": 1.0, **changes}
    return BusConfig(url=url, **options)


def enqueue(journal: Journal, n: int, start: int = 0) -> list[tuple[int, str]]:
    """Put n findings (one per new series) into the outbox. Returns (series_id, msg_id) pairs."""
    out = []
    for i in range(start, start + n):
        series_uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        sop = f"{series_uid}.1"
        rec = journal.record_instance(
            InstanceMeta(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series_uid,
                         modality="CT"),
            spool_name=f"20260101/{i:032x}.dcm", size_bytes=100)
        opened = journal.series(rec.series_id).first_received
        payload = encode(build_finding(make_input(series_instance_uid=series_uid, sop_instance_uids=[sop],
                                                  labels=[dataclasses.replace(make_input().labels[0],
                                                                              driving_instance_uid=sop)],
                                                  heatmap=None, timings=dataclasses.replace(
                                                      make_input().timings, received_first=opened))))
        mid = message_id(series_uid, "ct-demo", "0.1.0", rec.revision, opened)
        assert journal.close_series(rec.series_id, rec.revision, lambda s, i: ("ct", "ct-demo")) is not None
        assert journal.outbox.enqueue(rec.series_id, rec.revision, "ct-demo", mid,
                                      subject(PREFIX, "site1", "CT", "ct-demo"), payload)
        out.append((rec.series_id, mid))
    return out


class Acks:
    """on_acked callback that lets a test await the n-th acknowledgement."""

    def __init__(self) -> None:
        self.series: list[int] = []
        self._changed = asyncio.Event()

    async def __call__(self, series_id: int) -> None:
        self.series.append(series_id)
        self._changed.set()

    async def wait(self, n: int, within_seconds: float = 10.0) -> None:
        async def reached() -> None:
            while len(self.series) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), within_seconds)


async def poll(check: Callable[[], Awaitable[bool]], within_seconds: float = 10.0) -> None:
    """Poll a condition that has no event of its own (a foreign process, a log line)."""
    deadline = time.monotonic() + within_seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def wait_until(cond: Callable[[], bool], within_seconds: float = 10.0) -> None:
    async def check() -> bool:
        return cond()

    await poll(check, within_seconds)


async def consumer_listening(js: Any) -> None:
    """Wait until a consumer (the tail's) exists on the stream."""

    async def check() -> bool:
        return bool((await js.stream_info(STREAM)).state.consumer_count)

    await poll(check)


async def stream_messages(url: str, stream: str = STREAM) -> list[Any]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        return [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


def sample(metric: Any, **labels: str) -> float:
    value = metric.labels(**labels)._value.get() if labels else metric._value.get()
    return float(value)


# -- publishing ------------------------------------------------------------------------------------


def test_publishes_pending_findings_acks_them_and_wakes_on_new_ones(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    rows = enqueue(journal, 3)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(3)
        assert pub.connected
        assert sorted(acks.series) == sorted(sid for sid, _ in rows)
        assert journal.counts().outbox_pending == 0
        assert all(journal.series(sid).state == SeriesState.PUBLISHED for sid, _ in rows)
        assert sample(metrics.outbox_pending) == 0
        assert sample(metrics.broker_connected) == 1

        # A finding enqueued later goes out on wake(), well before the one-second poll.
        [(sid, _)] = enqueue(journal, 1, start=10)
        t0 = time.monotonic()
        pub.wake()
        await acks.wait(4)
        assert time.monotonic() - t0 < 0.5
        assert acks.series[-1] == sid

        msgs = await stream_messages(nats_server.url)
        assert [m.headers["Nats-Msg-Id"] for m in msgs] == [mid for _, mid in rows] + [enqueue_mid(journal, sid)]
        assert all(m.subject == "edge.findings.site1.CT.ct-demo" for m in msgs)
        assert decode(msgs[0].data)["finding_id"] == rows[0][1]
        assert await pub.stop(1.0) == 0
        assert sample(metrics.broker_connected) == 0

    run(main())
    assert sample(metrics.findings, model="ct-demo", outcome="published") == 4
    assert sample(metrics.findings, model="ct-demo", outcome="duplicate") == 0


def enqueue_mid(journal: Journal, series_id: int) -> str:
    row = journal.series(series_id)
    return message_id(row.series_uid, "ct-demo", "0.1.0", row.revision, row.first_received)


def test_a_finding_already_in_the_stream_is_acked_as_duplicate(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    [(sid, mid)] = enqueue(journal, 1)
    [row] = journal.outbox.pending(now=float("inf"))

    async def main() -> None:
        # As if an earlier run published it and died before recording the PubAck.
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], duplicate_window=600.0))
        first = await js.publish(row.subject, row.payload, headers={"Nats-Msg-Id": mid})
        await nc.close()

        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        assert await pub.stop(1.0) == 0
        assert len(await stream_messages(nats_server.url)) == 1
        assert first.seq == 1

    run(main())
    assert journal.series(sid).state == SeriesState.PUBLISHED
    assert sample(metrics.findings, model="ct-demo", outcome="duplicate") == 1
    assert sample(metrics.findings, model="ct-demo", outcome="published") == 0


def test_broker_down_at_start_then_started(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.bus.publisher")
    nats_server.stop()
    enqueue(journal, 2)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()  # must not raise, nor block, with the broker down
        await wait_until(lambda: "NATS connection problem" in caplog.text)
        assert not pub.connected
        assert sample(metrics.broker_connected) == 0
        nats_server.start()
        await acks.wait(2)
        assert await pub.stop(1.0) == 0

    run(main())
    assert len(asyncio.run(stream_messages(nats_server.url))) == 2


def test_broker_restart_mid_run_delivers_pending_findings_exactly_once(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url, publish_timeout_seconds=0.3), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        nats_server.stop()
        await wait_until(lambda: not pub.connected)
        enqueue(journal, 3, start=1)
        pub.wake()
        nats_server.start()
        await acks.wait(4)
        assert await pub.stop(1.0) == 0

    run(main())
    msgs = asyncio.run(stream_messages(nats_server.url))
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert journal.counts().outbox_pending == 0


def test_a_publish_whose_ack_was_lost_is_retried_and_deduplicated(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url, publish_timeout_seconds=0.2), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        # A frozen server takes the publish into its socket buffer but answers nothing: the publish
        # times out, yet the message is stored once the server runs again. The retry must not add it twice.
        nats_server.pause()
        try:
            enqueue(journal, 1, start=1)
            pub.wake()
            await wait_until(lambda: sample(metrics.publish_errors, reason="timeout") >= 1)
        finally:
            nats_server.resume()
        await acks.wait(2)
        assert await pub.stop(1.0) == 0

    run(main())
    ids = [m.headers["Nats-Msg-Id"] for m in asyncio.run(stream_messages(nats_server.url))]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert sample(metrics.findings, model="ct-demo", outcome="duplicate") == 1
    assert sample(metrics.findings, model="ct-demo", outcome="publish_error") >= 1
    with closing(sqlite3.connect(journal.path)) as db:
        [(attempts, error)] = db.execute("SELECT attempts, last_error FROM outbox WHERE id=2").fetchall()
    assert attempts >= 2 and error.startswith("timeout")


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_stop_with_a_dead_broker_returns_the_pending_count_within_the_flush_timeout(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, how: str
) -> None:
    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        enqueue(journal, 1)
        pub.wake()
        await acks.wait(1)
        if how == "stopped":
            nats_server.stop()
            await wait_until(lambda: not pub.connected)
        else:
            nats_server.pause()  # still connected, but nothing answers
        enqueue(journal, 2, start=1)
        pub.wake()
        t0 = time.monotonic()
        assert await pub.stop(0.5) == 2
        assert time.monotonic() - t0 < 1.5
        assert sample(metrics.outbox_pending) == 2
        assert sample(metrics.broker_connected) == 0

    try:
        run(main())
    finally:
        if how == "frozen":
            nats_server.resume()


def test_stop_when_the_broker_was_never_up_is_quick(tmp_path: Path, journal: Journal, metrics: Metrics) -> None:
    server = NatsServer(tmp_path / "nats")  # never started: nothing listens on its port
    enqueue(journal, 1)

    async def main() -> None:
        pub = Publisher(bus_config(server.url), journal, metrics)
        await pub.start()
        t0 = time.monotonic()
        assert await pub.stop(0.3) == 1
        assert time.monotonic() - t0 < 1.5

    run(main())


def test_stop_with_nothing_pending_does_not_wait(tmp_path: Path, journal: Journal, metrics: Metrics) -> None:
    server = NatsServer(tmp_path / "nats")

    async def main() -> None:
        pub = Publisher(bus_config(server.url), journal, metrics)
        await pub.start()
        t0 = time.monotonic()
        assert await pub.stop(5.0) == 0
        assert time.monotonic() - t0 < 1.0

    run(main())


class LogLine(logging.Handler):
    """An asyncio.Event set when a record containing ``text`` is logged (on the loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.parametrize("how", ["stopped", "frozen", "never_up", "forced_before"])
def test_a_forced_stop_does_not_wait_for_the_flush_or_the_drain(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The daemon's second SIGTERM sets ``force``: stop() returns at once, the outbox keeps the findings (issue C)."""
    caplog.set_level(logging.INFO)
    flushing = LogLine("pending finding(s) before stopping")
    logging.getLogger("edge_agent.bus.publisher").addHandler(flushing)

    async def main() -> None:
        acks = Acks()
        url = NatsServer(nats_server.root / "nobody").url if how == "never_up" else nats_server.url
        pub = Publisher(bus_config(url), journal, metrics, on_acked=acks)
        await pub.start()
        if how != "never_up":
            enqueue(journal, 1)
            pub.wake()
            await acks.wait(1)
            if how == "frozen":
                nats_server.pause()  # connected, but nothing answers: the drain would wait
            else:
                nats_server.stop()
                await wait_until(lambda: not pub.connected)
        enqueue(journal, 2, start=1)
        pub.wake()
        force = asyncio.Event()
        if how == "forced_before":
            force.set()
        stopping = asyncio.create_task(pub.stop(60.0, force=force))
        if how != "forced_before":
            await asyncio.wait_for(flushing.seen.wait(), 10)
            force.set()
        t0 = time.monotonic()
        assert await stopping == 2
        assert time.monotonic() - t0 < 2.0
        assert sample(metrics.broker_connected) == 0

    try:
        run(main())
    finally:
        logging.getLogger("edge_agent.bus.publisher").removeHandler(flushing)
        if how == "frozen":
            nats_server.resume()
    assert journal.counts().outbox_pending == 2
    assert any("forced exit" in r.getMessage() for r in caplog.records)


# -- the stream ------------------------------------------------------------------------------------


def mismatches(metrics: Metrics) -> dict[str, float]:
    return {setting: sample(metrics.stream_config_mismatch, setting=setting) for setting in STREAM_SETTINGS}


def stream_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(f"stream {STREAM} differs")]


def test_a_stream_it_creates_has_the_configured_settings(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url, duplicate_window_seconds=120.0, republish_window_seconds=60.0,
                                   max_age_days=2.0), journal,
                        metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        await pub.stop(1.0)
        nc = await nats.connect(nats_server.url)
        cfg = (await nc.jetstream().stream_info(STREAM)).config
        await nc.close()
        assert cfg.subjects == [f"{PREFIX}.>"] and cfg.storage == StorageType.FILE
        assert (cfg.duplicate_window, cfg.max_age) == (pytest.approx(120.0), pytest.approx(2 * 86400.0))

    run(main())
    assert mismatches(metrics) == dict.fromkeys(STREAM_SETTINGS, 0.0)


def test_an_existing_stream_is_never_changed_and_its_differences_are_shown(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A shared stream: a shorter max_age applied by us would purge other producers' messages (issue D)."""
    caplog.set_level(logging.INFO)
    enqueue(journal, 1)
    theirs = StreamConfig(name=STREAM, subjects=["ops.audit.>", f"{PREFIX}.>"], duplicate_window=5.0, max_age=60.0,
                          storage=StorageType.MEMORY)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(theirs)
        await js.publish("ops.audit.login", b"someone else's message")
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)  # the stream takes our subjects: the finding is stored
        info = await js.stream_info(STREAM)
        await nc.close()
        await pub.stop(1.0)
        assert info.config.subjects == theirs.subjects
        assert (info.config.duplicate_window, info.config.max_age) == (pytest.approx(5.0), pytest.approx(60.0))
        assert info.config.storage == StorageType.MEMORY
        assert info.state.messages == 2  # theirs and ours

    run(main())
    assert mismatches(metrics) == {"subjects": 0.0, "duplicate_window": 1.0, "max_age": 1.0, "storage": 1.0}
    [warning] = stream_warnings(caplog)
    assert "duplicate_window 5 s, configured 600 s" in warning and "max_age 60 s" in warning
    assert "storage memory" in warning and "subjects" not in warning
    assert not [r for r in caplog.records if "updated stream" in r.getMessage()]


def test_a_stream_that_does_not_take_our_subjects_is_left_alone_and_reported_once_per_connection(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["ops.audit.>"], duplicate_window=600.0,
                                         max_age=14 * 86400.0))
        pub = Publisher(bus_config(nats_server.url, publish_timeout_seconds=0.3), journal, metrics)
        await pub.start()
        # Each failed publish looks at the stream again; it is reported once, not at every retry.
        await wait_until(lambda: sample(metrics.publish_errors, reason="no_responders") >= 3)
        assert len(stream_warnings(caplog)) == 1
        # A new connection reports it again.
        nats_server.stop()
        await wait_until(lambda: not pub.connected)
        nats_server.start()
        await wait_until(lambda: len(stream_warnings(caplog)) == 2)
        cfg = (await js.stream_info(STREAM)).config
        await nc.close()
        assert cfg.subjects == ["ops.audit.>"]
        assert await pub.stop(0.1) == 1

    run(main())
    assert mismatches(metrics) == {"subjects": 1.0, "duplicate_window": 0.0, "max_age": 0.0, "storage": 0.0}
    assert f"subjects ops.audit.> do not cover {PREFIX}.>" in stream_warnings(caplog)[0]


@pytest.mark.parametrize(
    ("pattern", "covers"),
    [("edge.findings.>", True), ("edge.>", True), (">", True), ("*.findings.>", True), ("edge.*.>", True),
     ("edge.findings.*", False), ("edge.findings.site1.>", False), ("edge.findings", False), ("edge", False),
     ("other.>", False), ("edge.findings.*.*.*", False)],
)
def test_which_stream_subjects_cover_ours(pattern: str, covers: bool) -> None:
    assert subject_covers(pattern, f"{PREFIX}.>") is covers


@pytest.mark.parametrize("ours_exists", [False, True])
def test_a_stream_that_cannot_be_set_up_is_logged_and_publishing_goes_on(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture, ours_exists: bool
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        # Another stream already holds our subjects, so ours can neither be created nor take them.
        await js.add_stream(StreamConfig(name="LEGACY", subjects=[f"{PREFIX}.>"]))
        if ours_exists:
            await js.add_stream(StreamConfig(name=STREAM, subjects=["other.>"]))
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        assert (await js.stream_info("LEGACY")).state.messages == 1
        if ours_exists:
            assert (await js.stream_info(STREAM)).config.subjects == ["other.>"]  # not changed
        await nc.close()
        await pub.stop(1.0)

    run(main())
    if ours_exists:
        # Ours exists with other subjects: left as it is and reported; LEGACY takes the finding.
        assert stream_warnings(caplog) and sample(metrics.stream_config_mismatch, setting="subjects") == 1
    else:
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and STREAM in errors[0].getMessage()


def test_a_finding_the_stream_refuses_for_good_is_parked_and_later_ones_flow(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    """Defect 6: a finding over the stream's maximum message size must not block every later finding."""
    rows = enqueue(journal, 3)
    big_sid = rows[0][0]
    with closing(sqlite3.connect(journal.path)) as db, db:
        db.execute("UPDATE outbox SET payload=? WHERE series_id=?", (b"{" + b" " * 4000 + b"}", big_sid))

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], max_msg_size=2048))
        await nc.close()
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(2)
        assert await pub.stop(1.0) == 0
        assert len(await stream_messages(nats_server.url)) == 2

    run(main())
    assert journal.series(big_sid).state is SeriesState.FAILED and "too_large" in (journal.series(big_sid).note or "")
    assert [journal.series(sid).state for sid, _ in rows[1:]] == [SeriesState.PUBLISHED] * 2
    assert journal.counts().outbox_rejected == 1
    assert sample(metrics.outbox_rejected, reason="too_large") == 1


def test_a_row_the_stream_turns_down_for_now_backs_off_alone(
    nats_server: NatsServer, journal: Journal, metrics: Metrics
) -> None:
    """A full stream that discards new messages answers about one row: that row waits, the drain goes on."""
    enqueue(journal, 2)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], max_msgs=1,
                                         discard=DiscardPolicy.NEW))
        acks = Acks()
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        await wait_until(lambda: any(r.attempts >= 1 for r in journal.outbox.pending(now=float("inf"))))
        [waiting] = journal.outbox.pending(now=float("inf"))
        assert "maximum messages" in (journal.read("SELECT last_error FROM outbox WHERE id=?", (waiting.id,))[0][0])
        await js.purge_stream(STREAM)  # the operator makes room: the row goes at its next try
        await nc.close()
        await acks.wait(2)
        assert await pub.stop(1.0) == 0

    run(main())
    assert journal.counts().outbox_rejected == 0  # a full stream is not a reason to give up on a finding
    assert journal.counts().outbox_pending == 0


def test_a_subject_the_credentials_may_not_publish_to_is_parked_as_rejected(
    tmp_path: Path, journal: Journal, metrics: Metrics
) -> None:
    """Defect 6: a permission error never answers (the publish only times out): it must not block the rest."""
    conf = tmp_path / "nats.conf"
    conf.write_text(
        'jetstream { store_dir: "js" }\n'
        "authorization { users = [ { user: edge, password: pw,"
        ' permissions: { publish: { deny: ["edge.findings.site1.CR.>"] } } } ] }\n'
    )
    server = NatsServer(tmp_path / "nats", config=conf)
    server.start()
    rows = enqueue(journal, 3)
    denied_sid = rows[0][0]
    with closing(sqlite3.connect(journal.path)) as db, db:
        db.execute("UPDATE outbox SET subject=? WHERE series_id=?", (f"{PREFIX}.site1.CR.ct-demo", denied_sid))

    async def main() -> None:
        acks = Acks()
        config = bus_config(server.url, user="edge", password="pw", publish_timeout_seconds=0.5)
        pub = Publisher(config, journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(2)
        await wait_until(lambda: sample(metrics.outbox_rejected, reason="permission") == 1)
        assert await pub.stop(1.0) == 0

    try:
        run(main())
    finally:
        server.stop()
    assert journal.series(denied_sid).state is SeriesState.FAILED
    assert [journal.series(sid).state for sid, _ in rows[1:]] == [SeriesState.PUBLISHED] * 2


def test_a_subject_allowed_again_is_published_and_a_later_time_out_on_it_is_only_a_time_out(
    tmp_path: Path, journal: Journal, metrics: Metrics
) -> None:
    """Before: a subject once denied stayed denied in the publisher's memory, so after the operator
    allowed it and reloaded nats-server, any time-out on it parked the finding as rejected for permission."""
    conf = tmp_path / "nats.conf"

    def deny(subject: str) -> None:
        conf.write_text('jetstream { store_dir: "js" }\n'
                        "authorization { users = [ { user: edge, password: pw,"
                        f' permissions: {{ publish: {{ deny: ["{subject}"] }} }} }} ] }}\n')

    deny("edge.findings.site1.CR.>")
    server = NatsServer(tmp_path / "nats", config=conf)
    server.start()

    def enqueue_cr(start: int) -> int:
        [(sid, _)] = enqueue(journal, 1, start=start)
        with closing(sqlite3.connect(journal.path)) as db, db:
            db.execute("UPDATE outbox SET subject=? WHERE series_id=?", (f"{PREFIX}.site1.CR.ct-demo", sid))
        return sid

    first_sid = enqueue_cr(0)
    later_sid = 0

    async def main() -> None:
        nonlocal later_sid
        acks = Acks()
        config = bus_config(server.url, user="edge", password="pw", publish_timeout_seconds=0.5)
        pub = Publisher(config, journal, metrics, on_acked=acks)
        await pub.start()
        await wait_until(lambda: sample(metrics.outbox_rejected, reason="permission") == 1)
        # The operator allows the subject and reloads the server (SIGHUP), then re-queues the parked finding.
        loaded = server.monitor("/varz")["config_load_time"]
        deny("nothing.at.all")
        assert server._proc is not None
        server._proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return bool(server.monitor("/varz")["config_load_time"] != loaded)

        await poll(reloaded)
        journal.outbox.requeue_rejected()
        pub.wake()
        await acks.wait(1)
        # A later finding on that subject while the broker is slow: a time-out, to be retried, not a rejection.
        timeouts = sample(metrics.publish_errors, reason="timeout")
        server.pause()
        try:
            later_sid = enqueue_cr(1)
            pub.wake()
            await wait_until(lambda: sample(metrics.publish_errors, reason="timeout") > timeouts)
        finally:
            server.resume()
        await wait_until(lambda: journal.series(later_sid).state in (SeriesState.PUBLISHED, SeriesState.FAILED))
        assert await pub.stop(1.0) == 0

    try:
        run(main())
    finally:
        server.stop()
    assert [journal.series(sid).state for sid in (first_sid, later_sid)] == [SeriesState.PUBLISHED] * 2
    assert sample(metrics.outbox_rejected, reason="permission") == 1  # the first refusal only


def test_row_backoff_grows_and_is_capped() -> None:
    delays = [row_backoff_seconds(n, 0.5) for n in range(1, 12)]
    assert delays[0] == 0.5 and delays == sorted(delays) and delays[-1] == 30.0


def test_no_jetstream_counts_no_responders_and_keeps_the_finding(
    tmp_path: Path, journal: Journal, metrics: Metrics
) -> None:
    server = NatsServer(tmp_path / "nats", jetstream=False)
    server.start()
    enqueue(journal, 1)
    [row] = journal.outbox.pending(now=float("inf"))

    async def main() -> None:
        pub = Publisher(bus_config(server.url, publish_timeout_seconds=0.3), journal, metrics)
        await pub.start()
        await wait_until(lambda: sample(metrics.publish_errors, reason="no_responders") >= 1)
        assert await pub.stop(0.1) == 1

    try:
        run(main())
    finally:
        server.stop()
    [after] = journal.outbox.pending(now=float("inf"))
    assert after.id == row.id and after.attempts >= 1
    assert sample(metrics.findings, model="ct-demo", outcome="publish_error") >= 1


# -- auth, callbacks, logging ----------------------------------------------------------------------


def test_token_auth_and_a_wrong_token_is_never_logged(
    tmp_path: Path, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = NatsServer(tmp_path / "nats", args=["--auth", "s3cret-token-good"])
    server.start()
    enqueue(journal, 1)

    async def main() -> None:
        bad = Publisher(bus_config(server.url, token="s3cret-token-bad"), journal, Metrics())
        await bad.start()
        await wait_until(lambda: "Authorization" in caplog.text)
        assert not bad.connected
        assert await bad.stop(0.1) == 1

        acks = Acks()
        good = Publisher(bus_config(server.url, token="s3cret-token-good"), journal, metrics, on_acked=acks)
        await good.start()
        await acks.wait(1)
        await good.stop(1.0)

    try:
        run(main())
    finally:
        server.stop()
    assert "s3cret" not in caplog.text


def test_credentials_in_urls_are_redacted() -> None:
    assert redact("nats://alice:pw@10.0.0.1:4222,nats://h2:4222") == "nats://***@10.0.0.1:4222,nats://h2:4222"
    assert redact("cannot reach nats://edge:s3c/r@t@broker:4222 now") == "cannot reach nats://***@broker:4222 now"
    assert describe_error(OSError("cannot reach tls://bob:hunter2@broker:4222")) == (
        "OSError: cannot reach tls://***@broker:4222"
    )


def test_a_failing_on_acked_is_logged_and_publishing_goes_on(
    nats_server: NatsServer, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(journal, 2)
    seen: list[int] = []
    done = asyncio.Event()

    def on_acked(series_id: int) -> Awaitable[None] | None:
        seen.append(series_id)
        if len(seen) == 2:
            done.set()
        raise RuntimeError("downstream broke")

    async def main() -> None:
        pub = Publisher(bus_config(nats_server.url), journal, metrics, on_acked=on_acked)
        await pub.start()
        await asyncio.wait_for(done.wait(), 10)
        assert await pub.stop(1.0) == 0

    run(main())
    assert len(seen) == 2
    assert "on_acked failed" in caplog.text


def test_a_credentials_file_that_cannot_work_is_refused_at_start(
    tmp_path: Path, journal: Journal, metrics: Metrics
) -> None:
    # The config refuses a file it cannot read (tests/test_config_paths.py); one gone since is refused here.
    creds = tmp_path / "gone.creds"
    creds.write_text("creds\n")
    cfg = bus_config("nats://127.0.0.1:4222", credentials_file=str(creds))
    creds.unlink()

    async def main() -> None:
        with pytest.raises(BusError, match="credentials_file"):
            await Publisher(cfg, journal, metrics).start()

    run(main())


# -- tail ------------------------------------------------------------------------------------------


def publish_findings(url: str, journal: Journal, metrics: Metrics, n: int) -> None:
    enqueue(journal, n)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(url), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(n)
        await pub.stop(1.0)

    run(main())


def test_tail_prints_each_finding_as_one_json_line(nats_server: NatsServer, journal: Journal,
                                                   metrics: Metrics) -> None:
    publish_findings(nats_server.url, journal, metrics, 2)
    out = io.StringIO()
    count = asyncio.run(tail(nats_server.url, STREAM, from_start=True, out=out, max_messages=2, timeout_seconds=10))
    lines = out.getvalue().splitlines()
    assert count == 2 and len(lines) == 2
    findings = [json.loads(line) for line in lines]
    assert [f["series_instance_uid"] for f in findings] == [journal.series(i).series_uid for i in (1, 2)]


def test_tail_shows_only_new_findings_by_default(nats_server: NatsServer, journal: Journal, metrics: Metrics) -> None:
    publish_findings(nats_server.url, journal, metrics, 1)

    async def main() -> None:
        out = io.StringIO()
        task = asyncio.create_task(tail(nats_server.url, STREAM, out=out, max_messages=1, timeout_seconds=10))
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await consumer_listening(js)
        new = encode(build_finding(make_input(series_instance_uid="1.2.3.999")))
        await js.publish("edge.findings.site1.CT.ct-demo", new)
        await nc.close()
        assert await task == 1
        assert json.loads(out.getvalue())["series_instance_uid"] == "1.2.3.999"

    run(main())


def test_tail_skips_messages_that_are_not_findings(nats_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"]))
        await js.publish("edge.findings.x.CT.m", b"\x00not json")
        await js.publish("edge.findings.x.CT.m", encode(build_finding(make_input())))
        await nc.close()
        out = io.StringIO()
        assert await tail(nats_server.url, STREAM, from_start=True, out=out, max_messages=1, timeout_seconds=10) == 1
        assert json.loads(out.getvalue())["schema_version"] == SCHEMA_VERSION

    run(main())
    assert "skipping stream message 1" in caplog.text


def test_tail_stops_at_its_timeout(nats_server: NatsServer, journal: Journal, metrics: Metrics) -> None:
    publish_findings(nats_server.url, journal, metrics, 1)
    out = io.StringIO()
    t0 = time.monotonic()
    assert asyncio.run(tail(nats_server.url, STREAM, out=out, timeout_seconds=0.3)) == 0
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert out.getvalue() == ""


def test_tail_ends_cleanly_when_cancelled(nats_server: NatsServer, journal: Journal, metrics: Metrics) -> None:
    publish_findings(nats_server.url, journal, metrics, 1)

    async def main() -> None:
        task = asyncio.create_task(tail(nats_server.url, STREAM, out=io.StringIO()))
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await consumer_listening(js)
        await nc.close()
        task.cancel()  # what asyncio.run does on Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_tail_errors_say_what_is_wrong(nats_server: NatsServer, tmp_path: Path) -> None:
    with pytest.raises(BusError, match="no stream 'NOPE'"):
        asyncio.run(tail(nats_server.url, "NOPE", timeout_seconds=1))
    down = NatsServer(tmp_path / "down")
    t0 = time.monotonic()
    with pytest.raises(BusError, match="cannot connect"):
        asyncio.run(tail(down.url, STREAM, connect_timeout_seconds=0.3))
    assert time.monotonic() - t0 < 2.0
