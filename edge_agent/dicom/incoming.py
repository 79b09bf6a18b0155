"""One instance on its way in, and the commit that makes it durable before its Success.

Durability: a Success is answered only once the instance's data is fsynced, its name is in a fsynced
directory and its journal row is committed (PS3.4 Annex B.2.3). Instances that finish arriving
together, on any association, are committed together: one directory fsync and one journal commit per
group (``Committer``). What can be done before a Success is needed is done as the bytes arrive
(``Incoming``): the content's digest, the start of the data's writeback. The journal commit does not
wait for its own fsync: the spool file, named with a digest of its content, is the record of truth,
and after a power cut the daemon records again the files whose rows were lost (journal.py,
``Housekeeping.adopt_at_start``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edge_agent.dicom import digest, status, wholeness
from edge_agent.dicom.header import InstanceMeta, check_request, read_meta, read_meta_head
from edge_agent.dicom.spool import Spool, ToPlace, start_writeback
from edge_agent.errors import DecodeError, EdgeAgentError
from edge_agent.journal import Journal, Recorded
from edge_agent.logs import RepeatedLog

logger = logging.getLogger(__name__)
_mismatch = RepeatedLog(logger)  # once a minute, however many such instances a PACS forwards

# How much of each dataset's start is kept in memory to read the header without reading the file again.
_HEAD_BYTES = 256 * 1024
_INFLATE_STEP = 1 << 20
# Writeback of a dataset being received is started every this many bytes, and at its end.
_WRITEBACK_BYTES = 1 << 20

_IMPLICIT, _BIG_ENDIAN = str(ImplicitVRLittleEndian), str(ExplicitVRBigEndian)

CANNOT_UNDERSTAND = status.Answer(status.CANNOT_UNDERSTAND, status.OUTCOME_CANNOT_UNDERSTAND)


@dataclass
class Incoming:
    """A C-STORE being received: its temp file, or the answer it will get without one."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    calling_aet: str
    called_aet: str
    max_bytes: int
    refused: status.Answer | None = None
    refusal: str = ""
    path: Path | None = None
    fd: int = -1
    capacity: int = 0  # the file's size when taken: a slot's (spool.py), written over in place, or 0
    size: int = 0  # dataset bytes received (as sent, deflated or not)
    meta_bytes: int = 0  # the preamble and File Meta written before them
    head: bytearray = field(default_factory=bytearray)
    inflater: Any = None
    inflated: int = 0
    started: float = field(default_factory=time.perf_counter)
    # The dataset's digest (as received, deflated or not; digest.py), taken as the bytes arrive: the sender is
    # busy sending the next fragment meanwhile, and the file is never read back.
    hasher: Any = field(default_factory=digest.hasher)
    unflushed: int = 0  # bytes written since the last writeback was started

    def write(self, chunk: memoryview) -> None:
        if self.refused is not None:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.refuse(status.SPOOL_FULL, f"the dataset is larger than dicom.max_dataset_bytes ({self.max_bytes})")
            return
        if self.inflater is not None:
            self._inflate(chunk)
        elif len(self.head) < _HEAD_BYTES:
            self.head += chunk[: _HEAD_BYTES - len(self.head)]
        self.hasher.update(chunk)
        try:
            view = chunk
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.refuse(status.SPOOL_FULL if full else status.RECEIVE_FAILED,
                        f"writing it to the spool failed ({os.strerror(exc.errno or 0)})")
            return
        self.unflushed += len(chunk)
        if self.unflushed >= _WRITEBACK_BYTES:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Start writing what was received to the disk now, so that the fsync behind Success finds less to do."""
        if self.fd >= 0 and self.unflushed:
            self.unflushed = 0
            start_writeback(self.fd)

    def _inflate(self, chunk: memoryview) -> None:
        # Inflated in steps of 1 MiB: a small Deflated dataset that inflates to gigabytes is counted, and
        # refused, without ever holding more than one step of it.
        data: bytes = bytes(chunk)
        try:
            while data and self.refused is None:
                out = self.inflater.decompress(data, _INFLATE_STEP)
                self.inflated += len(out)
                if len(self.head) < _HEAD_BYTES:
                    self.head += out[: _HEAD_BYTES - len(self.head)]
                if self.inflated > self.max_bytes:
                    self.refuse(status.SPOOL_FULL, "the Deflated dataset inflates past dicom.max_dataset_bytes "
                                f"({self.max_bytes})")
                data = self.inflater.unconsumed_tail
        except zlib.error:
            self.refuse(CANNOT_UNDERSTAND, "the Deflated dataset does not inflate")

    def refuse(self, answer: status.Answer, why: str) -> None:
        if self.refused is None:
            self.refused, self.refusal = answer, why
            self.discard()

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


@dataclass
class Result:
    answer: status.Answer
    meta: InstanceMeta | None = None
    recorded: Recorded | None = None


class Committer:
    """Makes finished instances durable in groups, in two stages on two threads (see the module docstring).

    Stage one reads each header, renames the group into the spool and fsyncs the files and the folder at once;
    stage two records the group in the journal (one commit). A group enters stage two only after its own
    fsyncs, so the journal never names a file that is not on disk; meanwhile the next group is in stage one.
    Each stage takes everything waiting for it as its next group. The threads are plain threads fed by
    queues, and the answers go back with one ``call_soon_threadsafe`` per group: a hop through the event
    loop costs as much as a journal commit here.
    """

    def __init__(self, spool: Spool, journal: Journal) -> None:
        self._spool = spool
        self._journal = journal
        self._to_place: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._to_record: queue.SimpleQueue[_Placed | None] = queue.SimpleQueue()
        self._pending: set[asyncio.Future[Result]] = set()
        self._threads: list[threading.Thread] = []

    def submit(self, store: Incoming) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Result] = loop.create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._stage, name="dicom-place", daemon=True,
                                 args=(self._to_place, self._place_group, lambda: self._to_record.put(None))),
                threading.Thread(target=self._stage, name="dicom-journal", daemon=True,
                                 args=(self._to_record, self._record_group, lambda: None))]
            for t in self._threads:
                t.start()
        self._to_place.put(_Waiting(store, fut))
        return fut

    def commit_now(self, store: Incoming) -> Result:
        """Both stages for one instance, on the calling thread; only while ``idle_now``."""
        try:
            ready, results, names = self._place([store])
            self._record([store], ready, results, names)
        except Exception as exc:  # both stages answer their own failures; this is a last resort
            return Result(status.answer_for(exc))
        return results[0] or Result(status.RECEIVE_FAILED)

    def idle_now(self) -> bool:
        """Nothing submitted is waiting for its answer (so nothing is ahead of a new instance in the journal)."""
        return not self._pending

    async def idle(self) -> None:
        """Wait until every instance submitted so far has its answer."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    def close(self) -> None:
        threads, self._threads = self._threads, []
        if threads:
            self._to_place.put(None)
            for t in threads:
                t.join()

    @staticmethod
    def _stage(inbox: queue.SimpleQueue[Any], work: Callable[[list[Any]], None], after: Callable[[], None]) -> None:
        """One stage's thread: take everything waiting as one group, until the ``None`` that ends it."""
        stopping = False
        while not stopping:
            group: list[Any] = []
            item = inbox.get()
            while True:
                if item is None:
                    stopping = True
                    break
                group.append(item)
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
            if group:
                work(group)
        after()

    def _place_group(self, items: list[_Waiting]) -> None:
        try:
            ready, results, names = self._place([w.store for w in items])
        except BaseException as exc:  # _place is total; this is a last resort so that no sender hangs
            _answer_all(items, [Result(status.answer_for(exc))] * len(items))
            return
        self._to_record.put(_Placed(items, ready, results, names))

    def _record_group(self, placed: list[_Placed]) -> None:
        for p in placed:
            try:
                self._record([w.store for w in p.items], p.ready, p.results, p.names)
                results = p.results
            except BaseException as exc:  # _record answers its own failures; this is a last resort
                results = [r if r is not None else Result(status.answer_for(exc)) for r in p.results]
            _answer_all(p.items, [r if r is not None else Result(status.RECEIVE_FAILED) for r in results])

    def _place(self, group: list[Incoming]) -> tuple[list[tuple[int, InstanceMeta]], list[Result | None], list[str]]:
        """Stage one: read headers, place and fsync the group. Total: nothing raises."""
        results: list[Result | None] = [None] * len(group)
        ready: list[tuple[int, InstanceMeta]] = []
        for i, st in enumerate(group):
            try:
                _check_whole(st)
                meta = _read_meta(st)
                if not check_request(meta, st.sop_class, st.sop_instance):
                    _mismatch.warning("instance", "a dataset names another SOP Instance UID than its C-STORE request "
                                      "(from a File Meta that disagrees with its dataset, mostly); stored and "
                                      "journalled as the dataset says")
                ready.append((i, meta))
            except Exception as exc:
                results[i] = _refused(st, exc)
        names: list[str] = []
        if ready:
            try:
                names = self._spool.place([
                    ToPlace(group[i].path, group[i].fd, meta.content_digest,  # type: ignore[arg-type]
                            group[i].meta_bytes + group[i].size, group[i].capacity, group[i].transfer_syntax)
                    for i, meta in ready])
            except Exception as exc:
                for i, _ in ready:
                    results[i] = _refused(group[i], exc)
                ready = []
            for i, _ in ready:
                st = group[i]
                st.path = None  # renamed: it is the spool's now
                with contextlib.suppress(OSError):
                    os.close(st.fd)
                st.fd = -1
        return ready, results, names

    def _record(self, group: list[Incoming], ready: list[tuple[int, InstanceMeta]], results: list[Result | None],
                names: list[str]) -> None:
        """Stage two: one journal commit for the group's placed instances; fills in ``results``."""
        if not ready:
            return
        try:
            recorded = self._journal.record_instances(
                [(meta, name, group[i].meta_bytes + group[i].size) for (i, meta), name in
                 zip(ready, names, strict=True)], durable=False)
        except Exception as exc:
            for (i, _), name in zip(ready, names, strict=True):
                self._remove(name, "an unjournalled spool file")
                results[i] = _refused(group[i], exc)
            return
        for (i, meta), rec in zip(ready, recorded, strict=True):
            if rec.identical:
                # The same content as the instance held (a lost C-STORE-RSP, a PACS re-send): acknowledged,
                # and nothing changes (issue 8, defect 2). The new copy is not referenced.
                self._remove(rec.spool_name, "an unreferenced re-sent copy")
                results[i] = Result(status.STORED_DUPLICATE, meta, rec)
                continue
            if rec.replaced_spool_name is not None:
                self._remove(rec.replaced_spool_name, "a replaced spool file")
            results[i] = Result(status.STORED_REPLACED if rec.replaced_spool_name else status.STORED, meta, rec)

    def _remove(self, name: str, what: str) -> None:
        try:
            self._spool.remove(name)
        except OSError as exc:
            # Harmless: the orphan sweep at the next start removes it.
            logger.warning("cannot remove %s: %s", what, exc.strerror)


