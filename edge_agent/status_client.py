"""``edge-agent status``: ask a running daemon for ``GET /status`` and show the answer to a person.

The document itself is built by the daemon (status.py); this side only finds the daemon's HTTP address,
fetches it with the standard library, and renders it as a few lines of text (``--json`` prints it as it came).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from edge_agent.config import HttpConfig
from edge_agent.errors import EdgeAgentError

DEFAULT_TIMEOUT_SECONDS = 5.0


class StatusError(EdgeAgentError):
    """The daemon did not answer, or its answer was not a status document."""


def base_url(http: HttpConfig) -> str:
    """The URL to reach the daemon at from this machine, from its ``http`` settings.

    A daemon listening on every address (0.0.0.0, ::) is asked on loopback.
    """
    host = http.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{http.port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{http.port}" if address.version == 6 else f"http://{address}:{http.port}"


def normalise_url(url: str) -> str:
    """``host:port``, ``http://host:port/`` or ``.../status`` -> ``http://host:port`` (no path)."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/")
    return url.removesuffix("/status")


def fetch_status(url: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """GET ``<url>/status`` and return the document. Raises StatusError saying why not."""
    target = f"{normalise_url(url)}/status"
    # A direct opener: an http_proxy in the environment must not send a request for loopback elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=timeout_seconds) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read(500).decode("utf-8", "replace").strip()
        raise StatusError(f"{target} answered {exc.code} {exc.reason}{': ' + detail if detail else ''} "
                          "(not edge-agent, or one too old to have /status)") from None
    except urllib.error.URLError as exc:
        raise StatusError(_no_answer(target, exc.reason, timeout_seconds)) from None
    except (TimeoutError, OSError) as exc:
        raise StatusError(_no_answer(target, exc, timeout_seconds)) from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "ready" not in doc:
        raise StatusError(f"{target} did not answer with edge-agent's status document")
    return doc


def _no_answer(target: str, reason: object, timeout_seconds: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return (f"no answer from {target} within {timeout_seconds:g} s: the daemon is up but does not respond "
                f"(see its log: journalctl -u edge-agent)")
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror
    else:
        why = str(reason) or type(reason).__name__
    return f"no answer from {target} ({why}): is edge-agent running? (systemctl status edge-agent)"


# -- the text a person reads ------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 5 s``, ``2 h 3 min``, ``4 d 2 h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86_400} d {s % 86_400 // 3600} h"


def size(n_bytes: float) -> str:
    """``512 B``, ``1.5 MiB``, ``12.3 GiB``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _drift_line(drift: Mapping[str, Any]) -> str | None:
    if not drift:
        return None
    parts = [str(drift.get("state", "?"))]
    if drift.get("reason"):
        parts.append(f"({drift['reason']})")
    if drift.get("error"):
        parts.append(f"({drift['error']})")
    psi = drift.get("psi")
    if isinstance(psi, Mapping) and psi:
        parts.append("PSI " + ", ".join(f"{k} {v:g}" if isinstance(v, int | float) else f"{k} {v}"
                                        for k, v in sorted(psi.items())))
    return "drift: " + " ".join(parts)


def render(doc: Mapping[str, Any], source: str) -> str:
    """The status document as lines of text for a terminal."""
    lines = [f"edge-agent {doc.get('version', '?')} at {source} (site {doc.get('site', '?')}, host "
             f"{doc.get('host', '?')})",
             f"  up {duration(doc.get('uptime_seconds') or 0)}, since {doc.get('started_at', '?')}"]
    if doc.get("ready"):
        lines.append("  ready: yes")
    else:
        lines.append("  ready: NO")
        lines += [f"    - {reason}" for reason in doc.get("reasons", [])]
    broker = doc.get("broker", {})
    state = "connected to" if broker.get("connected") else "NOT connected to"
    lines.append(f"  broker: {state} {broker.get('url', '?')}, stream {broker.get('stream', '?')}")
    outbox = doc.get("outbox", {})
    text = f"  outbox: {outbox.get('pending', 0)} pending"
    if outbox.get("oldest_pending_age_seconds") is not None:
        text += f" (oldest waiting {duration(outbox['oldest_pending_age_seconds'])})"
    text += f", {outbox.get('rejected', 0)} rejected"
    if outbox.get("rejected"):
        text += " (fix the cause, then: edge-agent requeue-rejected)"
    lines.append(text)
    spool = doc.get("spool", {})
    free = spool.get("free_bytes")
    lines.append(f"  spool: {size(free) + ' free' if free is not None else 'free space unknown'} (watermark "
                 f"{size(spool.get('min_free_bytes', 0))}), {spool.get('held_files', 0)} files held "
                 f"({size(spool.get('held_bytes', 0))})")
    series = doc.get("series", {})
    states = ", ".join(f"{k} {v}" for k, v in series.get("by_state", {}).items()) or "none in the journal"
    lines.append(f"  series: {series.get('open', 0)} open; by state: {states}")
    queues = doc.get("queues", {})
    lines.append(f"  queues: {queues.get('pending_instances', 0)} instances waiting for inference (bound "
                 f"{queues.get('max_pending_instances', '?')}), {queues.get('preprocess', 0)} being decoded")
    lines.append("  models:")
    batch, decoded = queues.get("batch", {}), queues.get("decoded_instances", {})
    for name, m in doc.get("models", {}).items():
        head = f"    {name} {m.get('version') or ''}".rstrip() + f" on {m.get('backend', '?')} {m.get('precision', '')}"
        if not m.get("loaded"):
            lines.append(f"{head}: NOT LOADED: {m.get('problem') or '?'}")
            continue
        last = ("no finding yet" if m.get("last_finding_at") is None
                else f"last finding {duration(m.get('last_finding_age_seconds') or 0)} ago ({m['last_finding_at']})")
        lines.append(f"{head}: batch queue {batch.get(name, 0)}, decoded {decoded.get(name, 0)}; {last}")
        if m.get("problem"):
            lines.append(f"      problem: {m['problem']}")
        drift = _drift_line(m.get("drift") or {})
        if drift is not None:
            lines.append(f"      {drift}")
    return "\n".join(lines)
