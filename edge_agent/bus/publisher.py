"""The outbox drain loop: findings from the journal to NATS JetStream, each kept until its PubAck.

One background task owns the connection. It keeps trying while the broker is down (at start too),
publishes each pending outbox row with its deterministic ``Nats-Msg-Id`` and marks the row acked
only after JetStream's PubAck. A publish that timed out may still have reached the stream; the
retry carries the same message id, so the stream's duplicate window drops the second copy.

Logs name outbox row ids and error kinds only: never payloads, subjects or credentials.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from edge_agent.bus.connection import (
    cancel_and_wait,
    check_credentials_file,
    connect_options,
    describe_error,
    encrypted_as_configured,
    server_address,
)
from edge_agent.bus.finding import stamp_published
from edge_agent.bus.tls import PLAIN_SERVER_MESSAGE, tls_options
from edge_agent.config import BusConfig
from edge_agent.errors import JournalError
from edge_agent.journal import Journal
from edge_agent.logs import RepeatedLog, log_context
from edge_agent.metrics import STREAM_SETTINGS, Metrics
from edge_agent.outbox import OutboxRow

logger = logging.getLogger(__name__)

OnAcked = Callable[[int], Awaitable[None] | None]

POLL_SECONDS = 1.0  # safety net: a lost wake() costs at most this much latency
BATCH_ROWS = 100
MAX_BACKOFF_SECONDS = 30.0
# A broker that stays down would otherwise log one line per reconnect attempt for hours.
REPEAT_LOG_SECONDS = 60.0
SECONDS_PER_DAY = 86_400.0
# nats-py's close() waits for its reconnect task and writes what is buffered: a frozen broker could hold it.
CLOSE_TIMEOUT_SECONDS = 5.0
FORCED_CLOSE_SECONDS = 0.5

def error_reason(exc: BaseException) -> str:
    """The bounded ``reason`` label of a failed publish: timeout, no_responders or error."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no_responders"
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is an asyncio.TimeoutError too
        return "timeout"
    return "error"


# nats-server's -ERR for a publish its permissions deny; the subject holds site, modality and model only.
# nats-py lower-cases the server's text, subject included: subjects are compared in lower case.
_PUBLISH_DENIED = re.compile(r"permissions violation for publish to \W?([a-z0-9_.*>-]+)", re.IGNORECASE)
# JetStream's error code for a message over the stream's (or account's) maximum message size.
_JS_MESSAGE_TOO_LARGE = 10054


