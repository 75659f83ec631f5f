"""Feature statistics of a run, computed on workers: a Beam combine in, Facets/TFDV protos out.

`ComputeStatistics(specs=..., run_dir=...)` turns the pipeline's `FeatureRow`s into a
tensorflow-metadata `DatasetFeatureStatisticsList` at `<run_dir>/statistics/statistics.pb` (the
binary proto TFDV's `load_statistics` and Facets read) and emits one small JSON-able summary for
run.json. Every accumulator merges (moments by Chan's parallel update, bounded KLL quantile sketches),
so the work grows on workers, rows are folded into accumulators where they are made and only
accumulators cross a shuffle, and the launcher only sees the result.

What is described, for each output `name` of the run:
- frame-level `[frames, *shape]`: `name/frames` (every value of every frame, all dimensions
  together), `name/frames/<d>` per dimension over frames, and `name/clip_mean/<d>` per dimension
  over records (each record's mean over its frames); a scalar per frame has `name/frames` and
  `name/clip_mean`.
- clip-level: `name` (all dimensions together) and, for vectors, `name/<d>`. Integer and bool
  outputs are summarised as numbers. A variable-length output (shape `(-1, ...)`) has `name`
  (every value) and `name/count` (values per record). A string output is categorical (`name`:
  its value counts); events have `name/count` (events per record), each numeric field as
  `name/<field>` and each string field's value counts as `name/<field>`.
- the records themselves: `duration_seconds`, `source_duration_seconds`, `source_sample_rate`,
  `source_channels` (numeric) and `label`, `split` (categorical).

Dataset 0 of the list is every record (named `All Examples`, as TFDV names it); one further
dataset per label (`label=<label>`) holds the per-record streams (clip means, clip-level outputs,
durations), which is what per-label plots need, without the per-frame cost.

Histograms: each numeric feature carries a 20-bucket equal-width STANDARD histogram over
[min, max] and a 10-bucket QUANTILES histogram, both derived from its quantile sketch, plus its
NaN count (`num_nan`). NaNs are counted, never fed to moments or sketches. Sketches keep float32
values as float32, and clip means rounded to float32 (a relative 6e-8); moments are float64.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np

from featurebeam import stages
from featurebeam.elements import FeatureRow
from features.base import OutputSpec

STATISTICS_DIR = "statistics"
STATISTICS_FILE = "statistics.pb"
ALL_EXAMPLES = "All Examples"  # TFDV's name for the unsliced dataset
STANDARD_BUCKETS = 20
QUANTILE_BUCKETS = 10
_CDF_POINTS = 201  # quantile boundaries (min, 0.5 %, ..., max) the standard histogram is interpolated from
_SKETCH_K = 256  # items in a sketch's top level: ~3 x this many per dimension in all, rank error about 1 %
_FLUSH_VALUES = 1 << 18  # buffered values per stream before they go into moments and sketch
# The sketch sees at most this many evenly spaced rows (frames) of a record, each weighted by
# rows / sampled, so a one-hour record costs what a two-second one does and still counts for its
# length; moments, min, max, NaN and zero counts see every value. Sketching every frame cost
# about 270 ns per value, most of the statistics' time (benchmarks/feature_statistics.py).
_SKETCH_ROWS = 32

RECORD_FEATURES = ("duration_seconds", "source_duration_seconds", "source_sample_rate", "source_channels")
CATEGORICAL_FEATURES = ("label", "split")
# run.json's `statistics` for a run extracted with --statistics=off (no statistics step ran).
OFF = {"computed": False, "reason": "the run was extracted with --statistics=off"}


def absent(run: dict[str, Any]) -> str | None:
    """Why `run` (its run.json) has no statistics by design, or None when it should have them."""
    value = run.get("statistics")
    if isinstance(value, dict) and value.get("computed") is False:
        return f"Feature statistics are absent: {value.get('reason', 'they were not computed')}"
    return None


def slice_name(label: str) -> str:
    return f"label={label}"


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One group of numeric streams sharing a sketch: `dims` values per row."""

    path: str
    dims: int
    per_dim: bool  # also describe each dimension as `path/<d>`
    per_record: bool  # one row per record (sliced by label), not one per frame
    # Its sketch keeps the values as float32: clip means, float64 means of float32 features, are
    # rounded to their features' precision there (a relative 6e-8, far inside the sketch's rank
    # error), which halves what the accumulator of a batch of short clips ships.
    rounded: bool = False


