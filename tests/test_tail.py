"""`edge-agent tail` against a real nats-server: what it says at start, a broker restart, --since and filters."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from edge_agent.bus import tail as tail_module
from edge_agent.bus.finding import ModelInfo, build_finding, encode, subject
from edge_agent.bus.tail import findings_subject, parse_since, tail
from tests.daemon import REPO, write_config
from tests.natsutil import NatsServer
from tests.test_finding import make_input

STREAM = "EDGE_FINDINGS"
PREFIX = "edge.findings"
NOW = 1_760_000_000.0


def finding(n: int, model: str = "ct-demo", modality: str = "CT") -> tuple[str, bytes]:
    """The subject and payload of a finding numbered ``n`` (its series UID ends in n)."""
    info = ModelInfo(name=model, version="0.1.0", sha256="ab" * 32, backend="onnxruntime")
    body = encode(build_finding(make_input(series_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}", model=info,
                                           modality=modality)))
    return subject(PREFIX, "site1", modality, model), body


async def publish(url: str, *numbers: int, model: str = "ct-demo", modality: str = "CT") -> list[datetime]:
    """Publish findings (making the stream if needed); returns the time the stream stored each."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"]))
        stored = []
        for n in numbers:
            subj, body = finding(n, model, modality)
            ack = await js.publish(subj, body)
            msg = await js.get_msg(STREAM, ack.seq)
            assert msg.time is not None
            stored.append(msg.time)
        return stored
    finally:
        await nc.close()


def series_numbers(out: str) -> list[int]:
    return [int(json.loads(line)["series_instance_uid"].rsplit(".", 1)[1]) for line in out.splitlines()]