def reject_reason(exc: BaseException, subject_denied: bool) -> str | None:
    """The ``reason`` a failed publish is parked under as rejected, or None when a retry may succeed."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return "too_large"
    if isinstance(exc, nats.js.errors.APIError) and (
        exc.err_code == _JS_MESSAGE_TOO_LARGE or "size exceeds" in (exc.description or "").lower()
    ):
        return "too_large"
    if subject_denied and isinstance(exc, TimeoutError | nats.errors.NoRespondersError):
        return "permission"
    return None


def row_backoff_seconds(attempt: int, first_seconds: float, max_seconds: float = MAX_BACKOFF_SECONDS) -> float:
    """How long one outbox row waits after its ``attempt``-th failure (1 = the first)."""
    return float(min(max_seconds, first_seconds * 2.0 ** min(max(attempt - 1, 0), 30)))


def subject_covers(pattern: str, subject: str) -> bool:
    """True if every subject that ``subject`` (which may end in ``>``) matches is matched by ``pattern``."""
    have, want = pattern.split("."), subject.split(".")
    for i, token in enumerate(have):
        if token == ">":
            return i < len(want)
        if i >= len(want) or want[i] == ">" or (token != "*" and token != want[i]):
            return False
    return len(have) == len(want)


def stream_mismatches(have: StreamConfig, config: BusConfig) -> dict[str, str]:
    """The settings in which an existing stream differs from the one this agent would create: setting -> why.

    The keys are those of metrics.STREAM_SETTINGS. Durations are compared in seconds, to the millisecond.
    """
    out: dict[str, str] = {}
    want_subject = f"{config.subject_prefix}.>"
    subjects = list(have.subjects or [])
    if not any(subject_covers(s, want_subject) for s in subjects):
        out["subjects"] = f"subjects {', '.join(subjects) or '(none)'} do not cover {want_subject}"
    window = have.duplicate_window or 0.0
    if abs(window - config.duplicate_window_seconds) > 1e-3:
        out["duplicate_window"] = f"duplicate_window {window:g} s, configured {config.duplicate_window_seconds:g} s"
    max_age = have.max_age or 0.0
    want_max_age = config.max_age_days * SECONDS_PER_DAY
    if abs(max_age - want_max_age) > 1e-3:
        out["max_age"] = f"max_age {max_age:g} s (0: unlimited), configured {want_max_age:g} s"
    storage = str(getattr(have.storage, "value", have.storage) or StorageType.FILE.value)
    if storage != StorageType.FILE.value:
        out["storage"] = f"storage {storage}, edge-agent creates file storage"
    return out


async def wait_unless_forced(task: asyncio.Future[Any], force: asyncio.Event, timeout_seconds: float) -> None:
    """Wait until ``task`` is done, ``force`` is set or the timeout passes; ``task`` is left as it is."""
    forced = asyncio.ensure_future(force.wait())
    try:
        await asyncio.wait({task, forced}, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
        await asyncio.wait({forced})


class _Backoff:
    def __init__(self, first_seconds: float, max_seconds: float = MAX_BACKOFF_SECONDS) -> None:
        self._first = first_seconds
        self._max = max(max_seconds, first_seconds)
        self._tries = 0

    def next(self) -> float:
        self._tries += 1
        delay = row_backoff_seconds(self._tries, self._first, self._max)
        # Jitter, so that boxes restarted together do not retry in step.
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self._tries = 0


class Publisher:
    """Drains the journal's outbox into the findings stream. Owns one background task."""

    def __init__(self, config: BusConfig, journal: Journal, metrics: Metrics,
                 on_acked: OnAcked | None = None) -> None:
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._on_acked = on_acked
        self._nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Set when a pass ended with nothing pending and no wake() since: what stop() waits for.
        self._flushed = asyncio.Event()
        self._stream_ready = False
        self._repeated = RepeatedLog(logger, REPEAT_LOG_SECONDS)
        # Subjects (lower case) the server refused with a permissions -ERR while a publish to them waited for
        # its PubAck; see _publish_row. Only that publish's own refusal may park its row for good.
        self._denied_subjects: set[str] = set()
        self._tls: dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        """Start the background task. Returns at once; the broker may be down (the task keeps trying)."""
        if self._task is not None:
            raise RuntimeError("publisher already started")
        check_credentials_file(self._config.credentials_file)
        self._tls = tls_options(self._config.tls)  # once: nats-py keeps the context for its reconnects
        self._metrics.broker_connected.set(0)
        self._task = asyncio.create_task(self._run(), name="publisher")

    def wake(self) -> None:
        """A finding was enqueued: drain now rather than at the next poll. Call on the event loop."""
        self._flushed.clear()
        self._wake.set()

    async def stop(self, flush_timeout_seconds: float, force: asyncio.Event | None = None) -> int:
        """Publish what is pending within the timeout, then drain the connection. Returns how many remain.

        ``force`` set (the daemon's second signal), before or during the call, ends both waits at once: a
        broker that is down must not hold up a forced exit. What was not acknowledged stays in the outbox
        and is published after the next start.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout_seconds
        force = force if force is not None else asyncio.Event()
        task, self._task = self._task, None
        if task is not None:
            pending = 0 if task.done() or force.is_set() else await self._count_pending()
            if pending:
                self.wake()
                logger.info("publishing %d pending finding(s) before stopping, for up to %.0f s", pending,
                            flush_timeout_seconds)
                flushed = asyncio.ensure_future(self._flushed.wait())
                await wait_unless_forced(flushed, force, flush_timeout_seconds)
                flushed.cancel()
            await cancel_and_wait(task)
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                logger.error("the publisher task had failed: %s", describe_error(failure))
        if force.is_set():
            logger.warning("forced exit: not waiting for the NATS server; unpublished findings stay in the outbox")
        await self._close_connection(max(deadline - loop.time(), 0.1), force)
        pending = await self._count_pending()
        self._metrics.outbox_pending.set(pending)
        logger.info("publisher stopped: %d finding(s) left in the outbox", pending)
        return pending

    # -- the background task ----------------------------------------------------------------------

    async def _run(self) -> None:
        nc = await self._connect()
        js = nc.jetstream(timeout=self._config.publish_timeout_seconds)
        backoff = _Backoff(self._config.reconnect_wait_seconds)
        while True:
            if nc.is_closed:
                # Only we close it, but should nats-py ever give up, start over rather than stall.
                nc = await self._connect()
                js = nc.jetstream(timeout=self._config.publish_timeout_seconds)
            if not nc.is_connected:
                # nats-py reconnects on its own; its callbacks wake us when it is back.
                await self._sleep_unless_woken(POLL_SECONDS)
                continue
            if not self._encrypted_as_configured(nc):
                # nats-py reconnected to a server that did not ask for TLS: drop it, connect again.
                await self._drop_plain_connection(nc)
                nc = await self._connect()
                js = nc.jetstream(timeout=self._config.publish_timeout_seconds)
                continue
            try:
                if not self._stream_ready:
                    await self._ensure_stream(js)
                ok = await self._drain_outbox(js)
            except JournalError as exc:
                logger.error("publisher cannot use the journal: %s", exc)
                ok = False
            except Exception:
                # The daemon must outlive any surprise here: log it and try again after a pause.
                logger.exception("publisher: unexpected error while draining the outbox")
                ok = False
            if ok:
                backoff.reset()
                if not self._wake.is_set():
                    self._flushed.set()
                await self._sleep_unless_woken(POLL_SECONDS)
            else:
                await self._sleep_unless_woken(backoff.next())

    async def _sleep_unless_woken(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _connect(self) -> NATS:
        backoff = _Backoff(self._config.reconnect_wait_seconds)
        while True:
            nc = NATS()
            self._nc = nc
            try:
                await nc.connect(
                    **connect_options(self._config.url, token=self._config.token, user=self._config.user,
                                      password=self._config.password,
                                      credentials_file=self._config.credentials_file),
                    **self._tls,
                    name="edge-agent",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self._config.reconnect_wait_seconds,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except Exception as exc:
                # With max_reconnect_attempts=-1 nats-py retries the first connect itself; this is for
                # whatever it gives up on (e.g. a malformed server list): keep trying, never crash.
                self._repeated.warning("connect", "cannot connect to the NATS server (will retry): %s",
                                   describe_error(exc))
                with suppress(Exception):
                    await nc.close()
                await asyncio.sleep(backoff.next())
                continue
            if not self._encrypted_as_configured(nc):
                await self._drop_plain_connection(nc)
                await asyncio.sleep(backoff.next())
                continue
            self._repeated.last.clear()
            self._metrics.broker_connected.set(1)
            logger.info("connected to the NATS server at %s", self._server_name())
            return nc

    def _encrypted_as_configured(self, nc: NATS) -> bool:
        return encrypted_as_configured(nc, self._config.url, self._config.tls)

    async def _drop_plain_connection(self, nc: NATS) -> None:
        self._repeated.warning("plain", "%s; findings wait in the outbox", PLAIN_SERVER_MESSAGE)
        self._metrics.broker_connected.set(0)
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_SECONDS)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the findings stream if it is missing. An existing stream is compared, never changed.

        A stream may be shared with other producers or set up by its operator: changing its max_age would
        purge their messages, and two boxes with different configs would undo each other at every reconnect.
        Differences are logged once per connection and shown in edge_agent_stream_config_mismatch{setting}.
        """
        cfg = self._config
        want_subject = f"{cfg.subject_prefix}.>"
        try:
            try:
                info = await js.stream_info(cfg.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(StreamConfig(name=cfg.stream, subjects=[want_subject],
                                                     duplicate_window=cfg.duplicate_window_seconds,
                                                     max_age=cfg.max_age_days * SECONDS_PER_DAY,
                                                     storage=StorageType.FILE))
                except nats.js.errors.APIError:
                    # Another box may have created it meanwhile, with its own settings: compare with those.
                    info = await js.stream_info(cfg.stream)
                else:
                    logger.info("created stream %s for subjects %s", cfg.stream, want_subject)
                    self._report_stream_mismatches({})
                    self._stream_ready = True
                    return
            self._report_stream_mismatches(stream_mismatches(info.config, cfg))
        except nats.js.errors.ServiceUnavailableError as exc:
            self._repeated.warning("stream", "JetStream is not available yet for stream %s: %s", cfg.stream,
                               describe_error(exc))
            return
        except nats.js.errors.APIError as exc:
            # The server said no (subjects overlap another stream, limits, permissions): asking again
            # will not change its answer. Publish anyway: a stream that covers our subjects acks it,
            # and if none does, every publish says so in publish_errors_total{reason="no_responders"}.
            logger.error("stream %s cannot be created or brought to the configured settings: %s; publishing "
                         "into whichever stream holds %s", cfg.stream, describe_error(exc), want_subject)
        except (nats.errors.Error, TimeoutError) as exc:
            self._repeated.warning("stream", "cannot set up stream %s (is JetStream enabled?): %s", cfg.stream,
                               describe_error(exc))
            return
        self._stream_ready = True

    def _report_stream_mismatches(self, mismatches: dict[str, str]) -> None:
        for setting in STREAM_SETTINGS:
            self._metrics.stream_config_mismatch.labels(setting=setting).set(1 if setting in mismatches else 0)
        # Once per connection: _last_logged is cleared on every connect and reconnect.
        if mismatches and "stream_settings" not in self._repeated.last:
            self._repeated.last["stream_settings"] = time.monotonic()
            logger.warning("stream %s differs from this agent's bus settings and is left as it is (edge-agent "
                           "never changes an existing stream; align the config or the stream): %s",
                           self._config.stream, "; ".join(mismatches[s] for s in STREAM_SETTINGS if s in mismatches))

    async def _drain_outbox(self, js: JetStreamContext) -> bool:
        """Publish every pending row that is due. False when the broker itself failed (the caller backs off).

        A failure that belongs to one row (the stream refused it) backs that row off, or parks it as
        rejected when no retry can help, and the rows behind it go on (issue 8, defect 6).
        """
        outbox = self._journal.outbox
        while True:
            rows = await asyncio.to_thread(outbox.pending, BATCH_ROWS)
            for row in rows:
                if not await self._publish(js, row):
                    await self._update_backlog()
                    return False
            if rows:
                # An idle poll changes nothing: the housekeeping tick keeps the gauges fresh meanwhile.
                await self._update_backlog()
            if len(rows) < BATCH_ROWS:
                return True

    async def _update_backlog(self) -> None:
        counts = await asyncio.to_thread(self._journal.counts)
        self._metrics.outbox_pending.set(counts.outbox_pending)
        self._metrics.outbox_rejected_rows.set(counts.outbox_rejected)

    async def _publish(self, js: JetStreamContext, row: OutboxRow) -> bool:
        """One row. False only when the broker failed (a time-out, no stream, a lost connection)."""
        with log_context(series_id=row.series_id, finding_id=row.msg_id):
            return await self._publish_row(js, row)

    async def _publish_row(self, js: JetStreamContext, row: OutboxRow) -> bool:
        outbox = self._journal.outbox
        payload = stamp_published(row.payload, time.time(), row.created_at)
        # Forget any earlier refusal of this subject: the operator may have allowed it since (and reloaded the
        # server). A permissions -ERR for this very publish arrives, in the read loop, well before its time-out.
        denied_key = row.subject.lower()
        self._denied_subjects.discard(denied_key)
        try:
            ack = await js.publish(row.subject, payload, timeout=self._config.publish_timeout_seconds,
                                   headers={"Nats-Msg-Id": row.msg_id})
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            reason = error_reason(exc)
            self._metrics.publish_errors.labels(reason=reason).inc()
            self._metrics.findings.labels(model=row.model, outcome="publish_error").inc()
            rejected = reject_reason(exc, denied_key in self._denied_subjects)
            if rejected is not None:
                await asyncio.to_thread(outbox.reject, row.id, f"{rejected}: {describe_error(exc)}")
                self._metrics.outbox_rejected.labels(reason=rejected).inc()
                logger.error("finding %d rejected for good (%s): parked in the outbox for an operator; later "
                             "findings go on (%s)", row.id, rejected, describe_error(exc))
                return True
            retry_at = time.time() + row_backoff_seconds(row.attempts + 1, self._config.reconnect_wait_seconds)
            await asyncio.to_thread(outbox.attempt_failed, row.id, f"{reason}: {describe_error(exc)}", retry_at)
            self._repeated.warning(f"publish:{reason}", "publishing finding %d failed (%s, attempt %d), will retry: %s",
                               row.id, reason, row.attempts + 1, describe_error(exc))
            if reason == "no_responders":
                # No stream answered: it may have been deleted, or the broker lost its storage.
                self._stream_ready = False
            # The stream answered about this row alone (e.g. it is full and discards new messages): the rows
            # behind it may still go. Anything else is the broker's trouble: back off as a whole.
            return isinstance(exc, nats.js.errors.APIError) and not isinstance(
                exc, nats.js.errors.ServiceUnavailableError
            )
        series_id = await asyncio.to_thread(outbox.ack, row.id, ack.seq)
        self._repeated.last.pop("publish:timeout", None)
        self._repeated.last.pop("publish:no_responders", None)
        self._repeated.last.pop("publish:error", None)
        if ack.duplicate:
            logger.info("finding %d was already in the stream (seq %d): a retry of an earlier publish", row.id,
                        ack.seq)
        self._metrics.findings.labels(model=row.model, outcome="duplicate" if ack.duplicate else "published").inc()
        self._metrics.stage_seconds.labels(stage="publish").observe(max(time.time() - row.created_at, 0.0))
        await self._notify(series_id)
        return True

    async def _notify(self, series_id: int) -> None:
        if self._on_acked is None:
            return
        try:
            result = self._on_acked(series_id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_acked failed for series %d (the finding is published)", series_id)

    async def _count_pending(self) -> int:
        counts = await asyncio.to_thread(self._journal.counts)
        return counts.outbox_pending

    async def _close_connection(self, timeout_seconds: float, force: asyncio.Event) -> None:
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        if nc.is_connected and not force.is_set():
            # A task and asyncio.wait rather than wait_for: nc.drain() swallows one cancellation and
            # then flushes, which waits on a frozen broker for as long as nats-py's own flush timeout.
            draining = asyncio.create_task(nc.drain())
            await wait_unless_forced(draining, force, timeout_seconds)
            if not draining.done():
                if not force.is_set():
                    logger.warning("draining the NATS connection took over %.1f s; closing it", timeout_seconds)
                await cancel_and_wait(draining)
            failure = None if draining.cancelled() else draining.exception()
            if failure is not None:
                logger.warning("draining the NATS connection failed: %s", describe_error(failure))
        closing = asyncio.create_task(nc.close())
        if force.is_set():
            await asyncio.wait({closing}, timeout=FORCED_CLOSE_SECONDS)
        else:
            await wait_unless_forced(closing, force, CLOSE_TIMEOUT_SECONDS)
        if not closing.done():
            await cancel_and_wait(closing)
        elif not closing.cancelled():
            closing.exception()  # retrieved, so that asyncio does not log it: the connection is gone either way
        self._metrics.broker_connected.set(0)

    # -- nats-py callbacks ------------------------------------------------------------------------

    def _server_name(self) -> str:
        return server_address(self._nc) if self._nc is not None else "?"

    async def _on_error(self, exc: Exception) -> None:
        denied = _PUBLISH_DENIED.search(str(exc))
        if denied is not None:
            # The server refuses this subject to our credentials: the publish waiting on it can only time out.
            # Noted, so that its row is parked as rejected instead of retried for ever.
            self._denied_subjects.add(denied.group(1).lower())
        if isinstance(exc, ssl.SSLError):
            # Logged under its own key: a refused handshake also shows up as resets and broken pipes on
            # other attempts, and the warning should name the TLS reason, not whichever came first.
            self._repeated.warning("tls", "NATS TLS handshake failed: %s", describe_error(exc))
            return
        self._repeated.warning("nats", "NATS connection problem: %s", describe_error(exc, self._config.tls is not None))

    async def _on_disconnected(self) -> None:
        self._metrics.broker_connected.set(0)
        if self._task is not None:
            logger.warning("disconnected from the NATS server; findings wait in the outbox")
        self._wake.set()

    async def _on_reconnected(self) -> None:
        self._metrics.broker_connected.set(1)
        self._repeated.last.clear()
        self._stream_ready = False  # the server may have come back with empty storage
        self._denied_subjects.clear()  # and with other permissions
        logger.info("reconnected to the NATS server at %s", self._server_name())
        self._wake.set()

    async def _on_closed(self) -> None:
        self._metrics.broker_connected.set(0)
