"""What watching a model's drift costs the pipeline's loop per inferred instance, side by side in one run.

The pipeline hands every inferred CT slice to ``Drift.observe`` on its event loop. This times that call for
ct-demo (its card's drift reference, the shipped ``drift`` settings, a full window) two ways, interleaved in
rounds:

- "index per instance" (the daemon before this bench): the observation, then the index of every signal
  computed and set on its gauge, as ``Drift.add`` did for each instance;
- "index when scraped" (now): the observation alone; the gauges compute the index when /metrics is read.

    .venv/bin/python bench/drift_cost.py [--calls 3000] [--rounds 5]

Also prints what one scrape of the drift gauges costs now (the index computed there instead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest_data import CT_SOURCE  # noqa: E402
from edge_agent.config import DriftConfig  # noqa: E402
from edge_agent.drift import Drift  # noqa: E402
from edge_agent.inference.card import load_card  # noqa: E402
from edge_agent.inference.engine import SliceResult  # noqa: E402
from edge_agent.inference.preprocess import load_instance_prepared  # noqa: E402
from edge_agent.metrics import Metrics  # noqa: E402

MODEL = "ct-demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="observations per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each measures both ways once")
    args = ap.parse_args()
    card = load_card(REPO / "engines" / MODEL)
    if card.drift_reference is None:
        sys.exit(f"{MODEL}'s card has no drift_reference: nothing to measure")
    prepared = load_instance_prepared(CT_SOURCE, card)
    results = [SliceResult(np.array([0.3], np.float32), None) for _ in prepared]
    config = DriftConfig()
    metrics = Metrics()
    drift = Drift({MODEL: card}, config, metrics)
    for _ in range(config.window_images):  # a full window, as on a box in service
        drift.observe(MODEL, prepared, results)

    def per_instance() -> None:  # what Drift.add did for each instance before
        drift.observe(MODEL, prepared, results)
        index = drift.index(MODEL) or {}
        metrics.drift_window_images.labels(model=MODEL).set(config.window_images)
        for signal, value in index.items():
            metrics.drift_psi.labels(model=MODEL, signal=signal).set(value)

    def when_scraped() -> None:
        drift.observe(MODEL, prepared, results)

    ways = {"index per instance (before)": per_instance, "index when scraped (now)": when_scraped}
    timings: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way, call in ways.items():
            started = time.thread_time()
            for _ in range(args.calls):
                call()
            timings[way].append((time.thread_time() - started) * 1e6 / args.calls)
    started = time.thread_time()
    for _ in range(100):
        metrics.drift_psi.collect()
        metrics.drift_window_images.collect()
    scrape = (time.thread_time() - started) * 1e6 / 100
    print(f"{args.rounds} rounds of {args.calls} calls, medians; {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}; window {config.window_images} images\n")
    print("| Drift.observe, one CT slice | CPU per instance (us) |")
    print("|---|---:|")
    for way, runs in timings.items():
        print(f"| {way} | {statistics.median(runs):.1f} |")
    before, now = (statistics.median(runs) for runs in timings.values())
    print(f"\nsaved per instance: {before - now:.1f} us ({before / now:.1f}x less); collecting the drift gauges "
          f"once (what each scrape now adds): {scrape:.0f} us")


if __name__ == "__main__":
    main()