def _streams(specs: Sequence[OutputSpec]) -> list[_Stream]:
    out = [_Stream(name, 1, False, True) for name in RECORD_FEATURES]
    for spec in specs:
        if spec.dtype == "events":
            out.append(_Stream(f"{spec.name}/count", 1, False, True))
            out.extend(_Stream(f"{spec.name}/{field}", 1, False, True) for field, kind in spec.fields if kind != "string")
            continue
        if spec.dtype == "string":
            continue  # categorical (_categories)
        if spec.variable:
            out.append(_Stream(spec.name, 1, False, True))
            out.append(_Stream(f"{spec.name}/count", 1, False, True))
            continue
        dims = int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1
        vector = bool(spec.shape)
        if spec.level == "frame":
            if vector:
                out.append(_Stream(f"{spec.name}/frames", 1, False, False))  # all dimensions together
            out.append(_Stream(f"{spec.name}/frames" if not vector else f"{spec.name}/frames/", dims, vector, False))
            out.append(_Stream(f"{spec.name}/clip_mean" if not vector else f"{spec.name}/clip_mean/", dims, vector, True, True))
        else:
            out.append(_Stream(spec.name, 1, False, True))
            if vector:
                out.append(_Stream(f"{spec.name}/", dims, True, True))
    return out


def _row_values(row: FeatureRow, specs: Sequence[OutputSpec]) -> dict[str, np.ndarray]:
    """Stream path -> `[rows, dims]` values for one record (features in their own dtype, the rest float64)."""
    values = {
        "duration_seconds": np.array([[row.num_samples / row.sample_rate]]),
        "source_duration_seconds": np.array([[row.source_duration_seconds]], dtype=np.float64),
        "source_sample_rate": np.array([[row.source_sample_rate]], dtype=np.float64),
        "source_channels": np.array([[row.source_channels]], dtype=np.float64),
    }
    for spec in specs:
        if spec.dtype == "events":
            events = row.features[spec.name]
            values[f"{spec.name}/count"] = np.array([[len(events)]], dtype=np.float64)
            for field, kind in spec.fields:
                if kind != "string":
                    values[f"{spec.name}/{field}"] = np.array([e[field] for e in events], dtype=np.float64).reshape(-1, 1)
            continue
        if spec.dtype == "string":
            continue
        if spec.variable:
            array = np.asarray(row.features[spec.name], dtype=np.float64)
            values[spec.name] = array.reshape(-1, 1)
            values[f"{spec.name}/count"] = np.array([[len(array)]], dtype=np.float64)
            continue
        # Kept in the features' own dtype (float32): a long record's frames are not copied to
        # float64 whole; `_Moments.flush` widens them a block at a time.
        array = np.asarray(row.features[spec.name])
        if not spec.floating:
            array = array.astype(np.float64)  # integers and bools are summarised as numbers
        vector = bool(spec.shape)
        if spec.level == "frame":
            frames = array.reshape(array.shape[0], -1)
            if vector:
                values[f"{spec.name}/frames"] = frames.reshape(-1, 1)
            values[f"{spec.name}/frames/" if vector else f"{spec.name}/frames"] = frames
            with np.errstate(invalid="ignore"):
                mean = (
                    frames.mean(axis=0, keepdims=True, dtype=np.float64) if len(frames) else np.full((1, frames.shape[1]), np.nan)
                )
            values[f"{spec.name}/clip_mean/" if vector else f"{spec.name}/clip_mean"] = mean
        else:
            flat = array.reshape(1, -1)
            values[spec.name] = flat.reshape(-1, 1)
            if vector:
                values[f"{spec.name}/"] = flat
    return values


def _categories(row: FeatureRow, specs: Sequence[OutputSpec]) -> dict[str, list[str]]:
    """Categorical feature -> the record's values of it: string outputs and string event fields."""
    out = {}
    for spec in specs:
        if spec.dtype == "string":
            out[spec.name] = [str(v) for v in np.asarray(row.features[spec.name], dtype=object).ravel()]
        elif spec.dtype == "events":
            for field, kind in spec.fields:
                if kind == "string":
                    out[f"{spec.name}/{field}"] = [e[field] for e in row.features[spec.name]]
    return out


