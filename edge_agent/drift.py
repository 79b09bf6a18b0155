"""Model monitoring: how far live inputs and scores have moved from what the model was validated on (issue 10).

Each model's card may hold a ``drift_reference`` (made by ``edge-agent validate --drift-reference``): for a
few fixed signals, the share of the validation images in each bin (numbers) or category (the manufacturer).
The pipeline hands every model input to :class:`Drift` after inference; it keeps the last
``drift.window_images`` of them per model and compares their distribution with the reference by the
population stability index,

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share),

exported as ``edge_agent_model_drift_psi{model, signal}`` once ``drift.min_images`` inputs are in (computed
when the metrics are scraped, not as each input comes). Below 0.1
the distributions are alike; 0.1 to 0.25 is a moderate shift; above ``PSI_ALERT`` (0.25) they differ
(the alert EdgeAgentModelDrift fires when it lasts).

The signals (fixed names, never values from a file): ``score`` (the model's score for its first label),
``input_mean`` and ``input_std`` (of the model input's image region, letterbox left out, in normalised
units), ``pixel_spacing`` (mm) and ``manufacturer`` (the common makers in the reference, then "other").
The reference's bins are quantiles of the validation data, plus a bin below and one above its range when
the reference is large enough for its range to mean something.

The window lives in memory: after a restart the index is exported again once ``min_images`` inputs are in.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.config import DriftConfig
from edge_agent.inference.card import (
    CATEGORICAL_SIGNALS,
    NUMERIC_SIGNALS,
    OTHER_CATEGORY,
    CategoricalReference,
    DriftReference,
    ModelCard,
    NumericReference,
)
from edge_agent.inference.engine import SliceResult
from edge_agent.inference.preprocess import Prepared
from edge_agent.metrics import Metrics

logger = logging.getLogger(__name__)

SIGNALS = (*NUMERIC_SIGNALS, *CATEGORICAL_SIGNALS)
# The index above which two distributions are said to differ (the usual reading of the PSI); the alert rule
# EdgeAgentModelDrift in configs/alerts.yaml uses the same number.
PSI_ALERT = 0.25
# An empty bin counts as this share, so that a value never seen in the reference gives a large, finite index.
PSI_FLOOR = 1e-4
# Reference bins: quantiles, about this many images each, at most MAX_QUANTILE_BINS of them.
IMAGES_PER_BIN = 25
MAX_QUANTILE_BINS = 10
# From this many reference images on, values outside the reference's range get bins of their own (empty in
# the reference): with fewer, the range itself is too uncertain to flag what falls outside it.
RANGE_BINS_FROM = 200
# Manufacturers with at least this share of the reference get a category of their own (at most this many).
MIN_CATEGORY_SHARE = 0.02
MAX_CATEGORIES = 10
ABSENT = "(absent)"
STALE_REFERENCE = (
    "the card's drift_reference was made for another model file (its model_sha256 is not the card's sha256); "
    "make it again with edge-agent validate MODEL DATA --drift-reference"
)
_DIGITS = 6  # significant digits of a written edge


@dataclass(frozen=True, slots=True)
class Observation:
    """One model input's signals."""

    score: float
    input_mean: float
    input_std: float
    pixel_spacing_mm: float | None
    manufacturer: str

    def numeric(self, signal: str) -> float | None:
        value = {
            "score": self.score,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "pixel_spacing": self.pixel_spacing_mm,
        }[signal]
        return value if value is not None and math.isfinite(value) else None


def observation(prepared: Prepared, scores: Sequence[float] | np.ndarray[Any, Any]) -> Observation:
    """The signals of one prepared input and the scores the model gave it."""
    return Observation(
        float(np.asarray(scores, dtype=np.float64).reshape(-1)[0]),
        prepared.input_mean,
        prepared.input_std,
        prepared.pixel_spacing_mm,
        manufacturer_category(prepared.manufacturer),
    )


def manufacturer_category(manufacturer: str) -> str:
    """The name a manufacturer is counted under: case and spacing folded, an empty value as "(absent)"."""
    name = " ".join(manufacturer.split()).upper()
    return name or ABSENT


# ---- the reference ----------------------------------------------------------------------------------------


def _step(x: float) -> float:
    """The unit of the last of ``_DIGITS`` significant digits of x."""
    magnitude = math.floor(math.log10(abs(x))) if x != 0.0 else 0
    return 10.0 ** (magnitude - _DIGITS + 1)


def _short(x: float) -> float:
    return float(f"{x:.{_DIGITS}g}")


def _below(x: float) -> float:
    """A short number at or below x."""
    step = _step(x)
    out = _short(math.floor(x / step) * step)
    while out > x:
        out = _short(out - step)
    return out


