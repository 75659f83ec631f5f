"""Committed shards: export-stage dead letters, overlapping commits repaired, orphans removed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from export import commit
from featurebeam.deadletter import DeadLetter
from featurebeam.elements import FeatureRow
from features.base import OutputSpec
from tests.beam_util import collect

SPECS = (OutputSpec(name="f", level="frame", shape=(2,), hop_length=4, sample_rate=16),)


def _row(key: str, *, features=None) -> FeatureRow:
    return FeatureRow(
        key=key, item_key=key, uri=f"/a/{key}", label="x", split="train", metadata=(), start_sample=0, segment_index=0,
        last_segment=True, silent=False, num_samples=8, sample_rate=16, source_sample_rate=16, source_channels=1,
        source_duration_seconds=0.5, features={"f": np.ones((3, 2), np.float32)} if features is None else features,
    )


def _fn(run_dir: Path, n: int = 64) -> commit.CommitRowsFn:
    fn = commit.CommitRowsFn(run_dir=str(run_dir), specs=SPECS, commit_records=n)
    fn.start_bundle()
    return fn


def test_a_row_that_cannot_be_serialised_is_an_export_dead_letter(tmp_path):
    fn = commit.CommitRowsFn(run_dir=str(tmp_path), specs=SPECS, commit_records=4, extractor_ids=("f@1",))
    import apache_beam as beam

    class DeadOutput(beam.PTransform):
        def expand(self, pbegin):
            rows = pbegin | beam.Create([_row("good"), _row("bad", features={})])
            return (rows | beam.ParDo(fn).with_outputs("dead", main="done")).dead

    (dead,) = collect(DeadOutput())
    assert isinstance(dead, DeadLetter) and (dead.stage, dead.key, dead.extractors) == ("export", "bad", ("f@1",))
    assert set(commit.read_commits(str(tmp_path)).rows) == {"good"}


def test_overlapping_commits_keep_each_key_once(tmp_path):
    first, second = _fn(tmp_path), _fn(tmp_path)
    for key in ("a", "b"):
        list(first.process(_row(key)))
    first.flush()
    for key in ("b", "c", "d"):  # a retried bundle grouped differently: "b" again
        list(second.process(_row(key)))
    second.flush()
    committed = commit.read_commits(str(tmp_path))
    assert sorted(committed.rows) == ["a", "b", "c", "d"]
    keys = [k for p in committed.files["parquet"] for k in pq.read_table(p).column("key").to_pylist()]
    assert sorted(keys) == ["a", "b", "c", "d"]  # the later shard was rewritten without "b"
    assert commit.read_commits(str(tmp_path)).rows.keys() == committed.rows.keys()  # repair is stable


def test_orphans_and_temporaries_are_removed(tmp_path):
    fn = _fn(tmp_path)
    list(fn.process(_row("a")))
    fn.flush()
    (tmp_path / "parquet" / "part-orphan.parquet").write_bytes(b"half a shard from a killed worker")
    (tmp_path / "tfrecords" / ".part-x.tfrecord.gz.123.tmp").write_bytes(b"")
    committed = commit.read_commits(str(tmp_path))
    removed = commit.remove_orphans(str(tmp_path), committed)
    assert sorted(Path(p).name for p in removed) == [".part-x.tfrecord.gz.123.tmp", "part-orphan.parquet"]
    assert sorted(p.name for p in (tmp_path / "parquet").iterdir()) == [Path(committed.files["parquet"][0]).name]
    record = json.loads(next((tmp_path / commit.COMMITS).glob("*.json")).read_text())
    assert record["rows"][0]["key"] == "a" and record["files"]["parquet"] == committed.files["parquet"][0]