class _Sketch:
    """A mergeable quantile sketch of `dims` weighted streams whose size does not grow with the
    data: a deterministic, weighted KLL (Karnin, Lang and Liberty, 2016), vectorised over dims.

    Items live in levels; a level over its capacity is sorted (per dimension) and compacted: its
    items are paired in value order and each pair becomes one item carrying both weights, at the
    value of the heavier of the two (ties alternate between compactions, so no side is favoured),
    one level up. Capacities shrink geometrically (2/3) below the top level, so the sketch holds
    about 3 x `k` items per dimension whatever was added; each compaction moves any rank by at most
    one pair's weight, which keeps the rank error near 1/k (about 1 % at the default k, measured
    in tests/export/test_statistics.py). NaNs carry no weight. tfx-bsl's QuantilesSketch was used
    before: as exact, but its state grew with the data to ~180 kB per dimension (40 MB per
    accumulator at 10,000 items of one log-mel), and the FnApiRunner holds accumulators in the
    launcher.
    """

    def __init__(self, dims: int, k: int = _SKETCH_K):
        self.dims, self.k = dims, k
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []  # (values, weights), each [dims, n]
        self.compactions: list[int] = []  # per level: ties alternate between its compactions

    def _capacity(self, level: int) -> int:
        return max(8, int(self.k * (2 / 3) ** (len(self.levels) - 1 - level)))

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None:
        """rows `[n, dims]` (NaN allowed), weights `[n]`."""
        # Values keep float32 when they come as float32 (frame features): they are only compared
        # and copied, never summed, so the sketch is exact in half the bytes it ships in.
        values = np.ascontiguousarray(rows.T, dtype=np.float32 if rows.dtype == np.float32 else np.float64)
        nan = np.isnan(values)
        w = np.where(nan, 0.0, np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape))
        self._push(0, np.where(nan, 0.0, values), w)
        self._compress()

    def merge(self, other: "_Sketch") -> None:
        for level, (values, weights) in enumerate(other.levels):
            self._push(level, values, weights)
        self._compress()

    def _push(self, level: int, values: np.ndarray, weights: np.ndarray) -> None:
        while len(self.levels) <= level:
            self.levels.append((np.zeros((self.dims, 0), dtype=values.dtype), np.zeros((self.dims, 0))))
            self.compactions.append(0)
        v, w = self.levels[level]
        self.levels[level] = (np.concatenate([v, values], axis=1), np.concatenate([w, weights], axis=1))

    def _compress(self) -> None:
        level = 0
        while level < len(self.levels):
            values, weights = self.levels[level]
            n = values.shape[1]
            if n > self._capacity(level):
                order = np.argsort(values, axis=1, kind="stable")
                values, weights = np.take_along_axis(values, order, 1), np.take_along_axis(weights, order, 1)
                pairs = n // 2 * 2
                va, vb = values[:, 0:pairs:2], values[:, 1:pairs:2]
                wa, wb = weights[:, 0:pairs:2], weights[:, 1:pairs:2]
                first = (wa > wb) | ((wa == wb) & (self.compactions[level] % 2 == 0))
                self.compactions[level] += 1
                self.levels[level] = (values[:, pairs:], weights[:, pairs:])
                self._push(level + 1, np.where(first, va, vb), wa + wb)
            level += 1

    def quantiles(self, points: int) -> np.ndarray:
        """`[dims, points]` values at evenly spaced ranks 0 .. 1 (NaN for a dimension with no weight)."""
        if not self.levels:
            return np.full((self.dims, points), np.nan)
        values = np.concatenate([v for v, _ in self.levels], axis=1)
        weights = np.concatenate([w for _, w in self.levels], axis=1)
        out = np.full((self.dims, points), np.nan)
        ranks = np.linspace(0.0, 1.0, points)
        for d in range(self.dims):
            keep = weights[d] > 0
            if not keep.any():
                continue
            v, w = values[d, keep], weights[d, keep]
            order = np.argsort(v, kind="stable")
            v, w = v[order], w[order]
            cumulative = np.cumsum(w)  # the inverse CDF: the first item whose mass reaches the rank
            out[d] = v[np.minimum(np.searchsorted(cumulative, ranks * cumulative[-1], side="left"), len(v) - 1)]
        return out

    def items(self) -> int:
        return sum(v.shape[1] for v, _ in self.levels)

    def __getstate__(self):
        # A level's weights are mostly one value (every pair of a compaction of equal weights sums
        # to the same): such a level pickles its weight once, halving what an accumulator costs
        # to move between workers (and what FnApiRunner holds in the launcher). Lossless.
        levels = []
        for values, weights in self.levels:
            if weights.size and (weights == weights.flat[0]).all():
                weights = (float(weights.flat[0]), weights.shape)
            levels.append((values, weights))
        return {**self.__dict__, "levels": levels}

    def __setstate__(self, state):
        levels = []
        for values, weights in state["levels"]:
            if isinstance(weights, tuple):
                weights = np.full(weights[1], weights[0])
            levels.append((values, weights))
        self.__dict__.update({**state, "levels": levels})


