"""Input drift, per model version, in the serving process: is what a version is asked about
still like what it was trained (or first asked) on?

I/O-free apart from reading a version's ``reference.npz`` (once, in a worker thread). A
`DriftMonitor` is fed the inputs of the requests its version answered, from the version's
dispatcher worker after the answers were handed back (`multiserve.batching.Dispatcher`'s
``observe``), so monitoring never delays an answer and never runs on the event loop.

What is measured, per input and per *feature*:

- a 1-D input (``[rows]``): the input itself is one feature;
- a 2-D input (``[rows, columns]``): each column is a feature (up to `MAX_COLUMNS` columns;
  wider inputs are summarised as below);
- a higher-rank (or wider) input: one feature per row, **the mean of the row's values**
  (named ``mean(<input>)``): a cheap summary that moves when the inputs' level moves, though
  not when only their pattern does.

Numeric features are compared with the reference by the population stability index (PSI) over
`bins` bins whose edges are the reference's quantiles, and by the two-sample
Kolmogorov-Smirnov statistic (the largest gap between the two empirical distribution
functions). Integer and boolean features with at most `MAX_CATEGORIES` distinct reference
values, and strings, are categorical: PSI over the reference's category frequencies (values
the reference never had count as one more category), and no KS. Statistics are taken over a
sliding window of the last ``window`` rows. A version is *drifting* when any feature's PSI is
above ``threshold``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiserve.types import Array, ModelMetadata

logger = logging.getLogger("multiserve.monitor")

REFERENCE_FILE = "reference.npz"
# Wider 2-D inputs are summarised per row: a feature per column would cost more than the model.
MAX_COLUMNS = 256
# An integer feature with more distinct reference values than this is treated as numeric.
MAX_CATEGORIES = 64
# Fewest window rows before a verdict: below it, PSI's sampling noise alone nears 0.2.
MIN_ROWS = 200
# Requests queued before their rows are taken in one go (`DriftMonitor.observe`), and the
# longest they wait for it while requests keep coming.
BATCH_JOBS = 32
FLUSH_S = 0.5
# PSI takes logs of proportions: an empty bin counts as this proportion.
_EPSILON = 1e-4

Observed = Sequence[tuple[Mapping[str, Array], Mapping[str, Array]]]


@dataclass(frozen=True, slots=True)
class DriftSettings:
    window: int = 1000  # rows in the sliding window; 0 turns drift monitoring off
    reference_rows: int = 1000  # rows taken as the reference when there is no reference.npz
    threshold: float = 0.2  # PSI above which a feature drifts
    sample_rate: float = 1.0  # fraction of requests whose rows are observed
    bins: int = 10

    @property
    def enabled(self) -> bool:
        return self.window > 0


@dataclass(slots=True)
class FeatureStats:
    input: str
    feature: str  # "x[2]", "x" or "mean(x)"
    kind: str  # "numeric" or "categorical"
    psi: float | None = None
    ks: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "kind": self.kind,
            "psi": None if self.psi is None else round(self.psi, 6),
            "ks": None if self.ks is None else round(self.ks, 6),
        }


class _Feature:
    """One feature's reference, and its statistics over a window of values."""

    def __init__(self, input_name: str, name: str, reference: Array, bins: int) -> None:
        self.input = input_name
        self.name = name
        values = reference.ravel()
        categorical = values.dtype.kind in "USOb"
        if not categorical and values.dtype.kind in "iu":
            categorical = len(np.unique(values)) <= MAX_CATEGORIES
        self.categorical = categorical
        if categorical:
            keys, counts = np.unique(values.astype(str), return_counts=True)
            self.categories = keys
            # One more slot for values the reference never had.
            self.expected = np.append(counts / counts.sum(), 0.0)
            self.sorted = np.empty(0)
            self.edges = np.empty(0)
        else:
            numbers = values.astype(np.float64)
            numbers = numbers[np.isfinite(numbers)]
            self.sorted = np.sort(numbers)
            self.categories = np.empty(0, dtype=str)
            if not len(numbers):
                self.edges, self.expected = np.empty(0), np.ones(1)
                return
            quantiles = np.quantile(numbers, np.linspace(0, 1, bins + 1)[1:-1])
            self.edges = np.unique(quantiles)
            expected = np.bincount(
                np.searchsorted(self.edges, numbers, side="right"), minlength=len(self.edges) + 1
            )
            self.expected = expected / max(expected.sum(), 1)

    def stats(self, window: Array, with_ks: bool = True) -> FeatureStats:
        kind = "categorical" if self.categorical else "numeric"
        if self.categorical:
            labels = window.astype(str)
            index = np.searchsorted(self.categories, labels)
            index = np.minimum(index, len(self.categories) - 1) if len(self.categories) else index
            known = (
                self.categories[index] == labels
                if len(self.categories)
                else np.zeros(len(labels), bool)
            )
            slots = np.where(known, index, len(self.categories))
            actual = np.bincount(slots, minlength=len(self.expected))
            return FeatureStats(self.input, self.name, kind, _psi(self.expected, actual))
        numbers = window.astype(np.float64)
        numbers = numbers[np.isfinite(numbers)]
        if not len(numbers) or not len(self.sorted):
            return FeatureStats(self.input, self.name, kind)
        actual = np.bincount(
            np.searchsorted(self.edges, numbers, side="right"), minlength=len(self.edges) + 1
        )
        ks = _ks(self.sorted, numbers) if with_ks else None
        return FeatureStats(self.input, self.name, kind, _psi(self.expected, actual), ks)


