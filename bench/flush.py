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
- "preallocated, same size, in place": the same overwrite with nothing else: no size change, no rename (the least a
  flush of this much data can cost here; a spool that worked this way would need its own record of what each
  preallocated file holds).
- "4 KiB in place": one page overwritten and flushed: the disk's cache flush without the data.

Run:  .venv/bin/python bench/flush.py [--dir FOLDER] [--files 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIZE = 530_000  # one 512x512 CT slice as the bench's workloads send it
PIECE = 16 * 1024
HEAD_START_EVERY = 64 * 1024
REST_OF_RECEIVE_SECONDS = 0.0007
SYNC_FILE_RANGE_WRITE = 2

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


def _one_way(folder: Path, files: int, data: bytes, way: str) -> tuple[float, float]:
    """(flush ms, whole file ms), medians over ``files`` files written ``way``."""
    incoming, spool = folder / "incoming", folder / "spool"
    incoming.mkdir()
    spool.mkdir()
    fds = []
    for i in range(files):
        fd = os.open(incoming / str(i), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if way.startswith("preallocated") or way.startswith("4 KiB"):
            os.write(fd, bytes(SIZE + 70_000))
            os.fsync(fd)
        fds.append(fd)
    spool_fd = os.open(spool, os.O_RDONLY)
    os.sync()
    flushes, wholes = [], []
    try:
        for i, fd in enumerate(fds):
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
            rename = way in ("new file, head start, rename", "preallocated, truncated, renamed")
            if rename:
                os.rename(incoming / str(i), spool / str(i))
            os.fdatasync(fd)
            if rename:
                os.fsync(spool_fd)
            ended = time.perf_counter()
            flushes.append(ended - flush_from)
            wholes.append(ended - started)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(spool_fd)
        shutil.rmtree(incoming)
        shutil.rmtree(spool)
    return statistics.median(flushes) * 1000, statistics.median(wholes) * 1000


WAYS = ("new file", "new file, head start, rename", "preallocated, truncated, renamed",
        "preallocated, same size, in place", "4 KiB in place")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="a folder on the file system to measure "
                        "(default: this one; the spool's own file system is the one that matters)")
    parser.add_argument("--files", type=int, default=150, help="files per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = os.urandom(SIZE)
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="flush-bench-", dir=args.dir) as tmp:
        for r in range(args.rounds):
            order: Callable[[tuple[str, ...]], tuple[str, ...]] = (lambda w: w) if r % 2 == 0 else (lambda w: w[::-1])
            for way in order(WAYS):
                results[way].append(_one_way(Path(tmp), args.files, data, way))
    fs = os.statvfs(args.dir)
    print(f"{args.rounds} rounds of {args.files} files of {SIZE / 1e6:.2f} MB per way, medians of the rounds' medians; "
          f"folder {args.dir} ({fs.f_bsize}-byte blocks); Python {sys.version.split()[0]}\n")
    print("| way | flush (ms) | whole file (ms) |")
    print("|---|---:|---:|")
    for way in WAYS:
        flush = statistics.median(f for f, _ in results[way])
        whole = statistics.median(w for _, w in results[way])
        print(f"| {way} | {flush:.2f} | {whole:.2f} |")


if __name__ == "__main__":
    main()
