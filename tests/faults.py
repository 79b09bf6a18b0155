"""Fault injection against the real daemon: the harness behind tests/test_faults.py and bench/faults.py.

Everything is real: the daemon is a subprocess (tests/daemon.py), the broker a real nats-server
(tests/natsutil.py), the senders a pynetdicom SCU and dcmtk's storescu, the disk faults a real tmpfs,
``chattr +i`` and a read-only bind mount, the network fault a TCP proxy between the daemon and the broker.
The scenarios are in tests/fault_scenarios.py, the means of injection in tests/fault_tools.py.

What is checked is the finding contract (schema 1.2), from the outside (``check_findings``):

- every series with at least one instance answered Success (0x0000 or a 0xB000-family warning) has exactly
  one finding in the stream for its latest revision, and that finding covers every such instance
  (``instances_inferred`` == the number of distinct SOP Instance UIDs that got Success, ``instances_failed``
  == 0, each of them in ``sop_instance_uids``); a series without one is *lost*;
- no two messages in the stream carry the same ``finding_id`` (the stream de-duplicates by Nats-Msg-Id);
- a new revision only for genuinely new instances: each revision covers strictly more instances than the
  one before (an identical re-send changes nothing);
- no finding is partial: every instance sent here decodes, so a finding with ``instances_failed`` > 0 was
  cut short (a cancelled inference counted as a failure).

The harness never sleeps to synchronise: it waits on C-STORE responses, sd_notify READY, /metrics, log lines
and the stream's contents. The only timed waits are fault durations (a random kill moment, an outage longer
than the duplicate window) and deadlines after which a wait gives up and the check reports what it saw.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import subprocess
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pydicom
from nats.js.api import DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket

from tests.daemon import Daemon, write_config
from tests.dicomfiles import CT_SMALL, DATA_STORE, make_ct_series
from tests.natsutil import NatsServer

CR_CHEST = DATA_STORE / "RG1_UNCR.dcm"  # a real CR chest radiograph (pydicom-data), 7.2 MB: route cxr-nodule
STREAM = "EDGE_FINDINGS"
SUBJECTS = "edge.findings.>"
CALLING_AET = "FAULTS"
DEFAULT_MAX_AGE_SECONDS = 14 * 86_400.0  # bus.max_age_days' default: a stream made here matches the daemon's
DEFAULT_DUPLICATE_WINDOW_SECONDS = 600.0  # bus.duplicate_window_seconds' default
# A daemon that holds nothing in flight and publishes nothing for this long has nothing more to publish.
IDLE_GIVE_UP_SECONDS = 10.0
# A modality's pause before it re-sends what got no response (the daemon is up but did not answer).
RESEND_BACKOFF_SECONDS = 0.5
POLL_SECONDS = 0.05  # between two scrapes of /metrics (or reads of the log) while waiting on a value
# An instance refused this often with a failure status (not cut off by a dead daemon) is given up, as a
# modality's retry policy would; it is then not acknowledged, and no finding has to cover it.
MAX_REFUSALS_PER_INSTANCE = 5
REQUIRED_FIELDS = ("finding_id", "series_instance_uid", "revision", "sop_instance_uids", "instances_received",
                   "instances_inferred", "instances_failed")
# A line the daemon itself logged at WARNING or above (not a library's traceback that happened to land in its log).
_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) edge_agent[.:]")


def is_success(status: int) -> bool:
    """Success, or a warning of the 0xB000 family: PS3.4 B.2.3, the instance was stored."""
    return status == 0x0000 or (status & 0xF000) == 0xB000


# -- the instances sent and what they were answered ---------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One instance as a modality holds it: a file, and the UIDs it is checked by."""

    path: Path
    series_uid: str
    sop_uid: str
    sop_class: str
    syntax: str

    @classmethod
    def of(cls, path: Path) -> Item:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return cls(path, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                   str(ds.file_meta.TransferSyntaxUID))


