"""Housekeeping: spool retention, the heat-map sweep, orphaned spool files, journal pruning, gauges.

One owner, ticked by the agent's main loop in a thread (disk and database work must not hold up the
event loop). Each step catches, counts (``edge_agent_housekeeping_errors_total{step}``) and logs its
own errors, and the daemon goes on: a file that cannot be removed or a database error here is an
operator's matter, and a restart would only start into the same state until systemd gives up.

Logs carry error kinds and counts only, never paths or names of spool files (spool names are random,
but they still lead to a patient's images).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.config import AgentConfig, Retention
from edge_agent.dicom.header import file_digest, read_stored_meta, stored_size
from edge_agent.dicom.spool import Spool
from edge_agent.errors import DecodeError
from edge_agent.journal import Journal
from edge_agent.logs import RepeatedLog
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

RELEASE = "release"
HEATMAPS = "heatmaps"
ORPHANS = "orphans"
PRUNE = "prune"
GAUGES = "gauges"

# Heat maps are kept for days, and orphans and prunable rows are rare: listing folders or deleting rows
# every tick would be wasted work.
HEATMAP_SWEEP_SECONDS = 600.0
ORPHAN_SWEEP_SECONDS = 3600.0
PRUNE_SECONDS = 3600.0
# While the daemon runs, a spool file younger than this may be an instance being received right now,
# whose journal row is not committed yet: the periodic sweep leaves it alone.
ORPHAN_MIN_AGE_SECONDS = 3600.0
# A step that fails every tick would otherwise log a line a second for as long as the fault lasts.
REPEAT_LOG_SECONDS = 600.0
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class StepError:
    """The last error of one step, for /status: when (Unix time) and what kind (no paths)."""

    at: float
    error: str


def describe_error(exc: BaseException) -> str:
    """The kind of an error, for logs and /status: an OSError's file names are left out."""
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
        parts = [type(exc).__name__, f"[{code}]" if code else "", exc.strerror or ""]
        return " ".join(p for p in parts if p)
    text = str(exc).strip()[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Housekeeping:
    """Runs the housekeeping steps; call :meth:`tick` from a thread once per main-loop tick."""

    def __init__(self, config: AgentConfig, journal: Journal, spool: Spool, metrics: Metrics) -> None:
        self._config = config
        self._journal = journal
        self._spool = spool
        self._metrics = metrics
        self._heatmap_dir = config.state_dir / "heatmaps"
        # The last error of each step that failed since start; a later success does not clear it.
        self.last_errors: dict[str, StepError] = {}
        now = time.monotonic()
        # The start-up sweep (remove_orphans_at_start) covers the first hour.
        self._next_run = {HEATMAPS: now, ORPHANS: now + ORPHAN_SWEEP_SECONDS, PRUNE: now}
        self._repeated = RepeatedLog(logger, REPEAT_LOG_SECONDS)
        self._unlogged: dict[str, int] = {}
        # The main loop's tick and an acknowledgement (retain_seconds 0) may both release at once.
        self._release_lock = threading.Lock()

    # -- what the agent calls ---------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Run the steps that are due at ``now`` (monotonic). Never raises: each step counts its own errors."""
        self.release_due()
        now = time.monotonic() if now is None else now
        periodic: tuple[tuple[str, float, Callable[[], None]], ...] = (
            (HEATMAPS, HEATMAP_SWEEP_SECONDS, self._remove_old_heatmaps),
            (ORPHANS, ORPHAN_SWEEP_SECONDS, lambda: self._remove_orphans(ORPHAN_MIN_AGE_SECONDS)),
            (PRUNE, PRUNE_SECONDS, self._prune),
        )
        for step, every_seconds, run in periodic:
            if now >= self._next_run[step]:
                # Scheduled before it runs: a step that fails waits its interval like one that succeeds.
                self._next_run[step] = now + every_seconds
                self._run(step, run)
        self.update_gauges()

    def update_gauges(self) -> None:
        """Outbox and spool gauges from the journal and the file system."""
        self._run(GAUGES, self._update_gauges)

    def release_due(self) -> None:
        """Delete the spool files of series whose finding was acknowledged longer ago than the retention."""
        self._run(RELEASE, self._release)

    def remove_orphans_at_start(self) -> None:
        """Before the receiver starts, every unreferenced spool file is one no sender was told is stored
        (after an unclean stop, once ``adopt_at_start`` has recorded the files whose rows were lost)."""
        self._run(ORPHANS, lambda: self._remove_orphans(0.0))

    def put_back_at_start(self) -> int:
        """Before adoption and the orphan sweep, at every start: put the files written over slots whose renames
        were lost back under their names; returns how many.

        Such a file (spool.py) was found in tmp/ or free/ with its mark; it is put back under the name its mark
        gives when its content matches that name, and its journal row, if the row was kept, names it so (if not,
        adoption records it with the rest). One that does not match was never acknowledged (its flush had not
        finished) and is removed. At every start, not only after an unclean one: on a file system where an
        fsync does not carry other files' renames, a clean stop does not make them durable either. An error
        reading or moving one is raised: the orphan sweep would delete it from tmp/.
        """
        put_back = 0
        for path, name in self._spool.misplaced():
            try:
                matches = Spool.name_matches(name, file_digest(path))
            except (DecodeError, ValueError):
                matches = False
            if not matches:
                path.unlink(missing_ok=True)
            elif self._spool.put_back(path, name):
                put_back += 1
        if put_back:
            logger.warning("%d stored instance(s) found outside the spool's folders (their renames lost) put back",
                           put_back)
        return put_back

    def adopt_at_start(self) -> int:
        """After an unclean stop, record again the stored files whose journal commit was lost; returns how many.

        The receiver commits its rows without an fsync of their own (journal.py): a power cut may lose the
        last ones, although their files were fsynced and acknowledged. Such a file is one no row knows, not
        placed before the last prune's cut-off (``Journal.adoption_rules``), whose content matches the digest in
        its name; it is recorded as it arrived, with its AE titles from its File Meta and its modification time
        as its arrival, in the order they were written (two files of one re-sent instance: the newer replaces
        the older, as it did when it arrived). A file that
        does not match was never acknowledged (its fsync had not finished): the orphan sweep removes it. A
        journal error here is raised: sweeping orphans without adopting first would delete acknowledged
        instances. Call ``put_back_at_start`` first.
        """
        known, cutoff = self._journal.adoption_rules()
        adopted = unmatched = 0
        for name in self._spool.adoptable(known, cutoff):
            path = self._spool.path(name)
            try:
                digest = file_digest(path)
                # A file placed before the digests were BLAKE3 carries a SHA-256 in its name (dicom/digest.py);
                # it is recorded with the BLAKE3 digest, which a re-send of it is then compared by.
                if not (Spool.name_matches(name, digest)
                        or Spool.name_matches(name, file_digest(path, legacy_sha256=True))):
                    unmatched += 1
                    continue
                meta = read_stored_meta(path, digest)
                st = path.stat()
                size = stored_size(path)
            except (OSError, DecodeError):
                unmatched += 1
                continue
            rec = self._journal.record_instances([(meta, name, size)], now=st.st_mtime)[0]
            adopted += 1
            for gone in (rec.spool_name if rec.identical else None, rec.replaced_spool_name):
                if gone is not None:
                    self._run(ORPHANS, functools.partial(self._spool.remove, gone))
        if adopted or unmatched:
            logger.warning("unclean stop: %d stored instance(s) whose journal rows were lost recorded again from "
                           "the spool; %d unrecorded spool file(s) incomplete or unreadable, left for the orphan "
                           "sweep", adopted, unmatched)
        return adopted

    # -- the steps --------------------------------------------------------------------------------

    def _release(self) -> None:
        spool = self._config.spool
        if spool.retention != Retention.DELETE:
            return
        with self._release_lock:
            # The journal records the release first, one transaction per series; the files go after. A crash
            # in between, or a file that cannot be removed, leaves an orphan for the orphan sweep: never a
            # journal row pointing at a file that is gone.
            claimed = self._journal.claim_releasable(time.time() - spool.retain_seconds)
            for _series_id, names in claimed:
                for exc in self._spool.release_all(names):
                    self._failed(RELEASE, exc)

    def _remove_old_heatmaps(self) -> None:
        if not os.path.lexists(self._heatmap_dir):
            return  # none written yet
        cutoff = time.time() - self._config.heatmaps.retain_days * SECONDS_PER_DAY
        # scandir, not is_dir(): a heatmaps path that is not a folder is a fault to count, not to skip.
        with os.scandir(self._heatmap_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(".png"):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._failed(HEATMAPS, exc)

    def _remove_orphans(self, min_age_seconds: float) -> None:
        """Spool files no journal row references: never acknowledged, or released but not deleted."""
        orphans = self._spool.orphans(self._journal.referenced_spool_names(), min_age_seconds)
        removed = 0
        for name in orphans:
            try:
                self._spool.remove(name)
            except (OSError, ValueError) as exc:
                self._failed(ORPHANS, exc)
            else:
                removed += 1
        # Replaced files are named in dead_files until their deletion is seen (journal.py).
        self._journal.forget_dead([n for n in self._journal.dead_spool_names() if not self._spool.path(n).exists()])
        if removed:
            logger.info("removed %d spool files that no journal row references", removed)

    def _prune(self) -> None:
        older_than = time.time() - self._config.journal.prune_after_days * SECONDS_PER_DAY
        counts = self._journal.prune(older_than)
        if any(counts.values()):
            logger.info(
                "journal pruned: %s", ", ".join(f"{n} {table}" for table, n in sorted(counts.items()) if n)
            )

    def _update_gauges(self) -> None:
        counts = self._journal.counts()
        self._metrics.outbox_pending.set(counts.outbox_pending)
        self._metrics.outbox_rejected_rows.set(counts.outbox_rejected)
        self._metrics.spool_bytes.set(counts.spool_bytes)
        self._metrics.spool_free_bytes.set(self._spool.free_bytes())
        self._metrics.spool_slots.set(self._spool.slots()[0])

    # -- errors -----------------------------------------------------------------------------------

    def _run(self, step: str, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as exc:
            self._failed(step, exc)

    def _failed(self, step: str, exc: BaseException) -> None:
        self._metrics.housekeeping_errors.labels(step=step).inc()
        kind = describe_error(exc)
        self.last_errors[step] = StepError(time.time(), kind)
        if not self._repeated.due(step):
            self._unlogged[step] = self._unlogged.get(step, 0) + 1
            logger.debug("housekeeping step %s failed: %s", step, kind)
            return
        more = self._unlogged.pop(step, 0)
        logger.error(
            "housekeeping step %s failed: %s (%d more failures of this step since the last report; the daemon "
            "goes on, edge_agent_housekeeping_errors_total counts them)",
            step,
            kind,
            more,
        )
