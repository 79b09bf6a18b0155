"""A fuzz run over raw PDUs and C-STORE payloads against the real receive path (issue 9, hard limits).

A Receiver listens on a loopback port; each example opens a real TCP connection, sends what a strategy of
tests/pdu_strategies.py drew, and reads until the receiver ends the association or closes. After every
example: nothing escaped as an internal error (an ERROR log, a traceback), the receiver answered or closed
within ``HANG_SECONDS`` (a hang), it holds no connection older than ``HELD_SECONDS`` and the spool's ``tmp/``
is empty. Every
``CHECK_EVERY`` examples and after each run, a fresh association is served; over the run, RSS stays within
``RSS_GROWTH_BYTES``.

CI runs a fixed, derandomized budget (870 examples, ~35 s). A longer run, with fresh random inputs and
``EDGE_AGENT_FUZZ_EXAMPLES`` examples per test:
``EDGE_AGENT_FUZZ_EXAMPLES=2500 .venv/bin/pytest tests/test_scp_fuzz.py -q -s -p no:logging`` (the figures of
the last one are in docs/receiver-fuzz.md). Inputs worth keeping are replayed from tests/fuzz_corpus/ (one
``.hex`` file each; see ``load_corpus``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from edge_agent.dicom import digest, scp
from tests.dicomfiles import CT_SMALL, ReceiverHarness, dataset_offset, running_receiver
from tests.pdu_strategies import CONTEXTS, IVR, Wire, before_association, c_stores, datasets, in_association, store_wire
from tests.ul import (
    ASSOCIATE_AC,
    FINAL_PDUS,
    P_DATA,
    RELEASE_RP,
    RELEASE_RQ_PDU,
    VERIFICATION,
    RawPeer,
    response_status,
)

LONG_RUN_EXAMPLES = int(os.environ.get("EDGE_AGENT_FUZZ_EXAMPLES", "0"))
CORPUS = Path(__file__).parent / "fuzz_corpus"
# Short timeouts, so that a peer that stops talking is cut off within a second (and a hang, past that, shows).
# After an A-ABORT the receiver holds a connection for up to its linger time (PS3.8 Sta13), and such
# connections count against its limits: the fuzz peers rotate over loopback addresses and the limits are raised.
RECEIVER_CONFIG: dict[str, Any] = {
    "acse_timeout_seconds": 0.5, "network_timeout_seconds": 0.5, "max_pdu_bytes": 65536, "max_dataset_bytes": 1 << 20,
    "max_associations": 256, "max_pending_connections": 256,
}
SOURCES = [f"127.0.0.{i}" for i in range(2, 250)]
LINGER_SECONDS = 0.5
# A connection the receiver still holds this long after it was opened is a leak: an example ends within
# HANG_SECONDS, and the receiver lets go of an ended association within its linger time.
HELD_SECONDS = 10.0
HANG_SECONDS = 5.0
CHECK_EVERY = 25
RSS_GROWTH_BYTES = 200 << 20
FD_GROWTH = 8  # the liveness check's pynetdicom AE, and the like

pytestmark = pytest.mark.timeout(max(120, 2 * LONG_RUN_EXAMPLES))


def fuzz_settings(ci_examples: int) -> settings:
    """CI: ``ci_examples``, derandomized (the same inputs every run). Long run: fresh random inputs."""
    return settings(max_examples=LONG_RUN_EXAMPLES or ci_examples, derandomize=not LONG_RUN_EXAMPLES,
                    database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Internal(logging.Handler):
    """Records what marks an internal error: ERROR and above (the receiver's 'DICOM receive failed', asyncio's
    'Exception in callback') and anything logged with a traceback. pynetdicom's own ERRORs, which a peer's
    malformed A-ASSOCIATE-RQ provokes in its decoder (see test_a_malformed_request_logs_no_error), are
    counted apart: the receiver handled those."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.library_errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info or "Traceback" in record.getMessage():
            if record.name.startswith("pynetdicom"):
                self.library_errors += 1
            else:
                self.records.append(record)


