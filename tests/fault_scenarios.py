"""The fault-injection scenarios, sized by their arguments: tests/test_faults.py runs them small, bench/faults.py big.

Each takes a fresh work folder and returns an ``Outcome`` (a row of docs/reliability.md); a scenario this
machine cannot inject (no root for a mount, no ``chattr``) raises ``CannotInject`` or pytest's skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from nats.js.api import DiscardPolicy
from pydicom.uid import generate_uid

from tests.dicomfiles import fill, tmpfs
from tests.fault_tools import FaultProxy, build_hanging_model, immutable, model_repository, read_only_bind
from tests.faults import Item, Outcome, Rig, dcmtk_store, is_success, make_stream, stream_messages, update_stream
from tests.natsutil import NatsServer

# The CT route completes a series after this long without a new slice (write_config's overrides).
CT_QUIET_SECONDS = 1.0
FINDING_TIMEOUT_SECONDS = 90.0


@contextlib.contextmanager
def rig(work: Path, **kwargs: Any) -> Iterator[Rig]:
    r = Rig(work, **kwargs)
    try:
        yield r
    finally:
        r.close()


def _expect_finding(r: Rig, items: list[Item], what: str, timeout_seconds: float = FINDING_TIMEOUT_SECONDS) -> bool:
    if r.wait_finding(items, timeout_seconds):
        return True
    r.problems.append(f"{what}: no finding for {r.names.get(items[0].series_uid, 'the series')} in "
                      f"{timeout_seconds:.0f} s (log: {r.log_tail(4)})")
    return False


def _send(r: Rig, items: list[Item], what: str, timeout_seconds: float = 180.0) -> bool:
    left = r.send(items, timeout_seconds)
    if left:
        r.problems.append(f"{what}: {len(left)} of {len(items)} instance(s) never got Success (all sends so far: "
                          f"refusals {dict(r.ledger.refused)}, {r.ledger.no_response} without a response)")
    return not left


# -- SIGKILL at random moments ----------------------------------------------------------------------------


@dataclass
class SeriesPlan:
    items: list[Item]
    late: list[Item] = field(default_factory=list)  # sent after the series' finding appeared
    resend_open: Item | None = None  # an identical re-send in the same association
    resend_after: Item | None = None  # an identical re-send after the series' finding appeared

    @property
    def uid(self) -> str:
        return self.items[0].series_uid

    @property
    def stores(self) -> int:
        return len(self.items) + len(self.late) + (self.resend_open is not None) + (self.resend_after is not None)


def plan_workload(r: Rig, instances: int, rng: random.Random) -> list[SeriesPlan]:
    """CR radiographs and 5-30 slice CT series until ``instances``; some late instances, some identical re-sends."""
    plans: list[SeriesPlan] = []
    total = 0
    while total < instances:
        if rng.random() < 0.3:
            plan = SeriesPlan(r.cr())
        else:
            slices = rng.randint(5, 30)
            late = rng.random() < 0.25
            # Images in Acquisition completes a series by count; a series that will get a late slice must not
            # say it is complete before that slice.
            items = r.ct(slices + late, images_in_acquisition=not late and rng.random() < 0.2)
            plan = SeriesPlan(items[:slices], items[slices:])
        if rng.random() < 0.15:
            plan.resend_open = rng.choice(plan.items)
        if rng.random() < 0.15:
            plan.resend_after = rng.choice(plan.items)
        plans.append(plan)
        total += len(plan.items) + len(plan.late)
    # Every run has at least one of each kind, whatever the dice said.
    if all(len(p.items) > 1 for p in plans):
        plans.insert(0, SeriesPlan(r.cr()))
    cts = [p for p in plans if len(p.items) > 1] or plans
    if not any(p.late for p in plans):
        cts[0].late.append(_late_slice(cts[0]))
    if not any(p.resend_open for p in plans):
        cts[-1].resend_open = cts[-1].items[0]
    if not any(p.resend_after for p in plans):
        plans[0].resend_after = plans[0].items[0]
    return plans


def _late_slice(plan: SeriesPlan) -> Item:
    """One more instance of the series: its last one under a new SOP Instance UID (and no count that ends it)."""
    ds = pydicom.dcmread(plan.items[-1].path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = len(plan.items) + 1
    if "ImagesInAcquisition" in ds:
        del ds.ImagesInAcquisition
    path = plan.items[-1].path.with_name(f"late-{ds.SOPInstanceUID[-12:]}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return Item.of(path)


class Workload:
    """Sender threads working through the plans: each series, then its late slice and re-send once it has a finding."""

    def __init__(self, r: Rig, plans: list[SeriesPlan], senders: int, deadline: float) -> None:
        self.r = r
        self.plans = plans
        self.deadline = deadline
        self._lock = threading.Lock()
        self._todo: list[tuple[str, SeriesPlan]] = [("series", p) for p in plans]
        self._busy = 0
        self.planned_stores = sum(p.stores for p in plans)
        self.skipped: list[str] = []
        self.failures: list[str] = []
        self.done = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"sender-{i}", daemon=True) for i in range(senders)]
        self._live = senders

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout_seconds: float) -> bool:
        return self.done.wait(timeout_seconds)

    def _ready(self, kind: str, plan: SeriesPlan) -> bool:
        assert self.r.watcher is not None
        return kind == "series" or bool(self.r.watcher.findings(plan.uid))

    def _next(self) -> tuple[str, SeriesPlan] | None:
        assert self.r.watcher is not None
        while True:
            with self._lock:
                for n, (kind, plan) in enumerate(self._todo):
                    if self._ready(kind, plan):
                        self._busy += 1
                        return self._todo.pop(n)
                if not self._todo and not self._busy:
                    return None
                waiting = list(self._todo)
            if time.monotonic() > self.deadline:
                with self._lock:
                    self.skipped += [f"{k} of {self.r.names.get(p.uid)}" for k, p in self._todo]
                    self._todo.clear()
                return None
            # Late slices and re-sends wait for their series' finding; wake on each new finding.
            self.r.watcher.wait(lambda: any(self._ready(k, p) for k, p in waiting), 0.5)  # noqa: B023

    def _work(self) -> None:
        try:
            while (task := self._next()) is not None:
                kind, plan = task
                try:
                    self._do(kind, plan)
                finally:
                    with self._lock:
                        self._busy -= 1
        except Exception as exc:  # reported with the outcome, not lost in a thread
            self.failures.append(f"sender failed: {exc!r}")
        finally:
            with self._lock:
                self._live -= 1
                if not self._live:
                    self.done.set()

    def _do(self, kind: str, plan: SeriesPlan) -> None:
        scu = self.r.scu()
        if kind == "series":
            batch = plan.items + ([plan.resend_open] if plan.resend_open is not None else [])
            left = scu.store_until_acked(batch, self.r.up, self.deadline)
            if left:
                self.skipped.append(f"{len(left)} instance(s) of {self.r.names.get(plan.uid)} never acknowledged")
                return
            self.r.ledger.series_done(plan.uid)
            with self._lock:
                self._todo += [("late", plan)] * bool(plan.late) + [("resend", plan)] * (plan.resend_after is not None)
        elif kind == "late":
            scu.store_until_acked(plan.late, self.r.up, self.deadline)
        else:
            assert plan.resend_after is not None
            scu.store_until_acked([plan.resend_after], self.r.up, self.deadline)


KILL_MOMENTS = ("random", "after a Success", "while completing", "during inference", "after a publish")


def _kill_moment(r: Rig, kind: str, rng: random.Random, timeout_seconds: float) -> bool:
    """Wait for the moment ``kind`` names; False if it did not come within the timeout (the kill comes anyway).

    The daemon's duplicate counter is scraped before the wait (and just before the kill where the moment is not
    that precise); what it gains in between is not seen, so duplicates_rejected is a lower bound.
    """
    assert r.watcher is not None
    ledger = r.ledger
    r.scrape_duplicates()
    if kind == "random":
        threading.Event().wait(rng.uniform(0.05, 2.0))  # the fault's timing, not a synchronisation
        r.scrape_duplicates()
        return True
    if kind == "after a Success":
        seen = ledger.successes
        return ledger.wait(lambda: ledger.successes > seen, timeout_seconds)
    if kind == "while completing":
        # A series' last instance got Success: its quiet time (or Images in Acquisition) starts its completion.
        seen = len(ledger.series_sent)
        if not ledger.wait(lambda: len(ledger.series_sent) > seen, timeout_seconds):
            return False
        threading.Event().wait(rng.uniform(0.0, CT_QUIET_SECONDS + 0.5))
        r.scrape_duplicates()
        return True
    if kind == "during inference":
        before = r.scrape("edge_agent_instances_total", outcome="inferred")
        return before is not None and r.wait_scrape(
            "edge_agent_instances_total", lambda v: v > before, timeout_seconds, outcome="inferred")
    seen = r.watcher.count()
    return r.watcher.wait(lambda: r.watcher is not None and r.watcher.count() > seen, timeout_seconds)


def sigkill(work: Path, *, kills: int = 3, instances: int = 60, seed: int = 1, senders: int = 2,
            moment_timeout_seconds: float = 10.0, settle_seconds: float = 180.0) -> Outcome:
    """SIGKILL the daemon ``kills`` times at random and targeted moments while series stream in; restart it."""
    rng = random.Random(seed)
    with rig(work, **{"spool.retain_seconds": 86_400, "routes.1.quiet_seconds": CT_QUIET_SECONDS}) as r:
        r.start_daemon()
        r.watch()
        plans = plan_workload(r, instances, rng)
        load = Workload(r, plans, senders, time.monotonic() + 120 + 2.0 * instances)
        load.start()
        moments: Counter[str] = Counter()
        order: list[str] = []
        for k in range(kills):
            if not order:
                order = list(KILL_MOMENTS)
                rng.shuffle(order)
            kind = order.pop()
            if load.done.is_set() and kind in ("after a Success", "while completing"):
                kind = "after a publish"  # nothing is being sent any more: hit what is left, the publishing
            # Spread the kills over the workload: kill k once (k+1)/(kills+1) of the C-STOREs are done.
            target = (k + 1) * load.planned_stores / (kills + 1)
            while not (r.ledger.stores >= target or load.done.is_set()):
                r.ledger.wait(lambda: r.ledger.stores >= target, 0.5)  # noqa: B023
            if not r.check_alive(f"before kill {k + 1}"):
                r.start_daemon()
            came = _kill_moment(r, kind, rng, moment_timeout_seconds)
            r.kill9()
            moments[kind if came else f"{kind} (not seen in {moment_timeout_seconds:.0f} s)"] += 1
            r.start_daemon()
        if not load.join(120 + 2.0 * instances):
            r.problems.append("the senders did not finish")
        if not r.alive:
            r.check_alive("after the workload")
            r.start_daemon()
        r.settle(settle_seconds)
        injected = "SIGKILL " + ", ".join(f"{n}x {m}" for m, n in sorted(moments.items())) + "; restarted each time"
        out = r.finish("SIGKILL at random moments", injected, kills)
        out.problems += load.failures
        crs = sum(1 for p in plans if len(p.items) == 1)
        resends = sum((p.resend_open is not None) + (p.resend_after is not None) for p in plans)
        out.notes.append(f"{len(plans)} series ({crs} CR, {len(plans) - crs} CT), {sum(bool(p.late) for p in plans)} "
                         f"with a late slice, {resends} identical re-sends; {r.ledger.no_response} C-STOREs cut off "
                         "by a kill and re-sent")
        out.notes += load.skipped
        return out


# -- SIGTERM while a slow engine completes a series ------------------------------------------------------


def sigterm_slow_engine(work: Path, *, slices: int = 16, seconds_per_image: float = 0.25, rounds: int = 1) -> Outcome:
    """SIGTERM while a series is being completed by a slow engine; the finding after restart covers every instance."""
    repo, measured = model_repository(work / "models", seconds_per_image)
    overrides = {
        "model_repository": str(repo),
        "routes.1.model": "ct-slow",
        "routes.1.quiet_seconds": CT_QUIET_SECONDS,
        "models.ct-slow": {"max_batch": 2, "max_queue_delay_ms": 0},
        # Shorter than the series' inference: the drain runs out while the series is still being completed.
        "pipeline.drain_timeout_seconds": 1.0,
        "spool.retain_seconds": 86_400,
    }
    with rig(work, **overrides) as r:
        r.start_daemon()
        r.watch()
        at_term: list[int] = []
        for _ in range(rounds):
            items = r.ct(slices, images_in_acquisition=True)  # complete at the last slice's arrival
            before = r.scrape("edge_agent_instances_total", outcome="inferred") or 0.0
            if not _send(r, items, "sending the series"):
                break
            # Completion has begun (the count arrived); SIGTERM once inference is under way and not done.
            r.wait_scrape("edge_agent_instances_total", lambda v: v > before, 60, outcome="inferred")  # noqa: B023
            done = round((r.scrape("edge_agent_instances_total", outcome="inferred") or before) - before)
            at_term.append(done)
            if done >= slices:
                r.problems.append(f"the engine had inferred all {slices} slices before SIGTERM: the fault was not "
                                  "injected (make the model slower)")
            r.terminate()
            r.start_daemon()
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish(
            "SIGTERM during completion, slow engine",
            f"SIGTERM after the last slice's Success while a {measured:.2f} s/slice model ran "
            f"(drain timeout 1 s); restarted",
            rounds,
        )
        out.notes.append(f"slices inferred when SIGTERM came: {at_term} of {slices}")
        return out


# A daemon with an engine call that never returns exits within this many seconds of SIGTERM (its drain, 1 s,
# and the models' stop, at most min(infer_timeout_seconds, 5 s), plus the rest of a normal stop).
HUNG_EXIT_SECONDS = 20.0


def sigterm_hung_engine(work: Path, *, overdue: bool, slices: int = 4) -> Outcome:
    """SIGTERM while an engine call hangs (a wedged GPU): the daemon exits promptly and says why, rather than wait
    for the call forever; the next start, with the model replaced, gives the series its finding.

    ``overdue``: SIGTERM once the call has missed the model's deadline (infer_timeout_seconds 2 s); else while
    it is still within it (60 s), so that the stop itself gives up on it.
    """
    repo, _ = model_repository(work / "models", 0.01)
    build_hanging_model(repo / "ct-hang")
    timeout = 2.0 if overdue else 60.0
    overrides = {
        "model_repository": str(repo),
        "routes.1.model": "ct-hang",
        "routes.1.quiet_seconds": CT_QUIET_SECONDS,
        "models.ct-hang": {"max_batch": 2, "max_queue_delay_ms": 0, "infer_timeout_seconds": timeout},
        "pipeline.drain_timeout_seconds": 1.0,
    }
    took = None
    with rig(work, **overrides) as r:
        r.start_daemon()
        r.watch()
        items = r.ct(slices, images_in_acquisition=True)
        if _send(r, items, "sending the series"):
            if overdue:
                injected = r.wait_scrape("edge_agent_engine_timeouts_total", lambda v: v >= 1, 60, model="ct-hang")
            else:
                # Slices are inferred as they arrive: the first call is in the engine well within this. (If it
                # were not, the stop would not say "still running" below, and this scenario fails.)
                time.sleep(3.0)
                injected = r.alive
            if not injected:
                r.problems.append("the hanging model's call was never seen running: the fault was not injected")
            since = r.log_offset()
            proc = r.daemon.proc
            assert proc is not None
            r.up.clear()
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(HUNG_EXIT_SECONDS)
                took = time.monotonic() - started
                if rc != 0:
                    r.problems.append(f"the daemon exited with {rc} on SIGTERM: {r.log_tail(4)}")
            except subprocess.TimeoutExpired:
                r.problems.append(f"the daemon had not exited {HUNG_EXIT_SECONDS:.0f} s after SIGTERM, with an "
                                  f"engine call hung: {r.log_tail(4)}")
                proc.kill()
                proc.wait(30)
            r.daemon.close()
            if r.said(since, "still running") is None:
                r.problems.append(f"the stop did not say that an engine call was left running: {r.log_tail(6)}")
            build_hanging_model(repo / "ct-hang", hangs=False)  # the operator replaces the model
            r.start_daemon()
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish(
            "SIGTERM with an engine call hung",
            f"a model whose calls on real images never return (infer_timeout_seconds {timeout:g} s), SIGTERM "
            f"{'once its first call was overdue' if overdue else 'while its first call ran'} (drain timeout 1 s); "
            "restarted with the model replaced",
            1,
        )
        out.notes.append("the daemon did not exit" if took is None else f"exited {took:.1f} s after SIGTERM")
        return out


# -- broker faults ------------------------------------------------------------------------------------


def broker_killed_mid_publish(work: Path, *, rounds: int = 1, crs: int = 4, ct_slices: int = 8) -> Outcome:
    """SIGKILL nats-server right after the first finding of a burst lands; restart it with its storage."""
    with rig(work) as r:
        r.start_daemon()
        r.watch()
        for n in range(rounds):
            burst = [r.cr() for _ in range(crs)] + [r.ct(ct_slices), r.ct(ct_slices)]
            seen = r.watcher.count() if r.watcher else 0
            what = f"burst {n + 1}"
            sender = threading.Thread(target=lambda b=burst, w=what: [_send(r, s, w) for s in b], daemon=True)
            sender.start()
            assert r.watcher is not None
            if not r.watcher.wait_count(seen + 1, FINDING_TIMEOUT_SECONDS):
                r.problems.append(f"burst {n + 1}: no finding published before the broker was to be killed")
            r.nats.stop(kill=True)
            sender.join(300)  # receiving does not need the broker
            r.nats.start()
            r.watch()
            r.settle(FINDING_TIMEOUT_SECONDS)
        later = r.cr("later CR")
        if _send(r, later, "after the broker came back"):
            _expect_finding(r, later, "a finding after the broker came back")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("broker killed mid-publish", "SIGKILL nats-server when the first finding of a burst lands; "
                        "restarted on its storage", rounds)
        return out


def broker_down_at_start(work: Path, *, crs: int = 3, ct_slices: int = 6) -> Outcome:
    """The broker is down when the daemon starts and while studies arrive (dcmtk storescu); then it comes up."""
    with rig(work, start_nats=False) as r:
        r.start_daemon()  # READY without a broker
        series = [r.cr() for _ in range(crs)] + [r.ct(ct_slices)]
        for items in series:
            left = dcmtk_store(r.daemon.dicom_port, items, r.ledger)
            if left:
                r.problems.append(f"storescu: {len(left)} instance(s) without Success while the broker was down")
        if not r.wait_scrape("edge_agent_outbox_pending", lambda v: v >= len(series), FINDING_TIMEOUT_SECONDS):
            r.problems.append(f"findings did not wait in the outbox while the broker was down "
                              f"(edge_agent_outbox_pending={r.scrape('edge_agent_outbox_pending')})")
        if r.scrape("edge_agent_broker_connected") != 0:
            r.problems.append("edge_agent_broker_connected is not 0 with no broker")
        r.nats.start()
        r.watch()
        r.settle(FINDING_TIMEOUT_SECONDS)
        later = r.cr("later CR")
        if _send(r, later, "after the broker came up"):
            _expect_finding(r, later, "a finding after the broker came up")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("broker down at start", "nats-server not running when the daemon starts and while "
                        f"{len(series)} series arrive by storescu; then started", 1)
        return out


def broker_down_past_duplicate_window(work: Path, *, window_seconds: float = 2.0) -> Outcome:
    """A publish the stream stored but whose PubAck was lost, then the broker out of reach past the duplicate window.

    The re-publish after the outage is outside the window, so the stream stores it again: a duplicate that no
    Nats-Msg-Id can prevent, counted here. Nothing may be lost, and later findings must not wait behind it.
    """
    nats_server = NatsServer(work / "nats")
    nats_server.start()
    proxy = FaultProxy(nats_server.port).start()
    make_stream(nats_server.url, duplicate_window=window_seconds)
    try:
        with rig(work, nats_server=nats_server, bus_url=proxy.url, start_nats=False,
                 **{"bus.duplicate_window_seconds": window_seconds,
                    "bus.republish_window_seconds": window_seconds}) as r:
            r.start_daemon()
            r.watch()
            first = r.cr("CR before")
            if _send(r, first, "before the fault"):
                _expect_finding(r, first, "before the fault")
            proxy.drop_replies()  # PubAcks are swallowed from here on
            ambiguous = r.cr("CR whose PubAck is lost")
            stored_at = time.monotonic()
            if _send(r, ambiguous, "the ambiguous one") and _expect_finding(r, ambiguous, "the ambiguous publish"):
                stored_at = time.monotonic()
            proxy.cut()  # the broker is gone, from the daemon's side
            during = r.cr("CR during the outage")
            _send(r, during, "during the outage")
            threading.Event().wait(max(0.0, stored_at + window_seconds + 1.5 - time.monotonic()))  # outlast the window
            proxy.restore()
            r.settle(FINDING_TIMEOUT_SECONDS)
            later = r.cr("later CR")
            if _send(r, later, "after the outage"):
                _expect_finding(r, later, "a finding after the outage")
            r.settle(FINDING_TIMEOUT_SECONDS)
            out = r.finish(
                "broker down longer than the duplicate window",
                f"TCP proxy swallows the PubAck of a stored finding, then refuses connections for longer than the "
                f"{window_seconds:.0f} s duplicate window",
                1,
                duplicate_ids_allowed=True,
            )
            copies = Counter(str(m.finding.get("series_instance_uid")) for m in stream_messages(nats_server.url))
            repeated = ", ".join(f"{r.names.get(uid, uid)} {n} times" for uid, n in copies.items() if n > 1)
            out.notes.append(f"in the stream more than once: {repeated or 'none'} (a re-publish after the duplicate "
                             "window is stored again: consumers de-duplicate by finding_id)")
            return out
    finally:
        proxy.close()


def stream_refuses_writes(work: Path) -> Outcome:
    """A stream refuses a finding too large for it (later ones must pass), then refuses everything; then fixed.

    The too-large finding is parked as rejected until an operator runs ``edge-agent requeue-rejected``.
    """
    nats_server = NatsServer(work / "nats")
    nats_server.start()
    make_stream(nats_server.url)
    with rig(work, nats_server=nats_server, start_nats=False) as r:
        r.start_daemon()
        r.watch()
        probe = r.cr("CR probe")
        if _send(r, probe, "the probe") and _expect_finding(r, probe, "the probe"):
            size = max(len(m.data) for m in stream_messages(nats_server.url))
            # A CR finding fits, a 30-slice CT's (30 SOP Instance UIDs) does not: one poison row in the outbox.
            update_stream(nats_server.url, max_msg_size=size + 400)
            r.notes.append(f"stream max_msg_size {size + 400} bytes (the probe's finding is {size})")
        big = r.ct(30, label="CT too large for the stream")
        rejected_before = r.scrape("edge_agent_outbox_rejected_rows") or 0.0
        if _send(r, big, "the large series") and not r.wait_scrape(
                "edge_agent_outbox_rejected_rows", lambda v: v > rejected_before, FINDING_TIMEOUT_SECONDS):
            r.problems.append("the finding too large for the stream was not parked as rejected")
        behind = [r.cr("CR behind the refused one") for _ in range(2)]
        for items in behind:
            if _send(r, items, "behind the refused one"):
                _expect_finding(r, items, "later findings blocked behind a refused one", timeout_seconds=30)
        # Now a stream that is full and discards new messages: everything is refused.
        count = len(stream_messages(nats_server.url))
        update_stream(nats_server.url, max_msgs=count, discard=DiscardPolicy.NEW)
        refused = r.cr("CR into a full stream")
        errors = r.scrape("edge_agent_publish_errors_total") or 0.0
        _send(r, refused, "into a full stream")
        if not r.wait_scrape("edge_agent_publish_errors_total", lambda v: v > errors, FINDING_TIMEOUT_SECONDS):
            r.notes.append("no publish error counted while the stream was full")
        update_stream(nats_server.url, max_msgs=-1, max_msg_size=-1)
        # The refused-for-good finding waits for an operator; the full stream's finding is retried on its own.
        requeue = subprocess.run(
            [sys.executable, "-m", "edge_agent", "requeue-rejected", "--config", str(r.daemon.config_path)],
            capture_output=True, text=True, timeout=60, check=False)
        if requeue.returncode != 0 or "queued again" not in requeue.stdout:
            said = (requeue.stdout + requeue.stderr)[-300:]
            r.problems.append(f"requeue-rejected: exit {requeue.returncode}: {said}")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("stream refuses writes", "max_msg_size below one finding (later ones must pass it), then "
                        "max_msgs reached with discard=new; then both lifted, the rejected finding re-queued", 2)
        return out


# -- disk faults ------------------------------------------------------------------------------------------


def _keeps_serving(r: Rig, what: str) -> None:
    later = r.cr(f"CR after {what}")
    if _send(r, later, f"after {what}"):
        _expect_finding(r, later, f"the daemon serving after {what}")
    code, _ = r.daemon.http("/healthz") if r.alive else (0, "")
    if code != 200:
        r.problems.append(f"/healthz answered {code} after {what}")


def _says(r: Rig, since: int, what: str, phrases: tuple[str, ...], timeout_seconds: float = 30.0) -> None:
    line = r.wait_said(since, phrases, timeout_seconds)
    if line is None and r.alive:
        code, body = r.daemon.http("/readyz")
        if code == 200 or not any(p.lower() in body.lower() for p in phrases):
            r.problems.append(f"{what}: no WARNING/ERROR log line (or /readyz reason) says it "
                              f"(looked for {', '.join(phrases)})")
    elif line is not None:
        r.notes.append(f"says: {line.split(' ', 2)[-1][:160]}")


def disk_full_mid_write(work: Path, *, free_mib: int = 3) -> Outcome:
    """The state file system fills up while a 7 MB radiograph is being written (ENOSPC mid-write)."""
    with tmpfs("64m") as disk, rig(work, state_dir=str(disk / "state"), **{"spool.min_free_bytes": 1 << 20}) as r:
        r.start_daemon()
        r.watch()
        before = r.ct(5)
        if _send(r, before, "before the disk filled"):
            _expect_finding(r, before, "before the disk filled")
        fill(disk, leave_bytes=free_mib << 20)  # above the 1 MiB watermark, below one CR
        since = r.log_offset()
        cr = r.cr("CR that does not fit")
        # A modality waits a while for the response, then gives up on the association and keeps the study.
        _, answered = r.scu(dimse_timeout_seconds=10).store(cr)
        status = answered[0][1] if answered else None
        if status is not None and is_success(status):
            r.notes.append("the radiograph that could not fit got Success")
        else:
            r.notes.append(f"the radiograph that could not fit got {'no response' if status is None else hex(status)}")
        _says(r, since, "ENOSPC mid-write", ("No space left", "ENOSPC", "is full", "disk full", "free space"))
        leftovers = [p for p in (disk / "state" / "spool" / "tmp").glob("*") if p.is_file()]
        st = os.statvfs(disk)
        r.notes.append(f"after the failed transfer: {st.f_bavail * st.f_frsize} bytes free, spool/tmp holds "
                       f"{len(leftovers)} file(s) of {sum(p.stat().st_size for p in leftovers)} bytes")
        small = r.ct(5, label="CT while the disk is nearly full")
        # A healthy daemon answers at once (Success, or 0xA700 while it has no room): retry for 20 s, not longer.
        if _send(r, small, "while the disk is nearly full", timeout_seconds=20):
            _expect_finding(r, small, "a small series while the disk is nearly full")
        (disk / "filler").unlink()
        if _send(r, cr, "after space was freed"):  # the modality re-sends it
            _expect_finding(r, cr, "the radiograph re-sent after space was freed")
        _keeps_serving(r, "the disk filled up")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("disk full mid-write", f"tmpfs filled to {free_mib} MiB free (above the watermark) while a "
                        "7 MB CR arrives; then freed", 1)
        return out


def unremovable_spool_file(work: Path, *, retain_seconds: float = 2.0) -> Outcome:
    """A released series' spool files cannot be removed (chattr +i): housekeeping fails, the daemon goes on."""
    with rig(work, **{"spool.retain_seconds": retain_seconds}) as r:
        r.start_daemon()
        r.watch()
        ct = r.ct(5)
        if _send(r, ct, "the series") and _expect_finding(r, ct, "the series"):
            files = sorted((work / "state" / "spool" / "instances").rglob("*.dcm"))
            since = r.log_offset()
            with immutable(*files):
                _says(r, since, "a spool file it cannot remove", ("Operation not permitted", "EPERM"),
                      timeout_seconds=retain_seconds + 30)
                r.check_alive("after failing to remove a spool file")
                if r.alive:
                    _keeps_serving(r, "a spool file could not be removed")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("unremovable spool file", f"chattr +i on a series' spool files before its release "
                        f"(retain_seconds {retain_seconds:.0f})", 1)
        return out


