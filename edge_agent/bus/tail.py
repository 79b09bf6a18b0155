"""``edge-agent tail``: print the findings of the stream, one JSON line each, as they arrive.

Findings go to ``out`` (stdout), one JSON object per line, and nothing else does: what tail has to say
about its connection (where it is connected and what it reads, a lost or refused server, a reconnection)
goes to ``notes`` (stderr), so that ``edge-agent tail | jq`` keeps working through a broker restart.

An ephemeral ordered consumer: nothing is left on the server when the command ends, and it never
acknowledges, so it cannot disturb any other consumer of the stream. The consumer lives in the server's
memory, so a restarted server has forgotten it: after every reconnection tail makes a new one that starts
after the last stream sequence it printed, and skips anything older, so nothing is printed twice or lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from edge_agent.bus.connection import (
    cancel_and_wait,
    check_credentials_file,
    connect_options,
    describe_error,
    encrypted_as_configured,
    redact,
    server_address,
)
from edge_agent.bus.finding import decode, encode, rfc3339
from edge_agent.bus.tls import PLAIN_SERVER_MESSAGE, tls_options
from edge_agent.config import BusTLSConfig
from edge_agent.errors import BusError

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_RECONNECT_WAIT_SECONDS = 1.0
# A time given to --since may be a little ahead of this machine's clock; further ahead is a mistake.
FUTURE_SLACK_SECONDS = 60.0
# A stream that stays unreadable after a reconnection is said again this often, not once and then never.
RESUBSCRIBE_NOTE_SECONDS = 60.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from ``now`` (``90s``, ``10m``, ``2h``, ``1h30m``, ``7d``) or a time
    (ISO 8601: ``2026-01-31T12:00:00Z``, ``2026-01-31 12:00`` in local time). Returns Unix seconds.

    Raises ValueError with a message for the user.
    """
    value = text.strip()
    if value and _DURATION_PART.sub("", value) == "" and value[0].isdigit():
        return now - sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {text!r}: not a duration (10m, 2h, 1h30m, 7d) or a time "
                         f"(2026-01-31T12:00:00Z)") from None
    start = when.timestamp()  # a time without an offset is local time
    if start > now + FUTURE_SLACK_SECONDS:
        raise ValueError(f"--since {text!r} is in the future")
    return start


def findings_subject(prefix: str, *, site: str | None = None, modality: str | None = None,
                     model: str | None = None) -> str:
    """The subject filter for findings of one site, modality and/or model: ``<prefix>.<site>.<modality>.<model>``
    with ``*`` for what is not given (the publisher's subject layout; see finding.subject)."""
    if site is None and modality is None and model is None:
        return f"{prefix}.>"
    return ".".join((prefix, site or "*", modality or "*", model or "*"))


class _Notes:
    """What tail says about its connection, one line each, on ``notes`` (stderr in the CLI)."""

    def __init__(self, out: TextIO | None) -> None:
        self._out = out

    def say(self, text: str) -> None:
        logger.debug("%s", text)
        if self._out is not None:
            self._out.write(f"tail: {text}\n")
            self._out.flush()