class Fuzz:
    """Sends one drawn ``Wire`` at a time to a running receiver and checks what must hold after it."""

    def __init__(self, h: ReceiverHarness, internal: _Internal) -> None:
        self.h = h
        self.internal = internal
        self.examples = 0
        self.outcomes: Counter[str] = Counter()
        self.rss_start = self.rss_peak = rss_bytes()
        self.fds_start = _open_fds()
        self.held: dict[str, str] = {}  # the content digest of a stored dataset -> its spool name
        self.started = time.monotonic()

    def exchange(self, wire: Wire) -> list[tuple[int, bytes]]:
        """Send ``wire``; the PDUs the receiver answered with, up to the one that ends the association.

        A failing example is written to ``failed/`` beside the spool, in the corpus format, and named in the error.
        """
        try:
            with warnings.catch_warnings():
                # As in production, where a library's warning about a peer's odd value is printed, not raised
                # (this suite turns warnings into errors, which would fail in the receiver's own threads).
                warnings.simplefilter("ignore", UserWarning)
                return self._exchange(wire)
        except Exception as exc:
            out = self.h.spool.root.parent / "failed" / f"example-{self.examples}.hex"
            out.parent.mkdir(exist_ok=True)
            out.write_text(wire.corpus_text(str(exc).splitlines()[0][:200]))
            raise AssertionError(f"{type(exc).__name__}: {exc} [input: {out}]") from exc

    def _exchange(self, wire: Wire) -> list[tuple[int, bytes]]:
        self.examples += 1
        stored_before = len(self.h.stored.calls)
        t0 = time.monotonic()
        peer = RawPeer(self.h.port, SOURCES[self.examples % len(SOURCES)], timeout_seconds=HANG_SECONDS)
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                for chunk in wire.chunks:
                    peer.send(chunk)
                if wire.ending == "release":
                    peer.send(RELEASE_RQ_PDU)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the receiver gave up on us mid-way, which it may
            except TimeoutError:
                raise AssertionError(f"hang: the receiver neither read nor closed for {HANG_SECONDS} s") from None
            if wire.ending == "eof":
                with contextlib.suppress(OSError):
                    peer.sock.shutdown(socket.SHUT_WR)
            pdus = self._read_to_end(peer)
        finally:
            peer.close()
        self._settle()
        if wire.datasets:
            self._check_stores(wire, pdus, stored_before)
        self.outcomes[f"ended by {_PDU_NAMES.get(pdus[-1][0], 'close') if pdus else 'close'}"] += 1
        self.outcomes[f"{wire.ending} {int(2 * (time.monotonic() - t0)) / 2}s"] += 1
        self.rss_peak = max(self.rss_peak, rss_bytes())
        if self.examples % CHECK_EVERY == 0:
            self.still_serving()
        return pdus

    def _read_to_end(self, peer: RawPeer) -> list[tuple[int, bytes]]:
        pdus: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + HANG_SECONDS
        while True:
            peer.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                pdu = peer.read_pdu()
            except TimeoutError:
                raise AssertionError(f"hang: neither an answer that ends the association nor a close within "
                                     f"{HANG_SECONDS} s (got {[_PDU_NAMES.get(p[0], p[0]) for p in pdus]})") from None
            if pdu is None:
                return pdus
            pdus.append(pdu)
            if pdu[0] in FINAL_PDUS:
                return pdus

    def _settle(self, *, all_closed: bool = False) -> None:
        """The receiver lets go of its temp files (but its spares), of every connection older than
        ``HELD_SECONDS`` (with ``all_closed``, of every connection), and logged no internal error."""
        tmp = self.h.spool.tmp_dir
        deadline = time.monotonic() + HANG_SECONDS
        # The receiver's set of live connections is read directly: a connection it keeps after the peer
        # closed is a leak no metric shows.
        while True:
            now = time.monotonic()
            held = [c for c in list(self.h.receiver._conns) if all_closed or now - c.opened > HELD_SECONDS]
            # Up to two empty temp files are made ahead for the next C-STOREs: those are the receiver's.
            spares = {path.name for path, *_ in list(self.h.receiver._spares)}
            assert len(spares) <= 2
            left = sorted(p.name for p in tmp.iterdir() if p.name not in spares)
            if not held and not left:
                break
            if now > deadline:
                for name in left:  # removed, so that the examples that follow (and shrinking) start clean
                    (tmp / name).unlink(missing_ok=True)
                raise AssertionError(f"{len(held)} connections still held and {left} left in tmp/ after the "
                                     "peer closed")
            time.sleep(0.002)
        if self.internal.records:
            lines = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.internal.records]
            self.internal.records.clear()
            raise AssertionError("internal error in the receiver: " + "; ".join(lines))

    def _check_stores(self, wire: Wire, pdus: list[tuple[int, bytes]], stored_before: int) -> None:
        """Every C-STORE is answered, the release is too, and what was stored is byte for byte what was sent."""
        statuses = [response_status(body) for t, body in pdus if t == P_DATA]
        assert [t for t, _ in pdus][:1] == [ASSOCIATE_AC] and pdus[-1][0] == RELEASE_RP, \
            [_PDU_NAMES.get(t, t) for t, _ in pdus]
        assert len(statuses) == len(wire.datasets) and None not in statuses, statuses
        self.outcomes.update(f"C-STORE 0x{s:04X}" for s in statuses if s is not None)
        calls = self.h.stored.calls[stored_before:]
        for meta, rec in calls:
            self.held[meta.content_digest] = rec.spool_name
        replaced = {rec.replaced_spool_name for _, rec in calls}
        for data, status in zip(wire.datasets, statuses, strict=True):
            if status != 0:
                continue
            # Found by content, so that a re-sent dataset (answered Success, nothing stored anew) is checked too.
            name = self.held.get(digest.finish(digest.hasher(data)))
            assert name is not None, "answered Success, but no spool file holds the dataset sent"
            path = Path(self.h.spool.path(name))
            if not path.exists():
                assert name in replaced, f"{name} answered Success but is not on the spool"
                continue  # a later C-STORE of the same instance replaced it
            assert path.read_bytes()[dataset_offset(path):] == data, "the stored dataset is not the one sent"
            # The receiver's own part, the File Meta, reads. The dataset is stored as received: the receiver reads
            # only the header elements it needs, and a body no reader takes is refused later, at decoding.
            assert read_file_meta_info(path).TransferSyntaxUID in _SYNTAXES

    def still_serving(self, *, store: bool = False) -> None:
        """A fresh association is served: a C-ECHO over the raw peer, or a C-STORE of a real CT by pynetdicom."""
        if not store:
            peer = RawPeer(self.h.port, timeout_seconds=HANG_SECONDS)
            try:
                peer.associate(calling="CHECK", contexts=[(1, VERIFICATION, IVR)])
                assert peer.echo(1) == 0
                peer.release()
            finally:
                peer.close()
        else:
            ds = pydicom.dcmread(CT_SMALL)
            ae = AE(ae_title="CHECK")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = HANG_SECONDS
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", self.h.port, ae_title="EDGE_AGENT")
            assert assoc.is_established
            try:
                assert int(assoc.send_c_store(ds).Status) == 0
            finally:
                assoc.release()
        self._settle()

    def finish(self, name: str) -> None:
        """After a run: still serving, every connection let go, RSS bounded; the figures are printed (``-s``)."""
        self.still_serving(store=True)
        self._settle(all_closed=True)
        growth, fds = self.rss_peak - self.rss_start, _open_fds() - self.fds_start
        print(f"\nfuzz {name}: {self.examples} examples in {time.monotonic() - self.started:.1f} s, "
              f"0 crashes, 0 hangs, 0 internal errors, peak RSS growth {growth / (1 << 20):.1f} MiB, {fds:+d} fds, "
              f"{self.internal.library_errors} ERROR lines from pynetdicom's decoder; "
              f"{dict(sorted(self.outcomes.items()))}")
        assert growth < RSS_GROWTH_BYTES, f"RSS grew by {growth >> 20} MiB"
        assert fds <= FD_GROWTH, f"{fds} more file descriptors open than before the run"


