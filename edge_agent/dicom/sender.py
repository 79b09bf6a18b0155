"""A Storage SCU for ``edge-agent send``: sends DICOM files, as they are, over one association.

Files are sent byte for byte (no decode, no transcode), so each one needs a presentation context
for exactly its SOP class and transfer syntax; one context is proposed per pair found.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from edge_agent.dicom import status

logger = logging.getLogger(__name__)

# PS3.8 9.3.2.2: at most 128 presentation contexts (odd ids 1..255) in one association request.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class FileResult:
    """What happened to one file: ``status`` is the peer's C-STORE status, None if it was not sent."""

    path: Path
    status: int | None
    note: str = ""


@dataclass
class SendReport:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    results: list[FileResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # association-level problems

    def add(self, result: FileResult, outcome: str) -> None:
        self.results.append(result)
        if outcome == "ok":
            self.ok += 1
        elif outcome == "failed":
            self.failed += 1
        else:
            self.skipped += 1

    def summary(self) -> str:
        """Lines for a person: each problem, then the counts."""
        lines = list(self.errors)
        for r in self.results:
            if r.status is None or not status.is_success(r.status):
                code = f" (0x{r.status:04X})" if r.status is not None else ""
                lines.append(f"{r.path}: {r.note}{code}")
        lines.append(f"sent {self.ok}, failed {self.failed}, skipped {self.skipped}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


def _walk(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p


def _set_nodelay(event: Event) -> None:
    # Without it, Nagle's algorithm and the peer's delayed ACKs stall each small PDU.
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        with contextlib.suppress(OSError):
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reason(assoc: Association) -> str:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        why = f"{rsp.reason_str}" if rsp is not None else "no reason given"
        return f"association rejected: {why}"
    if assoc.is_aborted:
        return "association aborted (no answer to the request, or no presentation context accepted)"
    return "no answer to the association request"


def send_files(paths: list[Path], host: str, port: int, called_aet: str, calling_aet: str = "EDGE_SEND",
               timeout_seconds: float = 30.0) -> SendReport:
    """Send files (directories are walked recursively) with C-STORE. Non-DICOM files are skipped."""
    report = SendReport()
    items: list[_Item] = []
    for path in _walk(paths):
        if not path.exists():
            report.add(FileResult(path, None, "no such file"), "failed")  # named, so meant to be sent
            continue
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip()
            syntax = str(meta.get("TransferSyntaxUID", "")).strip()
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            note = "not a DICOM Part 10 file" if isinstance(exc, InvalidDicomError) else f"unreadable ({exc})"
            report.add(FileResult(path, None, note), "skipped")
            continue
        if not sop_class or not syntax:
            report.add(FileResult(path, None, "File Meta lacks the SOP class or transfer syntax"), "skipped")
            continue
        items.append(_Item(path, sop_class, syntax))
    if not items:
        return report

    pairs = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in items))
    # Normally one association; only past 128 distinct (SOP class, syntax) pairs are more needed.
    for start in range(0, len(pairs), MAX_CONTEXTS):
        group = set(pairs[start:start + MAX_CONTEXTS])
        batch = [i for i in items if (i.sop_class_uid, i.transfer_syntax_uid) in group]
        _send_batch(batch, sorted(group), host, port, called_aet, calling_aet, timeout_seconds, report)
    return report


def _send_batch(items: list[_Item], pairs: list[tuple[str, str]], host: str, port: int, called_aet: str,
                calling_aet: str, timeout_seconds: float, report: SendReport) -> None:
    # Stream each file's dataset from disk as it is, instead of decoding and re-encoding it.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_seconds
    ae.dimse_timeout = timeout_seconds
    ae.network_timeout = timeout_seconds
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in pairs]
    connected: list[bool] = []

    def on_open(event: Event) -> None:
        connected.append(True)
        _set_nodelay(event)

    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    if not assoc.is_established:
        # pynetdicom reports a refused connection as an abort; the connection event tells them apart.
        reason = _reason(assoc) if connected else "could not connect (is the receiver running? host and port right?)"
        report.errors.append(f"{host}:{port}: {reason}")
        for item in items:
            report.add(FileResult(item.path, None, reason), "failed")
        return
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for item in items:
            if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                report.add(FileResult(item.path, None, "the peer accepts no context for this SOP class and "
                                      "transfer syntax"), "failed")
                continue
            if not assoc.is_established:
                report.add(FileResult(item.path, None, "association lost"), "failed")
                continue
            try:
                rsp = assoc.send_c_store(item.path)
            except (OSError, ValueError, AttributeError, RuntimeError) as exc:
                report.add(FileResult(item.path, None, f"not sent: {exc}"), "failed")
                continue
            code = rsp.get("Status") if rsp is not None else None
            if code is None:
                report.add(FileResult(item.path, None, "no response (timeout or abort)"), "failed")
                continue
            code = int(code)
            outcome = "ok" if status.is_success(code) else "failed"
            report.add(FileResult(item.path, code, status.describe(code)), outcome)
    finally:
        if assoc.is_established:
            assoc.release()