class _Moments:
    """Mergeable per-dimension count / mean / M2 / min / max / NaN and zero counts, plus a
    `_Sketch` of the same values. Rows are buffered and added in blocks."""

    def __init__(self, dims: int, *, rounded: bool = False):
        self.dims = dims
        self.rounded = rounded  # the sketch takes the values as float32 (see `_Stream.rounded`)
        self.records = 0  # records that had this stream
        self.values_per_record = [np.inf, 0.0, 0.0]  # min, max, total rows per record
        self.count = np.zeros(dims)
        self.mean = np.zeros(dims)
        self.m2 = np.zeros(dims)
        self.min = np.full(dims, np.inf)
        self.max = np.full(dims, -np.inf)
        self.nan = np.zeros(dims, dtype=np.int64)
        self.zeros = np.zeros(dims, dtype=np.int64)
        self.sketch = _Sketch(dims)
        self.buffer: list[np.ndarray] = []
        self.sampled: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.buffered = 0

    def add(self, rows: np.ndarray) -> None:
        self.records += 1
        n = rows.shape[0]
        v = self.values_per_record
        v[0], v[1], v[2] = min(v[0], n), max(v[1], n), v[2] + n
        self.buffer.append(rows)
        index, weights = _sketch_rows(n)
        self.sampled.append(rows if index is None else rows[index])
        self.weights.append(weights)
        self.buffered += rows.size
        if self.buffered >= _FLUSH_VALUES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        sampled, weights = np.concatenate(self.sampled, axis=0), np.concatenate(self.weights)
        buffer, self.buffer, self.sampled, self.weights, self.buffered = self.buffer, [], [], [], 0
        rows = max(1, _FLUSH_VALUES // self.dims)  # float64 temporaries of at most this many rows
        pending: list[np.ndarray] = []
        count = 0
        for part in buffer:  # many short records make one block, a long one several
            start = 0
            while start < len(part):
                take = min(rows - count, len(part) - start)
                pending.append(part[start : start + take])
                count += take
                start += take
                if count >= rows:
                    self._add_block(np.concatenate(pending, axis=0).astype(np.float64))
                    pending, count = [], 0
        if pending:
            self._add_block(np.concatenate(pending, axis=0).astype(np.float64))
        self.sketch.add(sampled.astype(np.float32) if self.rounded else sampled, weights)

    def _add_block(self, block: np.ndarray) -> None:
        nan = np.isnan(block)
        nans = nan.sum(axis=0)
        self.nan += nans
        self.zeros += (block == 0).sum(axis=0)
        if nans.any():
            finite = ~nan
            n = finite.sum(axis=0).astype(np.float64)
            if not n.any():
                return
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, np.where(finite, block, 0.0).sum(axis=0) / np.maximum(n, 1), 0.0)
                m2 = (np.where(finite, block - mean, 0.0) ** 2).sum(axis=0)
            low, high = np.where(finite, block, np.inf).min(axis=0), np.where(finite, block, -np.inf).max(axis=0)
        else:  # the usual case (extraction dead-letters non-finite rows): no masked copies
            n = np.full(block.shape[1], float(len(block)))
            mean = block.sum(axis=0) / n
            m2 = ((block - mean) ** 2).sum(axis=0)
            low, high = block.min(axis=0), block.max(axis=0)
        self._merge_moments(n, mean, m2)
        self.min = np.minimum(self.min, low)
        self.max = np.maximum(self.max, high)

    def _merge_moments(self, n, mean, m2) -> None:
        total = self.count + n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean - self.mean
            self.mean = np.where(total > 0, self.mean + delta * n / np.maximum(total, 1), 0.0)
            self.m2 = self.m2 + m2 + np.where(total > 0, delta**2 * self.count * n / np.maximum(total, 1), 0.0)
        self.count = total

    def merge(self, other: "_Moments") -> None:
        self.flush()
        other.flush()
        self.records += other.records
        a, b = self.values_per_record, other.values_per_record
        self.values_per_record = [min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2]]
        self._merge_moments(other.count, other.mean, other.m2)
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        self.nan += other.nan
        self.zeros += other.zeros
        self.sketch.merge(other.sketch)

    def __getstate__(self):
        # Per-dimension counts (and NaN and zero counts) are mostly one value across dimensions:
        # such an array pickles that value once. Lossless; a third off a label slice's moments.
        self.flush()
        state = dict(self.__dict__)
        for name in _UNIFORM:
            array = state[name]
            if array.size and (array == array.flat[0]).all():
                state[name] = (array.flat[0].item(), array.dtype.str, array.shape)
        return state

    def __setstate__(self, state):
        for name in _UNIFORM:
            if isinstance(state.get(name), tuple):
                value, dtype, shape = state[name]
                state[name] = np.full(shape, value, dtype=np.dtype(dtype))
        self.__dict__.update(state)


