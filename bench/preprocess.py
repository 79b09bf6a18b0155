"""Preprocessing, old vs new, side by side in one run: ms per image (median), for the CT and CR of issue 9.

The old implementation is tests/reference_preprocess.py (the code before issue 9, kept as the test
oracle); the new one is edge_agent.inference.preprocess. Both run on the same file in one process, in
alternating blocks, so both see the same machine. Stages: ``decode`` (read the file, pixel data to
frames), ``preprocess`` (one decoded frame to the model input: window, resize, place, normalise) and
``both`` (``load_instance``, what a worker runs per instance); and ``decode: pydicom / fast path``,
today's decoding through pydicom against its fast path for plain native files (both new code). Also
shown: the largest difference between the two model inputs, in normalised units. OpenCV's own threads
are off, as in the daemon (the worker pool is the parallelism), so each figure is one core's.

A second table times a new worker's first calls (``load_instance_prepared``, as a worker runs it) in fresh
processes, cold or after the worker's warm-up (``preprocess.warm_up``), alternating, with the page faults
each call took.

Run:  .venv/bin/python bench/preprocess.py [--repeats 50] [--fresh 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom.data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the oracle lives in tests/, which is not installed

import tests.reference_preprocess as old  # noqa: E402
from edge_agent.dicom.pixels import decode_frames  # noqa: E402
from edge_agent.inference.card import ModelCard, load_card  # noqa: E402
from edge_agent.inference.preprocess import load_instance, load_instance_prepared, preprocess, warm_up  # noqa: E402

DATA_STORE = Path(pydicom.data.__file__).parent.parent.parent / "data_store" / "data"
IMAGES = [
    ("CT 512x512", DATA_STORE / "693_UNCR.dcm", "ct-demo"),
    ("CR 1955x1841", DATA_STORE / "RG1_UNCR.dcm", "cxr-nodule"),
]


def median_ms(pair: tuple[Callable[[], Any], Callable[[], Any]], repeats: int, rounds: int = 5) -> tuple[float, float]:
    """Median ms of (old, new) over ``repeats`` calls each, in ``rounds`` alternating blocks.

    Blocks rather than single calls: the old code's 100 MB of float64 temporaries, freed between calls,
    would otherwise be the new code's page faults and cold caches.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for fn in pair:  # warm-up: imports, caches
        fn()
    block = max(1, repeats // rounds)
    for _ in range(rounds):
        for fn, out in zip(pair, times, strict=True):
            for _ in range(block):
                started = time.perf_counter()
                fn()
                out.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def rows_for(path: Path, card: ModelCard, repeats: int) -> list[tuple[str, float, float]]:
    prep, channels = card.preprocessing, card.input_shape[0]
    old_frame, new_frame = old.decode_frames(path)[0], decode_frames(path)[0]
    stages = {
        "decode": (lambda: old.decode_frames(path), lambda: decode_frames(path)),
        "preprocess": (
            lambda: old.preprocess(old_frame, prep, channels),
            lambda: preprocess(new_frame, prep, channels),
        ),
        "both": (lambda: old.load_instance(path, card), lambda: load_instance(path, card)),
        # Today's decoding with and without its fast path (pixels._fast_read): "old" is pydicom's dcmread.
        "decode: pydicom / fast path": (lambda: decode_frames(path, fast_path=False), lambda: decode_frames(path)),
    }
    return [(stage, *median_ms(pair, repeats)) for stage, pair in stages.items()]


FIRST_CALLS = 3


def first_calls(path: Path, card_name: str, warm: bool) -> list[tuple[float, int]]:
    """In this (fresh) process: (ms, page faults) of the first calls on ``path``, after a warm-up or not."""
    card = load_card(REPO / "engines" / card_name)
    if warm:
        warm_up([(card.preprocessing, card.input_shape[0])])
    out = []
    for _ in range(FIRST_CALLS):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        load_instance_prepared(path, card)
        out.append(((time.perf_counter() - started) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    return out


def fresh_rows(fresh: int) -> None:
    print(f"\nA new worker's first calls, {fresh} fresh processes each way, alternating; median ms (page faults)")
    calls = " | ".join(f"call {i + 1}" for i in range(FIRST_CALLS))
    print(f"| image | card | worker | {calls} |")
    print("|---|---|---|" + "---:|" * FIRST_CALLS)
    for label, path, card_name in IMAGES:
        runs: dict[str, list[list[tuple[float, int]]]] = {"cold": [], "warmed up": []}
        for _ in range(fresh):
            for mode in runs:
                child = [sys.executable, __file__, "--child", str(path), card_name, mode]
                runs[mode].append(json.loads(subprocess.run(child, capture_output=True, check=True).stdout))
        for mode, got in runs.items():
            cells = " | ".join(
                f"{statistics.median(r[i][0] for r in got):.2f} ({statistics.median(r[i][1] for r in got):.0f})"
                for i in range(FIRST_CALLS)
            )
            print(f"| {label} | {card_name} | {mode} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed (old, new) pairs; the median is shown")
    parser.add_argument("--fresh", type=int, default=10, help="fresh processes per way for the first calls")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "CARD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, card_name, mode = args.child
        print(json.dumps(first_calls(Path(path), card_name, mode == "warmed up")))
        return
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; numpy {np.__version__}, "
        f"OpenCV {cv2.__version__}; median of {args.repeats}"
    )
    print("| image | card | stage | old ms | new ms | old/new | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, path, card_name in IMAGES:
        card = load_card(REPO / "engines" / card_name)
        pairs = zip(load_instance(path, card), old.load_instance(path, card), strict=True)
        diff = max(float(np.abs(a - b).max()) for a, b in pairs)
        for stage, old_ms, new_ms in rows_for(path, card, args.repeats):
            shown = f"{diff:.1e}" if stage == "both" else ""
            ratio = old_ms / new_ms
            print(f"| {label} | {card_name} | {stage} | {old_ms:.2f} | {new_ms:.2f} | {ratio:.1f}x | {shown} |")
    if args.fresh > 0:
        fresh_rows(args.fresh)


if __name__ == "__main__":
    main()