def _above(x: float) -> float:
    """A short number strictly above x."""
    step = _step(x)
    out = _short(math.floor(x / step) * step + step)
    while out <= x:
        out = _short(out + step)
    return out


def numeric_edges(values: Sequence[float]) -> list[float]:
    """Bin edges for a numeric signal: quantiles of ``values`` (and the range's ends for a large sample)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    bins = min(MAX_QUANTILE_BINS, max(2, ordered.size // IMAGES_PER_BIN))
    inner = [_short(float(q)) for q in np.quantile(ordered, np.arange(1, bins) / bins)]
    edges = set(inner)
    if ordered.size >= RANGE_BINS_FROM:
        edges |= {_below(float(ordered[0])), _above(float(ordered[-1]))}
    return sorted(edges)


def numeric_bin(edges: Sequence[float], value: float | None) -> int:
    """The bin of ``value`` (see NumericReference); ``len(edges) + 1`` is the bin of a missing value."""
    return len(edges) + 1 if value is None else bisect.bisect_right(edges, value)


def _shares(counts: Sequence[float], total: int) -> list[float]:
    return [round(c / total, 6) for c in counts]


def numeric_reference(values: Sequence[float | None]) -> dict[str, Any] | None:
    """A numeric signal's reference as the card writes it; None when no image has a value.

    The bins beyond the reference's range get the chance that one more value drawn like these n falls above
    their largest (or below their smallest): 1 / (n + 1) each, taken from the bins inside. Counted as empty,
    the one image in a few hundred that does so by chance would weigh as if it could not happen.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    edges = numeric_edges(present)
    counts = np.bincount([numeric_bin(edges, v) for v in values], minlength=len(edges) + 2).astype(np.float64)
    n = len(present)
    if n >= RANGE_BINS_FROM:
        counts[1:-2] *= (n - 1) / (n + 1)
        counts[0] = counts[-2] = n / (n + 1)
    shares = _shares(counts.tolist(), len(values))
    return {"edges": edges, "proportions": shares[:-1], "missing": shares[-1]}


def categorical_reference(values: Sequence[str]) -> dict[str, Any]:
    """A categorical signal's reference: the common values (most frequent first), then "other"."""
    counts = Counter(values)
    common = [
        name
        for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n / len(values) >= MIN_CATEGORY_SHARE and name != OTHER_CATEGORY
    ][:MAX_CATEGORIES]
    other = len(values) - sum(counts[name] for name in common)
    return {"categories": common, "proportions": _shares([*(counts[name] for name in common), other], len(values))}


def build_reference(
    observations: Sequence[Observation], *, data: str, command: str, model_sha256: str
) -> dict[str, Any]:
    """The ``drift_reference`` section of a card, from the observations of the data a model was validated on."""
    if not observations:
        raise ValueError("a drift reference needs at least one image")
    signals: dict[str, Any] = {}
    for name in NUMERIC_SIGNALS:
        ref = numeric_reference([o.numeric(name) for o in observations])
        if ref is not None:
            signals[name] = ref
    signals["manufacturer"] = categorical_reference([o.manufacturer for o in observations])
    return {
        "data": data,
        "command": command,
        "model_sha256": model_sha256,
        "images": len(observations),
        "signals": signals,
    }


# ---- the index --------------------------------------------------------------------------------------------


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (shares; an empty bin counts as
    PSI_FLOOR)."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, PSI_FLOOR), max(a, PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


class _Signal:
    """One signal of one model: its reference shares and how an observation falls into its bins."""

    def __init__(self, name: str, reference: NumericReference | CategoricalReference) -> None:
        self.name = name
        if isinstance(reference, NumericReference):
            self.edges: list[float] = list(reference.edges)
            self.expected = [*reference.proportions, reference.missing]
            self.index: dict[str, int] = {}
        else:
            self.edges = []
            self.expected = list(reference.proportions)
            self.index = {name: i for i, name in enumerate(reference.categories)}

    def bin(self, obs: Observation) -> int:
        if self.name in CATEGORICAL_SIGNALS:
            return self.index.get(obs.manufacturer, len(self.index))
        return numeric_bin(self.edges, obs.numeric(self.name))


