"""Committed shards: export-stage dead letters, batches bounded by records and bytes, overlapping
commits repaired when read back, orphans removed, all through real Beam pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq

from export import commit
from featurebeam.deadletter import DeadLetter
from featurebeam.elements import FeatureRow
from features.base import OutputSpec
from tests.beam_util import collect

SPECS = (OutputSpec(name="f", level="frame", shape=(2,), hop_length=4, sample_rate=16),)
EXTRACTORS = ({"name": "e", "version": "1", "config": {}, "outputs": [dict(SPECS[0].to_json())]},)
TABLE = commit.TableContext(run_id="r", started="2026-12-01T00:00:00+00:00", extractors=EXTRACTORS)


def _row(key: str, *, features=None, frames: int = 3, split: str = "train") -> FeatureRow:
    return FeatureRow(
        key=key, item_key=key, uri=f"/a/{key}", label="x", split=split, metadata=(), start_sample=0, segment_index=0,
        last_segment=True, silent=False, num_samples=4 * (frames - 1), sample_rate=16, source_sample_rate=16, source_channels=1,
        source_duration_seconds=0.5, features={"f": np.ones((frames, 2), np.float32)} if features is None else features,
    )


class _Commit(beam.PTransform):
    def __init__(self, run_dir, rows, *, records=64, max_bytes=commit.DEFAULT_COMMIT_BYTES, output="commits"):
        super().__init__()
        self.run_dir, self.rows, self.records, self.max_bytes, self.output = str(run_dir), rows, records, max_bytes, output

    def expand(self, pbegin):
        rows = pbegin | beam.Create([self.rows], reshuffle=False)  # one extraction batch
        out = rows | commit.CommitRows(
            run_dir=self.run_dir, specs=SPECS, table=TABLE, commit_records=self.records, commit_bytes=self.max_bytes,
            extractor_ids=("e@1",),
        )
        return out[self.output]


def _write_commit(run_dir: Path, keys: list[str], *, with_tfds: bool = False, attempt: str = "", formats=None) -> dict:
    """Commit one batch directly, as a worker's attempt would (for overlap and orphan set-ups);
    keys starting with "t" are in the test split."""
    import dataclasses

    from export.formats import ALL_FORMATS, FORMATS, ExportFormats

    fn = commit._CommitRowsFn(
        run_dir=str(run_dir), specs=SPECS, table=dataclasses.replace(TABLE, attempt=attempt), commit_records=64,
        commit_bytes=1 << 20, formats=formats or ExportFormats(formats=ALL_FORMATS if with_tfds else FORMATS),
    )
    fn.setup()
    rows = [_row(k, split="test" if k.startswith("t") else "train") for k in keys]
    return fn.commit([commit._encode(row, SPECS, (), with_tfds=with_tfds) for row in rows])


def _tfds_keys(path: Path) -> list[str]:
    import tensorflow as tf

    from export.formats import read_tfrecords

    return [
        tf.train.Example.FromString(record).features.feature["key"].bytes_list.value[0].decode()
        for record in read_tfrecords(path.read_bytes())
    ]


class _Read(beam.PTransform):
    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = str(run_dir)

    def expand(self, pbegin):
        return pbegin | commit.ReadCommits(self.run_dir)


def test_a_row_that_cannot_be_serialised_is_an_export_dead_letter(tmp_path):
    (dead,) = collect(_Commit(tmp_path, [_row("good"), _row("bad", features={})], output="dead"))
    assert isinstance(dead, DeadLetter) and (dead.stage, dead.key, dead.extractors) == ("export", "bad", ("e@1",))
    (record,) = collect(_Read(tmp_path))
    assert [r["key"] for r in record["rows"]] == ["good"]


def test_commits_name_their_files_relative_to_the_run_with_sizes_and_table_shards(tmp_path):
    (record,) = collect(_Commit(tmp_path, [_row("a"), _row("b")]))
    assert set(record["files"]) == {"tfrecords", "parquet", "features_table"}
    for entry in record["files"].values():
        assert not entry["path"].startswith("/") and (tmp_path / entry["path"]).stat().st_size == entry["bytes"]
    features = pq.read_table(tmp_path / record["files"]["features_table"]["path"]).to_pylist()
    assert [r["key"] for r in features] == ["a", "b"] and features[0]["e"]["f_mean"] == [1.0, 1.0]
    assert json.loads((tmp_path / commit.COMMITS / f"{record['id']}.json").read_text()) == record


def test_batches_are_bounded_by_records_and_by_bytes(tmp_path):
    by_count = collect(_Commit(tmp_path / "n", [_row(f"k{i:02d}") for i in range(10)], records=4))
    assert [len(r["rows"]) for r in by_count] == [4, 4, 2]
    big = [_row(f"k{i:02d}", frames=2000) for i in range(10)]  # ~16 kB of float32 each
    by_bytes = collect(_Commit(tmp_path / "b", big, records=64, max_bytes=40_000))
    assert len(by_bytes) >= 4 and all(len(r["rows"]) <= 3 for r in by_bytes)
    assert sorted(k for r in by_bytes for k in (row["key"] for row in r["rows"])) == [f"k{i:02d}" for i in range(10)]


def test_overlapping_commits_are_repaired_when_read_back(tmp_path):
    _write_commit(tmp_path, ["a", "b"])
    _write_commit(tmp_path, ["b", "c", "d"])  # a retried bundle batched differently: "b" again
    records = collect(_Read(tmp_path))
    keys = sorted(row["key"] for r in records for row in r["rows"])
    assert keys == ["a", "b", "c", "d"]
    for kind in ("parquet", "features_table"):
        on_disk = [k for p in tmp_path.glob(commit.shard_name(kind, "*")) for k in pq.read_table(p).column("key").to_pylist()]
        assert sorted(on_disk) == keys  # the later shard was rewritten without "b"
    assert sorted(row["key"] for r in collect(_Read(tmp_path)) for row in r["rows"]) == keys  # repair is stable


class _Orphans(beam.PTransform):
    """RemoveOrphans given the valid commit records."""

    def __init__(self, run_dir, valid):
        super().__init__()
        self.run_dir = str(run_dir)
        self.named = [path for record in valid for path in commit.named_paths(record)]

    def expand(self, pbegin):
        after = pbegin | "After" >> beam.Create([None])
        return pbegin | "Valid" >> beam.Create(self.named) | commit.RemoveOrphans(self.run_dir, after=after)


class _ReadEarlier(beam.PTransform):
    def __init__(self, run_dir, *, attempt, earlier):
        super().__init__()
        self.run_dir, self.attempt, self.earlier = str(run_dir), attempt, earlier

    def expand(self, pbegin):
        return pbegin | commit.ReadCommits(self.run_dir, attempt=self.attempt, earlier=self.earlier)


def test_orphans_and_temporaries_are_removed(tmp_path):
    kept = _write_commit(tmp_path, ["a"])
    orphan = _write_commit(tmp_path, ["z"])  # a failed attempt's commit: no element says it is valid
    (tmp_path / "parquet" / "part-orphan.parquet").write_bytes(b"half a shard from a killed worker")
    (tmp_path / "tfrecords" / ".part-x.tfrecord.gz.123.tmp").write_bytes(b"")
    removed = collect(_Orphans(tmp_path, [kept]))
    assert sum(removed) == 3 + 1 + 2  # the orphan commit's three shards and record, two strays
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([f"{commit.COMMITS}/{kept['id']}.json", *(f["path"] for f in kept["files"].values())])
    assert orphan["id"] not in "".join(left)


def test_tfds_parts_are_committed_per_split_repaired_and_removed_like_any_shard(tmp_path):
    from export import tfds

    first = _write_commit(tmp_path, ["a", "b", "t1"], with_tfds=True)
    assert set(first["files"]) == {"tfrecords", "parquet", "features_table", "tfds/train", "tfds/test"}
    assert _tfds_keys(tmp_path / first["files"]["tfds/train"]["path"]) == ["a", "b"]
    assert first["files"]["tfds/test"]["path"] == tfds.part_name("test", first["id"])
    # A retried bundle batched differently: "b" and "t1" again; the later commit loses them, and its
    # test part, left empty, goes.
    second = _write_commit(tmp_path, ["b", "c", "t1"], with_tfds=True)
    records = {r["id"]: r for r in collect(_Read(tmp_path))}
    repaired = records[max(first["id"], second["id"])]
    on_disk = {split: sorted(k for p in tmp_path.glob(f"tfds/_parts/{split}/*") for k in _tfds_keys(p)) for split in ("train", "test")}
    assert on_disk == {"train": ["a", "b", "c"], "test": ["t1"]}
    assert {k for k in repaired["files"] if k.startswith("tfds/")} == {"tfds/train"}
    orphan = _write_commit(tmp_path, ["z", "t9"], with_tfds=True)  # no valid commit names it
    removed = collect(_Orphans(tmp_path, list(records.values())))
    assert sum(removed) == 5 + 1  # its five shards (two TFDS parts) and its record
    assert not list(tmp_path.glob(f"tfds/_parts/*/part-{orphan['id']}*"))


def test_only_this_runs_earlier_attempts_are_read_back(tmp_path):
    """A resume reads the commits of the run's earlier attempts; a run --mode=overwrite replaced
    (another attempt) is not read, nor is this attempt's own."""
    _write_commit(tmp_path, ["old"], attempt="t0/h")
    _write_commit(tmp_path, ["mine"], attempt="t1/h")
    _write_commit(tmp_path, ["now"], attempt="t2/h")

    def keys(**kwargs):
        return sorted(row["key"] for record in collect(_ReadEarlier(tmp_path, **kwargs)) for row in record["rows"])

    assert keys(attempt="t2/h", earlier=("t1/h",)) == ["mine"]
    assert keys(attempt="t2/h", earlier=()) == []  # the first launch of an overwrite
    assert keys(attempt="t2/h", earlier=None) == ["mine", "old"]  # a run folder from before attempts were recorded


def test_a_replaced_runs_files_go_even_when_a_new_commit_has_its_id(tmp_path):
    """The same keys batched alike give the same commit id; the old run's shards of a kind or codec
    the new run does not write are still removed, because orphans are matched by path."""
    from export.formats import ExportFormats

    old = _write_commit(tmp_path, ["a", "b"], attempt="old/h")  # tfrecord.gz + parquet + table
    new = _write_commit(tmp_path, ["a", "b"], attempt="new/h", formats=ExportFormats(formats=("parquet",)))
    assert new["id"] == old["id"] and "tfrecords" not in new["files"]
    removed = collect(_Orphans(tmp_path, [new]))
    assert sum(removed) == 1
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(commit.named_paths(new))
    assert json.loads((tmp_path / commit.COMMITS / f"{new['id']}.json").read_text())["attempt"] == "new/h"