class Notes(io.StringIO):
    """What tail writes (its notes, or its findings), which a test on the same loop can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, text: str) -> int:
        self.changed.set()
        return super().write(text)

    async def wait_for(self, text: str, within_seconds: float = 15.0) -> None:
        async def said() -> None:
            while text not in self.getvalue():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(said(), within_seconds)
        except TimeoutError:
            raise AssertionError(f"{text!r} never written; so far:\n{self.getvalue()}") from None


# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds_back"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("7d", 7 * 86400), ("1w", 604800), ("0.5h", 1800)],
)
def test_since_takes_a_duration_back_from_now(text: str, seconds_back: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(NOW - seconds_back)


def test_since_takes_a_time() -> None:
    assert parse_since("2025-10-09T08:00:00Z", NOW) == datetime(2025, 10, 9, 8, tzinfo=UTC).timestamp()
    assert parse_since("2025-10-09T10:00:00+02:00", NOW) == datetime(2025, 10, 9, 8, tzinfo=UTC).timestamp()
    local = parse_since("2025-10-09 08:00", NOW)  # no offset: local time
    assert local == datetime(2025, 10, 9, 8).timestamp()


@pytest.mark.parametrize("text", ["", "10", "m", "10 minutes", "-5m", "yesterday", "2025-13-01"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_since(text, NOW)


def test_since_refuses_a_time_in_the_future() -> None:
    with pytest.raises(ValueError, match="in the future"):
        parse_since("2099-01-01T00:00:00Z", NOW)


def test_subject_filter_from_site_modality_and_model() -> None:
    assert findings_subject(PREFIX) == "edge.findings.>"
    assert findings_subject(PREFIX, model="cxr-nodule") == "edge.findings.*.*.cxr-nodule"
    assert findings_subject(PREFIX, site="north", modality="CT") == "edge.findings.north.CT.*"


# -- against a real server -------------------------------------------------------------------------


def test_tail_says_where_it_reads_and_survives_a_broker_restart(nats_server: NatsServer) -> None:
    async def main() -> None:
        await publish(nats_server.url, 1)
        out, notes = Notes(), Notes()
        task = asyncio.create_task(tail(nats_server.url, STREAM, from_start=True, out=out, notes=notes,
                                        max_messages=3, timeout_seconds=60, reconnect_wait_seconds=0.2))
        await notes.wait_for("connected to")
        first = notes.getvalue().splitlines()[0]
        assert first == (f"tail: connected to {nats_server.url}; reading stream {STREAM}, subjects {PREFIX}.>: "
                         "every finding from the first")
        await out.wait_for("\n")  # the first finding is printed
        nats_server.stop()
        await notes.wait_for("lost the connection to the NATS server")
        await notes.wait_for("cannot reach the NATS server")  # the refused attempts while it is down, said once
        nats_server.start()
        await notes.wait_for("reconnected to")
        await publish(nats_server.url, 2, 3)
        assert await asyncio.wait_for(task, 30) == 3
        assert series_numbers(out.getvalue()) == [1, 2, 3]  # each once, none lost over the restart
        said = notes.getvalue()
        assert said.count("cannot reach the NATS server") == 1
        assert f"reconnected to {nats_server.url}; reading stream {STREAM} from sequence 2" in said

    asyncio.run(asyncio.wait_for(main(), 90))


def test_since_and_a_subject_filter_choose_what_is_shown(nats_server: NatsServer) -> None:
    async def main() -> None:
        stored = await publish(nats_server.url, 1, 2)
        stored += await publish(nats_server.url, 3, model="cxr-nodule", modality="CR")
        stored += await publish(nats_server.url, 4)
        # Between findings 1 and 2: half-way between the times the stream stored them.
        since = (stored[0].timestamp() + stored[1].timestamp()) / 2
        out, notes = io.StringIO(), Notes()
        assert await tail(nats_server.url, STREAM, findings_subject(PREFIX, model="ct-demo"), out=out, notes=notes,
                          since=since, timeout_seconds=1.5) == 2
        assert series_numbers(out.getvalue()) == [2, 4]
        assert "subjects edge.findings.*.*.ct-demo: findings since 20" in notes.getvalue()
        out = io.StringIO()
        assert await tail(nats_server.url, STREAM, "edge.findings.*.CR.>", out=out, from_start=True,
                          timeout_seconds=1.5) == 1
        assert series_numbers(out.getvalue()) == [3]

    asyncio.run(asyncio.wait_for(main(), 60))


def lose_storage_and_restart(server: NatsServer) -> None:
    server.stop()
    for path in sorted(server.store_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    server.start()


async def tail_through_lost_storage(
    server: NatsServer, timeout_seconds: float
) -> tuple[asyncio.Task[int], Notes, Notes]:
    """A tail for two findings that has shown finding 3 (after 1 and 2, which it skips) when the server loses its
    storage and comes back: (the tail's task, its output, its notes)."""
    await publish(server.url, 1, 2)
    out, notes = Notes(), Notes()
    task = asyncio.create_task(tail(server.url, STREAM, out=out, notes=notes, max_messages=2,
                                    timeout_seconds=timeout_seconds, reconnect_wait_seconds=0.2))
    await notes.wait_for("new findings (after stream sequence 2)")
    await publish(server.url, 3)
    await out.wait_for("\n")
    lose_storage_and_restart(server)
    return task, out, notes


def test_a_server_back_with_an_empty_stream_is_read_from_its_start(nats_server: NatsServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_module, "RESUBSCRIBE_NOTE_SECONDS", 0.5)

    async def main() -> None:
        task, out, notes = await tail_through_lost_storage(nats_server, 60)
        await notes.wait_for("has no stream EDGE_FINDINGS")  # until a publisher makes it again
        await notes.wait_for("still, after")  # and said again while it lasts, not once and then never
        await publish(nats_server.url, 4)
        assert await asyncio.wait_for(task, 30) == 2
        assert series_numbers(out.getvalue()) == [3, 4]
        said = notes.getvalue()
        assert "now ends at sequence" in said
        assert f"tail: reading stream {STREAM} again, from sequence 1" in said

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_server_back_with_the_stream_made_anew_but_still_empty_is_read_from_its_start(
    nats_server: NatsServer,
) -> None:
    """The daemon makes the stream again at once on reconnecting; an empty stream's
    first_seq is 0, a consumer from sequence 0 is refused (err 10094), and tail went silent for good."""

    async def main() -> None:
        task, out, notes = await tail_through_lost_storage(nats_server, 20)
        await publish(nats_server.url)  # the stream only, as the publisher makes it again
        await notes.wait_for(f"stream {STREAM} now ends at sequence 0")  # tail has seen it empty
        await publish(nats_server.url, 4)
        assert await asyncio.wait_for(task, 30) == 2
        assert series_numbers(out.getvalue()) == [3, 4]

    asyncio.run(asyncio.wait_for(main(), 90))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "tail", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_prints_its_connection_line_on_stderr_and_findings_on_stdout(nats_server: NatsServer,
                                                                         tmp_path: Path) -> None:
    config = write_config(tmp_path, nats_server.url)
    asyncio.run(publish(nats_server.url, 1))
    asyncio.run(publish(nats_server.url, 2, model="cxr-nodule", modality="CR"))
    result = run_cli("--config", str(config), "--since", "10m", "--modality", "CR", "--count", "1", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert series_numbers(result.stdout) == [2]
    assert result.stderr.startswith(f"tail: connected to {nats_server.url}; reading stream {STREAM}, subjects "
                                    f"{PREFIX}.*.CR.*: findings since ")


def test_cli_usage_errors(nats_server: NatsServer, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, nats_server.url))
    bad = run_cli("--config", config, "--since", "ten minutes")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    both = run_cli("--config", config, "--subject", "edge.findings.>", "--model", "ct-demo")
    assert both.returncode == 2 and "not both" in both.stderr
    exclusive = run_cli("--config", config, "--all", "--since", "1h")
    assert exclusive.returncode == 2 and "not allowed with" in exclusive.stderr


def test_cli_gives_up_on_a_server_that_never_answers(tmp_path: Path) -> None:
    down = NatsServer(tmp_path / "down")  # never started: its port refuses
    config = str(write_config(tmp_path, down.url))
    result = run_cli("--config", config, "--connect-timeout", "0.5")
    assert result.returncode == 1 and result.stdout == ""
    said = result.stderr.splitlines()
    assert said[0].startswith(f"tail: cannot reach the NATS server at {down.url}: ConnectionRefusedError")
    assert said[0].endswith("; trying for up to 0.5 s")
    assert said[-1].startswith(f"tail failed: cannot connect to the NATS server at {down.url} within 0.5 s")
