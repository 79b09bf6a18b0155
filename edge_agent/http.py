"""/metrics, /healthz, /readyz, /status and /heatmaps on the event loop, with a minimal HTTP/1.1 server.

No web framework: a handful of read-only GET endpoints do not justify a dependency. Every response closes
the connection (Prometheus and kubelet-style probes open one per request anyway), so there is no
keep-alive state to get wrong. A request must arrive whole within ``read_timeout_seconds`` and fit
in ``max_request_bytes``, so that a slow or hostile client cannot hold a connection open.

Because /healthz is answered by the event loop itself, a wedged loop fails the probe.

``/heatmaps/<finding_id>.png`` serves a finding's heat-map PNG (the finding's ``heatmap.url``), and
``/heatmaps/<finding_id>.overlay.png`` the map over the image (``heatmap.overlay_url``). The name must be
exactly 64 lower-case hex digits and one of those two endings: the file's path is built from those digits and
a constant alone, so no request can name anything else (no dots, slashes or percent-escapes get through).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]
StatusSource = Callable[[], Awaitable[dict[str, Any]]]

DEFAULT_READ_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_REQUEST_BYTES = 8192
DEFAULT_MAX_CONNECTIONS = 64
_JSON = "application/json"
_PNG = "image/png"
# A finding id (a SHA-256 in hex, see bus/finding.message_id), and nothing else; with .overlay, the map on the image.
_HEATMAP_PATH = re.compile(r"/heatmaps/([0-9a-f]{64})(\.overlay)?\.png")


class Response(NamedTuple):
    status: HTTPStatus
    content_type: str
    body: bytes


class HttpServer:
    """Serves GET/HEAD /metrics, /healthz, /readyz, and with their sources /status and /heatmaps/<id>.png."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Check, ready: Check, *,
                 status: StatusSource | None = None, heatmap_dir: Path | None = None,
                 read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self._host = host
        self._requested_port = port
        self._registry = registry
        self._health = health
        self._ready = ready
        self._status = status
        self._heatmap_dir = heatmap_dir
        self._read_timeout_seconds = read_timeout_seconds
        self._max_request_bytes = max_request_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HttpServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving. Raises OSError if the address is taken."""
        self._server = await asyncio.start_server(
            self._handle, self._host, self._requested_port, limit=self._max_request_bytes
        )
        logger.info("http: serving /metrics, /healthz, /readyz, /status, /heatmaps on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is None:
            return
        self._server.close()
        # Aborting the transport wakes each handler with a connection error, so it ends through its
        # own finally; cancelling the tasks instead would make asyncio's stream callback log an error.
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs every handler in a task
        self._connections[task] = writer
        try:
            if len(self._connections) > self._max_connections:
                response, head_only = _error(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections"), False
            else:
                response, head_only = await self._serve_one(reader)
            await self._respond(writer, response, head_only)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or stopped reading; nothing more to say to it
        finally:
            writer.close()
            try:
                # A close waits for the answer to be read: a client that stops reading would keep its connection
                # (and its place among max_connections) for as long as it likes. Dropped instead, answer and all.
                await asyncio.wait_for(writer.wait_closed(), self._read_timeout_seconds)
            except (OSError, TimeoutError):
                writer.transport.abort()
            del self._connections[task]

    async def _serve_one(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout_seconds)
        except TimeoutError:
            return _error(HTTPStatus.REQUEST_TIMEOUT, "request not received in time"), False
        except asyncio.LimitOverrunError:
            return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header too large"), False
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            return _error(HTTPStatus.BAD_REQUEST, "incomplete request"), False
        request = parse_request_line(head)
        if request is None:
            return _error(HTTPStatus.BAD_REQUEST, "malformed request line"), False
        method, path = request
        if method not in ("GET", "HEAD"):
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD"), False
        return await self._route(path), method == "HEAD"

    async def _route(self, path: str) -> Response:
        if path == "/metrics":
            # Serialising a registry of a few dozen series takes well under a millisecond: no thread needed.
            return Response(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self._registry))
        if path == "/status" and self._status is not None:
            return await self._status_response(self._status)
        if path.startswith("/heatmaps/"):
            return await self._heatmap(path)
        if path not in ("/healthz", "/readyz"):
            return _error(HTTPStatus.NOT_FOUND, "not found")
        key = "healthy" if path == "/healthz" else "ready"
        ok, details = _run_check(self._health if path == "/healthz" else self._ready, key)
        body = json.dumps({**details, key: ok}, sort_keys=True, default=str).encode()
        return Response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, _JSON, body)

    async def _status_response(self, status: StatusSource) -> Response:
        try:
            doc = await status()
        except Exception as exc:
            logger.exception("http: building /status failed")
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"status failed: {type(exc).__name__}")
        return Response(HTTPStatus.OK, _JSON, json.dumps(doc, sort_keys=True, default=str).encode())

    async def _heatmap(self, path: str) -> Response:
        match = _HEATMAP_PATH.fullmatch(path)
        if match is None or self._heatmap_dir is None:
            return _error(HTTPStatus.NOT_FOUND, "not found")
        # Built from the matched digits and a constant only (finding_maker names the files the same way).
        file = self._heatmap_dir / (f"{match.group(1)}.overlay.png" if match.group(2) else f"{match.group(1)}.png")
        try:
            body = await asyncio.to_thread(file.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return _error(HTTPStatus.NOT_FOUND, "no heat map for this finding (none stored, or swept after "
                                                "heatmaps.retain_days)")
        except OSError as exc:
            logger.warning("http: cannot read a heat map: %s", exc.strerror or type(exc).__name__)
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "cannot read the heat map")
        return Response(HTTPStatus.OK, _PNG, body)

    async def _respond(self, writer: asyncio.StreamWriter, response: Response, head_only: bool) -> None:
        headers = [
            f"HTTP/1.1 {response.status.value} {response.status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if response.status == HTTPStatus.METHOD_NOT_ALLOWED:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head_only else response.body))
        # A client that does not read its answer must not hold the connection either.
        await asyncio.wait_for(writer.drain(), self._read_timeout_seconds)


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path without query) from a request head, or None if it is not HTTP/1.x."""
    line = head.split(b"\r\n", 1)[0]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha() or not parts[0].isupper():
        return None
    target = parts[1]
    if target.startswith(("http://", "https://")):
        # Absolute form (RFC 9112 3.2.2): keep only the path.
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return parts[0], target.split("?", 1)[0].split("#", 1)[0]


def _error(status: HTTPStatus, message: str) -> Response:
    return Response(status, _JSON, json.dumps({"error": message}).encode())


def _run_check(check: Check, key: str) -> tuple[bool, dict[str, Any]]:
    try:
        ok, details = check()
    except Exception as exc:
        # A broken check must read as "not ok", never as a crashed endpoint that a probe may misread.
        logger.exception("http: the %s check raised", key)
        return False, {"reasons": [f"{key} check failed: {type(exc).__name__}"]}
    if not ok and "reasons" not in details:
        details = {**details, "reasons": []}
    return bool(ok), dict(details)
