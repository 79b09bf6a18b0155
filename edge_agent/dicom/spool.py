"""The spool: received DICOM files, held on disk until their finding is acknowledged.

Layout: ``root/instances/<yyyymmdd>/<32 hex>.dcm``, ``root/tmp`` for incoming temp files, and ``root/free`` for
files kept ready to become temp files (``open_incoming``, ``release``, ``refill``): empty ones (``.free``) and
released instances' files kept whole, zeroed, as slots (``.slot``) for instances to be written over in place. A
spool name is the path relative to ``root/instances`` ("20261126/3f2a...dcm"). Names are never derived from a
UID: UIDs come from the peer and must not choose paths. A received instance's name is 16 random hex digits
and then the first 16 of its content's digest (``place``, digest.py): after a power cut, a file whose journal row was
lost can show that it is whole (``adoptable``, ``name_matches``) and be recorded again.

Written over in place, a slot keeps its size and blocks, so the fdatasync behind a Success carries the data and
nothing of the file system's own (no new blocks, size or name to commit; 0.5 against 0.9 ms for a CT slice on
the development machine, and concurrent flushes no longer ride in one another's journal commits). Its name in
instances/ is then not fsynced: the file says it instead. The 128-byte preamble of the Part 10 file, which
PS3.10 7.1 leaves to the application, holds a mark (``held_mark``): the end of the instance's bytes and its
spool name; what follows the end, to the slot's size, is Data Set Trailing Padding (FFFC,FFFC), so the file
stays one valid DICOM file. After a power cut, a marked file found in tmp/ or free/ whose content matches the
name in its mark is put back under that name (``misplaced``, ``put_back``). A release clears the mark, and
makes that durable, before the file leaves instances/; the rest of its zeroing is not flushed, so every start
empties the unmarked slots (``_keep_free_files``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from edge_agent.dicom.digest import name_part
from edge_agent.errors import EdgeAgentError

logger = logging.getLogger(__name__)

# A stored file, a half-written copy of one (left by a crash), or a file in the temp directory.
_NAME = re.compile(r"^(?:\d{8}/[0-9a-f]{32}\.dcm|\d{8}/\.[0-9a-f]{32}\.part|tmp/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")
_STORED = re.compile(r"^[0-9a-f]{32}\.dcm$")
_STORED_NAME = re.compile(r"^\d{8}/[0-9a-f]{32}\.dcm$")
_PARTIAL = re.compile(r"^\.[0-9a-f]{32}\.part$")
_DAY = re.compile(r"^\d{8}$")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_COPY_CHUNK_BYTES = 1 << 20
# fsyncs in flight at once when a group of received instances is placed.
_SYNC_THREADS = 8
# Released files zeroed and flushed at once (``release_all``).
_RELEASE_THREADS = 4
# Empty files kept in ``free/`` for instances to come. Making a file is a search of the inode tables, and a
# costly one on some file systems: 0.56-0.75 ms of CPU per file on the ext4 (without a journal) of the machine
# where bench/ingest.py runs, more than a 0.5 MB CT slice's SHA-256, against 0.03 ms to take a kept one. A CT
# study of up to a thousand slices arrives without one file made; empty, they hold an inode each and no data.
FREE_FILES = 1024
# A receiver process whose free files ran out looks in free/ again at most this often.
_RESCAN_SECONDS = 1.0
# With receiver processes, the daemon counts the slots they left in free/ at most this often while idle.
_SLOT_COUNT_SECONDS = 10.0
# Released files kept as slots: at most this many bytes in all (counted as free space: ``free_bytes``), none
# larger than _SLOT_LARGEST, each zeroed and rounded up to a multiple of _SLOT_ROUND (room for the trailing
# padding of a slightly larger instance of the same series).
SLOT_BYTES = 1 << 30
_SLOT_LARGEST = 64 << 20
_SLOT_ROUND = 64 * 1024
_ZEROS = bytes(1 << 20)
# The mark in the preamble of a file written over a slot: magic, the end of the instance's bytes (8 bytes,
# little endian), its spool name (ASCII, NUL-padded).
_MARK_MAGIC = b"edge-agent held\0"
_PREAMBLE_BYTES = 128
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Syntaxes after whose dataset no plain element can follow: Big Endian and the deflated ones.
_NO_PADDING = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})


class SpoolFullError(EdgeAgentError, OSError):
    """The spool's file system has no room for another instance."""


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return, unused-ignore]