_UNIFORM = ("count", "nan", "zeros")

@functools.lru_cache(maxsize=256)
def _sketch_rows(n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Which of a record's `n` rows its sketch takes (None: all) and their weights; the same for
    every record of a length, so computed once per length (clips mostly share a few)."""
    if n > _SKETCH_ROWS:
        index = np.unique(np.linspace(0, n - 1, _SKETCH_ROWS).round().astype(np.int64))
        index.flags.writeable = False
        weights = np.full(len(index), n / len(index))
    else:
        index, weights = None, np.ones(n)
    weights.flags.writeable = False
    return index, weights


class _Accumulator:
    def __init__(self):
        self.records: collections.Counter = collections.Counter()  # slice -> records
        self.numeric: dict[tuple[str, str], _Moments] = {}  # (slice, stream path) -> moments
        self.categorical: dict[tuple[str, str], collections.Counter] = {}


class _StatisticsFn(beam.CombineFn):
    """FeatureRow -> DatasetFeatureStatisticsList (as serialized bytes, so it pickles anywhere)."""

    def __init__(self, specs: Sequence[OutputSpec]):
        self._specs = tuple(specs)
        self._streams = {s.path: s for s in _streams(self._specs)}
        self._us = stages.counter("statistics")

    def create_accumulator(self):
        return _Accumulator()

    def add_input(self, acc: _Accumulator, row: FeatureRow):
        with stages.timer(self._us):
            return self._add(acc, row)

    def _add(self, acc: _Accumulator, row: FeatureRow):
        slices = [ALL_EXAMPLES] + ([slice_name(row.label)] if row.label else [])
        for name in slices:
            acc.records[name] += 1
        for path, rows in _row_values(row, self._specs).items():
            stream = self._streams[path]
            for name in slices if stream.per_record else slices[:1]:
                moments = acc.numeric.get((name, path))
                if moments is None:
                    moments = acc.numeric[(name, path)] = _Moments(stream.dims, rounded=stream.rounded)
                moments.add(rows)
        for feature in CATEGORICAL_FEATURES:
            value = getattr(row, feature) or ""
            for name in slices:
                acc.categorical.setdefault((name, feature), collections.Counter())[value] += 1
        for feature, found in _categories(row, self._specs).items():
            for name in slices:
                acc.categorical.setdefault((name, feature), collections.Counter()).update(found)
        return acc

    def merge_accumulators(self, accumulators: Iterable[_Accumulator]):
        with stages.timer(self._us):
            return self._merge(accumulators)

    def _merge(self, accumulators: Iterable[_Accumulator]):
        accumulators = iter(accumulators)
        out = next(accumulators)
        for acc in accumulators:
            out.records.update(acc.records)
            for key, moments in acc.numeric.items():
                if key in out.numeric:
                    out.numeric[key].merge(moments)
                else:
                    out.numeric[key] = moments
            for key, counter in acc.categorical.items():
                out.categorical.setdefault(key, collections.Counter()).update(counter)
        return out

    def compact(self, acc: _Accumulator):
        with stages.timer(self._us):
            for moments in acc.numeric.values():
                moments.flush()
        return acc

    def extract_output(self, acc: _Accumulator) -> bytes:
        with stages.timer(self._us):
            return _to_proto(acc, self._streams).SerializeToString()


def _to_proto(acc: _Accumulator, streams: dict[str, _Stream]):
    from tensorflow_metadata.proto.v0 import statistics_pb2

    result = statistics_pb2.DatasetFeatureStatisticsList()
    names = [ALL_EXAMPLES] + sorted(n for n in acc.records if n != ALL_EXAMPLES)
    for name in names:
        dataset = result.datasets.add(name=name, num_examples=acc.records[name])
        for (slice_, path), moments in sorted(acc.numeric.items()):
            if slice_ == name:
                _add_numeric(dataset, path, moments, streams[path], acc.records[name])
        features = list(CATEGORICAL_FEATURES) + sorted({f for s, f in acc.categorical if s == name} - set(CATEGORICAL_FEATURES))
        for feature in features:
            counter = acc.categorical.get((name, feature))
            if counter is not None:
                _add_categorical(dataset, feature, counter)
    return result


def _steps(path: str) -> list[str]:
    return [step for step in path.split("/") if step]


def _add_numeric(dataset, path: str, m: _Moments, stream: _Stream, num_examples: int) -> None:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    m.flush()
    quantiles = m.sketch.quantiles(_CDF_POINTS)
    std = np.sqrt(np.where(m.count > 0, m.m2 / np.maximum(m.count, 1), 0.0))
    dims = range(m.dims) if stream.per_dim else [None]
    for d in dims:
        i = 0 if d is None else d
        feature = dataset.features.add(type=statistics_pb2.FeatureNameStatistics.FLOAT)
        feature.path.step.extend(_steps(path) + ([] if d is None else [str(d)]))
        num = feature.num_stats
        common = num.common_stats
        common.num_non_missing = m.records
        common.num_missing = max(0, num_examples - m.records)
        low, high, total = m.values_per_record
        common.min_num_values = int(low) if m.records else 0
        common.max_num_values = int(high)
        common.avg_num_values = float(total / m.records) if m.records else 0.0
        common.tot_num_values = int(total)
        num.num_zeros = int(m.zeros[i])
        if m.count[i] > 0:
            num.mean, num.std_dev = float(m.mean[i]), float(std[i])
            num.min, num.max = float(m.min[i]), float(m.max[i])
            q = np.clip(quantiles[i], m.min[i], m.max[i])
            q[0], q[-1] = m.min[i], m.max[i]  # the exact extremes, whatever the sketch kept
            num.median = float(np.interp(0.5, np.linspace(0, 1, _CDF_POINTS), q))
            _standard_histogram(num.histograms.add(), q, m.count[i], m.min[i], m.max[i], int(m.nan[i]))
            _quantile_histogram(num.histograms.add(), q, m.count[i], int(m.nan[i]))
        else:  # every value was NaN: say so in an empty histogram
            num.histograms.add(type=statistics_pb2.Histogram.STANDARD, num_nan=int(m.nan[i]))


def interval_mass(lows: np.ndarray, highs: np.ndarray, masses: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mass of buckets `[lows, highs]` (spread uniformly; a bucket with low == high is a point)
    falling in each cell `[edges[j], edges[j+1])` (the last cell closed): `[len(edges) - 1]`.

    Shared by the statistics (quantile intervals -> equal-width buckets) and by
    `pipelines.compare` (two runs' histograms -> common cells).
    """
    lows, highs, masses = (np.asarray(a, dtype=np.float64) for a in (lows, highs, masses))
    cells = len(edges) - 1
    out = np.zeros(cells)
    width = highs - lows
    point = width <= 0
    if point.any():
        index = np.clip(np.searchsorted(edges, lows[point], side="right") - 1, 0, cells - 1)
        np.add.at(out, index, masses[point])
    spread = ~point
    if spread.any():
        lo, hi, w, ms = lows[spread, None], highs[spread, None], width[spread, None], masses[spread, None]
        overlap = np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0, None)
        out += (ms * overlap / w).sum(axis=0)
    return out


