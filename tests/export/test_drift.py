"""Drift distances with known answers, and feature drift between synthetic statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tensorflow_metadata.proto.v0 import statistics_pb2

from export import drift, statistics
from tests.export.test_statistics import ROWS, SPECS


def _hist(lows, highs, counts, nan=0.0):
    return np.array(lows, float), np.array(highs, float), np.array(counts, float), float(nan)


def test_jensen_shannon_known_values():
    a = _hist([0, 1], [1, 2], [10, 0])
    assert drift.jensen_shannon(a, a) == 0.0
    assert drift.jensen_shannon(a, _hist([5], [6], [3])) == pytest.approx(1.0)  # disjoint supports
    # p = (1, 0), q = (1/2, 1/2): ((log2 4/3) + (1/2 log2 2/3 + 1/2 log2 2)) / 2
    expected = (np.log2(4 / 3) + 0.5 * np.log2(2 / 3) + 0.5) / 2
    assert drift.jensen_shannon(a, _hist([0, 1], [1, 2], [5, 5])) == pytest.approx(expected)


def test_jensen_shannon_rebins_different_edges_and_counts_nans():
    one_bucket = _hist([0], [2], [2])
    two_buckets = _hist([0, 1], [1, 2], [7, 7])  # the same uniform density, other edges and total
    assert drift.jensen_shannon(one_bucket, two_buckets) == pytest.approx(0.0, abs=1e-12)
    assert drift.jensen_shannon(one_bucket, _hist([0], [2], [2], nan=2)) > 0.1
    point = _hist([3], [3], [4])  # a constant feature
    assert drift.jensen_shannon(point, _hist([3], [3], [9])) == 0.0


def test_l_infinity_known_values():
    assert drift.l_infinity({"a": 50, "b": 50}, {"a": 60, "b": 40}) == pytest.approx(0.1)
    assert drift.l_infinity({"a": 1}, {"b": 3}) == pytest.approx(1.0)


def _stats(rows):
    fn = statistics._StatisticsFn(SPECS)
    acc = fn.create_accumulator()
    for row in rows:
        acc = fn.add_input(acc, row)
    return statistics_pb2.DatasetFeatureStatisticsList.FromString(fn.extract_output(acc))


def test_same_rows_flag_nothing_and_relabelled_rows_flag_the_label():
    same = drift.feature_drift(_stats(ROWS), _stats(list(reversed(ROWS))), threshold=drift.DEFAULT_THRESHOLD)
    assert not [f for f in same if f.flagged]
    assert max(f.distance for f in same) < 1e-9  # input order does not move the sketches
    relabelled = [dataclasses.replace(r, label="a") if i < 80 else r for i, r in enumerate(ROWS)]
    changed = drift.feature_drift(_stats(ROWS), _stats(relabelled), threshold=drift.DEFAULT_THRESHOLD)
    assert [f.path for f in changed if f.flagged] == ["label"]
    assert next(f for f in changed if f.path == "label").distance == pytest.approx(0.4)  # a: 50 % -> 90 %


def test_shifted_values_are_flagged_per_dimension():
    shifted = [dataclasses.replace(r, features={**r.features, "v": r.features["v"] + [100.0, 0.0]}) for r in ROWS]
    result = {f.path: f for f in drift.feature_drift(_stats(ROWS), _stats(shifted), threshold=drift.DEFAULT_THRESHOLD)}
    assert result["v/frames/0"].flagged and result["v/frames/0"].distance > 0.2
    assert not result["v/frames/1"].flagged and result["v/frames/1"].distance == 0.0
    assert not result["c"].flagged


def test_config_differences_name_the_key():
    a = {"config": {"features": {"logmel": {"n_mels": 64}}}, "extractors": [{"name": "logmel", "version": "1"}]}
    b = {"config": {"features": {"logmel": {"n_mels": 32}}}, "extractors": [{"name": "logmel", "version": "2"}]}
    assert drift.config_differences(a, b) == [("config.features.logmel.n_mels", 64, 32), ("extractors.logmel", "1", "2")]