_sync_file_range = _load_sync_file_range() if sys.platform == "linux" else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to the disk, without waiting for them.

    Only a head start for the fdatasync that follows (Linux ``sync_file_range``; nothing elsewhere): it
    promises nothing, and a failure here is found by that fdatasync.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def held_mark(end: int, name: str) -> bytes:
    """The preamble of a file written over a slot: its instance ends at ``end`` and is named ``name``."""
    return (_MARK_MAGIC + struct.pack("<Q", end) + name.encode("ascii")).ljust(_PREAMBLE_BYTES, b"\0")


def read_mark(head: bytes) -> tuple[int, str] | None:
    """``(end, spool name)`` from a file's first bytes when its preamble holds a mark, else None."""
    if len(head) < _PREAMBLE_BYTES or not head.startswith(_MARK_MAGIC):
        return None
    n = len(_MARK_MAGIC)
    (end,) = struct.unpack_from("<Q", head, n)
    name = head[n + 8:_PREAMBLE_BYTES].rstrip(b"\0").decode("ascii", "replace")
    if not _STORED_NAME.fullmatch(name) or end < _PREAMBLE_BYTES:
        return None
    return end, name


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``: a write cut short (a full disk) is taken up again, so that the
    error, if any, is raised."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _zero(fd: int, start: int, end: int) -> None:
    for off in range(start, end, len(_ZEROS)):
        _pwrite_all(fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - off)], off)


def _hold(fd: int) -> None:
    """Lock a temp file the receiver writes to (a shared ``flock``, released when its fd is closed), so that the
    running orphan sweep can tell it from one left behind (``_held``): a spare the receiver made ahead may wait
    through an idle hour, and a slot keeps the time of its release. Advisory only; a failure costs that check."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _held(path: Path) -> bool:
    """Whether a process holds ``path`` open with ``_hold``'s lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the lock just taken
    return False


def _marked(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return read_mark(f.read(_PREAMBLE_BYTES)) is not None
    except OSError:
        return False


def _padding(syntax: str, slack: int) -> bytes | None:
    """The header of a Data Set Trailing Padding element that fills ``slack`` bytes after a dataset in
    ``syntax``, or None when none can."""
    if syntax in _NO_PADDING:
        return None
    if syntax == _IMPLICIT_LE:
        header = struct.pack("<HHI", 0xFFFC, 0xFFFC, slack - 8) if slack >= 8 else None
    else:  # every other syntax encodes its dataset in Explicit VR Little Endian
        header = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, slack - 12) if slack >= 12 else None
    return header if header is not None and (slack - len(header)) % 2 == 0 else None


class _Slots:
    """Kept slots by size class (sizes in (2**(k-1), 2**k]), within the caps (FREE_FILES, SLOT_BYTES). Not
    thread-safe: the spool holds its lock."""

    def __init__(self) -> None:
        self._by_class: dict[int, list[tuple[Path, int]]] = {}
        self.count = 0
        self.bytes = 0

    def has_room(self, size: int) -> bool:
        return self.count < FREE_FILES and self.bytes + size <= SLOT_BYTES

    def add(self, path: Path, size: int) -> bool:
        if size <= 0 or not self.has_room(size):
            return False
        self._by_class.setdefault((size - 1).bit_length(), []).append((path, size))
        self.count += 1
        self.bytes += size
        return True

    def take(self, want: int) -> Path | None:
        """A slot of at least ``want`` bytes, the smallest class first (the last kept of it: its pages may still
        be cached); None when none is that large."""
        for k in sorted(c for c in self._by_class if c >= (max(want, 1) - 1).bit_length()):
            kept = self._by_class[k]
            for i in range(len(kept) - 1, max(-1, len(kept) - 9), -1):
                path, size = kept[i]
                if size >= want:
                    del kept[i]
                    if not kept:
                        del self._by_class[k]
                    self.count -= 1
                    self.bytes -= size
                    return path
        return None