def _psi(expected: Array, actual_counts: Array) -> float:
    actual = actual_counts / max(actual_counts.sum(), 1)
    e = np.maximum(expected, _EPSILON)
    a = np.maximum(actual, _EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def _ks(reference_sorted: Array, window: Array) -> float:
    window_sorted = np.sort(window)
    points = np.concatenate([reference_sorted, window_sorted])
    below_reference = np.searchsorted(reference_sorted, points, side="right") / len(
        reference_sorted
    )
    below_window = np.searchsorted(window_sorted, points, side="right") / len(window_sorted)
    return float(np.max(np.abs(below_reference - below_window)))


def matrix_of(name: str, values: Array) -> tuple[tuple[str, ...], Array] | None:
    """The features of a batch of an input's rows (module docstring): their names, and a
    matrix of one row per input row and one column per feature. None for a scalar input, or a
    higher-rank input of strings (no mean)."""
    if values.ndim == 0:
        return None
    if values.ndim == 1:
        return (name,), values[:, None]
    if values.ndim == 2 and values.shape[1] <= MAX_COLUMNS:
        return tuple(f"{name}[{column}]" for column in range(values.shape[1])), values
    if values.dtype.kind in "USO":
        return None
    rows = values.reshape(values.shape[0], -1)
    return (f"mean({name})",), rows.astype(np.float64).mean(axis=1)[:, None]


def features_of(name: str, values: Array) -> list[tuple[str, Array]]:
    """The features of a batch of an input's rows: (name, one value per row) each."""
    found = matrix_of(name, values)
    if found is None:
        return []
    names, matrix = found
    return [(feature, matrix[:, column]) for column, feature in enumerate(names)]


class _Window:
    """The last ``size`` rows of one input's features (a ring buffer, a column per feature):
    one copy per batch of requests, whatever the number of features."""

    def __init__(self, size: int, names: tuple[str, ...], dtype: np.dtype[Any]) -> None:
        self.names = names
        self.values: Array = np.empty((size, len(names)), dtype=dtype)
        self.size = size
        self.count = 0
        self.next = 0

    def extend(self, values: Array) -> None:
        values = values[-self.size :]
        n = len(values)
        end = self.next + n
        if end <= self.size:
            self.values[self.next : end] = values
        else:
            first = self.size - self.next
            self.values[self.next :] = values[:first]
            self.values[: n - first] = values[first:]
        self.next = end % self.size
        self.count = min(self.count + n, self.size)

    def contents(self) -> Array:
        return self.values if self.count == self.size else self.values[: self.count]


@dataclass(slots=True)
class DriftReport:
    """What `DriftMonitor.report` answers (``GET /models/{name}/{version}/monitor``)."""

    reference_source: str  # "file:<path>", "first_rows", "pending", "none"
    reference_rows: int  # while "pending": the rows collected so far
    window: int
    window_rows: int
    threshold: float
    features: list[FeatureStats] = field(default_factory=list)
    drift: bool = False
    since: float | None = None
    checked_at: float | None = None
    note: str | None = None

    def worst_by_input(self) -> dict[str, FeatureStats]:
        worst: dict[str, FeatureStats] = {}
        for stats in self.features:
            best = worst.get(stats.input)
            if stats.psi is not None and (best is None or (best.psi or 0) < stats.psi):
                worst[stats.input] = stats
        return worst

    def worst(self, count: int = 5) -> list[FeatureStats]:
        scored = [s for s in self.features if s.psi is not None]
        return sorted(scored, key=lambda s: s.psi or 0.0, reverse=True)[:count]

    def to_json(self) -> dict[str, Any]:
        inputs: dict[str, list[dict[str, Any]]] = {}
        for stats in self.features:
            inputs.setdefault(stats.input, []).append(stats.to_json())
        worst_by_input = self.worst_by_input()
        return {
            "reference": {"source": self.reference_source, "rows": self.reference_rows},
            "window": {"size": self.window, "rows": self.window_rows},
            "threshold": self.threshold,
            "drift": self.drift,
            "since": self.since,
            "checked_at": self.checked_at,
            "note": self.note,
            "inputs": {
                name: {
                    "score": None
                    if name not in worst_by_input
                    else round(worst_by_input[name].psi or 0.0, 6),
                    "features": features,
                }
                for name, features in inputs.items()
            },
            "worst": [{"input": s.input, **s.to_json()} for s in self.worst()],
        }


class DriftMonitor:
    """Drift statistics for one loaded version. ``observe`` is called from the version's
    worker thread(s), ``report`` from any thread; a lock keeps them apart.

    ``reference_dirs``: where to look for `REFERENCE_FILE`, first match wins (the version's
    directory, then the model's); a callable, since finding the version's files may block and
    is left to the first call made off the event loop.
    """

    def __init__(
        self,
        name: str,
        version: int,
        metadata: ModelMetadata,
        settings: DriftSettings,
        reference_dirs: Callable[[], Sequence[Path]] = list,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.settings = settings
        self._inputs = [spec.name for spec in metadata.inputs]
        self._reference_dirs = reference_dirs
        self._lock = threading.Lock()
        self._pending: list[Mapping[str, Array]] = []  # inputs observed, not yet taken
        self._flushed_at = time.monotonic()
        self._random = (rng or random.Random()).random
        self._looked_for_file = False
        self._source = "pending" if settings.reference_rows else "none"
        self._collected: dict[str, list[Array]] = {}  # first rows, while they are the reference
        self._collected_rows = 0
        self._reference_rows = 0
        self._features: dict[str, _Feature] = {}
        self._windows: dict[str, _Window] = {}
        self._since_check = 0
        # Recomputed every quarter window of rows: a window's worth of new rows always ends
        # with a verdict on mostly those rows, and the cost per row stays small and constant
        # (benchmarks/monitoring_cost.py). These checks take PSI alone (the verdict); KS,
        # which sorts the window, is computed when asked (`report`, GET .../monitor).
        self._check_every = max(1, settings.window // 4)
        self._note: str | None = None
        self.report_cache = DriftReport(
            self._source, 0, settings.window, 0, settings.threshold, note=None
        )

    # --- in the worker ------------------------------------------------------------------------

    def observe(self, observed: Observed) -> None:
        """Take the inputs of requests just answered. They are only queued here; every
        `BATCH_JOBS` requests (or `FLUSH_S` seconds), their rows are joined and taken in one
        go, so that a small model's requests pay a list append each rather than a numpy copy
        per feature. `report` takes what is queued first."""
        rate = self.settings.sample_rate
        pending = self._pending
        if rate >= 1.0:
            pending.extend(inputs for inputs, _ in observed)
        else:
            pending.extend(inputs for inputs, _ in observed if self._random() < rate)
        now = time.monotonic()
        if len(pending) >= BATCH_JOBS or now - self._flushed_at >= FLUSH_S:
            self._flushed_at = now
            with self._lock:
                self._flush()

    def _flush(self) -> None:
        """Take the queued requests' rows (the model's own inputs only). Under the lock."""
        # A list swapped out while another worker appends to it may lose that one request:
        # a sample missed, which costs less than a lock per request.
        pending, self._pending = self._pending, []
        if not pending:
            return
        joined = {}
        for name in self._inputs:
            parts = [np.asarray(inputs[name]) for inputs in pending if name in inputs]
            if not parts:
                continue
            try:
                joined[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            except ValueError:  # rows of different shapes: take those like the last one's
                last = parts[-1].shape[1:]
                joined[name] = np.concatenate([p for p in parts if p.shape[1:] == last])
        if joined:
            self._take(joined)

    def _take(self, inputs: Mapping[str, Array]) -> None:
        self._find_reference_file()
        if not self._features:
            if self._source != "pending":
                return
            self._collect(inputs)
            return
        rows = 0
        for name, values in inputs.items():
            window = self._windows.get(name)
            found = None if window is None else matrix_of(name, values)
            if window is not None and found is not None and found[0] == window.names:
                window.extend(found[1])
                rows = max(rows, len(values))
        self._since_check += rows
        if self._since_check >= self._check_every:
            self._check()

    def _collect(self, inputs: Mapping[str, Array]) -> None:
        wanted = self.settings.reference_rows
        taken_before = self._collected_rows
        rows = 0
        for name, values in inputs.items():
            if values.ndim == 0:
                continue
            self._collected.setdefault(name, []).append(values[: wanted - self._collected_rows])
            rows = max(rows, min(len(values), wanted - self._collected_rows))
        self._collected_rows += rows
        self.report_cache.reference_rows = self._collected_rows
        if self._collected_rows >= wanted:
            reference = {}
            for name, parts in self._collected.items():
                try:
                    reference[name] = np.concatenate(parts)
                except ValueError:
                    continue
            self._collected = {}
            self._set_reference(reference, "first_rows")
            # The rows of this batch past the reference are the window's first.
            used = self._collected_rows - taken_before
            rest = {
                name: values[used:]
                for name, values in inputs.items()
                if values.ndim and len(values) > used
            }
            if rest:
                self._take(rest)

    def _find_reference_file(self) -> None:
        if self._looked_for_file:
            return
        self._looked_for_file = True
        try:
            directories = list(self._reference_dirs())
        except Exception as exc:
            logger.warning("%s: cannot look for %s: %s", self._what, REFERENCE_FILE, exc)
            return
        for directory in directories:
            path = directory / REFERENCE_FILE
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    reference = {name: data[name] for name in self._inputs if name in data.files}
            except Exception as exc:
                self._note = f"{path} could not be read ({exc}); the first rows are the reference"
                logger.warning("%s: %s", self._what, self._note)
                return
            if not reference:
                self._note = (
                    f"{path} holds no array named after an input ({', '.join(self._inputs)}); "
                    "the first rows are the reference"
                )
                logger.warning("%s: %s", self._what, self._note)
                return
            self._set_reference(reference, f"file:{path}")
            return

    def _set_reference(self, reference: Mapping[str, Array], source: str) -> None:
        features: dict[str, _Feature] = {}
        rows = 0
        for name, values in reference.items():
            values = np.asarray(values)
            for feature_name, column in features_of(name, values):
                if len(column):
                    features[feature_name] = _Feature(
                        name, feature_name, column, self.settings.bins
                    )
                    rows = max(rows, len(column))
        self._features = features
        self._windows = {}
        for name, values in reference.items():
            found = matrix_of(name, np.asarray(values))
            if found is not None and all(feature in features for feature in found[0]):
                dtype = _window_dtype(found[1])
                self._windows[name] = _Window(self.settings.window, found[0], dtype)
        self._source = source
        self._reference_rows = rows
        self.report_cache = self._report(checked=False)

    @property
    def _what(self) -> str:
        return f"{self.name} version {self.version}"

    def _check(self, with_ks: bool = False) -> None:
        self._since_check = 0
        previous = self.report_cache
        report = self._report(checked=True, with_ks=with_ks)
        if report.drift and not previous.drift:
            report.since = report.checked_at
            worst = report.worst(1)[0]
            logger.warning(
                "%s: inputs drifting: %s has PSI %.3f > %g (window of %d rows)",
                self._what,
                worst.feature,
                worst.psi or 0.0,
                self.settings.threshold,
                report.window_rows,
            )
        elif report.drift:
            report.since = previous.since
        elif previous.drift:
            logger.warning("%s: inputs no longer drifting", self._what)
        self.report_cache = report

    def _report(self, *, checked: bool, with_ks: bool = False) -> DriftReport:
        window_rows = max((w.count for w in self._windows.values()), default=0)
        report = DriftReport(
            self._source,
            self._collected_rows if self._source == "pending" else self._reference_rows,
            self.settings.window,
            window_rows,
            self.settings.threshold,
            note=self._note,
        )
        if not checked:
            return report
        report.checked_at = time.time()
        if window_rows < min(self.settings.window, MIN_ROWS):
            report.note = report.note or f"waiting for {MIN_ROWS} rows in the window"
            return report
        for window in self._windows.values():
            contents = window.contents()
            for column, feature_name in enumerate(window.names):
                feature = self._features[feature_name]
                report.features.append(feature.stats(contents[:, column], with_ks))
        threshold = self.settings.threshold
        report.drift = any(s.psi is not None and s.psi > threshold for s in report.features)
        return report

    # --- from anywhere (blocking: compute, and maybe a file read) -----------------------------

    def report(self) -> DriftReport:
        """The statistics over the window as it is now (computed afresh, so call it off the
        event loop); `report_cache` then holds the same."""
        with self._lock:
            self._flush()
            self._find_reference_file()
            if self._features:
                self._check(with_ks=True)
            return self.report_cache

    @property
    def stale(self) -> bool:
        """Rows were observed since the statistics were last computed."""
        return bool(self._pending) or self._since_check > 0

    def cached(self) -> DriftReport:
        """The last statistics computed (cheap: for a metrics scrape on the event loop)."""
        return self.report_cache


def _window_dtype(column: Array) -> np.dtype[Any]:
    # Strings are kept whole (a fixed-width string dtype would cut longer ones).
    return np.dtype(object) if column.dtype.kind in "USO" else column.dtype
