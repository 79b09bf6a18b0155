"""edge_agent.tlsutil: contexts tried in real handshakes over loopback, and file errors that name their option."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from edge_agent.errors import TLSFileError
from edge_agent.tlsutil import client_context, server_context
from tests.certs import DEFAULT_CLIENT_NAME, CertPaths, make_certs


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "localhost") -> Any:
    """Connect ``client`` to a loopback server using ``server``; one byte each way. Returns the client cert the
    server saw (None without one). Raises what the client sees when the handshake fails."""
    seen: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(1)
            if not seen.done():
                seen.set_result(writer.get_extra_info("peercert"))
            writer.write(b"!")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname)
        try:
            writer.write(b"?")
            await writer.drain()
            # Under TLS 1.3 a refused client certificate arrives as an alert after the handshake: on this read.
            if await reader.read(1) != b"!":
                raise ConnectionResetError("the server closed the connection")
        finally:
            writer.close()
        return await seen
    finally:
        listener.close()
        await listener.wait_closed()


def test_contexts_are_tls_1_2_or_later(certs: CertPaths) -> None:
    assert server_context(certs.server_cert_file, certs.server_key_file).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(certs.ca_file).minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_authentication_only(certs: CertPaths) -> None:
    seen = run(handshake(server_context(certs.server_cert_file, certs.server_key_file), client_context(certs.ca_file)))
    assert seen is None


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_the_server_certificate_names_localhost_and_the_loopback_address(
    certs: CertPaths, server_hostname: str
) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file)
    run(handshake(server, client_context(certs.ca_file), server_hostname=server_hostname))


def test_a_server_name_its_certificate_does_not_carry_is_refused(certs: CertPaths) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        run(handshake(server, client_context(certs.ca_file), server_hostname="pacs.example"))


def test_a_server_signed_by_another_ca_is_refused(certs: CertPaths) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        run(handshake(server, client_context(certs.other_ca_file)))


def test_mutual_tls_the_server_sees_the_client_certificate(certs: CertPaths) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file, certs.ca_file, require_client_cert=True)
    client = client_context(certs.ca_file, certs.client_cert_file, certs.client_key_file)
    seen = run(handshake(server, client))
    names = [value for kind, value in seen["subjectAltName"]]
    assert DEFAULT_CLIENT_NAME in names


def test_a_required_client_certificate_that_is_missing_is_refused(certs: CertPaths) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file, certs.ca_file, require_client_cert=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        run(handshake(server, client_context(certs.ca_file)))


def test_an_optional_client_certificate_lets_clients_without_one_in_but_checks_one_that_is_sent(
    certs: CertPaths, tmp_path: Path
) -> None:
    server = server_context(certs.server_cert_file, certs.server_key_file, certs.ca_file)
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert run(handshake(server, client_context(certs.ca_file))) is None
    assert run(handshake(server, client_context(certs.ca_file, certs.client_cert_file, certs.client_key_file)))
    stranger = make_certs(tmp_path / "stranger")  # a client certificate from a CA the server does not trust
    with pytest.raises((ssl.SSLError, ConnectionError)):
        run(handshake(server, client_context(certs.ca_file, stranger.client_cert_file, stranger.client_key_file)))


def test_required_client_certificates_need_a_ca_file(certs: CertPaths) -> None:
    with pytest.raises(TLSFileError) as info:
        server_context(certs.server_cert_file, certs.server_key_file, require_client_cert=True)
    assert info.value.option == "ca_file"


def test_file_problems_name_their_option(certs: CertPaths, tmp_path: Path) -> None:
    def option_of(**kwargs: Any) -> tuple[str, str]:
        with pytest.raises(TLSFileError) as info:
            client_context(**kwargs)
        return info.value.option, info.value.message

    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    assert option_of(ca_file=tmp_path / "missing.pem")[0] == "ca_file"
    assert option_of(ca_file=not_pem) == ("ca_file", f"{not_pem}: no PEM certificate in it")
    assert option_of(cert_file=not_pem, key_file=certs.client_key_file)[0] == "cert_file"
    assert option_of(cert_file=certs.client_cert_file, key_file=not_pem)[0] == "key_file"
    assert option_of(cert_file=certs.client_cert_file)[0] == "key_file"  # a certificate without its key
    option, message = option_of(cert_file=certs.client_cert_file, key_file=certs.server_key_file)
    assert option == "key_file" and "not the key of the certificate" in message


def test_an_encrypted_key_is_refused_without_prompting(certs: CertPaths, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(certs.client_key_file.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(TLSFileError) as info:
        client_context(certs.ca_file, certs.client_cert_file, encrypted)
    assert info.value.option == "key_file" and "encrypted" in info.value.message


def test_a_ca_file_is_the_only_trust_anchor(certs: CertPaths) -> None:
    # With a private ca_file the system's CAs are not loaded beside it: a server with a certificate from a
    # public CA is not the broker this box was set up for.
    assert len(client_context(certs.ca_file).get_ca_certs()) == 1


def test_make_certs_writes_every_file(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "c", server_names=("nats.test",), client_name="modality.test")
    for path in vars(paths).values():
        assert path.is_file() and path.stat().st_size > 0
    assert (paths.client_key_file.stat().st_mode & 0o077) == 0
