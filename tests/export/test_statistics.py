"""Feature statistics on synthetic rows with known answers: moments, NaN and zero counts,
quantiles and histograms per dimension, label slices, mergeable (and picklable) accumulators,
and the written DatasetFeatureStatisticsList read back."""

from __future__ import annotations

import dataclasses
import pickle

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from export import statistics
from featurebeam.elements import FeatureRow
from featurebeam.errors import OutputError
from features.base import OutputSpec

N = 100
SPECS = (
    OutputSpec(name="v", level="frame", shape=(2,), hop_length=160, sample_rate=16000),
    OutputSpec(name="c", level="clip", shape=()),
)


def _row(r: int) -> FeatureRow:
    # v: dim 0 runs 0..299 over all frames of all records, dim 1 is always 0; c = r, NaN for the last.
    frames = np.stack([np.arange(3 * r, 3 * r + 3, dtype=np.float32), np.zeros(3, np.float32)], axis=1)
    return FeatureRow(
        key=f"k{r:03d}",
        item_key=f"k{r:03d}",
        uri=f"/audio/{r}.wav",
        label="a" if r % 2 == 0 else "b",
        split="train" if r < 80 else "test",
        metadata=(),
        start_sample=0,
        segment_index=0,
        last_segment=True,
        silent=False,
        sample_rate=16000,
        source_sample_rate=44100 if r < 25 else 16000,
        source_channels=1,
        source_duration_seconds=float(r + 1),
        num_samples=16000 * (r + 1),
        features={"v": frames, "c": np.float32(np.nan if r == N - 1 else r)},
    )


ROWS = [_row(r) for r in range(N)]


def _features(dataset) -> dict:
    return {"/".join(f.path.step): f for f in dataset.features}


def _combine(rows):
    fn = statistics._StatisticsFn(SPECS)
    acc = fn.create_accumulator()
    for row in rows:
        acc = fn.add_input(acc, row)
    return fn, acc


def _proto(serialized: bytes):
    from tensorflow_metadata.proto.v0 import statistics_pb2

    return statistics_pb2.DatasetFeatureStatisticsList.FromString(serialized)


def test_known_moments_quantiles_and_histograms():
    fn, acc = _combine(ROWS)
    stats = _proto(fn.extract_output(acc))
    assert [d.name for d in stats.datasets] == ["All Examples", "label=a", "label=b"]
    all_ = stats.datasets[0]
    assert all_.num_examples == N
    f = _features(all_)

    dim0 = f["v/frames/0"].num_stats
    assert dim0.common_stats.tot_num_values == 3 * N and dim0.common_stats.avg_num_values == 3
    assert dim0.mean == pytest.approx(149.5)
    assert dim0.std_dev == pytest.approx(np.std(np.arange(300.0)))
    assert (dim0.min, dim0.max, dim0.num_zeros) == (0.0, 299.0, 1)
    assert dim0.median == pytest.approx(149.5, abs=3.0)  # the sketch's rank error, about 1 %
    standard, quantiles = dim0.histograms
    assert standard.type == standard.STANDARD and len(standard.buckets) == statistics.STANDARD_BUCKETS
    assert sum(b.sample_count for b in standard.buckets) == pytest.approx(300)
    np.testing.assert_allclose([b.sample_count for b in standard.buckets], 15, atol=1.6)  # uniform 0..299
    assert quantiles.type == quantiles.QUANTILES
    np.testing.assert_allclose([b.high_value for b in quantiles.buckets], np.linspace(29.9, 299, 10), atol=3.0)

    dim1 = f["v/frames/1"].num_stats  # constant zero: one point bucket
    assert (dim1.mean, dim1.std_dev, dim1.num_zeros, dim1.min, dim1.max) == (0, 0, 300, 0, 0)
    assert [(b.low_value, b.high_value, b.sample_count) for b in dim1.histograms[0].buckets] == [(0, 0, 300)]

    together = f["v/frames"].num_stats  # both dimensions together
    assert together.common_stats.tot_num_values == 600 and together.mean == pytest.approx(74.75)
    assert together.num_zeros == 301

    clip_mean = f["v/clip_mean/0"].num_stats  # record r's frames are 3r..3r+2: mean 3r + 1
    assert clip_mean.common_stats.tot_num_values == N
    assert (clip_mean.min, clip_mean.max, clip_mean.mean) == (1.0, 298.0, pytest.approx(149.5))

    c = f["c"].num_stats
    assert c.histograms[0].num_nan == 1 and c.mean == pytest.approx(49.0) and c.max == 98.0
    assert c.common_stats.num_non_missing == N

    duration = f["duration_seconds"].num_stats
    assert duration.mean == pytest.approx(50.5) and (duration.min, duration.max) == (1, 100)
    rates = f["source_sample_rate"].num_stats
    assert rates.mean == pytest.approx((25 * 44100 + 75 * 16000) / 100)

    label = f["label"].string_stats
    assert label.unique == 2 and {v.value: v.frequency for v in label.top_values} == {"a": 50, "b": 50}
    split = {v.value: v.frequency for v in f["split"].string_stats.top_values}
    assert split == {"train": 80, "test": 20}


def test_label_slices_hold_per_record_streams():
    fn, acc = _combine(ROWS)
    stats = _proto(fn.extract_output(acc))
    a = _features(stats.datasets[1])
    assert stats.datasets[1].num_examples == 50
    assert "v/frames/0" not in a  # per-frame streams stay in the unsliced dataset
    assert a["v/clip_mean/0"].num_stats.mean == pytest.approx(np.mean([3 * r + 1 for r in range(0, N, 2)]))
    assert {v.value for v in a["label"].string_stats.top_values} == {"a"}


