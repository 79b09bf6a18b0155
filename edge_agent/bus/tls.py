"""TLS to the NATS server: connect options from ``bus.tls``, a check that a connection really is encrypted,
and hints that turn OpenSSL's reasons for a refused handshake into the setting to look at."""

from __future__ import annotations

import ssl
from typing import Any

from nats.aio.client import Client as NATS

from edge_agent.config import BusTLSConfig
from edge_agent.errors import BusError, TLSFileError
from edge_agent.tlsutil import client_context


def tls_options(tls: BusTLSConfig | None) -> dict[str, Any]:
    """Keyword arguments for ``Client.connect`` that set up TLS as ``bus.tls`` says; none without it.

    Raises BusError naming the ``bus.tls`` key whose file cannot be used (it was checked with the config, but
    may have changed since). Without ``bus.tls`` a ``tls://`` URL still gets TLS, verified against the
    system's CA store (nats-py's default context).
    """
    if tls is None:
        return {}
    try:
        context = client_context(tls.ca_file, tls.cert_file, tls.key_file)
    except TLSFileError as exc:
        raise BusError(f"bus.tls.{exc.option}: {exc.message}") from None
    opts: dict[str, Any] = {"tls": context, "tls_handshake_first": tls.handshake_first}
    if tls.server_name is not None:
        opts["tls_hostname"] = tls.server_name
    return opts


def connection_uses_tls(nc: NATS) -> bool:
    """Whether ``nc``'s current connection is encrypted.

    nats-py upgrades a connection to TLS only when the server's INFO asks for it, whatever the client was
    given, so a server without TLS (or something posing as the server) is talked to in clear. nats-py has
    no public way to ask; this reads its transport's stream writer (nats-py 2.16).
    """
    url = nc.connected_url
    if url is not None and url.scheme == "wss":
        return True
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


PLAIN_SERVER_MESSAGE = ("the NATS server did not ask for TLS, which bus.tls or a tls:// URL requires: not using the "
                        "connection (give the server a tls block; bus.tls.handshake_first makes sure nothing is "
                        "sent in clear)")


def expects_tls(url: str, tls: BusTLSConfig | None) -> bool:
    """Whether a connection must be encrypted: bus.tls is set, or a server URL says tls:// or wss://."""
    return tls is not None or any(u.strip().startswith(("tls://", "wss://")) for u in url.split(","))


# OpenSSL's reason for a failed handshake -> what to check. Ours are the client's view; the alerts are the
# server telling us why it refused.
_TLS_HINTS = (
    ("CERTIFICATE_VERIFY_FAILED", "mismatch, certificate is not valid for",
     " (the server's certificate does not name the host in bus.url: set bus.tls.server_name to a name it carries)"),
    ("CERTIFICATE_VERIFY_FAILED", "",
     " (the server's certificate is not signed by a CA in bus.tls.ca_file, or has expired)"),
    ("CERTIFICATE_REQUIRED", "",
     " (the server requires a client certificate: set bus.tls.cert_file and bus.tls.key_file)"),
    ("HANDSHAKE_FAILURE", "", " (the server requires a client certificate, or shares no cipher with us)"),
    ("UNKNOWN_CA", "", " (the server does not trust the CA of the client certificate in bus.tls.cert_file)"),
    ("BAD_CERTIFICATE", "", " (the server refused the client certificate in bus.tls.cert_file)"),
    ("WRONG_VERSION_NUMBER", "",
     " (the server did not answer in TLS: it has no tls block, or bus.tls.handshake_first differs from its own)"),
)


# Under TLS 1.3 the server checks the client certificate after the client's side of the handshake is done:
# a client that writes at once (nats-py sends CONNECT) often sees the server's close, not its alert.
_CLOSED_UNDER_TLS_HINT = (" (bus.tls is set: this is also how a server that refuses the client certificate "
                          "ends the connection)")


def tls_hint(exc: BaseException, tls_configured: bool = False) -> str:
    """A hint naming the bus.tls setting to check for a failed TLS handshake; empty for any other error."""
    if tls_configured and isinstance(exc, BrokenPipeError | ConnectionResetError):
        return _CLOSED_UNDER_TLS_HINT
    if not isinstance(exc, ssl.SSLError):
        return ""
    reason = str(exc.reason or "")
    text = str(exc)
    for code, detail, hint in _TLS_HINTS:
        if code in reason and detail in text:
            return hint
    return ""