def make_cr(folder: Path) -> list[Item]:
    """A CR chest radiograph as a new one-instance series (fresh UIDs, the real file's pixels)."""
    ds = pydicom.dcmread(CR_CHEST)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cr-{ds.SOPInstanceUID[-12:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [Item.of(path)]


def make_ct(folder: Path, slices: int, *, images_in_acquisition: bool = False) -> list[Item]:
    """A CT series of ``slices`` real slices (pydicom's CT_small) under fresh UIDs, in slice order."""
    target = folder / f"ct-{generate_uid()[-12:]}"
    return [Item.of(p) for p in make_ct_series(target, slices, source=CT_SMALL,
                                                images_in_acquisition=images_in_acquisition)]


class Ledger:
    """Every C-STORE and its response (from association threads): the truth findings are checked against."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.stores = 0  # C-STORE requests issued, re-sends and retries included
        self.instances: dict[str, set[str]] = {}  # series UID -> SOP Instance UIDs sent
        self.acked: dict[str, set[str]] = {}  # series UID -> SOP Instance UIDs answered Success
        self.successes = 0  # Success responses, re-sends included
        self.no_response = 0  # requests that got no response (the daemon died, the association broke)
        self.refused: Counter[int] = Counter()  # failure statuses
        self.given_up: set[str] = set()  # SOP Instance UIDs refused MAX_REFUSALS_PER_INSTANCE times
        self.series_sent: list[str] = []  # series whose every instance got Success, in that order

    def record(self, item: Item, status: int | None) -> None:
        with self._cond:
            self.stores += 1
            self.instances.setdefault(item.series_uid, set()).add(item.sop_uid)
            if status is None:
                self.no_response += 1
            elif is_success(status):
                self.successes += 1
                self.acked.setdefault(item.series_uid, set()).add(item.sop_uid)
            else:
                self.refused[status] += 1
            self._cond.notify_all()

    def series_done(self, series_uid: str) -> None:
        with self._cond:
            self.series_sent.append(series_uid)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_seconds: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout_seconds)

    def expected(self) -> dict[str, set[str]]:
        """Series UID -> the instances that got Success, for every series with at least one."""
        with self._cond:
            return {uid: set(sops) for uid, sops in self.acked.items() if sops}

    @property
    def sent(self) -> int:
        with self._cond:
            return sum(len(s) for s in self.instances.values())

    @property
    def acknowledged(self) -> int:
        with self._cond:
            return sum(len(s) for s in self.acked.values())


class _ClosingSocket(AssociationSocket):
    def _shutdown_socket(self) -> None:
        # pynetdicom 3.0 calls shutdown() then close() in one try: on a refused connect the socket is not
        # connected, shutdown() raises ENOTCONN, and the socket is never closed (a ResourceWarning later). The
        # senders here connect while the daemon restarts, so that happens.
        sock = self.socket
        super()._shutdown_socket()
        if sock is not None:
            sock.close()


class _ClosingAE(AE):
    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _wake_when_aborted(assoc: Association, stop: threading.Event) -> None:
    """Wake a C-STORE that waits for a response on an association the peer has reset.

    pynetdicom 3.0 notices the reset (the association is no longer established, its socket is closed) but does
    not wake the request waiting for its response, which then waits out the whole DIMSE timeout: after every
    SIGKILL of the daemon, each sender would stall for it. An empty message is what pynetdicom's own abort
    handling puts on the queue (fsm.AA_4); the C-STORE then returns without a status.
    """
    while not stop.wait(0.05):
        if not assoc.is_established:
            assoc.dimse.msg_queue.put((None, None))
            return


class Scu:
    """A modality: pynetdicom C-STOREs, one association per call, every response recorded in the ledger."""

    def __init__(self, port: int, ledger: Ledger, *, aet: str = CALLING_AET,
                 dimse_timeout_seconds: float = 60.0) -> None:
        self.port = port
        self.ledger = ledger
        self.aet = aet
        # How long a C-STORE waits for its response before the association is aborted (a modality's setting).
        self.dimse_timeout_seconds = dimse_timeout_seconds
        self.on_success: Callable[[Item], None] | None = None

    def store(self, items: Sequence[Item]) -> tuple[bool, list[tuple[Item, int | None]]]:
        """Send ``items`` in order over one association: (associated, [(item, status or None)])."""
        ae = _ClosingAE(ae_title=self.aet)
        ae.acse_timeout = 30
        ae.dimse_timeout = self.dimse_timeout_seconds
        ae.network_timeout = 60
        for sop_class, syntax in dict.fromkeys((i.sop_class, i.syntax) for i in items):
            ae.add_requested_context(sop_class, syntax)
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="EDGE_AGENT")
        except (OSError, RuntimeError):
            return False, []
        if not assoc.is_established:
            return False, []
        out: list[tuple[Item, int | None]] = []
        stop = threading.Event()
        threading.Thread(target=_wake_when_aborted, args=(assoc, stop), daemon=True).start()
        try:
            for item in items:
                if not assoc.is_established:
                    break  # cut off: the rest were never sent
                try:
                    rsp = assoc.send_c_store(item.path)
                except (RuntimeError, OSError, ValueError):
                    rsp = None
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                self.ledger.record(item, status)
                out.append((item, status))
                if status is not None and is_success(status) and self.on_success is not None:
                    self.on_success(item)
        finally:
            stop.set()
            if assoc.is_established:
                assoc.release()
        return True, out

    def store_until_acked(self, items: Sequence[Item], up: threading.Event, deadline: float) -> list[Item]:
        """Send and re-send, as a modality does, until every item got Success; returns those that never did.

        No association or no response (a dead daemon) is retried once ``up`` says the daemon is back; a failure
        status counts towards MAX_REFUSALS_PER_INSTANCE, after which the item is given up.
        """
        todo = list(items)
        refusals: Counter[str] = Counter()
        given_up: list[Item] = []
        while todo and time.monotonic() < deadline:
            if not up.wait(timeout=max(0.0, deadline - time.monotonic())):
                break
            associated, results = self.store(todo)
            acked = {i.sop_uid for i, s in results if s is not None and is_success(s)}
            refused = {i.sop_uid for i, s in results if s is not None and not is_success(s)}
            left = []
            for item in todo:
                if item.sop_uid in acked:
                    continue
                if item.sop_uid in refused:
                    refusals[item.sop_uid] += 1
                    if refusals[item.sop_uid] >= MAX_REFUSALS_PER_INSTANCE:
                        given_up.append(item)
                        continue
                left.append(item)
            todo = left
            if todo:
                # A modality's re-send interval (not a synchronisation): after a kill the killer has cleared ``up``
                # and the next round waits for the restart; otherwise a refusing or hung daemon is not hammered.
                up.wait(timeout=0.1)
                time.sleep(RESEND_BACKOFF_SECONDS if associated else 0.1)
        for item in given_up:
            self.ledger.given_up.add(item.sop_uid)
        return given_up + todo


def dcmtk_store(port: int, items: Sequence[Item], ledger: Ledger) -> list[Item]:
    """Send with dcmtk's storescu (one association); record each file's response; return those not acked."""
    cmd = ["/usr/bin/storescu", "-v", "-aet", CALLING_AET, "-aec", "EDGE_AGENT", "127.0.0.1", str(port),
           *(str(i.path) for i in items)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                         env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    by_path = {str(i.path): i for i in items}
    status: dict[str, int | None] = {}
    current: str | None = None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
            status[current] = None
            continue
        m = re.search(r"Received Store Response(?: \(([^)]*)\))?", line)
        if m and current is not None:
            text = (m.group(1) or "").lower()
            code = re.search(r"0x([0-9a-f]{4})", text)
            status[current] = int(code.group(1), 16) if code else (0 if text.startswith("success") else 0x0110)
            current = None
    left = []
    for path, item in by_path.items():
        if path in status:
            ledger.record(item, status[path])
        if status.get(path) is None or not is_success(status[path] or 0):
            left.append(item)
    return left


# -- the stream ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamMessage:
    seq: int
    msg_id: str | None
    data: bytes
    finding: dict[str, Any]


async def _stream_messages(url: str, stream: str) -> list[StreamMessage]:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            data = msg.data or b""
            out.append(StreamMessage(seq, (msg.headers or {}).get("Nats-Msg-Id"), data, json.loads(data)))
        return out
    finally:
        await nc.close()


def stream_messages(url: str, stream: str = STREAM) -> list[StreamMessage]:
    """Every message the stream holds, in order, with its Nats-Msg-Id header."""
    return asyncio.run(_stream_messages(url, stream))


async def _edit_stream(url: str, create: bool, changes: Mapping[str, Any]) -> None:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        if create:
            base = StreamConfig(name=STREAM, subjects=[SUBJECTS], duplicate_window=DEFAULT_DUPLICATE_WINDOW_SECONDS,
                                max_age=DEFAULT_MAX_AGE_SECONDS)
            await js.add_stream(base.evolve(**changes))
        else:
            info = await js.stream_info(STREAM)
            await js.update_stream(info.config.evolve(**changes))
    finally:
        await nc.close()


def make_stream(url: str, **settings: Any) -> None:
    """Create the findings stream as the daemon would, with ``settings`` changed (a stream that refuses)."""
    asyncio.run(_edit_stream(url, True, settings))


def update_stream(url: str, **changes: Any) -> None:
    asyncio.run(_edit_stream(url, False, changes))


class StreamWatcher:
    """Findings as they land in the stream (a JetStream ordered consumer from the start), in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._cond = threading.Condition()
        self._findings: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-watcher", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> StreamWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by whoever waits on the watcher, not lost in a thread
            self.failure = exc
            with self._cond:
                self._cond.notify_all()

    async def _main(self) -> None:
        async def quiet(exc: Exception) -> None:
            return None

        nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                error_cb=quiet)
        try:
            js = nc.jetstream()
            sub = None
            while sub is None and not self._stop.is_set():
                try:
                    sub = await js.subscribe(SUBJECTS, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
                except NotFoundError:
                    await asyncio.sleep(0.1)  # the daemon has not created the stream yet: poll for it
            while sub is not None and not self._stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except TimeoutError:
                    continue
                finding = json.loads(msg.data)
                with self._cond:
                    self._findings.append(finding)
                    self._cond.notify_all()
        finally:
            await nc.close()

    def count(self) -> int:
        with self._cond:
            return len(self._findings)

    def findings(self, series_uid: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [f for f in self._findings if series_uid is None or f.get("series_instance_uid") == series_uid]

    def wait(self, predicate: Callable[[], bool], timeout_seconds: float) -> bool:
        """Wait until ``predicate`` holds, re-checking at each new finding (and at least every 0.25 s)."""
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while True:
                if self.failure is not None:
                    raise RuntimeError(f"the stream watcher failed: {self.failure!r}")
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(0.25, remaining))

    def wait_count(self, count: int, timeout_seconds: float) -> bool:
        return self.wait(lambda: len(self._findings) >= count, timeout_seconds)

    def wait_series(self, series_uid: str, timeout_seconds: float, *, revisions: int = 1) -> bool:
        """Wait until ``revisions`` distinct revisions of the series' finding are in the stream."""
        return self.wait(lambda: len({f.get("revision") for f in self.findings(series_uid)}) >= revisions,
                         timeout_seconds)


# -- the verdict --------------------------------------------------------------------------------------


@dataclass
class Verdict:
    findings: int = 0
    duplicate_ids: int = 0  # messages beyond the first with the same finding_id
    revisions: int = 0  # findings with a revision above 0
    lost: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _covered(f: Mapping[str, Any]) -> set[str]:
    uids = f.get("sop_instance_uids")
    return {str(u) for u in uids} if isinstance(uids, list) else set()


def check_findings(
    expected: Mapping[str, set[str]],
    messages: Sequence[StreamMessage],
    *,
    names: Mapping[str, str] | None = None,
    duplicate_ids_allowed: bool = False,
    latest_revision: Mapping[str, int] | None = None,
) -> Verdict:
    """Check the stream against what was acknowledged (series UID -> SOP Instance UIDs that got Success)."""
    names = names or {}
    v = Verdict(findings=len(messages))

    def name(uid: str) -> str:
        return names.get(uid, f"series ...{uid[-8:]}")

    missing: Counter[str] = Counter()
    versions: set[str] = set()
    by_series: dict[str, list[StreamMessage]] = {}
    for m in messages:
        f = m.finding
        versions.add(str(f.get("schema_version")))
        for key in REQUIRED_FIELDS:
            if key not in f:
                missing[key] += 1
        if m.msg_id != f.get("finding_id"):
            v.problems.append(f"stream seq {m.seq}: Nats-Msg-Id {m.msg_id!r} is not the finding_id")
        by_series.setdefault(str(f.get("series_instance_uid")), []).append(m)
        failed = f.get("instances_failed")
        inferred = f.get("instances_inferred")
        if isinstance(failed, int) and failed > 0:
            v.problems.append(
                f"{name(str(f.get('series_instance_uid')))} revision {f.get('revision')}: partial finding, "
                f"instances_failed={failed} (every instance sent decodes: a cancelled inference was counted as "
                f"a failure?)")
        if isinstance(inferred, int) and inferred != len(_covered(f)):
            v.problems.append(f"{name(str(f.get('series_instance_uid')))} revision {f.get('revision')}: "
                              f"instances_inferred={inferred} but {len(_covered(f))} sop_instance_uids")
    for key, n in sorted(missing.items()):
        v.problems.append(f"{n} of {len(messages)} findings lack {key!r} (schema_version "
                          f"{', '.join(sorted(versions))}; the contract is 1.2)")

    ids = Counter(str(m.finding.get("finding_id")) for m in messages)
    v.duplicate_ids = sum(n - 1 for n in ids.values())
    if v.duplicate_ids and not duplicate_ids_allowed:
        v.problems.append(f"{v.duplicate_ids} message(s) repeat a finding_id already in the stream")
    v.revisions = sum(1 for m in messages if isinstance(m.finding.get("revision"), int) and m.finding["revision"])

    for uid, acked in expected.items():
        msgs = by_series.get(uid, [])
        if not msgs:
            v.lost.append(f"{name(uid)}: {len(acked)} instance(s) acknowledged, no finding")
            continue
        by_rev: dict[int, dict[str, dict[str, Any]]] = {}
        for m in msgs:
            by_rev.setdefault(int(m.finding.get("revision", -1)), {})[str(m.finding.get("finding_id"))] = m.finding
        latest = max(by_rev)
        if len(by_rev[latest]) > 1:
            v.problems.append(f"{name(uid)}: {len(by_rev[latest])} different findings for revision {latest}")
        f = next(iter(by_rev[latest].values()))
        inferred, failed = f.get("instances_inferred"), f.get("instances_failed")
        not_listed = acked - _covered(f)
        if not isinstance(inferred, int) or not isinstance(failed, int):
            v.lost.append(f"{name(uid)}: revision {latest} does not say what it covers (no instances_inferred/"
                          f"instances_failed); it lists {len(_covered(f) & acked)} of the {len(acked)} acknowledged")
        elif inferred < len(acked) or failed != 0 or not_listed:
            v.lost.append(f"{name(uid)}: revision {latest} covers instances_inferred={inferred}, "
                          f"instances_failed={failed} of {len(acked)} acknowledged"
                          + (f" ({len(not_listed)} acknowledged not in sop_instance_uids)" if not_listed else ""))
        elif inferred > len(acked):
            v.problems.append(f"{name(uid)}: revision {latest} covers {inferred} instances, only {len(acked)} "
                              "were acknowledged")
        if latest_revision is not None and uid in latest_revision and latest != latest_revision[uid]:
            v.problems.append(f"{name(uid)}: latest revision is {latest}, expected {latest_revision[uid]}")
        revs = sorted(by_rev)
        for lower, upper in itertools.pairwise(revs):
            before = set().union(*(_covered(x) for x in by_rev[lower].values()))
            after = set().union(*(_covered(x) for x in by_rev[upper].values()))
            if not after > before:
                v.problems.append(f"{name(uid)}: revision {upper} covers no instance that revision {lower} did not "
                                  f"({len(after)} vs {len(before)}): a new revision without new data")
    return v


# -- what a scenario reports -------------------------------------------------------------------------


@dataclass
class Outcome:
    """One row of the reliability table, and what went wrong."""

    fault: str
    injected: str
    times: int = 0
    sent: int = 0  # distinct instances sent
    stores: int = 0  # C-STORE requests, re-sends and retries included
    acknowledged: int = 0  # distinct instances answered Success
    findings: int = 0  # messages in the stream
    lost: int = 0
    duplicate_ids: int = 0
    duplicates_rejected: int = 0  # publishes the stream reported as duplicates (the daemon's counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.problems and self.lost == 0

    def summary(self) -> str:
        head = (f"{self.fault}: {self.injected}, {self.times}x; {self.sent} instances sent ({self.stores} C-STOREs), "
                f"{self.acknowledged} acknowledged, {self.findings} findings, {self.lost} lost, "
                f"{self.duplicate_ids} duplicate finding_ids in the stream, {self.duplicates_rejected} duplicate "
                f"publishes rejected by the stream, {self.seconds:.0f} s")
        lines = [head, *(f"  problem: {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)]
        return "\n".join(lines)


# -- the rig: a broker, a daemon, a modality, the stream ---------------------------------------------------


class Rig:
    """One scenario's peers and bookkeeping. ``close()`` stops whatever is still running."""

    def __init__(self, work: Path, *, start_nats: bool = True, bus_url: str | None = None,
                 nats_server: NatsServer | None = None, **overrides: Any) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.nats = nats_server or NatsServer(work / "nats")
        if start_nats:
            self.nats.start()
        self.data = work / "data"
        self.daemon = Daemon(write_config(work, bus_url or self.nats.url, **overrides), work)
        self.ledger = Ledger()
        self.names: dict[str, str] = {}
        self.up = threading.Event()
        self.watcher: StreamWatcher | None = None
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._duplicates_done = 0.0  # the duplicate counter of daemon processes that have ended
        self._duplicates_seen = 0.0  # the last value scraped from the running one
        self.starts = 0
        self.started = time.monotonic()

    # -- the daemon --

    @property
    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def start_daemon(self, timeout_seconds: float = 90.0) -> None:
        self._duplicates_done += self._duplicates_seen
        self._duplicates_seen = 0.0
        self.daemon.start(timeout_seconds=timeout_seconds)
        self.starts += 1
        self.up.set()

    def kill9(self) -> None:
        """SIGKILL at once (no scrape first: the moment matters); what the counter gained since is not counted."""
        self.up.clear()
        self.daemon.kill9()

    def terminate(self) -> int:
        self.scrape_duplicates()
        self.up.clear()
        rc = self.daemon.terminate(timeout_seconds=120)
        if rc != 0:
            self.problems.append(f"the daemon exited with {rc} on SIGTERM")
        return rc

    def check_alive(self, what: str) -> bool:
        """False (and a problem) if the daemon ended on its own."""
        if self.alive:
            return True
        rc = self.daemon.proc.returncode if self.daemon.proc is not None else None
        self.problems.append(f"the daemon exited by itself ({what}), status {rc}: {self.log_tail()}")
        self.up.clear()
        return False

    def log(self) -> str:
        return self.daemon.log()

    def log_tail(self, lines: int = 8) -> str:
        return " | ".join(self.log().splitlines()[-lines:])

    def log_offset(self) -> int:
        return len(self.log())

    def said(self, since: int, *phrases: str) -> str | None:
        """The first WARNING/ERROR line logged after ``since`` that contains one of ``phrases``."""
        for line in self.log()[since:].splitlines():
            if _LOG_PROBLEM.search(line) and any(p.lower() in line.lower() for p in phrases):
                return line
        return None

    def wait_said(self, since: int, phrases: Sequence[str], timeout_seconds: float) -> str | None:
        deadline = time.monotonic() + timeout_seconds
        while True:
            line = self.said(since, *phrases)
            if line is not None or time.monotonic() > deadline or not self.alive:
                return line
            time.sleep(POLL_SECONDS)  # polling a log file written by another process

    def scrape(self, name: str, **labels: str) -> float | None:
        """A metric summed over its other labels, or None when /metrics does not answer."""
        try:
            return self.daemon.metric_total(name, **labels)
        except (OSError, urllib.error.URLError):
            return None

    def wait_scrape(self, name: str, ok: Callable[[float], bool], timeout_seconds: float, **labels: str) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline and self.alive:
            value = self.scrape(name, **labels)
            if value is not None and ok(value):
                return True
            time.sleep(POLL_SECONDS)  # polling /metrics
        return False

    def scrape_duplicates(self) -> None:
        value = self.scrape("edge_agent_findings_total", outcome="duplicate")
        if value is not None:
            self._duplicates_seen = value

    @property
    def duplicates_rejected(self) -> int:
        return round(self._duplicates_done + self._duplicates_seen)

    def idle(self) -> bool:
        """The daemon holds nothing in flight: no open series, nothing waiting in the outbox."""
        pending = self.scrape("edge_agent_outbox_pending")
        open_series = self.scrape("edge_agent_open_series")
        return pending == 0 and open_series == 0

    # -- sending --

    def cr(self, label: str = "CR") -> list[Item]:
        items = make_cr(self.data)
        self.names[items[0].series_uid] = f"{label} #{len(self.names) + 1}"
        return items

    def ct(self, slices: int, *, label: str = "CT", images_in_acquisition: bool = False) -> list[Item]:
        items = make_ct(self.data, slices, images_in_acquisition=images_in_acquisition)
        self.names[items[0].series_uid] = f"{label} #{len(self.names) + 1} ({slices} slices)"
        return items

    def scu(self, dimse_timeout_seconds: float = 60.0) -> Scu:
        return Scu(self.daemon.dicom_port, self.ledger, dimse_timeout_seconds=dimse_timeout_seconds)

    def send(self, items: Sequence[Item], timeout_seconds: float = 180.0) -> list[Item]:
        """Send until every item got Success (retrying across restarts); returns what never did."""
        left = self.scu().store_until_acked(items, self.up, time.monotonic() + timeout_seconds)
        if not left:
            for uid in dict.fromkeys(i.series_uid for i in items):
                self.ledger.series_done(uid)
        return left

    # -- the stream --

    def watch(self) -> StreamWatcher:
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = StreamWatcher(self.nats.url).start()
        return self.watcher

    def wait_finding(self, items: Sequence[Item], timeout_seconds: float = 60.0, *, revisions: int = 1) -> bool:
        assert self.watcher is not None
        return self.watcher.wait_series(items[0].series_uid, timeout_seconds, revisions=revisions)

    def satisfied(self) -> bool:
        """Every acknowledged instance is in the latest finding of its series, as far as the watcher has seen.

        A wait condition only (it reads sop_instance_uids, which schema 1.1 has too); the verdict is check_findings.
        """
        assert self.watcher is not None
        for uid, acked in self.ledger.expected().items():
            found = self.watcher.findings(uid)
            if not found:
                return False
            latest = max(found, key=lambda f: int(f.get("revision", -1)))
            if not acked <= _covered(latest):
                return False
        return True

    def settle(self, timeout_seconds: float = 120.0, *, give_up_idle_seconds: float = IDLE_GIVE_UP_SECONDS) -> bool:
        """Wait until every acknowledged instance is covered in the stream and the daemon is idle.

        On the failure path it gives up early: once the daemon has held nothing in flight (no open series, an
        empty outbox) and no finding has arrived for ``give_up_idle_seconds``, nothing more is coming.
        """
        assert self.watcher is not None
        deadline = time.monotonic() + timeout_seconds
        idle_since: float | None = None
        last_count = -1
        while True:
            if not self.check_alive("while settling"):
                return False
            idle = self.idle()
            if idle and self.satisfied():
                self.scrape_duplicates()
                return True
            count = self.watcher.count()
            now = time.monotonic()
            idle_since = (idle_since or now) if idle and count == last_count else None
            last_count = count
            stuck = idle_since is not None and now - idle_since > give_up_idle_seconds
            if now > deadline or stuck:
                self.scrape_duplicates()
                self.notes.append(
                    f"not settled: {'idle with nothing new' if stuck else 'still busy'} after "
                    f"{timeout_seconds - max(0.0, deadline - now):.0f} s (outbox_pending="
                    f"{self.scrape('edge_agent_outbox_pending')}, open_series={self.scrape('edge_agent_open_series')})")
                return False
            watcher = self.watcher
            watcher.wait(lambda: watcher.count() > count, 0.25)  # noqa: B023 (called before the loop moves on)

    def finish(self, fault: str, injected: str, times: int, *, duplicate_ids_allowed: bool = False,
               latest_revision: Mapping[str, int] | None = None) -> Outcome:
        """Stop the daemon (SIGTERM: it must exit 0), then read the whole stream and check it against the ledger."""
        if self.alive:
            self.terminate()
        messages = stream_messages(self.nats.url) if self.nats.running else []
        verdict = check_findings(self.ledger.expected(), messages, names=self.names,
                                 duplicate_ids_allowed=duplicate_ids_allowed, latest_revision=latest_revision)
        out = Outcome(
            fault=fault,
            injected=injected,
            times=times,
            sent=self.ledger.sent,
            stores=self.ledger.stores,
            acknowledged=self.ledger.acknowledged,
            findings=verdict.findings,
            lost=len(verdict.lost),
            duplicate_ids=verdict.duplicate_ids,
            duplicates_rejected=self.duplicates_rejected,
            seconds=time.monotonic() - self.started,
            problems=[*verdict.lost, *verdict.problems, *self.problems],
            notes=list(self.notes),
        )
        if self.ledger.given_up:
            out.notes.append(f"{len(self.ledger.given_up)} instance(s) refused {MAX_REFUSALS_PER_INSTANCE} times and "
                             f"given up (statuses {dict(self.ledger.refused)})")
        if verdict.revisions:
            out.notes.append(f"{verdict.revisions} finding(s) of a later revision")
        return out

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.alive:
            self.daemon.kill9()
        self.daemon.close()
        self.nats.stop()