@dataclass
class _Waiting:
    store: Incoming
    future: asyncio.Future[Result]  # on the receiver's loop


@dataclass
class _Placed:
    items: list[_Waiting]
    ready: list[tuple[int, InstanceMeta]]
    results: list[Result | None]
    names: list[str]


def _answer_all(items: list[_Waiting], results: list[Result]) -> None:
    """From a committer thread: settle the group's futures on the receiver's loop, in one hop."""
    pairs = [(w.future, r) for w, r in zip(items, results, strict=True)]
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these any more
        items[0].future.get_loop().call_soon_threadsafe(_settle, pairs)


def _settle(pairs: list[tuple[asyncio.Future[Result], Result]]) -> None:
    for fut, result in pairs:
        if not fut.done():
            fut.set_result(result)


def _read_meta(st: Incoming) -> InstanceMeta:
    assert st.path is not None
    content = digest.finish(st.hasher)
    whole = (st.inflated if st.inflater is not None else st.size) <= len(st.head)
    syntax = ExplicitVRLittleEndian if st.inflater is not None else st.transfer_syntax
    meta = read_meta_head(bytes(st.head), syntax, st.calling_aet, st.called_aet, content, whole=whole)
    if meta is None:
        meta = read_meta(st.path, st.calling_aet, st.called_aet, content)
    if st.inflater is not None:
        meta = InstanceMeta(**{**meta.__dict__, "transfer_syntax_uid": st.transfer_syntax})
    return meta