class _Tail:
    def __init__(self, nc: NATS, url: str, stream: str, subject_filter: str, tls: BusTLSConfig | None,
                 notes: _Notes, reconnect_wait_seconds: float) -> None:
        self.nc = nc
        self.url = url
        self.stream = stream
        self.subject_filter = subject_filter
        self.tls = tls
        self.notes = notes
        self.reconnect_wait_seconds = reconnect_wait_seconds
        # Messages, and None after a reconnection: the consumer must be made again.
        self.inbox: asyncio.Queue[Msg | None] = asyncio.Queue()
        self.next_seq: int | None = None  # the stream sequence to read from; None until known
        self.since: float | None = None
        self.from_start = False
        self.sub: JetStreamContext.PushSubscription | None = None
        self.connected_once = False
        self.outage_reported = False
        self.connect_timeout_seconds: float | None = None  # while connecting at start
        self.tls_error: ssl.SSLError | None = None

    # -- nats-py callbacks --------------------------------------------------------------------------

    async def on_error(self, exc: Exception) -> None:
        logger.debug("NATS: %s", describe_error(exc))
        if isinstance(exc, ssl.SSLError):
            self.tls_error = exc
        if self.nc.is_connected or self.outage_reported:
            return
        # Once per outage (and once at start): a server that stays down refuses every attempt.
        self.outage_reported = True
        then = "still trying" if self.connected_once else f"trying for up to {self.connect_timeout_seconds:g} s"
        self.notes.say(f"cannot reach the NATS server at {redact(self.url)}: "
                       f"{describe_error(exc, self.tls is not None)}; {then}")

    async def on_disconnected(self) -> None:
        if self.connected_once and not self.nc.is_closed:
            self.notes.say(f"lost the connection to the NATS server at {redact(self.url)}; reconnecting every "
                           f"{self.reconnect_wait_seconds:g} s")

    async def on_reconnected(self) -> None:
        self.outage_reported = False
        self.inbox.put_nowait(None)

    async def on_message(self, msg: Msg) -> None:
        self.inbox.put_nowait(msg)

    def start_error(self) -> str:
        # A refused handshake alternates with resets and broken pipes: the TLS reason is the one to show.
        err = self.tls_error if self.tls_error is not None else self.nc.last_error
        return f": {describe_error(err, self.tls is not None)}" if err is not None else ""

    # -- the consumer -------------------------------------------------------------------------------

    def describe_start(self) -> str:
        if self.next_seq is not None and not self.from_start:
            return f"new findings (after stream sequence {self.next_seq - 1})"
        if self.since is not None:
            return f"findings since {rfc3339(self.since)}"
        return "every finding from the first"

    async def subscribe(self) -> None:
        """Make the ephemeral consumer, from ``next_seq`` once known. Raises the server's errors."""
        js = self.nc.jetstream()
        info = await js.stream_info(self.stream)
        if self.next_seq is not None and info.state.last_seq < self.next_seq - 1:
            # The server came back with less than it had (its storage was lost or the stream made anew).
            self.notes.say(f"stream {self.stream} now ends at sequence {info.state.last_seq}, before the last one "
                           f"shown ({self.next_seq - 1}): reading it from its first message")
            # An empty stream reports first_seq 0, and the server refuses a start sequence of 0 (err 10094):
            # its first message will be sequence 1.
            self.next_seq = max(info.state.first_seq, 1)
        config = ConsumerConfig()
        if self.next_seq is not None:
            config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, self.next_seq
        elif self.since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.fromtimestamp(self.since, UTC)
        else:
            config.deliver_policy = DeliverPolicy.ALL
        old, self.sub = self.sub, None
        if old is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await old.unsubscribe()
        self.sub = await js.subscribe(self.subject_filter, stream=self.stream, ordered_consumer=True, config=config,
                                      cb=self.on_message)

    def where(self) -> str:
        return f"from sequence {self.next_seq}" if self.next_seq is not None else "from where it started"

    async def resubscribe(self, deadline: float | None) -> bool:
        """After a reconnection: a new consumer where the last one stopped. False if the deadline passed first."""
        loop = asyncio.get_running_loop()
        if not encrypted_as_configured(self.nc, self.url, self.tls):
            raise BusError(f"{redact(self.url)}: {PLAIN_SERVER_MESSAGE}")
        self.notes.say(f"reconnected to {server_address(self.nc)}; reading stream {self.stream} {self.where()}")
        failing_since = loop.time()
        said_at: float | None = None
        while deadline is None or loop.time() < deadline:
            try:
                await self.subscribe()
                if said_at is not None:
                    self.notes.say(f"reading stream {self.stream} again, {self.where()}")
                return True
            except (nats.errors.Error, TimeoutError) as exc:
                # A restarted server may not have JetStream (or the stream) back yet; the daemon makes a
                # missing stream again when it reconnects. Said at once and then every RESUBSCRIBE_NOTE_SECONDS
                # while it lasts: a tail that has gone quiet must not look like one with nothing to show.
                now = loop.time()
                if said_at is None or now - said_at >= RESUBSCRIBE_NOTE_SECONDS:
                    still = "" if said_at is None else f"still, after {now - failing_since:.0f} s: "
                    said_at = now
                    why = (f"has no stream {self.stream}" if isinstance(exc, nats.js.errors.NotFoundError)
                           else f"cannot serve stream {self.stream} ({describe_error(exc)})")
                    self.notes.say(f"{still}the NATS server {why}; trying again every "
                                   f"{self.reconnect_wait_seconds:g} s")
                if not self.nc.is_connected:
                    return True  # lost again: the next reconnection comes through the inbox
                await asyncio.sleep(self.reconnect_wait_seconds)
        return False


