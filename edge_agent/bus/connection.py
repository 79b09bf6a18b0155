"""The NATS connection's small helpers, shared by the daemon's publisher and ``edge-agent tail``.

Connect options from the bus settings, the credentials file check, URL redaction and one-line error
descriptions (credentials never reach a log or a terminal), and a cancellation that survives nats-py's
habit of swallowing one. TLS options and checks live beside this, in ``tls.py``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from nats.aio.client import Client as NATS

from edge_agent.bus.tls import connection_uses_tls, expects_tls, tls_hint
from edge_agent.config import BusTLSConfig
from edge_agent.errors import BusError

_URL_USERINFO = re.compile(r"//[^\s,]*@")  # to the last "@": a password may hold "/" or "@"


def redact(text: str) -> str:
    """Remove user:password@ from any URL in ``text``."""
    return _URL_USERINFO.sub("//***@", text)


def describe_error(exc: BaseException, tls_configured: bool = False) -> str:
    """One line for a log: the error's type and message, with URL credentials removed, and for what looks
    like a failed TLS handshake the setting most likely wrong (see ``tls_hint``)."""
    text = str(exc).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__) + tls_hint(exc, tls_configured)


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


def encrypted_as_configured(nc: NATS, url: str, tls: BusTLSConfig | None) -> bool:
    """False when the settings ask for TLS and ``nc``'s connection stayed in clear (see tls.PLAIN_SERVER_MESSAGE)."""
    return not expects_tls(url, tls) or connection_uses_tls(nc)


def server_address(nc: NATS) -> str:
    """The server ``nc`` is connected to, as scheme://host:port without credentials; '?' when not connected."""
    url = nc.connected_url
    if url is None:
        return "?"
    return f"{url.scheme}://{url.hostname}:{url.port}"