class _DatasetBytes:
    """``wholeness.Read`` over an instance being committed: its kept head, else its temp file (opened to read only
    if the walk goes past the head), never past the dataset's end (a slot's padding follows it)."""

    def __init__(self, st: Incoming) -> None:
        self._st, self._head, self._fd = st, st.head, -1

    def __call__(self, pos: int, count: int) -> bytes:
        count = max(0, min(count, self._st.size - pos))
        if pos + count <= len(self._head):
            return bytes(self._head[pos : pos + count])
        if self._fd < 0:
            assert self._st.path is not None
            self._fd = os.open(self._st.path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(self._fd, count, self._st.meta_bytes + pos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _check_whole(st: Incoming) -> None:
    """DecodeError when the dataset ends inside an element (wholeness.py). A Deflated one was checked as it
    arrived: its deflate stream must end (scp.py)."""
    if st.inflater is not None:
        return
    read = _DatasetBytes(st)
    try:
        short = wholeness.cut_short(read, st.size, st.head, explicit=st.transfer_syntax != _IMPLICIT,
                                    little=st.transfer_syntax != _BIG_ENDIAN)
    finally:
        read.close()
    if short:
        raise DecodeError("the dataset ends inside an element: its last fragment came before the element's end")


def _refused(st: Incoming, exc: BaseException) -> Result:
    st.discard()
    answer = status.answer_for(exc)
    logger.warning("instance refused with 0x%04X: %s", answer.status, describe(exc))
    return Result(answer)


def describe(exc: BaseException) -> str:
    """Our own errors carry messages written without patient data; others are named by type only."""
    if isinstance(exc, EdgeAgentError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__

