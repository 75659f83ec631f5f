"""The run's summaries (pipelines/summary.py, the statistics, the listing's fingerprint) cross every
shuffle as accumulators, never as rows, items or commit records, on a runner that lifts no combiner.

The extraction runs twice on a small labelled corpus with a broken file: once on FnApiRunner as
usual (it lifts combiners), once on FnApiRunner running every combine as Beam's DaskRunner does
(`tests.groupings.unlifted_groupings`: a GroupByKey of what reaches it), which records what each
grouping receives. The two runs' summaries must agree, and the summary groupings of the second
must have received accumulators only. tests/pipelines/test_dask.py runs the same graph on a real
Dask cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from datasets import resolve
from datasets.base import AudioItem, FingerprintFn
from export import statistics
from featurebeam.elements import FeatureRow
from pipelines import combine, extract
from tests.beam_util import collect
from tests.groupings import unlifted_groupings

pytestmark = pytest.mark.slow

N_GOOD = 12
SUMMARY_STEPS = ("Statistics/", "Summarise/", "Fingerprint/", "JoinSummaries/")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """12 clips of 0.5 s at 8 kHz in two label folders, and one file that cannot be decoded."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(7)
    for i in range(N_GOOD):
        folder = root / ("low" if i % 3 else "high")
        folder.mkdir(exist_ok=True)
        t = np.arange(4000) / 8000
        y = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.standard_normal(4000)
        soundfile.write(folder / f"{i:02d}.wav", y.astype(np.float32), 8000)
    (root / "low" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return root


def _argv(corpus: Path, output: Path, runner: list[str] = ["--runner=FnApiRunner"]) -> list[str]:
    # Extraction batches of two clips and commits of three rows: several of each, so a grouping
    # that received rows or records would receive more values than there are batches or commits.
    return [f"--dataset={corpus}", "--features=logmel", "--sample_rate=8000", f"--output={output}", "--run_id=s",
            "--batch_seconds=1", "--commit_records=3", "--max_failure_ratio=1", "--progress=none", "--no_report", *runner]


@pytest.fixture(scope="module")
def lifted(labelled, tmp_path_factory) -> dict:
    """run.json of the corpus on FnApiRunner as usual."""
    return extract.run(_argv(labelled, tmp_path_factory.mktemp("lifted")))


def _assert_same_summaries(run: dict, reference: dict) -> None:
    for key in ("counts", "label_counts", "split_counts", "failures", "audio_seconds"):
        assert run[key] == reference[key], key
    assert run["dataset"]["fingerprint"] == reference["dataset"]["fingerprint"]
    a, b = reference["statistics"], run["statistics"]
    assert (a["records"], a["slices"], a["categorical"]) == (b["records"], b["slices"], b["categorical"])
    for name, numbers in a["numeric"].items():
        for field in ("count", "nan", "zeros", "min", "max"):
            assert b["numeric"][name][field] == numbers[field], (name, field)
        assert b["numeric"][name]["mean"] == pytest.approx(numbers["mean"], rel=1e-9, abs=1e-9), name


def _holds(value, kinds) -> bool:
    """Whether `value` is, or contains (in lists, tuples, dicts), an instance of `kinds`."""
    if isinstance(value, kinds):
        return True
    if isinstance(value, dict):
        return any(_holds(v, kinds) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds(v, kinds) for v in value)
    return False


def _is_commit_record(value) -> bool:
    if isinstance(value, dict):
        return "files" in value and ("rows" in value or "dead" in value) or any(_is_commit_record(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_commit_record(v) for v in value)
    return False


def test_summaries_cross_shuffles_as_accumulators_only(labelled, lifted, tmp_path):
    with unlifted_groupings() as received:
        unlifted = extract.run(_argv(labelled, tmp_path / "unlifted"))

    # The same summaries, whether the runner lifts combiners or not.
    assert lifted["counts"] == {"listed": N_GOOD + 1, "ok": N_GOOD, "failed": 1, "partial": 0, "records": N_GOOD}
    assert lifted["label_counts"] == {"high": 4, "low": 8}
    assert lifted["statistics"]["records"] == N_GOOD
    _assert_same_summaries(unlifted, lifted)
    # The fingerprint, summed a bucket of the grouping by key at a time, is the listing's as
    # FingerprintFn gives it over the listed items themselves (the value runs had before).
    dataset = resolve(str(labelled))
    dataset.prepare()
    fn = FingerprintFn()
    listed = [item for item in collect(dataset.listing()) if isinstance(item, AudioItem)]
    assert len(listed) == N_GOOD + 1
    assert lifted["dataset"]["fingerprint"] == fn.extract_output(fn.add_inputs(fn.create_accumulator(), listed))["fingerprint"]

    groupings = {name: pairs for name, pairs in received.items() if name.startswith(SUMMARY_STEPS)}
    assert groupings, sorted(received)
    for name, pairs in groupings.items():
        values = [value for _, value in pairs]
        assert not _holds(values, (FeatureRow, AudioItem)), name
        assert not _is_commit_record(values), name

    # Statistics: one accumulator per extraction batch at the first level (fewer than the rows),
    # at most one per shard at the last.
    first = groupings["Statistics/Combine/MergeShards0/GroupByKey"]
    assert all(isinstance(v, statistics._Accumulator) for _, v in first)
    assert 1 < len(first) < N_GOOD
    assert sum(v.records["All Examples"] for _, v in first) == N_GOOD
    last = groupings["Statistics/Combine/Combine/GroupByKey"]
    assert all(isinstance(v, (statistics._Accumulator, combine._Seed)) for _, v in last)
    assert len(last) <= 2 * combine.SHARDS + 1
    # The fingerprint: (count, sum) per bucket of listed items, never an item.
    listed = groupings["Fingerprint/MergeShards/GroupByKey"]
    assert all(isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v) for _, v in listed)
    assert sum(v[0] for _, v in listed) == N_GOOD + 1
    # Commit totals: one accumulator per commit (dicts of counters, not the commit's rows).
    totals = [v for name, pairs in groupings.items() if name.startswith("Summarise/Totals/") and "MergeShards" in name for _, v in pairs]
    assert totals and all(isinstance(v, dict) and "records" in v and "rows" not in v for v in totals)
    assert sum(v["records"] for v in totals) == N_GOOD
    # Items: three counts per bucket of per-item flags (the one per-item grouping is PerItem's).
    items = groupings["Summarise/Items/MergeShards/GroupByKey"]
    assert all(isinstance(v, list) and len(v) == 3 for _, v in items)
    assert sum(v[0] for _, v in items) == N_GOOD and sum(v[1] for _, v in items) == 1
    per_item = [name for name in groupings if name.startswith("Summarise/PerItem/")]
    for name in per_item:
        assert all(isinstance(v, (bytes, list)) for _, v in groupings[name]), name


def test_summaries_on_dask_equal_fnapi(labelled, lifted, dask_cluster, tmp_path):
    """The same graph on a real two-worker Dask cluster (no combiner lifting, bundles that are
    Dask partitions) gives the same counts, labels, failures, fingerprint and statistics."""
    on_dask = extract.run(_argv(labelled, tmp_path / "dask", dask_cluster.flags))
    _assert_same_summaries(on_dask, lifted)
