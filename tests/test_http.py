"""/metrics, /healthz, /readyz with a real HTTP client, raw sockets, and a real Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_agent.http import HttpServer, parse_request_line
from edge_agent.metrics import Metrics
from tests.netutil import free_port

# A direct opener: an http_proxy in the environment must not reroute requests to loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROMETHEUS = "/usr/bin/prometheus"


class Status:
    """Mutable health/readiness that the callbacks report."""

    def __init__(self) -> None:
        self.ready = False
        self.reasons = ["engine cxr-demo not warm"]

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"uptime_seconds": 1.5}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"reasons": [] if self.ready else list(self.reasons)}


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


async def afetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, url, method)


async def raw(port: int, data: bytes, *, eof: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if eof:
        writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return out


def serve(test: Callable[[HttpServer, Status, Metrics], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        status = Status()
        metrics = Metrics()
        server = HttpServer("127.0.0.1", 0, metrics.registry, status.health, status.readiness, **kw)
        await server.start()
        try:
            await test(server, status, metrics)
        finally:
            await server.stop()

    asyncio.run(main())


def test_metrics_endpoint_serves_the_registry() -> None:
    async def body(server: HttpServer, _: Status, metrics: Metrics) -> None:
        metrics.instances.labels(outcome="stored").inc(3)
        code, headers, data = await afetch(f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = data.decode()
        assert 'edge_agent_instances_total{outcome="stored"} 3.0' in text
        assert "edge_agent_build_info" in text
        assert headers["Connection"] == "close"

    serve(body)


def test_healthz_answers_from_the_loop() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        code, headers, data = await afetch(f"http://127.0.0.1:{server.port}/healthz")
        assert code == 200
        assert headers["Content-Type"] == "application/json"
        assert json.loads(data) == {"healthy": True, "uptime_seconds": 1.5}

    serve(body)


def test_readyz_is_503_with_reasons_until_ready() -> None:
    async def body(server: HttpServer, status: Status, _: Metrics) -> None:
        url = f"http://127.0.0.1:{server.port}/readyz"
        code, _h, data = await afetch(url)
        assert code == 503
        assert json.loads(data) == {"ready": False, "reasons": ["engine cxr-demo not warm"]}
        status.ready = True
        code, _h, data = await afetch(url + "?verbose=1")  # a query string does not change the path
        assert code == 200
        assert json.loads(data) == {"ready": True, "reasons": []}

    serve(body)


def test_a_check_that_raises_reads_as_not_ok(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise KeyError("x")

    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, broken, broken)
        await server.start()
        try:
            for path, key in (("/healthz", "healthy"), ("/readyz", "ready")):
                code, _h, data = await afetch(f"http://127.0.0.1:{server.port}{path}")
                assert code == 503
                assert json.loads(data) == {key: False, "reasons": [f"{key} check failed: KeyError"]}
        finally:
            await server.stop()

    asyncio.run(main())
    assert "check raised" in caplog.text


def test_not_ok_without_reasons_gets_an_empty_list() -> None:
    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (False, {}))
        await server.start()
        try:
            code, _h, data = await afetch(f"http://127.0.0.1:{server.port}/readyz")
            assert code == 503
            assert json.loads(data) == {"ready": False, "reasons": []}
        finally:
            await server.stop()

    asyncio.run(main())


def test_unknown_path_is_404() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        code, _h, data = await afetch(f"http://127.0.0.1:{server.port}/admin")
        assert code == 404
        assert json.loads(data) == {"error": "not found"}
        code, _h, _d = await afetch(f"http://127.0.0.1:{server.port}/metrics/")
        assert code == 404

    serve(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405(method: str) -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        code, headers, _d = await afetch(f"http://127.0.0.1:{server.port}/metrics", method)
        assert code == 405
        assert headers["Allow"] == "GET, HEAD"

    serve(body)


def test_head_has_headers_and_no_body() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        code, headers, data = await afetch(f"http://127.0.0.1:{server.port}/metrics", "HEAD")
        assert code == 200
        assert int(headers["Content-Length"]) > 0
        assert data == b""
        out = await raw(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _sep, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and rest == b""

    serve(body)


def test_malformed_request_is_400() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        for request in (b"GARBAGE\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n", b"\xff\xfe /x HTTP/1.1\r\n\r\n"):
            assert (await raw(server.port, request)).startswith(b"HTTP/1.1 400 Bad Request\r\n")
        # A head cut short by the client closing its side.
        assert (await raw(server.port, b"GET /metrics HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400 ")
        # A client that connects and closes at once gets no answer and does no harm.
        assert await raw(server.port, b"") == b""

    serve(body)


def test_oversized_request_is_refused() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
        out = await raw(server.port, request)
        assert out.startswith(b"HTTP/1.1 431 ")

    serve(body, max_request_bytes=1024)


def test_slow_client_is_cut_off_and_others_are_served() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        await writer.drain()
        # Meanwhile another client is answered at once.
        code, _h, _d = await afetch(f"http://127.0.0.1:{server.port}/healthz")
        assert code == 200
        out = await asyncio.wait_for(reader.read(), 10)  # the server times the slow one out and closes
        assert out.startswith(b"HTTP/1.1 408 ")
        writer.close()
        await writer.wait_closed()

    serve(body, read_timeout_seconds=0.2)


def test_too_many_connections_get_503() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        # Make sure both are accepted (and counted) before the third connects.
        for _r, w in held:
            w.write(b"GET ")
            await w.drain()
        out = await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        assert b"too many connections" in out
        for _r, w in held:
            w.close()
            await w.wait_closed()

    serve(body, max_connections=2)


def test_stop_ends_open_connections() -> None:
    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (True, {}))
        await server.start()
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        await writer.drain()
        await asyncio.wait_for(server.stop(), 5)
        # stop() aborts the connection: the client sees a reset (or an end of file), both final.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.stop()  # twice is fine

    asyncio.run(main())


def test_port_in_use_raises_oserror() -> None:
    async def main() -> None:
        first = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (True, {}))
        await first.start()
        try:
            second = HttpServer("127.0.0.1", first.port, Metrics().registry, lambda: (True, {}), lambda: (True, {}))
            with pytest.raises(OSError):
                await second.start()
        finally:
            await first.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/metrics")),
        (b"HEAD /readyz?x=1 HTTP/1.0\r\n\r\n", ("HEAD", "/readyz")),
        (b"GET http://box:9108/healthz HTTP/1.1\r\n\r\n", ("GET", "/healthz")),
        (b"GET /metrics#frag HTTP/1.1\r\n\r\n", ("GET", "/metrics")),
        (b"get /metrics HTTP/1.1\r\n\r\n", None),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", None),
        (b"GET /metrics\r\n\r\n", None),
        (b"GET /metrics HTTP/2\r\n\r\n", None),
    ],
)
def test_parse_request_line(head: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_request_line(head) == expected


# -- a real Prometheus ----------------------------------------------------------------------------

def query_up(prom_port: int) -> str | None:
    q = urllib.parse.urlencode({"query": 'up{job="edge-agent"}'})
    try:
        code, _h, data = fetch(f"http://127.0.0.1:{prom_port}/api/v1/query?{q}")
    except OSError:
        return None  # not listening yet
    if code != 200:
        return None
    result = json.loads(data)["data"]["result"]
    return str(result[0]["value"][1]) if result else None


@pytest.mark.skipif(shutil.which(PROMETHEUS) is None, reason="Debian prometheus is not installed")
def test_real_prometheus_scrapes_metrics(tmp_path: Path) -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: edge-agent\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            value = None
            while time.monotonic() < deadline and proc.returncode is None:
                value = await asyncio.to_thread(query_up, prom_port)
                if value == "1":
                    break
                # Polling an external API: there is no event to wait on. Scrapes come once a second.
                await asyncio.sleep(0.2)
            assert value == "1", (tmp_path / "prometheus.log").read_text()[-2000:]
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            log.close()

    serve(body)


# -- /heatmaps and /status (issue 10) ----------------------------------------------------------------

FINDING_ID = "0123456789abcdef" * 4
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def test_heatmaps_are_served_by_finding_id_and_nothing_else(tmp_path: Path) -> None:
    state = tmp_path / "state"
    heatmaps = state / "heatmaps"
    heatmaps.mkdir(parents=True)
    (heatmaps / f"{FINDING_ID}.png").write_bytes(PNG)
    (heatmaps / f"{FINDING_ID}.overlay.png").write_bytes(PNG + b"overlay")
    (state / "journal.sqlite3").write_bytes(b"SQLite format 3\x00 secret")
    (heatmaps / "notes.png").write_bytes(b"not a finding's")

    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (True, {}),
                            heatmap_dir=heatmaps)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            code, headers, data = await afetch(f"{base}/heatmaps/{FINDING_ID}.png")
            assert (code, headers["Content-Type"], data) == (200, "image/png", PNG)
            code, headers, data = await afetch(f"{base}/heatmaps/{FINDING_ID}.overlay.png")
            assert (code, data) == (200, PNG + b"overlay")
            code, headers, data = await afetch(f"{base}/heatmaps/{FINDING_ID}.png", "HEAD")
            assert (code, int(headers["Content-Length"]), data) == (200, len(PNG), b"")
            code, _h, data = await afetch(f"{base}/heatmaps/{'f' * 64}.png")  # a well-formed id, not stored
            assert code == 404 and b"no heat map for this finding" in data
            for target in (
                "/heatmaps/../journal.sqlite3",
                "/heatmaps/..%2fjournal.sqlite3",
                "/heatmaps/%2e%2e/journal.sqlite3",
                f"/heatmaps/{FINDING_ID}.png/../../journal.sqlite3",
                f"/heatmaps/../heatmaps/{FINDING_ID}.png",
                f"/heatmaps//{FINDING_ID}.png",
                f"/heatmaps/{FINDING_ID.upper()}.png",
                f"/heatmaps/{FINDING_ID[:-1]}.png",
                f"/heatmaps/{FINDING_ID}0.png",
                f"/heatmaps/{FINDING_ID}.PNG",
                f"/heatmaps/{FINDING_ID}.png%00",
                f"/heatmaps/{FINDING_ID}.other.png",
                "/heatmaps/notes.png",
                "/heatmaps/",
                "/heatmaps/" + "/".join([".."] * 8) + "/etc/passwd",
            ):
                out = await raw(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 404 Not Found\r\n"), target
                assert b"SQLite" not in out and b"not a finding" not in out and b"root:" not in out
        finally:
            await server.stop()

    asyncio.run(main())


def test_heatmaps_without_a_folder_and_status_without_a_source_are_404() -> None:
    async def body(server: HttpServer, _: Status, __: Metrics) -> None:
        for path in (f"/heatmaps/{FINDING_ID}.png", "/status"):
            code, _h, _d = await afetch(f"http://127.0.0.1:{server.port}{path}")
            assert code == 404

    serve(body)


def test_status_serves_its_source_and_a_failing_source_is_500(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    async def status() -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("journal gone")
        return {"ready": True, "version": "x"}

    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (True, {}),
                            status=status)
        await server.start()
        try:
            code, headers, data = await afetch(f"http://127.0.0.1:{server.port}/status")
            assert (code, headers["Content-Type"], json.loads(data)) == (200, "application/json",
                                                                         {"ready": True, "version": "x"})
            code, _h, data = await afetch(f"http://127.0.0.1:{server.port}/status")
            assert code == 500 and json.loads(data) == {"error": "status failed: RuntimeError"}
        finally:
            await server.stop()

    asyncio.run(main())
    assert "building /status failed" in caplog.text


def test_clients_that_never_read_their_answer_do_not_keep_their_places(tmp_path: Path) -> None:
    """Two clients ask for a large heat map and never read it, with max_connections at 2: once the answer cannot
    be written within the read timeout they are dropped, answer and all, and /healthz is answered again while they
    still hold their sockets open."""
    heatmaps = tmp_path / "heatmaps"
    heatmaps.mkdir()
    (heatmaps / f"{FINDING_ID}.overlay.png").write_bytes(PNG + bytes(20 * 1024 * 1024))

    async def main() -> None:
        server = HttpServer("127.0.0.1", 0, Metrics().registry, lambda: (True, {}), lambda: (True, {}),
                            heatmap_dir=heatmaps, max_connections=2, read_timeout_seconds=0.3)
        await server.start()
        stalled = []
        try:
            for _ in range(2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(f"GET /heatmaps/{FINDING_ID}.overlay.png HTTP/1.1\r\n\r\n".encode())
                stalled.append(sock)  # and never read
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                out = await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
                if out.startswith(b"HTTP/1.1 200 "):
                    break
                assert b"too many connections" in out
                assert asyncio.get_running_loop().time() < deadline, "the stalled clients kept their places"
                await asyncio.sleep(0.1)
        finally:
            for sock in stalled:
                sock.close()
            await server.stop()

    asyncio.run(main())