def read_only_heatmaps(work: Path) -> Outcome:
    """The heat-map folder is a read-only mount holding an expired PNG: no PNG can be written or swept."""
    heatmaps = work / "state" / "heatmaps"
    heatmaps.mkdir(parents=True)
    expired = heatmaps / f"{'0' * 64}.png"
    expired.write_bytes(b"\x89PNG\r\n\x1a\n")
    old = time.time() - 90 * 86_400
    os.utime(expired, (old, old))
    with read_only_bind(heatmaps), rig(work, **{"heatmaps.retain_days": 30}) as r:
        r.start_daemon()
        r.watch()
        since = 0
        for n in range(2):
            cr = r.cr(f"CR {n + 1} with a read-only heat-map folder")
            if _send(r, cr, "with a read-only heat-map folder") and _expect_finding(r, cr, "with read-only heat maps"):
                for f in r.watcher.findings(cr[0].series_uid) if r.watcher else []:
                    image = (f.get("heatmap") or {}).get("image")
                    if image is not None and not (work / "state" / image).exists():
                        r.problems.append(f"a finding references heat map {image}, which was never written")
        _says(r, since, "a read-only heat-map folder", ("Read-only file system", "EROFS"))
        r.check_alive("with a read-only heat-map folder")
        if r.alive:
            _keeps_serving(r, "heat maps could not be written or swept")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("read-only heat-map folder", "state/heatmaps bind-mounted read-only, with an expired PNG for "
                        "the sweep", 1)
        return out


