"""TLS contexts for the NATS client and the DICOM listener: TLS 1.2 or later, certificates always verified.

Every failure to read or load a file is a ``TLSFileError`` naming the option it came from (``ca_file``,
``cert_file`` or ``key_file``), so that configuration checks can report it under its key instead of as
an OpenSSL traceback ("[SSL] PEM lib" does not say which file).
"""

from __future__ import annotations

import os
import ssl
from typing import NoReturn

from edge_agent.errors import TLSFileError

# PS3.15 B.12/B.13 (DICOM) and the NATS server both accept 1.2; nothing older is offered or accepted.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

StrPath = str | os.PathLike[str]

_CERTIFICATE_PEM = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY_PEM = b"PRIVATE KEY-----"  # PKCS#8, or the older RSA / EC forms


def server_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A server-side context: our certificate and key, TLS 1.2+.

    With ``ca_file``, clients are asked for a certificate, which must be signed by that CA: required when
    ``require_client_cert``, else optional (a client without one is let in; one with a bad one is not).
    Raises TLSFileError naming the option whose file is unusable.
    """
    if require_client_cert and ca_file is None:
        raise TLSFileError("ca_file", "client certificates are required, so a CA file to verify them is needed")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    load_cert_chain(ctx, cert_file, key_file)
    if ca_file is not None:
        load_ca_file(ctx, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: StrPath | None = None,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client-side context: the server's certificate verified, TLS 1.2+.

    ``ca_file`` is the only trust anchor when given (a private CA is not mixed with the system's); without
    it the system's CA store is used. ``cert_file`` and ``key_file`` (together) are the client certificate
    for mutual TLS. ``check_hostname=False`` still verifies the chain but not the name in it; for servers
    reached by an address their certificate does not name, prefer giving the expected name to the
    connection (``server_hostname``) instead.
    Raises TLSFileError naming the option whose file is unusable.
    """
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise TLSFileError(missing, "cert_file and key_file go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = MIN_TLS_VERSION
    if ca_file is not None:
        load_ca_file(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    if cert_file is not None and key_file is not None:
        load_cert_chain(ctx, cert_file, key_file)
    return ctx


def load_ca_file(ctx: ssl.SSLContext, ca_file: StrPath) -> None:
    """Trust the CA certificates in ``ca_file`` (PEM). Raises TLSFileError("ca_file", ...)."""
    check_certificate_file(ca_file, "ca_file")
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError("ca_file", f"cannot load {os.fspath(ca_file)}: {_reason(exc)}") from None


def load_cert_chain(ctx: ssl.SSLContext, cert_file: StrPath, key_file: StrPath) -> None:
    """Load a certificate (chain) and its private key. Raises TLSFileError naming cert_file or key_file."""
    check_certificate_file(cert_file)
    check_key_file(key_file)
    try:
        # The callback keeps OpenSSL from prompting on the terminal for an encrypted key's passphrase.
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file), password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFileError("key_file", f"{os.fspath(key_file)} is not the key of the certificate in cert_file"
                               ) from None
        raise TLSFileError("cert_file", f"cannot load {os.fspath(cert_file)} with its key: {_reason(exc)}") from None
    except OSError as exc:
        raise TLSFileError("cert_file", f"cannot load {os.fspath(cert_file)}: {_reason(exc)}") from None


def check_certificate_file(path: StrPath, option: str = "cert_file") -> None:
    """Raise TLSFileError(option, ...) unless ``path`` is readable and holds a PEM certificate."""
    _check_pem(path, option, _CERTIFICATE_PEM, "no PEM certificate in it")


def check_key_file(path: StrPath, option: str = "key_file") -> None:
    """Raise TLSFileError(option, ...) unless ``path`` is readable and holds a PEM private key."""
    _check_pem(path, option, _PRIVATE_KEY_PEM, "no PEM private key in it")


def _check_pem(path: StrPath, option: str, marker: bytes, problem: str) -> None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSFileError(option, f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    if marker not in data:
        raise TLSFileError(option, f"{os.fspath(path)}: {problem}")


def _no_passphrase() -> NoReturn:
    raise TLSFileError("key_file", "the private key is encrypted; give a key file without a passphrase "
                                   "(readable only by the service's user)")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