def _standard_histogram(histogram, q: np.ndarray, count: float, low: float, high: float, nan: int) -> None:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    histogram.type = statistics_pb2.Histogram.STANDARD
    histogram.num_nan = nan
    if high <= low:
        histogram.buckets.add(low_value=float(low), high_value=float(high), sample_count=float(count))
        return
    edges = np.linspace(low, high, STANDARD_BUCKETS + 1)
    mass = interval_mass(q[:-1], q[1:], np.full(len(q) - 1, count / (len(q) - 1)), edges)
    for j in range(STANDARD_BUCKETS):
        histogram.buckets.add(low_value=float(edges[j]), high_value=float(edges[j + 1]), sample_count=float(mass[j]))


def _quantile_histogram(histogram, q: np.ndarray, count: float, nan: int) -> None:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    histogram.type = statistics_pb2.Histogram.QUANTILES
    histogram.num_nan = nan
    bounds = np.interp(np.linspace(0, 1, QUANTILE_BUCKETS + 1), np.linspace(0, 1, len(q)), q)
    for j in range(QUANTILE_BUCKETS):
        histogram.buckets.add(low_value=float(bounds[j]), high_value=float(bounds[j + 1]), sample_count=count / QUANTILE_BUCKETS)


def _add_categorical(dataset, name: str, counter: collections.Counter) -> None:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    feature = dataset.features.add(type=statistics_pb2.FeatureNameStatistics.STRING)
    feature.path.step.extend(_steps(name))
    stats = feature.string_stats
    total = sum(counter.values())
    stats.common_stats.num_non_missing = total
    stats.common_stats.min_num_values = stats.common_stats.max_num_values = 1
    stats.common_stats.avg_num_values = 1.0
    stats.common_stats.tot_num_values = total
    stats.unique = len(counter)
    stats.avg_length = sum(len(v) * n for v, n in counter.items()) / total if total else 0.0
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    for rank, (value, n) in enumerate(ranked):
        stats.top_values.add(value=value, frequency=n)
        stats.rank_histogram.buckets.add(low_rank=rank, high_rank=rank, label=value, sample_count=n)