# -- revisions: late instances and identical re-sends ------------------------------------------------------


def late_and_resend(work: Path, *, slices: int = 6) -> Outcome:
    """A late slice makes revision 1 covering every slice; an identical re-send, before or after, changes nothing."""
    with rig(work, **{"spool.retain_seconds": 86_400, "routes.1.quiet_seconds": CT_QUIET_SECONDS}) as r:
        r.start_daemon()
        r.watch()
        items = r.ct(slices + 1)
        first, late = items[:slices], items[slices:]
        if not (_send(r, first, "the series") and _expect_finding(r, first, "the series")):
            return r.finish("late instance and identical re-sends", "", 0)
        _send(r, [first[2]], "an identical re-send of a finished series")
        _barrier(r, "after the identical re-send")
        _send(r, late, "the late slice")
        if r.wait_finding(first, FINDING_TIMEOUT_SECONDS, revisions=2):
            _send(r, late, "an identical re-send of the late slice")
            _barrier(r, "after re-sending the late slice")
        else:
            r.problems.append("the late slice made no new revision")
        r.settle(FINDING_TIMEOUT_SECONDS)
        out = r.finish("late instance and identical re-sends", "one slice sent after the series' finding; identical "
                        "re-sends of a slice before and after it", 3, latest_revision={first[0].series_uid: 1})
        return out


def _barrier(r: Rig, what: str) -> None:
    """Let whatever the last send set off finish: another series' finding, then an idle daemon."""
    marker = r.cr(f"barrier CR {what}")
    if _send(r, marker, what):
        _expect_finding(r, marker, f"barrier {what}")
    r.settle(FINDING_TIMEOUT_SECONDS)


SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "sigkill": sigkill,
    "sigterm-slow-engine": sigterm_slow_engine,
    "sigterm-hung-engine-in-call": functools.partial(sigterm_hung_engine, overdue=False),
    "sigterm-hung-engine-overdue": functools.partial(sigterm_hung_engine, overdue=True),
    "late-and-resend": late_and_resend,
    "broker-killed": broker_killed_mid_publish,
    "broker-down-at-start": broker_down_at_start,
    "broker-down-past-window": broker_down_past_duplicate_window,
    "stream-refuses": stream_refuses_writes,
    "disk-full": disk_full_mid_write,
    "unremovable-spool-file": unremovable_spool_file,
    "read-only-heatmaps": read_only_heatmaps,
}
