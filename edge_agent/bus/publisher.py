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
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from edge_agent.config import BusConfig
from edge_agent.errors import BusError, JournalError
from edge_agent.journal import Journal, OutboxRow
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

OnAcked = Callable[[int], Awaitable[None] | None]

POLL_SECONDS = 1.0  # safety net: a lost wake() costs at most this much latency
BATCH_ROWS = 100
MAX_BACKOFF_SECONDS = 30.0
# A broker that stays down would otherwise log one line per reconnect attempt for hours.
REPEAT_LOG_SECONDS = 60.0
SECONDS_PER_DAY = 86_400.0

_URL_USERINFO = re.compile(r"//[^/@\s]*@")


def redact(text: str) -> str:
    """Remove user:password@ from any URL in ``text``."""
    return _URL_USERINFO.sub("//***@", text)


def describe_error(exc: BaseException) -> str:
    """One line for a log: the error's type and message, with URL credentials removed."""
    text = str(exc).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def error_reason(exc: BaseException) -> str:
    """The bounded ``reason`` label of a failed publish: timeout, no_responders or error."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no_responders"
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is an asyncio.TimeoutError too
        return "timeout"
    return "error"


def connect_options(url: str, *, token: str | None = None, user: str | None = None, password: str | None = None,
                    credentials_file: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nats.aio.client.Client.connect``: the server list and the auth."""
    opts: dict[str, Any] = {"servers": [u.strip() for u in url.split(",")]}
    if token is not None:
        opts["token"] = token
    if user is not None:
        opts["user"] = user
        opts["password"] = password
    if credentials_file is not None:
        opts["user_credentials"] = credentials_file
    return opts


def check_credentials_file(credentials_file: str | None) -> None:
    """Raise BusError when a credentials file is named but can never work (unreadable, or no nkeys package)."""
    if credentials_file is None:
        return
    try:
        import nkeys  # noqa: F401  (nats-py reads .creds files with it)
    except ImportError:
        raise BusError("bus.credentials_file needs the 'nkeys' package (pip install 'nats-py[nkeys]')") from None
    try:
        with open(credentials_file, "rb"):
            pass
    except OSError as exc:
        raise BusError(f"bus.credentials_file cannot be read: {exc.strerror}") from None


async def cancel_and_wait(task: asyncio.Task[Any], retry_seconds: float = 0.1) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if a cancellation was lost.

    On Python 3.11 ``asyncio.wait_for`` returns the result instead of raising when the awaited future
    completes in the same loop iteration as the cancellation (CPython gh-86296, bpo-42130). nats-py
    connects inside wait_for, so a single cancel() of a connecting task can vanish.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_seconds)


