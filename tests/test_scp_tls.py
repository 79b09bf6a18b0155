"""DICOM TLS (PS3.15 B.12/B.13) on the receiver, with certificates the tests make (tests/certs.py).

Peers: dcmtk's storescu (+tls / +tla) and pynetdicom's SCU with an ssl context.
"""

from __future__ import annotations

import gc
import socket
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from edge_agent import tlsutil
from edge_agent.config import DicomTLSConfig
from edge_agent.errors import ConfigError
from tests.certs import CertPaths
from tests.dicomfiles import CT_SMALL, dcmtk_env, free_port, running_receiver, storescu

pytestmark = pytest.mark.timeout(60)


def _tls(certs: CertPaths, **kw: object) -> dict[str, object]:
    return {"tls": {"port": free_port(), "cert_file": str(certs.server_cert_file),
                    "key_file": str(certs.server_key_file), **kw}}


def _store(port: int, ctx: object, server_name: str = "localhost") -> int | None:
    ds = pydicom.dcmread(CT_SMALL)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT", tls_args=(ctx, server_name))  # type: ignore[arg-type]
    if not assoc.is_established:
        # pynetdicom leaves the socket of a failed TLS handshake open; collect it here, quietly, rather than let
        # its ResourceWarning surface in whichever test runs next.
        del assoc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _storescu_tls(port: int, certs: CertPaths, *client: str) -> subprocess.CompletedProcess[str]:
    cmd = ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "EDGE_AGENT", *client, "+cf", str(certs.ca_file),
           "127.0.0.1", str(port), str(CT_SMALL)]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False)


def test_tls_beside_the_plain_port_with_dcmtk_and_pynetdicom(tmp_path: Path, certs: CertPaths) -> None:
    with running_receiver(tmp_path, **_tls(certs)) as h:
        tls_port = h.receiver.tls_port
        assert tls_port is not None and tls_port != h.port
        # dcmtk without a client certificate (the receiver does not ask for one here).
        res = _storescu_tls(tls_port, certs, "+tla")
        assert res.returncode == 0, res.stderr
        assert _store(tls_port, tlsutil.client_context(certs.ca_file)) == 0
        # The plain port still serves.
        assert storescu(h.port, [CT_SMALL]).returncode == 0
        # The same instance three times (dcmtk re-encodes a little): one file, every send acknowledged.
        assert h.instances("stored") + h.instances("replaced") + h.instances("duplicate") == 3
        assert len(h.spool_files()) == 1


def test_plain_dicom_on_the_tls_port_is_refused(tmp_path: Path, certs: CertPaths) -> None:
    with running_receiver(tmp_path, **_tls(certs, only=True)) as h:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(pydicom.dcmread(CT_SMALL).SOPClassUID)
        assoc = ae.associate("127.0.0.1", h.port, ae_title="EDGE_AGENT")
        assert not assoc.is_established
        assert h.spool_files() == []


def test_only_tls_closes_the_plain_port(tmp_path: Path, certs: CertPaths) -> None:
    plain = free_port()
    with running_receiver(tmp_path, port=plain, **_tls(certs, only=True)) as h:
        assert h.receiver.port == h.receiver.tls_port != plain
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plain), timeout=5).close()
        assert _store(h.receiver.port, tlsutil.client_context(certs.ca_file)) == 0


# pynetdicom leaves its socket open when a TLS handshake fails (the test's client, not the receiver).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_required_client_certificates(tmp_path: Path, certs: CertPaths) -> None:
    with running_receiver(tmp_path, **_tls(certs, ca_file=str(certs.ca_file), require_client_cert=True)) as h:
        port = h.receiver.tls_port
        assert port is not None
        # Without a certificate: no association.
        assert _store(port, tlsutil.client_context(certs.ca_file)) is None
        assert _storescu_tls(port, certs, "+tla").returncode != 0
        # With one signed by the CA: stored, by pynetdicom and by dcmtk.
        with_cert = tlsutil.client_context(certs.ca_file, certs.client_cert_file, certs.client_key_file)
        assert _store(port, with_cert) == 0
        res = _storescu_tls(port, certs, "+tls", str(certs.client_key_file), str(certs.client_cert_file))
        assert res.returncode == 0, res.stderr
        assert h.instances("stored") + h.instances("replaced") + h.instances("duplicate") == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_client_that_does_not_trust_our_certificate_gets_nowhere(tmp_path: Path, certs: CertPaths) -> None:
    with running_receiver(tmp_path, **_tls(certs)) as h:
        port = h.receiver.tls_port
        assert port is not None
        assert _store(port, tlsutil.client_context(certs.other_ca_file)) is None
        assert h.spool_files() == []
        assert _store(port, tlsutil.client_context(certs.ca_file)) == 0


def test_tls_config_errors_name_the_key(tmp_path: Path, certs: CertPaths) -> None:
    with pytest.raises(ValueError, match="require_client_cert needs ca_file"):
        DicomTLSConfig(cert_file=certs.server_cert_file, key_file=certs.server_key_file, require_client_cert=True)
    with pytest.raises(ValueError, match=r"cannot read /\S+/server\.pem"):  # relative: to the current folder
        DicomTLSConfig(cert_file="server.pem", key_file=certs.server_key_file)  # type: ignore[arg-type]
    from edge_agent.config import load_config

    cfg = tmp_path / "agent.yaml"
    missing = tmp_path / "missing.pem"
    cfg.write_text(f"dicom:\n  tls:\n    cert_file: {missing}\n    key_file: {certs.server_key_file}\n")
    with pytest.raises(ConfigError, match=r"dicom\.tls"):
        load_config(cfg)


@pytest.mark.parametrize("processes", [1, 2])
def test_connections_in_their_handshake_count_against_the_caps_from_their_accept(tmp_path: Path, certs: CertPaths,
                                                                                processes: int) -> None:
    """Raw TCP connections to the TLS port that never start TLS: refused at accept beyond the per-host cap, as on
    the plain port, and the ones admitted are closed at dicom.acse_timeout_seconds; a TLS store then works."""
    with running_receiver(tmp_path, **_tls(certs), max_connections_per_host=2, max_pending_connections=4,
                          acse_timeout_seconds=1.0, receiver_processes=processes) as h:
        port = h.receiver.tls_port
        assert port is not None
        silent: list[socket.socket] = []
        closed = 0
        try:
            for _ in range(20):
                try:
                    silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                except ConnectionResetError:  # refused at accept before the connect returned
                    closed += 1
            for sock in silent:
                try:
                    closed += sock.recv(1) == b""  # closed (refused at accept, or at the timeout): EOF or a reset
                except ConnectionResetError:
                    closed += 1
            assert closed == 20  # none held beyond the ARTIM timeout
            assert h.associations("refused_connection") == 18  # refused at once: only 2 per host get in
        finally:
            for sock in silent:
                sock.close()
        assert _store(port, tlsutil.client_context(certs.ca_file)) == 0x0000