async def tail(
    url: str,
    stream: str,
    subject_filter: str = "edge.findings.>",
    from_start: bool = False,
    out: TextIO = sys.stdout,
    max_messages: int | None = None,
    timeout_seconds: float | None = None,
    *,
    since: float | None = None,
    notes: TextIO | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    credentials_file: str | None = None,
    tls: BusTLSConfig | None = None,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    reconnect_wait_seconds: float = DEFAULT_RECONNECT_WAIT_SECONDS,
) -> int:
    """Print findings from ``stream`` until ``max_messages`` or ``timeout_seconds`` (total). Returns the count.

    Where reading starts: ``from_start`` replays the stream from its first message, ``since`` (Unix seconds)
    from the first message stored at or after that time; otherwise only new findings are shown.
    ``subject_filter`` narrows them (NATS wildcards; see ``findings_subject``). Connection lines go to
    ``notes`` when given. A server lost while reading is reported and reconnected to for as long as it
    takes. Raises BusError when the server cannot be reached at start (within ``connect_timeout_seconds``)
    or has no such stream. Ctrl-C (KeyboardInterrupt out of ``asyncio.run``) cancels it; the connection,
    and with it the consumer, is closed on the way out.
    """
    check_credentials_file(credentials_file)
    tls_kwargs = tls_options(tls)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_seconds is None else loop.time() + timeout_seconds
    nc = NATS()
    said = _Notes(notes)
    state = _Tail(nc, url, stream, subject_filter, tls, said, reconnect_wait_seconds)
    state.since = since
    state.from_start = from_start
    state.connect_timeout_seconds = connect_timeout_seconds
    connecting = asyncio.create_task(nc.connect(
        **connect_options(url, token=token, user=user, password=password, credentials_file=credentials_file),
        **tls_kwargs,
        name="edge-agent-tail",
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=reconnect_wait_seconds,  # type: ignore[arg-type]
        error_cb=state.on_error,
        disconnected_cb=state.on_disconnected,
        reconnected_cb=state.on_reconnected,
    ))
    try:
        # Not asyncio.wait_for: on Python 3.11 its cancellation of nats-py's connect can be lost
        # (see cancel_and_wait), and then it would wait forever.
        await asyncio.wait({connecting}, timeout=connect_timeout_seconds)
        if not connecting.done():
            await cancel_and_wait(connecting)
            raise BusError(f"cannot connect to the NATS server at {redact(url)} within {connect_timeout_seconds:g} s"
                           f"{state.start_error()}")
        try:
            connecting.result()
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot connect to the NATS server at {redact(url)}: "
                           f"{describe_error(exc, tls is not None)}") from None
        if not encrypted_as_configured(nc, url, tls):
            raise BusError(f"{redact(url)}: {PLAIN_SERVER_MESSAGE}")
        state.connected_once = True
        state.outage_reported = False
        js = nc.jetstream()
        try:
            if not from_start and since is None:
                # New findings only: from just after the stream's last message, so that a reconnection
                # resumes there too.
                state.next_seq = (await js.stream_info(stream)).state.last_seq + 1
            await state.subscribe()
        except nats.js.errors.NotFoundError:
            raise BusError(f"the NATS server has no stream {stream!r}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot subscribe to stream {stream!r}: {describe_error(exc)}") from None
        said.say(f"connected to {server_address(nc)}; reading stream {stream}, subjects {subject_filter}: "
                 f"{state.describe_start()}")
        return await _print_findings(state, out, max_messages, deadline)
    finally:
        # Also on Ctrl-C (the task is cancelled): the ephemeral consumer goes with the connection.
        await cancel_and_wait(connecting)
        await nc.close()


async def _print_findings(state: _Tail, out: TextIO, max_messages: int | None, deadline: float | None) -> int:
    loop = asyncio.get_running_loop()
    count = 0
    while max_messages is None or count < max_messages:
        wait = None if deadline is None else deadline - loop.time()
        if wait is not None and wait <= 0:
            break
        try:
            msg = await asyncio.wait_for(state.inbox.get(), wait)
        except TimeoutError:
            break
        if msg is None:
            if not await state.resubscribe(deadline):
                break
            continue
        seq = _stream_sequence(msg)
        if state.next_seq is not None and seq is not None and seq < state.next_seq:
            continue  # from the consumer before a reconnection: already printed
        if seq is not None:
            state.next_seq = seq + 1
        try:
            finding = decode(msg.data)
        except ValueError:
            logger.warning("skipping stream message %s: not a JSON finding", seq if seq is not None else "?")
            continue
        out.write(encode(finding).decode("utf-8") + "\n")
        out.flush()
        count += 1
    return count


def _stream_sequence(msg: Msg) -> int | None:
    try:
        meta: Any = msg.metadata
        return int(meta.sequence.stream)
    except (nats.errors.Error, ValueError, AttributeError):
        return None
