"""Certificates for TLS tests, made on the spot with trustme and written as PEM files.

``make_certs(folder)`` gives a CA, a server certificate for 127.0.0.1 and localhost, a client certificate
signed by the same CA, and a second CA that signed none of them (the "wrong CA" of a test). Paths only:
the files are what the code under test and a real peer (nats-server, a DICOM sender) read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

DEFAULT_SERVER_NAMES = ("127.0.0.1", "localhost")
DEFAULT_CLIENT_NAME = "edge-agent.client.test"


@dataclass(frozen=True)
class CertPaths:
    """PEM files: each ``*_cert_file`` holds the leaf certificate (its chain, if any, follows it)."""

    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path
    # A CA that signed none of the certificates above.
    other_ca_file: Path


def make_certs(
    folder: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    client_name: str = DEFAULT_CLIENT_NAME,
) -> CertPaths:
    """Write a fresh CA, server and client certificates and keys, and an unrelated CA into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="edge-agent tests")
    server = ca.issue_cert(*server_names)
    client = ca.issue_cert(client_name)
    other = trustme.CA(organization_name="edge-agent tests, another CA")
    paths = CertPaths(
        ca_file=folder / "ca.pem",
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server.key",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        other_ca_file=folder / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca_file))
    _write_chain(server, paths.server_cert_file)
    server.private_key_pem.write_to_path(str(paths.server_key_file))
    _write_chain(client, paths.client_cert_file)
    client.private_key_pem.write_to_path(str(paths.client_key_file))
    other.cert_pem.write_to_path(str(paths.other_ca_file))
    for key in (paths.server_key_file, paths.client_key_file):
        key.chmod(0o600)
    return paths


def _write_chain(leaf: trustme.LeafCert, path: Path) -> None:
    path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