class _Backoff:
    def __init__(self, first_seconds: float, max_seconds: float = MAX_BACKOFF_SECONDS) -> None:
        self._first = first_seconds
        self._max = max(max_seconds, first_seconds)
        self._tries = 0

    def next(self) -> float:
        delay = min(self._max, self._first * 2.0 ** min(self._tries, 30))
        self._tries += 1
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
        self._last_logged: dict[str, float] = {}

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        """Start the background task. Returns at once; the broker may be down (the task keeps trying)."""
        if self._task is not None:
            raise RuntimeError("publisher already started")
        check_credentials_file(self._config.credentials_file)
        self._metrics.broker_connected.set(0)
        self._task = asyncio.create_task(self._run(), name="publisher")

    def wake(self) -> None:
        """A finding was enqueued: drain now rather than at the next poll. Call on the event loop."""
        self._flushed.clear()
        self._wake.set()

    async def stop(self, flush_timeout_seconds: float) -> int:
        """Publish what is pending within the timeout, then drain the connection. Returns how many remain."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout_seconds
        task, self._task = self._task, None
        if task is not None:
            if not task.done() and await self._count_pending():
                self.wake()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._flushed.wait(), flush_timeout_seconds)
            await cancel_and_wait(task)
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                logger.error("the publisher task had failed: %s", describe_error(failure))
        await self._close_connection(max(deadline - loop.time(), 0.1))
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
                self._log_repeated("connect", "cannot connect to the NATS server (will retry): %s",
                                   describe_error(exc))
                with suppress(Exception):
                    await nc.close()
                await asyncio.sleep(backoff.next())
                continue
            self._last_logged.clear()
            self._metrics.broker_connected.set(1)
            logger.info("connected to the NATS server at %s", self._server_name())
            return nc

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the findings stream, or bring an existing one to our subjects and windows."""
        cfg = self._config
        want_subject = f"{cfg.subject_prefix}.>"
        max_age_seconds = cfg.max_age_days * SECONDS_PER_DAY
        try:
            try:
                info = await js.stream_info(cfg.stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(StreamConfig(name=cfg.stream, subjects=[want_subject],
                                                 duplicate_window=cfg.duplicate_window_seconds,
                                                 max_age=max_age_seconds))
                logger.info("created stream %s for subjects %s", cfg.stream, want_subject)
            else:
                have = info.config
                changes: dict[str, Any] = {}
                if want_subject not in (have.subjects or []):
                    changes["subjects"] = [*(have.subjects or []), want_subject]
                if abs((have.duplicate_window or 0.0) - cfg.duplicate_window_seconds) > 1e-3:
                    changes["duplicate_window"] = cfg.duplicate_window_seconds
                if abs((have.max_age or 0.0) - max_age_seconds) > 1e-3:
                    changes["max_age"] = max_age_seconds
                if changes:
                    await js.update_stream(have.evolve(**changes))
                    logger.info("updated stream %s: %s", cfg.stream, ", ".join(sorted(changes)))
        except nats.js.errors.ServiceUnavailableError as exc:
            self._log_repeated("stream", "JetStream is not available yet for stream %s: %s", cfg.stream,
                               describe_error(exc))
            return
        except nats.js.errors.APIError as exc:
            # The server said no (subjects overlap another stream, limits, permissions): asking again
            # will not change its answer. Publish anyway: a stream that covers our subjects acks it,
            # and if none does, every publish says so in publish_errors_total{reason="no_responders"}.
            logger.error("stream %s cannot be created or brought to the configured settings: %s; publishing "
                         "into whichever stream holds %s", cfg.stream, describe_error(exc), want_subject)
        except (nats.errors.Error, TimeoutError) as exc:
            self._log_repeated("stream", "cannot set up stream %s (is JetStream enabled?): %s", cfg.stream,
                               describe_error(exc))
            return
        self._stream_ready = True

    async def _drain_outbox(self, js: JetStreamContext) -> bool:
        """Publish every pending row. False as soon as one fails (the caller backs off)."""
        while True:
            rows = await asyncio.to_thread(self._journal.pending_outbox, BATCH_ROWS)
            pending = len(rows) if len(rows) < BATCH_ROWS else await self._count_pending()
            self._metrics.outbox_pending.set(pending)
            for row in rows:
                if not await self._publish(js, row):
                    return False
                pending -= 1
                self._metrics.outbox_pending.set(pending)
            if len(rows) < BATCH_ROWS:
                return True

    async def _publish(self, js: JetStreamContext, row: OutboxRow) -> bool:
        try:
            ack = await js.publish(row.subject, row.payload, timeout=self._config.publish_timeout_seconds,
                                   headers={"Nats-Msg-Id": row.msg_id})
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            reason = error_reason(exc)
            self._metrics.publish_errors.labels(reason=reason).inc()
            self._metrics.findings.labels(model=row.model, outcome="publish_error").inc()
            await asyncio.to_thread(self._journal.outbox_attempt_failed, row.id, f"{reason}: {describe_error(exc)}")
            self._log_repeated(f"publish:{reason}", "publishing finding %d failed (%s, attempt %d), will retry: %s",
                               row.id, reason, row.attempts + 1, describe_error(exc))
            if reason == "no_responders":
                # No stream answered: it may have been deleted, or the broker lost its storage.
                self._stream_ready = False
            return False
        series_id = await asyncio.to_thread(self._journal.ack_finding, row.id, ack.seq)
        self._last_logged.pop("publish:timeout", None)
        self._last_logged.pop("publish:no_responders", None)
        self._last_logged.pop("publish:error", None)
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

    async def _close_connection(self, timeout_seconds: float) -> None:
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        if nc.is_connected:
            # A task and asyncio.wait rather than wait_for: nc.drain() swallows one cancellation and
            # then flushes, which waits on a frozen broker for as long as nats-py's own flush timeout.
            draining = asyncio.create_task(nc.drain())
            await asyncio.wait({draining}, timeout=timeout_seconds)
            if not draining.done():
                logger.warning("draining the NATS connection took over %.1f s; closing it", timeout_seconds)
                await cancel_and_wait(draining)
            failure = None if draining.cancelled() else draining.exception()
            if failure is not None:
                logger.warning("draining the NATS connection failed: %s", describe_error(failure))
        with suppress(Exception):
            await nc.close()
        self._metrics.broker_connected.set(0)

    # -- nats-py callbacks ------------------------------------------------------------------------

    def _server_name(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return f"{url.hostname}:{url.port}" if url is not None else "?"

    def _log_repeated(self, key: str, msg: str, *args: object) -> None:
        """Log at WARNING the first time and then once a minute; DEBUG in between."""
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is None or now - last >= REPEAT_LOG_SECONDS:
            self._last_logged[key] = now
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)

    async def _on_error(self, exc: Exception) -> None:
        self._log_repeated("nats", "NATS connection problem: %s", describe_error(exc))

    async def _on_disconnected(self) -> None:
        self._metrics.broker_connected.set(0)
        if self._task is not None:
            logger.warning("disconnected from the NATS server; findings wait in the outbox")
        self._wake.set()

    async def _on_reconnected(self) -> None:
        self._metrics.broker_connected.set(1)
        self._last_logged.clear()
        self._stream_ready = False  # the server may have come back with empty storage
        logger.info("reconnected to the NATS server at %s", self._server_name())
        self._wake.set()

    async def _on_closed(self) -> None:
        self._metrics.broker_connected.set(0)