def summary(statistics) -> dict[str, Any]:
    """A small JSON summary of a `DatasetFeatureStatisticsList` for run.json: per feature of the
    unsliced dataset, except per-dimension ones, its count, mean, std, min, median, max, NaN and
    zero counts; per categorical feature its value counts."""
    dataset = statistics.datasets[0]
    numeric, categorical = {}, {}
    for feature in dataset.features:
        path = "/".join(feature.path.step)
        if feature.HasField("num_stats"):
            if feature.path.step[-1].isdigit():
                continue
            num = feature.num_stats
            numeric[path] = {
                "count": int(num.common_stats.tot_num_values),
                "mean": num.mean,
                "std": num.std_dev,
                "min": num.min,
                "median": num.median,
                "max": num.max,
                "nan": int(num.histograms[0].num_nan) if num.histograms else 0,
                "zeros": int(num.num_zeros),
            }
        elif feature.HasField("string_stats"):
            categorical[path] = {v.value: int(v.frequency) for v in feature.string_stats.top_values}
    return {
        "file": f"{STATISTICS_DIR}/{STATISTICS_FILE}",
        "records": int(dataset.num_examples),
        "slices": [d.name for d in statistics.datasets],
        "numeric": numeric,
        "categorical": categorical,
    }


def read(run_dir: str):
    """The run's `DatasetFeatureStatisticsList`, read from `<run_dir>/statistics/statistics.pb`."""
    from apache_beam.io.filesystems import FileSystems
    from tensorflow_metadata.proto.v0 import statistics_pb2

    from export import metadata
    from featurebeam.errors import OutputError

    path = metadata.join(run_dir, STATISTICS_DIR, STATISTICS_FILE)
    if not FileSystems.exists(path):
        raise OutputError(
            f"{run_dir} has no {STATISTICS_DIR}/{STATISTICS_FILE}; compute it with 'python -m export.statistics {run_dir}'"
        )
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return statistics_pb2.DatasetFeatureStatisticsList.FromString(handle.read())