def test_accumulators_merge_and_pickle_to_the_same_answer():
    fn, whole = _combine(ROWS)
    parts = [_combine(ROWS[i::3])[1] for i in range(3)]
    parts = [pickle.loads(pickle.dumps(fn.compact(p))) for p in parts]  # as Beam ships them between workers
    merged = fn.merge_accumulators(parts)
    a = _features(_proto(fn.extract_output(whole)).datasets[0])
    b = _features(_proto(fn.extract_output(merged)).datasets[0])
    assert a.keys() == b.keys()
    for path in ("v/frames/0", "v/clip_mean/0", "c", "duration_seconds"):
        x, y = a[path].num_stats, b[path].num_stats
        assert (x.min, x.max, x.num_zeros, x.common_stats.tot_num_values) == (y.min, y.max, y.num_zeros, y.common_stats.tot_num_values)
        assert x.mean == pytest.approx(y.mean) and x.std_dev == pytest.approx(y.std_dev)
        assert x.median == pytest.approx(y.median, abs=1.0)


def test_interval_mass_spreads_buckets_and_keeps_points():
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    mass = statistics.interval_mass(np.array([0.0, 3.0]), np.array([2.0, 3.0]), np.array([4.0, 1.0]), edges)
    np.testing.assert_allclose(mass, [2.0, 2.0, 1.0])


def test_compute_statistics_in_a_pipeline_writes_and_summarises(tmp_path):
    run_dir = str(tmp_path)
    with TestPipeline(runner="FnApiRunner") as p:
        summaries = p | beam.Create(ROWS) | statistics.ComputeStatistics(specs=SPECS, run_dir=run_dir)

        def check(elements):
            (summary,) = elements
            assert summary["records"] == N and summary["file"] == "statistics/statistics.pb"
            assert summary["slices"] == ["All Examples", "label=a", "label=b"]
            assert summary["numeric"]["c"]["nan"] == 1
            assert summary["numeric"]["v/frames"]["count"] == 600
            assert "v/frames/0" not in summary["numeric"]  # per-dimension detail stays in the proto
            assert summary["categorical"]["label"] == {"a": 50, "b": 50}

        assert_that(summaries, check)
    stats = statistics.read(run_dir)
    assert _features(stats.datasets[0])["v/frames/0"].num_stats.max == 299.0
    assert statistics.summary(stats)["numeric"]["duration_seconds"]["max"] == 100.0


def test_read_names_the_fix_when_statistics_are_missing(tmp_path):
    with pytest.raises(OutputError, match="python -m export.statistics"):
        statistics.read(str(tmp_path))


def test_long_records_are_sketched_by_sample_but_weigh_by_length():
    def row(key, frames, value):
        r = _row(0)
        return dataclasses.replace(r, key=key, features={"v": np.full((frames, 2), value, np.float32), "c": np.float32(0)})

    fn, acc = _combine([row("long", 1000, 1.0), row("short", 10, 0.0)])
    f = _features(_proto(fn.extract_output(acc)).datasets[0])
    dim0 = f["v/frames/0"].num_stats
    assert dim0.common_stats.tot_num_values == 1010 and dim0.num_zeros == 10  # exact counts
    assert dim0.mean == pytest.approx(1000 / 1010) and dim0.median == 1.0
    standard = dim0.histograms[0]
    assert sum(b.sample_count for b in standard.buckets) == pytest.approx(1010)
    assert standard.buckets[-1].sample_count == pytest.approx(1000, abs=10)  # the long record's frames, by weight


@pytest.mark.parametrize("rows_per_add", [1, 25, 4096])
def test_the_quantile_sketch_stays_small_and_within_its_rank_error(rows_per_add):
    """The sketch's size does not grow with what it has seen, and its quantiles stay within about
    1 % in rank, whether rows come one by one or in blocks, weighted or not, added or merged."""
    rng = np.random.default_rng(rows_per_add)
    data = rng.standard_normal((200_000, 3)) * np.array([1.0, 40.0, 0.01]) + np.array([0.0, -60.0, 5.0])
    weights = rng.integers(1, 50, len(data)).astype(np.float64)
    sizes = []
    sketch = statistics._Sketch(3)
    for start in range(0, len(data), rows_per_add):
        sketch.add(data[start:start + rows_per_add], weights[start:start + rows_per_add])
        if start % 50_000 < rows_per_add:
            sizes.append(len(pickle.dumps(sketch)))
    merged = statistics._Sketch(3)
    for start in range(0, len(data), 10_000):  # the same data again, as many accumulators merged
        part = statistics._Sketch(3)
        part.add(data[start:start + 10_000], weights[start:start + 10_000])
        merged.merge(pickle.loads(pickle.dumps(part)))
    ranks = np.linspace(0, 1, 201)[1:-1]
    for s in (sketch, merged):
        q = s.quantiles(201)[:, 1:-1]
        for d in range(3):
            order = np.argsort(data[:, d])
            cdf = np.cumsum(weights[order]) / weights.sum()
            assert np.abs(np.interp(q[d], data[order, d], cdf) - ranks).max() < 0.02
        assert s.items() <= 3 * 3 * statistics._SKETCH_K + 64  # ~3k items per dimension, whatever was added
    assert max(sizes) < 16 * (3 * 3 * statistics._SKETCH_K + 64) + 4096  # bytes: a value and a weight per item
