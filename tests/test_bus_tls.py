"""NATS over TLS: the publisher and `tail` against a real nats-server that verifies client certificates."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import nats
import pytest

from edge_agent.bus.publisher import Publisher
from edge_agent.bus.tail import tail
from edge_agent.config import BusTLSConfig, load_config, parse_config
from edge_agent.errors import BusError, ConfigError
from edge_agent.journal import Journal
from edge_agent.metrics import Metrics
from edge_agent.tlsutil import client_context
from tests.certs import CertPaths, make_certs
from tests.natsutil import NatsServer
from tests.test_publisher import STREAM, Acks, bus_config, enqueue, run, wait_until


def tls_server(root: Path, certs: CertPaths, *, verify: bool = True, handshake_first: bool = False) -> NatsServer:
    """A nats-server with JetStream whose TLS block uses ``certs``; with ``verify``, client certificates too."""
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nats-server.conf"
    lines = [
        "tls {",
        f'  cert_file: "{certs.server_cert_file}"',
        f'  key_file: "{certs.server_key_file}"',
        f'  ca_file: "{certs.ca_file}"',
        f"  verify: {'true' if verify else 'false'}",
        f"  handshake_first: {'true' if handshake_first else 'false'}",
        "  timeout: 2",
        "}",
        f'jetstream {{ store_dir: "{root / "js"}" }}',
    ]
    conf.write_text("\n".join(lines) + "\n")
    return NatsServer(root, config=conf)


@pytest.fixture
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: CertPaths) -> Any:
    server = tls_server(tmp_path_factory.mktemp("nats-tls"), certs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def mutual(certs: CertPaths, **changes: Any) -> BusTLSConfig:
    options: dict[str, Any] = {
        "ca_file": certs.ca_file, "cert_file": certs.client_cert_file, "key_file": certs.client_key_file, **changes
    }
    return BusTLSConfig(**options)


def tls_warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == "edge_agent.bus.publisher" and r.levelno >= logging.WARNING)


async def stream_count(server: NatsServer, certs: CertPaths) -> int:
    nc = await nats.connect(server.url, tls=client_context(certs.ca_file, certs.client_cert_file,
                                                           certs.client_key_file))
    try:
        return int((await nc.jetstream().stream_info(STREAM)).state.messages)
    finally:
        await nc.close()


def test_findings_are_published_over_mutual_tls(
    mtls_server: NatsServer, certs: CertPaths, journal: Journal, metrics: Metrics
) -> None:
    enqueue(journal, 2)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(mtls_server.url, tls=mutual(certs)), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(2)
        connections = mtls_server.monitor("/connz?auth=true")["connections"]
        assert [c["tls_version"] for c in connections if c.get("name") == "edge-agent"] in (["1.3"], ["1.2"])
        assert await pub.stop(1.0) == 0
        assert await stream_count(mtls_server, certs) == 2

    run(main())
    assert journal.counts().outbox_pending == 0


def test_a_server_certificate_from_another_ca_is_refused_and_findings_stay_in_the_outbox(
    mtls_server: NatsServer, certs: CertPaths, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.bus.publisher")
    enqueue(journal, 2)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(mtls_server.url, tls=mutual(certs, ca_file=certs.other_ca_file)), journal, metrics,
                        on_acked=acks)
        await pub.start()
        await wait_until(lambda: "NATS TLS handshake failed" in tls_warnings(caplog))
        assert not pub.connected
        assert await pub.stop(0.2) == 2
        assert acks.series == []

    run(main())
    text = tls_warnings(caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in text and "not signed by a CA in bus.tls.ca_file" in text
    assert journal.counts().outbox_pending == 2


def test_no_client_certificate_against_a_verifying_server_is_refused_clearly(
    mtls_server: NatsServer, certs: CertPaths, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.bus.publisher")
    enqueue(journal, 1)

    async def main() -> None:
        pub = Publisher(bus_config(mtls_server.url, tls=BusTLSConfig(ca_file=certs.ca_file)), journal, metrics)
        await pub.start()
        # The server's refusal reaches the client as its alert, or (TLS 1.3, the client already writing) as a
        # closed connection; each says what to set.
        await wait_until(lambda: "the server requires a client certificate" in tls_warnings(caplog))
        assert not pub.connected
        assert await pub.stop(0.2) == 1

    run(main())
    assert "set bus.tls.cert_file and bus.tls.key_file" in tls_warnings(caplog)
    assert journal.counts().outbox_pending == 1


def test_server_name_is_the_name_checked_when_the_url_names_an_address(
    tmp_path: Path, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.bus.publisher")
    certs = make_certs(tmp_path / "certs", server_names=("nats.site.test",))
    server = tls_server(tmp_path / "nats", certs)
    server.start()
    enqueue(journal, 1)
    try:
        async def main() -> None:
            wrong = Publisher(bus_config(server.url, tls=mutual(certs)), journal, metrics)
            await wrong.start()
            await wait_until(lambda: "set bus.tls.server_name" in tls_warnings(caplog))
            assert await wrong.stop(0.2) == 1

            acks = Acks()
            right = Publisher(bus_config(server.url, tls=mutual(certs, server_name="nats.site.test")), journal,
                              metrics, on_acked=acks)
            await right.start()
            await acks.wait(1)
            assert await right.stop(1.0) == 0

        run(main())
    finally:
        server.stop()


def test_handshake_first_never_talks_to_a_server_in_clear(
    tmp_path: Path, certs: CertPaths, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.bus.publisher")
    strict = tls_server(tmp_path / "strict", certs, handshake_first=True)
    plain = NatsServer(tmp_path / "plain")
    strict.start()
    plain.start()
    enqueue(journal, 1)
    try:
        async def main() -> None:
            # A server without TLS: the handshake fails, nothing is sent in clear, the finding waits.
            refused = Publisher(bus_config(plain.url, tls=mutual(certs, handshake_first=True)), journal, metrics)
            await refused.start()
            await wait_until(lambda: "NATS TLS handshake failed" in tls_warnings(caplog))
            assert not refused.connected
            assert await refused.stop(0.2) == 1

            acks = Acks()
            pub = Publisher(bus_config(strict.url, tls=mutual(certs, handshake_first=True)), journal, metrics,
                            on_acked=acks)
            await pub.start()
            await acks.wait(1)
            assert await pub.stop(1.0) == 0

        run(main())
    finally:
        strict.stop()
        plain.stop()


def test_a_server_that_does_not_ask_for_tls_is_not_used_when_bus_tls_is_set(
    nats_server: NatsServer, certs: CertPaths, journal: Journal, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py would talk to it in clear (it upgrades only when the server's INFO asks for TLS).
    caplog.set_level(logging.INFO, logger="edge_agent.bus.publisher")
    enqueue(journal, 1)

    async def main() -> None:
        pub = Publisher(bus_config(nats_server.url, tls=mutual(certs)), journal, metrics)
        await pub.start()
        await wait_until(lambda: "did not ask for TLS" in tls_warnings(caplog))
        assert not pub.connected
        assert await pub.stop(0.2) == 1
        with pytest.raises(BusError, match="did not ask for TLS"):
            await tail(nats_server.url, STREAM, timeout_seconds=1, tls=mutual(certs))
        with pytest.raises(BusError, match="did not ask for TLS"):  # a tls:// URL asks for TLS too
            await tail(nats_server.url.replace("nats://", "tls://"), STREAM, timeout_seconds=1)

    run(main())
    assert journal.counts().outbox_pending == 1
    assert nats_server.monitor("/jsz")["streams"] == 0  # not even the stream was created


def test_tail_reads_over_mutual_tls_and_says_what_is_wrong(
    mtls_server: NatsServer, certs: CertPaths, journal: Journal, metrics: Metrics
) -> None:
    enqueue(journal, 1)

    async def main() -> None:
        acks = Acks()
        pub = Publisher(bus_config(mtls_server.url, tls=mutual(certs)), journal, metrics, on_acked=acks)
        await pub.start()
        await acks.wait(1)
        await pub.stop(1.0)

        out = io.StringIO()
        assert await tail(mtls_server.url, STREAM, from_start=True, out=out, max_messages=1, timeout_seconds=10,
                          tls=mutual(certs)) == 1
        assert out.getvalue().count("\n") == 1

        with pytest.raises(BusError, match=r"not signed by a CA in bus\.tls\.ca_file"):
            await tail(mtls_server.url, STREAM, timeout_seconds=1, connect_timeout_seconds=1.5,
                       tls=mutual(certs, ca_file=certs.other_ca_file))
        with pytest.raises(BusError, match="client certificate"):
            await tail(mtls_server.url, STREAM, timeout_seconds=1, connect_timeout_seconds=1.5,
                       tls=BusTLSConfig(ca_file=certs.ca_file))

    run(main())


# -- configuration ---------------------------------------------------------------------------------


def _bus_problems(bus: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": "a", "state_dir": "/s", "bus": bus}, env={})
    return dict(info.value.problems)


def test_bus_tls_config_accepts_existing_files_and_reads_from_yaml(certs: CertPaths, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "site: a\nstate_dir: state\nbus:\n  url: tls://nats.site.test:4222\n  tls:\n"
        f"    ca_file: {certs.ca_file}\n    cert_file: {certs.client_cert_file}\n"
        f"    key_file: {certs.client_key_file}\n    server_name: nats.site.test\n"
    )
    tls = load_config(cfg, env={}).bus.tls
    assert tls is not None
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (certs.ca_file, certs.client_cert_file, certs.client_key_file)
    assert tls.server_name == "nats.site.test" and tls.handshake_first is False


def test_bus_tls_file_problems_name_the_key(certs: CertPaths, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    problems = _bus_problems({"tls": {"ca_file": str(missing), "cert_file": "client.pem",
                                      "key_file": str(certs.client_cert_file)}})
    assert problems == {
        "bus.tls.ca_file": f"cannot read {missing}: No such file or directory",
        # Relative to the config file's folder; parse_config has no file, so the current folder.
        "bus.tls.cert_file": f"cannot read {Path.cwd() / 'client.pem'}: No such file or directory",
        "bus.tls.key_file": f"{certs.client_cert_file}: no PEM private key in it",
    }
    assert _bus_problems({"tls": {"cert_file": str(certs.client_cert_file)}}) == {
        "bus.tls": "key_file: cert_file and key_file go together"
    }
    problems = _bus_problems({"tls": {"cert_file": str(certs.client_cert_file),
                                      "key_file": str(certs.server_key_file)}})
    assert "not the key of the certificate" in problems["bus.tls"]
    assert set(_bus_problems({"tls": {"ca_flie": str(certs.ca_file)}})) == {"bus.tls.ca_flie"}
    assert "did you mean 'ca_file'" in _bus_problems({"tls": {"ca_flie": str(certs.ca_file)}})["bus.tls.ca_flie"]
    assert set(_bus_problems({"tls": {"server_name": "not a name"}})) == {"bus.tls.server_name"}
    assert "ws://" in _bus_problems({"url": "ws://127.0.0.1:8080", "tls": {"ca_file": str(certs.ca_file)}})["bus"]


def test_a_tls_file_removed_after_the_config_check_is_refused_at_start(
    certs: CertPaths, journal: Journal, metrics: Metrics, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.ca_file.read_bytes())
    config = bus_config("tls://127.0.0.1:4222", tls=BusTLSConfig(ca_file=ca))
    ca.unlink()

    async def main() -> None:
        with pytest.raises(BusError, match=r"bus\.tls\.ca_file: cannot read"):
            await Publisher(config, journal, metrics).start()

    run(main())