def _write(serialized: bytes, run_dir: str) -> dict[str, Any]:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    from export import metadata

    metadata.write_atomic(metadata.join(run_dir, STATISTICS_DIR, STATISTICS_FILE), serialized)
    return summary(statistics_pb2.DatasetFeatureStatisticsList.FromString(serialized))


class ComputeStatistics(beam.PTransform):
    """`PCollection[FeatureRow]`, or a tuple of them, -> a one-element `PCollection[dict]`: the
    statistics summary (of all their rows together, when several).

    Rows never cross a shuffle: each element is folded into an accumulator where it is made and
    only accumulators are grouped (`pipelines.combine.CombineToOne`), so no runner, lifting
    combiners or not, brings the run's rows to one worker. Elements that hold many rows (an
    extraction batch, a commit) give one accumulator for all of them (`rows_of`).

    specs: the run's output specs (what `features.json["outputs"]` describes).
    run_dir: where `statistics/statistics.pb` is written (local or any Beam file system); None
      only computes, and the element is then the serialized proto instead of a summary.
    rows_of: how an element gives its FeatureRows (`lambda batch: batch` for lists of rows); one
      callable, or one per input PCollection. By default each element is one row.
    """

    def __init__(self, *, specs: Sequence[OutputSpec], run_dir: str | None, rows_of=None):
        super().__init__()
        self._specs = tuple(specs)
        self._run_dir = run_dir
        self._rows_of = rows_of

    def expand(self, rows):
        from pipelines.combine import CombineToOne

        statistics = rows | "Combine" >> CombineToOne(_StatisticsFn(self._specs), inputs=self._rows_of)
        if self._run_dir is None:
            return statistics
        return statistics | "Write" >> beam.Map(_write, self._run_dir)


def specs_of(features_json: dict) -> tuple[OutputSpec, ...]:
    """OutputSpecs back from `features.json["outputs"]`."""
    return tuple(OutputSpec.from_json(o) for o in features_json["outputs"])


def compute_for_run(run_dir: str, *, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Compute a finished run's statistics again from its Parquet shards (for runs made before
    statistics were part of the pipeline); returns the summary."""
    import glob

    from apache_beam.options.pipeline_options import PipelineOptions

    from export import metadata, records
    from featurebeam.errors import OutputError

    from export import formats

    specs = specs_of(metadata.read_json(metadata.join(run_dir, metadata.FEATURES_JSON)))
    run = metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON))
    formats.require(run, formats.PARQUET, run_dir=run_dir, what="computing statistics again",
                    fix="its statistics/statistics.pb was written by the run itself; rerun with --formats=tfrecord,parquet to recompute")
    pattern = metadata.join(run_dir, "parquet", "part-*.parquet")
    if "://" not in run_dir and not glob.glob(pattern):
        raise OutputError(f"{run_dir}/parquet holds no part-*.parquet shards; pass a finished featurebeam run folder")
    options = PipelineOptions(list(beam_args) or ["--runner=FnApiRunner"])
    with beam.Pipeline(options=options) as p:
        (
            p
            | "Read" >> beam.io.ReadFromParquetBatched(pattern)  # Arrow tables: one accumulator per table
            | "Statistics" >> ComputeStatistics(
                specs=specs, run_dir=run_dir, rows_of=lambda table: (records.row_from_parquet(r, specs, reused=()) for r in table.to_pylist())
            )
        )
    return summary(read(run_dir))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from featurebeam.errors import FeaturebeamError

    parser = argparse.ArgumentParser(
        prog="python -m export.statistics", description="Compute a run's feature statistics from its Parquet shards."
    )
    parser.add_argument("run_dir")
    args, beam_args = parser.parse_known_args(argv)
    try:
        result = compute_for_run(args.run_dir, beam_args=beam_args)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("file", "records", "slices")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