class _Window:
    """The last ``size`` observations of one model, as bin counts per signal."""

    def __init__(self, reference: DriftReference, size: int) -> None:
        self.reference = reference
        self.signals = [_Signal(name, reference.signals[name]) for name in SIGNALS if name in reference.signals]
        self.size = size
        self.recent: deque[tuple[int, ...]] = deque()
        self.counts = [[0] * len(s.expected) for s in self.signals]
        self.exported: set[str] = set()  # its metrics, made once: "images" from the first input, "psi" at min_images

    def add(self, obs: Observation) -> None:
        bins = tuple(s.bin(obs) for s in self.signals)
        self.recent.append(bins)
        for counts, b in zip(self.counts, bins, strict=True):
            counts[b] += 1
        if len(self.recent) > self.size:
            for counts, b in zip(self.counts, self.recent.popleft(), strict=True):
                counts[b] -= 1

    def index(self) -> dict[str, float]:
        return {s.name: self.signal_index(i) for i, s in enumerate(self.signals)}

    def signal_index(self, i: int) -> float:
        n = len(self.recent)
        return psi(self.signals[i].expected, [c / n for c in self.counts[i]])


class Drift:
    """Per-model drift of inputs and scores against each card's reference; fed by the pipeline after inference.

    Safe to call from any thread (the pipeline feeds it on the event loop; ``snapshot`` may be asked elsewhere).
    """

    def __init__(self, cards: Mapping[str, ModelCard], config: DriftConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._unwatched: dict[str, str] = {}  # model -> why it is not watched
        for name, card in cards.items():
            if not config.enabled:
                self._unwatched[name] = "drift monitoring is off (drift.enabled)"
            elif card.drift_reference is None:
                self._unwatched[name] = "the model card has no drift_reference"
                logger.info("drift: model %s is not watched: its card has no drift_reference", name)
            elif card.drift_reference.model_sha256 != card.sha256:
                # Its scores came from another model: comparing this one's with them would raise false alarms.
                self._unwatched[name] = STALE_REFERENCE
                logger.warning("drift: model %s is not watched: %s", name, STALE_REFERENCE)
            else:
                self._windows[name] = _Window(card.drift_reference, config.window_images)

    def observe(self, model: str, prepared: Sequence[Prepared], results: Sequence[SliceResult]) -> None:
        """One instance's inputs and their results, as the pipeline has them after inference."""
        if model in self._windows:
            self.add(model, (observation(p, r.scores) for p, r in zip(prepared, results, strict=True)))

    def add(self, model: str, observations: Iterable[Observation]) -> None:
        """Observations of one model's inputs, in the order they were inferred."""
        window = self._windows.get(model)
        if window is None:
            return
        with self._lock:
            for obs in observations:
                window.add(obs)
            images = len(window.recent)
        if self._metrics is None:
            return
        # The metrics read the window when they are scraped: an input costs its bins, not an index of every
        # signal and a gauge per signal (32 of its 41 us, bench/drift_cost.py). A window never shrinks, so once
        # min_images are in, the index stays exported.
        if "images" not in window.exported:
            window.exported.add("images")
            self._metrics.drift_window_images.labels(model=model).set_function(lambda: self._images(window))
        if "psi" not in window.exported and images >= self._config.min_images:
            window.exported.add("psi")
            for i, signal in enumerate(window.signals):
                self._metrics.drift_psi.labels(model=model, signal=signal.name).set_function(
                    functools.partial(self._signal_index, window, i))

    def _images(self, window: _Window) -> float:
        with self._lock:
            return float(len(window.recent))

    def _signal_index(self, window: _Window, i: int) -> float:
        with self._lock:
            return window.signal_index(i)

    def index(self, model: str) -> dict[str, float] | None:
        """The current index per signal of ``model``; None while its window holds fewer than min_images."""
        window = self._windows.get(model)
        if window is None:
            return None
        with self._lock:
            return window.index() if len(window.recent) >= self._config.min_images else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every model's drift state, for ``/status`` and ``edge-agent status`` (no patient data).

        ``state``: "stable" (every index at most PSI_ALERT), "drift" (some above), "collecting" (fewer than
        min_images inputs since start), or "unwatched" (with ``reason``).
        """
        out: dict[str, dict[str, Any]] = {
            model: {"state": "unwatched", "reason": reason} for model, reason in self._unwatched.items()
        }
        with self._lock:
            for model, window in self._windows.items():
                images = len(window.recent)
                index = window.index() if images >= self._config.min_images else None
                drifting = sorted(s for s, v in (index or {}).items() if v > PSI_ALERT)
                state = "collecting" if index is None else ("drift" if drifting else "stable")
                out[model] = {
                    "state": state,
                    "images": images,
                    "window_images": window.size,
                    "min_images": self._config.min_images,
                    "alert_psi": PSI_ALERT,
                    "psi": None if index is None else {s: round(v, 4) for s, v in index.items()},
                    "drifting": drifting,
                    "reference": {"images": window.reference.images, "data": window.reference.data},
                }
        return dict(sorted(out.items()))