_SYNTAXES = {ts for _, _, ts in CONTEXTS}
_PDU_NAMES = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x06: "A-RELEASE-RP",
              0x07: "A-ABORT"}


@pytest.fixture
def fuzz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fuzz]:
    # After its last PDU the receiver waits for the peer to close (PS3.8 Sta13) for up to 2 s. Many fuzz peers
    # never close (they sent an A-ABORT, or garbage, and wait): the same wait, shorter, keeps the run fast.
    monkeypatch.setattr(scp, "_LINGER_SECONDS", LINGER_SECONDS)
    internal = _Internal()
    root = logging.getLogger()
    root.addHandler(internal)
    try:
        with running_receiver(tmp_path, **RECEIVER_CONFIG) as h:
            yield Fuzz(h, internal)
    finally:
        root.removeHandler(internal)


def test_bytes_before_association(fuzz: Fuzz) -> None:
    @fuzz_settings(120)
    @given(before_association())
    def run(wire: Wire) -> None:
        fuzz.exchange(wire)

    run()
    fuzz.finish("before association")


def test_pdus_inside_an_association(fuzz: Fuzz) -> None:
    @fuzz_settings(250)
    @given(in_association())
    def run(wire: Wire) -> None:
        fuzz.exchange(wire)

    run()
    fuzz.finish("inside an association")