class ToPlace(NamedTuple):
    """A received instance for ``Spool.place``."""

    path: Path  # its temp file
    fd: int  # open on it
    digest: str  # its content's (digest.py)
    end: int = -1  # the bytes written: preamble, File Meta and dataset
    capacity: int = 0  # the file's size when taken (``open_incoming``): a slot's, or 0
    syntax: str = ""  # its dataset's transfer syntax


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable storage for received instances (see the module docstring for the layout)."""

    def __init__(self, root: Path, min_free_bytes: int, *, taker: tuple[int, int] | None = None) -> None:
        """``taker``: ``(index, count)`` in a receiver process (dicom/receivers.py), which takes its share of the
        empty files in ``free/`` (the daemon's process makes them) and leaves the folder's upkeep to the daemon."""
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._instances = root / "instances"
        self._tmp = root / "tmp"
        self._free_dir = root / "free"
        self._instances.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._free_dir.mkdir(exist_ok=True)
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._free_lock = threading.Lock()
        self._free: list[Path] = []
        self._slots = _Slots()  # under _free_lock
        self._hint = 0  # the last instance placed: the size of the next, most likely (a series' slices)
        self._slots_scanned = 0.0
        self._taker = taker
        self._shared = False  # share_free_files
        self._scanned = 0.0
        if taker is None:
            self._keep_free_files()

    def share_free_files(self) -> None:
        """Receiver processes take the empty files in ``free/`` themselves: ``refill`` counts what is there."""
        self._shared = True

    @property
    def tmp_dir(self) -> Path:
        """A directory on the spool's file system for incoming temp files (so ``store`` can rename)."""
        return self._tmp

    def path(self, name: str) -> Path:
        """The absolute path of a spool name. Raises ValueError for anything but a spool name."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError("not a spool name")
        if name.startswith("tmp/"):
            return self._tmp / name[4:]
        return self._instances / name

    def store(self, src: Path) -> tuple[str, int]:
        """Move ``src`` into the spool durably and return ``(name, size_bytes)``.

        PS3.4 Annex B.2.3: a Success status hands the instance over to us, so the data and the
        directory entry are fsynced before this returns. Raises SpoolFullError on ENOSPC/EDQUOT,
        after removing whatever was partly written.
        """
        day = time.strftime("%Y%m%d", time.gmtime())
        day_dir = self._instances / day
        token = secrets.token_hex(16)
        name = f"{day}/{token}.dcm"
        final = day_dir / f"{token}.dcm"
        try:
            if not day_dir.is_dir():
                day_dir.mkdir(exist_ok=True)
                # The new directory's own entry must survive a power loss too.
                _fsync_dir(self._instances)
            if os.stat(src).st_dev == os.stat(day_dir).st_dev:
                size = self._rename_into(src, final)
            else:
                size = self._copy_into(src, day_dir / f".{token}.part", final)
            _fsync_dir(day_dir)
        except OSError as exc:
            final.unlink(missing_ok=True)
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError(exc.errno, "the spool's file system is full") from exc
            raise
        return name, size

    def open_incoming(self) -> tuple[Path, int, int]:
        """A temp file in ``tmp/`` for an instance being received: ``(path, fd open for writing, capacity)``.

        A kept slot when there is one (its zeroed blocks written over in place: ``capacity`` is its size, for
        ``place``), else a kept empty file from ``free/`` (truncated on open, so nothing of what it held before
        can reach the new instance), else a file made now (capacity 0 for both). The file is locked (``_hold``)
        before it reaches ``tmp/``, for as long as the fd is open: the running orphan sweep leaves it alone.
        """
        path = self._tmp / f"in-{secrets.token_hex(16)}.dcm"
        for _ in range(4):
            slot = self._take_slot()
            if slot is None:
                break
            fd = -1
            try:
                fd = os.open(slot, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                if read_mark(os.pread(fd, _PREAMBLE_BYTES, 0)) is None:
                    _hold(fd)
                    os.rename(slot, path)
                    return path, fd, os.fstat(fd).st_size
                # An instance that a power cut left in free/ and the start could not put back: never written
                # over; left where the next start looks for it.
            except OSError:
                pass
            if fd >= 0:
                os.close(fd)
        kept = self._take_free()
        if kept is not None:
            fd = -1
            try:
                fd = os.open(kept, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
                _hold(fd)
                os.rename(kept, path)
                return path, fd, 0
            except OSError:
                if fd >= 0:
                    os.close(fd)
                for gone in (kept, path):  # whichever name it has now
                    with contextlib.suppress(OSError):
                        gone.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        _hold(fd)  # new: too young for the sweep until then
        return path, fd, 0

    # -- free files (module constant FREE_FILES) --

    def free_files(self) -> int:
        """How many empty files are kept ready for incoming instances."""
        with self._free_lock:
            return len(self._free)

    def slots(self) -> tuple[int, int]:
        """How many slots are kept, and their bytes."""
        with self._free_lock:
            return self._slots.count, self._slots.bytes

    def refill(self, limit: int = FREE_FILES, within_seconds: float | None = None) -> int:
        """Make up to ``limit`` empty files in ``free/``, short of FREE_FILES, for at most ``within_seconds``;
        returns how many were made.

        Call it while nothing is being received (at start, or from housekeeping when the receiver is idle):
        the files are made then, not while a study arrives. On a file system that counts inodes, a tenth of
        them is left free for everything else (heat maps, the journal, other files on that disk). What a file
        costs to make depends on the file system's state (30 us to 0.75 ms on the development machine), hence
        the time bound. An error stops it quietly: ``open_incoming`` makes its own file when none is kept, and
        says why that fails.
        """
        if self._shared:
            with self._free_lock:
                self._free = self._scan_free()[:FREE_FILES]
                if time.monotonic() - self._slots_scanned > _SLOT_COUNT_SECONDS:
                    # A stat per slot: not at every idle tick (the count only bounds what a release keeps).
                    self._slots_scanned = time.monotonic()
                    self._slots = self._scan_slots()
        if not self._has_room():
            return 0
        try:
            st = os.statvfs(self._free_dir)
        except OSError:
            return 0
        if st.f_files > 0:  # a file system that counts inodes: a tenth of them stays for everything else
            limit = min(limit, max(0, st.f_favail - st.f_files // 10))
        made = 0
        deadline = None if within_seconds is None else time.monotonic() + within_seconds
        while made < limit and (deadline is None or time.monotonic() < deadline) and self._has_room():
            path = self._free_dir / f"{secrets.token_hex(16)}.free"
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
            except OSError:
                break
            self._add_free(path)
            made += 1
        return made

    def _keep_free_files(self) -> None:
        # At start, the empty files left in free/ are kept; anything else there is removed: a released instance
        # renamed in whose truncation a power cut undid still holds its data.
        # A slot that holds a mark is left as it is: an instance whose move out of free/ a power cut undid, for
        # the housekeeping's ``misplaced`` to put back. Every other slot is emptied, after any stop: its zeroing
        # was only in the page cache (``_into_slot``), so after a power cut (or a kill during its release) it may
        # still hold a released instance's bytes, which an instance written over it would carry in its padding.
        # Emptied, then renamed: a power cut in between leaves a slot to empty again, or an empty file.
        for entry in os.scandir(self._free_dir):
            try:
                path = Path(entry.path)
                if entry.name.endswith(".slot") and entry.is_file(follow_symlinks=False):
                    if _marked(path):
                        continue
                    os.truncate(path, 0)
                    path = path.with_suffix(".free")
                    os.rename(entry.path, path)
                st = os.lstat(path)
                keep = path.suffix == ".free" and stat.S_ISREG(st.st_mode) and st.st_size == 0 and \
                    len(self._free) < FREE_FILES
                if keep:
                    self._free.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(path)
            except OSError as exc:
                logger.warning("spool: a file in free/ could not be checked or removed (%s)", exc.strerror)

    def _take_slot(self) -> Path | None:
        with self._free_lock:
            want = self._hint + 16 if self._hint else 0
            path = self._slots.take(want)
            if path is None and self._taker is not None and time.monotonic() - self._scanned > _RESCAN_SECONDS:
                self._scanned = time.monotonic()
                self._free = self._scan_free(self._taker)
                self._slots = self._scan_slots(self._taker)
                path = self._slots.take(want)
            return path

    def _take_free(self) -> Path | None:
        with self._free_lock:
            if not self._free and self._taker is not None and time.monotonic() - self._scanned > _RESCAN_SECONDS:
                self._scanned = time.monotonic()
                self._free = self._scan_free(self._taker)
            return self._free.pop() if self._free else None

    def _scan_slots(self, share: tuple[int, int] | None = None) -> _Slots:
        """The slots in ``free/`` (or those of ``share``, as ``_scan_free``), within the caps. Their sizes only:
        the daemon counts them at each idle tick; ``open_incoming`` looks for a mark in the one it takes."""
        out = _Slots()
        for path in self._scan_free(share, ".slot"):
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if size % _SLOT_ROUND == 0 and out.has_room(size):
                    out.add(path, size)
        return out

    def _scan_free(self, share: tuple[int, int] | None = None, suffix: str = ".free") -> list[Path]:
        """The empty files in ``free/`` (or the slots, by ``suffix``), or those of ``share`` (index, count): a
        file's name says whose it is, so that receiver processes do not reach for the same ones (a file taken by
        another fails its rename, and the taker makes a new one)."""
        out: list[Path] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._free_dir):
                name = entry.name
                if not name.endswith(suffix):
                    continue
                if share is not None:
                    try:
                        if int(name[:8], 16) % share[1] != share[0]:
                            continue
                    except ValueError:
                        continue
                out.append(Path(entry.path))
        return out

    def _has_room(self) -> bool:
        # Checked before a file is made or emptied, added after: two threads at once (the release and an idle
        # tick's refill) may pass FREE_FILES by a file each, which is harmless.
        return self.free_files() < FREE_FILES

    def _add_free(self, path: Path) -> None:
        with self._free_lock:
            self._free.append(path)

    def _recycle(self, path: Path) -> bool:
        """Keep a released instance's file in ``free/``: zeroed as a slot while the slots' caps allow, else
        emptied. False (nothing done) when free/ is full or the file is not a plain file of ours (the caller's
        unlink then says what is wrong)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # already gone
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            # A file with another name (the pipeline's hard link for a heat-map overlay) is only unlinked: the
            # other name still needs its data.
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return False
            # Rounded up from where the instance ends: a file written over a slot has the slot's size, and
            # rounding that up would grow the slot at each reuse.
            mark = read_mark(os.pread(fd, _PREAMBLE_BYTES, 0))
            end = mark[0] if mark is not None and mark[0] <= st.st_size else st.st_size
            size = -(-(end + 16) // _SLOT_ROUND) * _SLOT_ROUND
            with self._free_lock:
                if self._shared and not self._slots.has_room(size) and \
                        time.monotonic() - self._slots_scanned > _RESCAN_SECONDS:
                    # The receiver processes took some meanwhile: count what free/ holds now.
                    self._slots_scanned = time.monotonic()
                    self._slots = self._scan_slots()
                as_slot = size <= _SLOT_LARGEST and self._slots.has_room(size)
            if as_slot:
                try:
                    return self._into_slot(path, fd, size)
                except OSError:
                    pass  # no room to round it up (ENOSPC), or its flush failed: emptied instead, freeing its blocks
            if not self._has_room():
                return False
            kept = self._free_dir / f"{secrets.token_hex(16)}.free"
            if read_mark(os.pread(fd, _PREAMBLE_BYTES, 0)) is not None:
                # Its mark cleared first, for good: a marked file in free/ is one to put back after a power cut.
                _pwrite_all(fd, bytes(_PREAMBLE_BYTES), 0)
                os.fdatasync(fd)
            try:
                # Out of the spool's namespace first, then emptied: its blocks are freed as an unlink frees them.
                os.rename(path, kept)
            except OSError:
                return False
            try:
                if os.fstat(fd).st_nlink == 1:  # else linked between the check and the rename: unlinked below
                    os.ftruncate(fd, 0)
                    os.fchmod(fd, 0o640)
                    self._add_free(kept)
                    return True
            except OSError:
                pass
            kept.unlink(missing_ok=True)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _into_slot(self, path: Path, fd: int, size: int) -> bool:
        """Zero the file to ``size`` (nothing of the instance left in it, its mark gone) and keep it in ``free/``
        as a slot.

        What must be on disk before it leaves instances/, its preamble (the mark) and its new size, is flushed
        first: a few KiB. The rest is zeroed once the file is out of the spool's namespace (no new name can reach
        it then), in the page cache, for the writeback or for the next instance to overwrite first; so a release
        costs the instances arriving meanwhile no flush of the size of the file. That zeroing may not reach the
        disk before a power cut: the next start empties every slot (``_keep_free_files``)."""
        old = os.fstat(fd).st_size
        first = min(old, _PREAMBLE_BYTES)
        _zero(fd, 0, first)
        if size < old:  # a slot whose instance ended well before its size
            os.ftruncate(fd, size)
            old = size
        _zero(fd, old, size)
        os.fdatasync(fd)
        kept = self._free_dir / f"{secrets.token_hex(16)}.slot"
        try:
            os.rename(path, kept)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_nlink != 1:
                # Linked between the check and the rename (the pipeline's overlay): that name still needs the data.
                raise FileExistsError
            _zero(fd, first, old)
        except OSError:
            kept.unlink(missing_ok=True)
            return True
        with self._free_lock:
            self._slots.add(kept, size)  # past the caps only by a race with another release: harmless
        return True

    def place(self, incoming: Iterable[ToPlace | tuple[Path, int, str]]) -> list[str]:
        """Move received temp files into the spool durably and return their spool names, in order.

        Each name ends with the instance's digest's first 16 hex digits. A file written over a slot that it
        fits (``ToPlace.capacity``) is sealed in place (``_seal``: its padding and mark); any other is cut to
        its size. The files are renamed into today's folder, then every file's data is fsynced at once, each on
        its own thread (the first on this one): the file system folds concurrent fsyncs into one journal
        commit, so a group costs about one fsync, not one per file. The folder is fsynced last, unless every
        file was sealed in place (each names itself in its mark); the entries of the others went out with that
        commit, so this fsync finds little left to do. A failure removes every file of the group (none was
        journalled yet) and raises; ENOSPC/EDQUOT as SpoolFullError. The caller closes the fds.
        """
        items = [ToPlace(*i) for i in incoming]
        day = time.strftime("%Y%m%d", time.gmtime())
        day_dir = self._instances / day
        placed: list[Path] = []
        try:
            if not day_dir.is_dir():
                day_dir.mkdir(exist_ok=True)
                _fsync_dir(self._instances)
            all_sealed = True
            for item in items:
                stem = f"{secrets.token_hex(8)}{name_part(item.digest)}.dcm"
                all_sealed = self._seal(item, f"{day}/{stem}") and all_sealed
                final = day_dir / stem
                os.replace(item.path, final)
                placed.append(final)
            if items:
                syncs = [self._syncer().submit(os.fdatasync, i.fd) for i in items[1:]]
                try:
                    os.fdatasync(items[0].fd)
                finally:
                    concurrent.futures.wait(syncs)  # every one done before raising (or removing files)
                for f in syncs:
                    f.result()
            if not all_sealed:
                _fsync_dir(day_dir)
            if items and items[-1].end > 0:
                self._hint = items[-1].end
        except OSError as exc:
            for final in placed:
                with contextlib.suppress(OSError):
                    final.unlink()
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError(exc.errno, "the spool's file system is full") from exc
            raise
        return [f"{day}/{final.name}" for final in placed]

    @staticmethod
    def _seal(item: ToPlace, name: str) -> bool:
        """Seal a file written over a slot in place: Data Set Trailing Padding from the instance's end to the
        slot's, and the mark in the preamble; True. A file that outgrew its slot, or whose slack no padding can
        fill, is cut to its size instead (and one that was never a slot is left as it is); False."""
        slack = item.capacity - item.end
        padding = _padding(item.syntax, slack) if item.capacity > 0 and item.end >= _PREAMBLE_BYTES and \
            slack >= 0 else None
        if padding is None and slack != 0:
            if item.capacity > 0 and slack > 0:
                os.ftruncate(item.fd, item.end)
            return False
        if item.capacity == 0:
            return False
        if slack:
            assert padding is not None
            _pwrite_all(item.fd, padding, item.end)
        _pwrite_all(item.fd, held_mark(item.end, name), 0)
        return True

    def _syncer(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._sync_pool is None:
            self._sync_pool = concurrent.futures.ThreadPoolExecutor(max_workers=_SYNC_THREADS,
                                                                    thread_name_prefix="spool-fsync")
        return self._sync_pool

    def close(self) -> None:
        """Stop the fsync threads (``place`` starts them again if called later)."""
        pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    @staticmethod
    def _rename_into(src: Path, final: Path) -> int:
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.replace(src, final)
        return size

    @staticmethod
    def _copy_into(src: Path, part: Path, final: Path) -> int:
        try:
            with open(src, "rb") as fin, open(part, "xb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK_BYTES)
                fout.flush()
                os.fsync(fout.fileno())
                size = fout.tell()
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        # Moved, not copied: the source is a temp file nobody needs any more.
        with contextlib.suppress(OSError):
            os.unlink(src)
        return size

    def remove(self, name: str) -> None:
        """Delete a spool file; one that is already gone is fine."""
        self.path(name).unlink(missing_ok=True)

    def release(self, name: str) -> None:
        """Delete a released instance's file, which nothing reads any more; one that is already gone is fine.

        While fewer than FREE_FILES are kept, the file is emptied into ``free/`` for an instance to come
        instead of unlinked. Only here: a file that a reader may still have open (a replaced instance being
        decoded) must be unlinked, never emptied and handed to the next instance. A file with another name
        (the pipeline's hard link for an overlay) is unlinked too.
        """
        path = self.path(name)
        if name.startswith("tmp/") or not _STORED.fullmatch(name.rsplit("/", 1)[-1]) or not self._recycle(path):
            path.unlink(missing_ok=True)

    def release_all(self, names: list[str]) -> list[BaseException]:
        """``release`` each of ``names``, several at once (each kept file's flush on its own thread); returns the
        errors, one per name that failed."""

        def one(name: str) -> BaseException | None:
            try:
                self.release(name)
            except (OSError, ValueError) as exc:
                return exc
            return None

        if len(names) <= 1:
            results = [one(name) for name in names]
        else:
            # Threads of its own, not the placing's: a series' release must not queue ahead of a Success's flush.
            with concurrent.futures.ThreadPoolExecutor(max_workers=_RELEASE_THREADS,
                                                       thread_name_prefix="spool-release") as pool:
                results = list(pool.map(one, names))
        return [exc for exc in results if exc is not None]

    def free_bytes(self) -> int:
        """The file system's free space, and the slots' kept bytes, which instances are written over."""
        st = os.statvfs(self.root)
        with self._free_lock:
            return st.f_bavail * st.f_frsize + self._slots.bytes

    def has_room(self, extra_bytes: int = 0) -> bool:
        """True while the free space, less ``extra_bytes``, stays at or above the watermark."""
        return self.free_bytes() - extra_bytes >= self.min_free_bytes

    def writable(self) -> bool:
        """True if a file can be created, fsynced and removed in the spool."""
        probe = self._tmp / f".probe-{secrets.token_hex(8)}"
        try:
            with open(probe, "xb") as f:
                f.write(b"\0")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            logger.warning("spool is not writable: %s", exc.strerror)
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
            return False
        return True

    def adoptable(self, known: set[str], placed_after: float | None) -> list[str]:
        """Stored files that no journal row knows, placed (renamed in: ctime) at or after ``placed_after``, in the
        order they were written (mtime, then name): after an unclean stop, those whose content matches their name
        (``name_matches``) are instances that were acknowledged but whose journal commit was lost. Written, not
        placed: ``put_back`` renames files in the order it finds them, which sets their ctime, and of two files
        of one re-sent instance the one written last must be recorded last, replacing the other."""
        found: list[tuple[int, str]] = []
        for day_dir in sorted(self._instances.iterdir()):
            if not (_DAY.fullmatch(day_dir.name) and day_dir.is_dir()):
                continue
            for f in day_dir.iterdir():
                name = f"{day_dir.name}/{f.name}"
                if not _STORED.fullmatch(f.name) or name in known:
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if placed_after is None or st.st_ctime >= placed_after:
                    found.append((st.st_mtime_ns, name))
        return [name for _, name in sorted(found)]

    def misplaced(self) -> list[tuple[Path, str]]:
        """Marked files in ``tmp/`` and ``free/``: ``(path, the spool name in its mark)``. After a power cut, one
        whose content matches that name holds an instance that was sealed in place and acknowledged, whose
        renames out of free/ and into instances/ were not yet on disk (``put_back``); one that does not match
        was never acknowledged."""
        out: list[tuple[Path, str]] = []
        # Only the receiver's temp files and the slots: another name for a stored file (the pipeline's hard link
        # for an overlay, tmp/overlay-*) shows its mark too, but was never moved.
        for folder, prefix, suffix in ((self._tmp, "in-", ".dcm"), (self._free_dir, "", ".slot")):
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)
                                and entry.is_file(follow_symlinks=False)):
                            continue
                        with open(entry.path, "rb") as f:
                            mark = read_mark(f.read(_PREAMBLE_BYTES))
                        if mark is not None:
                            out.append((Path(entry.path), mark[1]))
        return out

    def put_back(self, path: Path, name: str) -> bool:
        """Move a misplaced file back under its spool name, durably; False if a file already has that name."""
        final = self.path(name)
        if final.exists():
            return False
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self._instances)
        os.rename(path, final)
        _fsync_dir(final.parent)
        return True

    @staticmethod
    def name_matches(name: str, content_digest: str) -> bool:
        """Whether a stored file's name carries ``content_digest``, the digest of the content it holds."""
        return _STORED.fullmatch(name.rsplit("/", 1)[-1]) is not None and name[-20:-4] == name_part(content_digest)

    def orphans(self, referenced: set[str], min_age_seconds: float = 0.0) -> list[str]:
        """Spool names on disk that the journal does not reference, and stale temp files.

        Call it before the receiver starts (or with ``min_age_seconds`` well above the longest
        transfer): an instance being received right now is not referenced yet. A temp file the receiver holds
        open (``open_incoming``) is never one.
        """
        cutoff = time.time() - min_age_seconds
        out: list[str] = []

        def old(p: Path) -> bool:
            try:
                return p.stat().st_mtime <= cutoff
            except FileNotFoundError:
                return False

        for day_dir in sorted(self._instances.iterdir()):
            if not (_DAY.fullmatch(day_dir.name) and day_dir.is_dir()):
                continue
            for f in sorted(day_dir.iterdir()):
                name = f"{day_dir.name}/{f.name}"
                unreferenced = _STORED.fullmatch(f.name) is not None and name not in referenced
                if (unreferenced or _PARTIAL.fullmatch(f.name)) and old(f):
                    out.append(name)
        for f in sorted(self._tmp.iterdir()):
            name = f"tmp/{f.name}"
            # Not one the receiver holds (``open_incoming``): its spares may wait through an idle hour.
            if _NAME.fullmatch(name) and f.is_file() and old(f) and not _held(f):
                out.append(name)
        return out
