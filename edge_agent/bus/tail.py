"""``edge-agent tail``: print the findings of the stream, one JSON line each, as they arrive.

An ephemeral ordered consumer: nothing is left on the server when the command ends, and it never
acknowledges, so it cannot disturb any other consumer of the stream.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from typing import TextIO

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from edge_agent.bus.finding import decode, encode
from edge_agent.bus.publisher import (
    cancel_and_wait,
    check_credentials_file,
    connect_options,
    describe_error,
    redact,
)
from edge_agent.bus.tls import PLAIN_SERVER_MESSAGE, connection_uses_tls, expects_tls, tls_options
from edge_agent.config import BusTLSConfig
from edge_agent.errors import BusError

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0


class _Errors:
    """nats-py's error callback: every failed (re)connect attempt, kept quiet; the time-out says it once."""

    def __init__(self, tls_configured: bool) -> None:
        self.tls: ssl.SSLError | None = None
        self._tls_configured = tls_configured

    async def record(self, exc: Exception) -> None:
        logger.debug("NATS: %s", describe_error(exc))
        if isinstance(exc, ssl.SSLError):
            self.tls = exc

    def describe(self, nc: NATS) -> str:
        # A refused handshake alternates with resets and broken pipes: the TLS reason is the one to show.
        err = self.tls if self.tls is not None else nc.last_error
        return f": {describe_error(err, self._tls_configured)}" if err is not None else ""


async def tail(
    url: str,
    stream: str,
    subject_filter: str = "edge.findings.>",
    from_start: bool = False,
    out: TextIO = sys.stdout,
    max_messages: int | None = None,
    timeout_seconds: float | None = None,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    credentials_file: str | None = None,
    tls: BusTLSConfig | None = None,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> int:
    """Print findings from ``stream`` until ``max_messages`` or ``timeout_seconds`` (total). Returns the count.

    ``from_start`` replays the stream from its first message; otherwise only new findings are shown.
    Raises BusError when the server cannot be reached or has no such stream. Ctrl-C (KeyboardInterrupt
    out of ``asyncio.run``) cancels it; the connection, and with it the consumer, is closed on the way out.
    """
    check_credentials_file(credentials_file)
    tls_kwargs = tls_options(tls)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_seconds is None else loop.time() + timeout_seconds
    nc = NATS()
    errors = _Errors(tls_configured=tls is not None)
    connecting = asyncio.create_task(nc.connect(
        **connect_options(url, token=token, user=user, password=password, credentials_file=credentials_file),
        **tls_kwargs,
        name="edge-agent-tail",
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        error_cb=errors.record,
    ))
    try:
        # Not asyncio.wait_for: on Python 3.11 its cancellation of nats-py's connect can be lost
        # (see cancel_and_wait), and then it would wait forever.
        await asyncio.wait({connecting}, timeout=connect_timeout_seconds)
        if not connecting.done():
            await cancel_and_wait(connecting)
            raise BusError(f"cannot connect to the NATS server at {redact(url)} within {connect_timeout_seconds:g} s"
                           f"{errors.describe(nc)}")
        try:
            connecting.result()
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot connect to the NATS server at {redact(url)}: "
                           f"{describe_error(exc, tls is not None)}") from None
        if expects_tls(url, tls) and not connection_uses_tls(nc):
            raise BusError(f"{redact(url)}: {PLAIN_SERVER_MESSAGE}")
        js = nc.jetstream()
        try:
            sub = await js.subscribe(subject_filter, stream=stream, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW)
        except nats.js.errors.NotFoundError:
            raise BusError(f"the NATS server has no stream {stream!r}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot subscribe to stream {stream!r}: {describe_error(exc)}") from None
        count = 0
        while max_messages is None or count < max_messages:
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            try:
                finding = decode(msg.data)
            except ValueError:
                logger.warning("skipping stream message %d: not a JSON finding", msg.metadata.sequence.stream)
                continue
            out.write(encode(finding).decode("utf-8") + "\n")
            out.flush()
            count += 1
        return count
    finally:
        # Also on Ctrl-C (the task is cancelled): the ephemeral consumer goes with the connection.
        await cancel_and_wait(connecting)
        await nc.close()