def test_c_stores_with_mutated_datasets(fuzz: Fuzz) -> None:
    @fuzz_settings(500)
    @given(c_stores())
    def run(wire: Wire) -> None:
        fuzz.exchange(wire)

    run()
    fuzz.finish("C-STORE datasets")


# -- the corpus ------------------------------------------------------------------------------------------


def load_corpus(path: Path) -> Wire:
    """A corpus file: ``#`` comment lines (one may be ``# ending: eof|release|wait``), then hex; a line ``--``
    separates the pieces sent one after the other."""
    ending, pieces, current = "eof", [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# ending:"):
            ending = line.split(":", 1)[1].strip()
        elif line.startswith("#"):
            continue
        elif line == "--":
            pieces.append(bytes.fromhex(current))
            current = ""
        else:
            current += line
    pieces.append(bytes.fromhex(current))
    return Wire(tuple(p for p in pieces if p), ending)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.hex")), ids=lambda p: p.stem)
def test_corpus(fuzz: Fuzz, path: Path) -> None:
    fuzz.exchange(load_corpus(path))
    fuzz.still_serving()


# -- what the fuzz run found, kept as plain tests -----------------------------------------------------------


def test_a_deflated_dataset_cut_inside_its_deflate_stream_is_refused(fuzz: Fuzz) -> None:
    # The first 2200 bytes of a deflated CT inflate to a header that parses; the file could never be read whole.
    pdus = fuzz.exchange(store_wire([(7, datasets()["deflated"][0][:2200])]))
    assert [response_status(body) for t, body in pdus if t == P_DATA] == [0xC000]
    assert fuzz.h.spool_files() == []


def test_a_presentation_context_without_an_abstract_syntax_is_refused_alone(fuzz: Fuzz) -> None:
    # Found by the corpus: pynetdicom's PresentationContext refuses None as an abstract syntax, and the receiver
    # answered with "DICOM receive failed (TypeError)" and an A-ABORT instead of negotiating.
    pdus = fuzz.exchange(load_corpus(CORPUS / "context-without-abstract-syntax.hex"))
    assert [t for t, _ in pdus] == [ASSOCIATE_AC, RELEASE_RP]
    results = [(item[4], item[6]) for item in _items(pdus[0][1][68:]) if item[0] == 0x21]
    assert results == [(1, 0x03), (3, 0x03), (5, 0x04)]  # context id, result


@pytest.mark.parametrize("name", ["null-calling-ae", "non-ascii-called-ae"])
def test_a_malformed_request_logs_no_error(fuzz: Fuzz, name: str) -> None:
    # Else any peer that can connect could write ERROR lines (and peer data) into the daemon's log at will, past
    # the receiver's own rate limit on refusals.
    pdus = fuzz.exchange(load_corpus(CORPUS / f"{name}.hex"))
    assert [t for t, _ in pdus] == [0x03]  # A-ASSOCIATE-RJ
    assert fuzz.internal.library_errors == 0


def _items(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append(data[pos : pos + 4 + length])
        pos += 4 + length
    return out
