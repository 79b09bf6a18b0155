"""What the flush behind a durable Success costs on this disk, and whether writing the file differently shortens it.

A C-STORE Success from the daemon waits for the instance's data and its name in the spool to be on disk. Over one
association that flush is most of each instance's round trip (`bench/commit_latency.py`). This bench writes files
of one CT slice's size (0.53 MB) in a folder of the file system under test, the ways a receiver could, and times
the flush alone (from the end of the last write to the end of the last fsync) and the whole file, in rounds that
alternate the ways, and prints medians:

- "new file": written in 16 KiB pieces, fdatasync; no head start.
- "new file, head start, rename": as the daemon does: ``sync_file_range`` every 64 KiB while the data arrives,
  0.7 ms for the rest of the receive, then renamed into the spool folder, fdatasync, folder fsync.
- "preallocated, truncated, renamed": the file's blocks written with zeros and fsynced beforehand (a spare made
  while idle), overwritten the same way, then truncated to its size, renamed, fdatasync, folder fsync.
- "slot, renamed, no folder fsync": as the daemon does since its spool keeps released files as slots: a file whose
  blocks were written and synced beforehand, overwritten the same way without a change of size, a mark written
  into its first bytes, renamed into the spool folder, fdatasync, and no folder fsync (the mark names the file).
- "preallocated, same size, in place": the same overwrite with nothing else: no rename (the least a flush of this
  much data can cost here).
- "4 KiB in place": one page overwritten and flushed: the disk's cache flush without the data.

Each way is run by one writer and by several at once (``--writers``, threads each writing their own files, as
concurrent associations do), and also gives files per second.

Run:  .venv/bin/python bench/flush.py [--dir FOLDER] [--files 150] [--rounds 3] [--writers 1 4]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

SIZE = 530_000  # one 512x512 CT slice as the bench's workloads send it
PIECE = 16 * 1024
HEAD_START_EVERY = 64 * 1024
REST_OF_RECEIVE_SECONDS = 0.0007
SYNC_FILE_RANGE_WRITE = 2
MARK = b"edge-agent held\0".ljust(128, b"\0")

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


def _write(fd: int, data: bytes, head_start: bool) -> None:
    for off in range(0, len(data), PIECE):
        os.pwrite(fd, data[off:off + PIECE], off)
        if head_start and (off + PIECE) % HEAD_START_EVERY == 0:
            _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
    if head_start:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def _one_way(folder: Path, files: int, data: bytes, way: str, writers: int) -> tuple[float, float, float]:
    """(flush ms, whole file ms, files per second), medians over ``files`` files written ``way`` by ``writers``
    threads at once (as concurrent associations write theirs)."""
    incoming, spool = folder / "incoming", folder / "spool"
    incoming.mkdir()
    spool.mkdir()
    fds = []
    for i in range(files):
        fd = os.open(incoming / str(i), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if way.startswith(("preallocated", "slot", "4 KiB")):
            os.write(fd, bytes(SIZE + 70_000))
            os.fsync(fd)
        fds.append(fd)
    spool_fd = os.open(spool, os.O_RDONLY)
    os.sync()
    flushes: list[float] = []
    wholes: list[float] = []

    def write_files(mine: range) -> None:
        for i in mine:
            fd = fds[i]
            started = time.perf_counter()
            if way.startswith("4 KiB"):
                os.pwrite(fd, data[:4096], 0)
            else:
                _write(fd, data, head_start=way != "new file")
                if way != "new file":
                    time.sleep(REST_OF_RECEIVE_SECONDS)
            flush_from = time.perf_counter()
            if way == "preallocated, truncated, renamed":
                os.ftruncate(fd, SIZE)
            if way.startswith("slot"):
                os.pwrite(fd, MARK, 0)
            rename = way in ("new file, head start, rename", "preallocated, truncated, renamed",
                             "slot, renamed, no folder fsync")
            if rename:
                os.rename(incoming / str(i), spool / str(i))
            os.fdatasync(fd)
            if rename and not way.startswith("slot"):
                os.fsync(spool_fd)
            ended = time.perf_counter()
            flushes.append(ended - flush_from)
            wholes.append(ended - started)

    try:
        began = time.perf_counter()
        threads = [threading.Thread(target=write_files, args=(range(w, files, writers),)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = files / (time.perf_counter() - began)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(spool_fd)
        shutil.rmtree(incoming)
        shutil.rmtree(spool)
    return statistics.median(flushes) * 1000, statistics.median(wholes) * 1000, rate


WAYS = ("new file", "new file, head start, rename", "preallocated, truncated, renamed",
        "slot, renamed, no folder fsync", "preallocated, same size, in place", "4 KiB in place")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="a folder on the file system to measure "
                        "(default: this one; the spool's own file system is the one that matters)")
    parser.add_argument("--files", type=int, default=150, help="files per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4],
                        help="threads writing files at once (one per concurrent association), each a row")
    args = parser.parse_args()
    data = os.urandom(SIZE)
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {(n, w): [] for n in args.writers
                                                                         for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="flush-bench-", dir=args.dir) as tmp:
        for r in range(args.rounds):
            order: Callable[[tuple[str, ...]], tuple[str, ...]] = (lambda w: w) if r % 2 == 0 else (lambda w: w[::-1])
            for writers in args.writers:
                for way in order(WAYS):
                    results[writers, way].append(_one_way(Path(tmp), args.files, data, way, writers))
    fs = os.statvfs(args.dir)
    print(f"{args.rounds} rounds of {args.files} files of {SIZE / 1e6:.2f} MB per way, medians of the rounds' medians; "
          f"folder {args.dir} ({fs.f_bsize}-byte blocks); Python {sys.version.split()[0]}\n")
    print("| way | writers | flush (ms) | whole file (ms) | files/s |")
    print("|---|---:|---:|---:|---:|")
    for (writers, way), runs in results.items():
        flush = statistics.median(f for f, _, _ in runs)
        whole = statistics.median(w for _, w, _ in runs)
        rate = statistics.median(r for _, _, r in runs)
        print(f"| {way} | {writers} | {flush:.2f} | {whole:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
