"""Committed shards: export-stage dead letters, batches bounded by records and bytes, overlapping
commits repaired when read back, orphans removed, all through real Beam pipelines; and a kill
at every point of a commit, a repair and orphan removal, finished by the retry and by a resume."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from export import commit
from featurebeam.deadletter import DeadLetter
from featurebeam.elements import FeatureRow
from features.base import OutputSpec
from tests import faultinject
from tests.beam_util import collect
from tests.kill_points import killed_at

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


# --- a kill at any point of a commit, a repair or orphan removal, then the retry ---------------------


def _whole(run_dir: Path) -> dict[str, dict]:
    """Every commit record on disk, each checked to name shards that exist, with the sizes it
    lists, holding its entries: what a resume after a kill at any point must find."""
    from export import tfds
    from export.formats import read_tfrecords

    records = {}
    for path in sorted((run_dir / commit.COMMITS).glob("*.json")):
        record = json.loads(path.read_text())
        entries = record.get("rows", record.get("dead"))
        for kind, entry in record["files"].items():
            data = (run_dir / entry["path"]).read_bytes()
            assert len(data) == entry["bytes"], entry
            if kind == "tfrecords":
                held, listed = len(read_tfrecords(data)), len(entries)
            elif kind.startswith(tfds.KIND_PREFIX):
                split = kind[len(tfds.KIND_PREFIX):]
                held, listed = len(read_tfrecords(data)), sum(1 for r in entries if tfds.split_name(r["split"]) == split)
            elif kind == "errors":
                held, listed = len(data.splitlines()), len(entries)
            else:
                held, listed = pq.read_metadata(run_dir / entry["path"]).num_rows, len(entries)
            assert held == listed, f"commit {record['id']} lists {listed} entries but {entry['path']} holds {held}"
        records[record["id"]] = record
    return records


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _committer(run_dir: Path, *, attempt: str = "a1"):
    import dataclasses

    from export.formats import ALL_FORMATS, ExportFormats

    fn = commit._CommitRowsFn(
        run_dir=str(run_dir), specs=SPECS, table=dataclasses.replace(TABLE, attempt=attempt), commit_records=64,
        commit_bytes=1 << 20, formats=ExportFormats(formats=ALL_FORMATS),
    )
    fn.setup()
    return fn


def _batch(keys: list[str]) -> list:
    rows = [_row(k, split="test" if k.startswith("t") else "train") for k in keys]
    return [commit._encode(row, SPECS, (), with_tfds=True) for row in rows]


@pytest.mark.parametrize("where", ["commit_shard:1", "commit_shard:4", "commit:1", "commit_record:1"])
def test_a_commit_killed_anywhere_is_finished_by_its_retry(tmp_path, where):
    """A worker killed while it writes a commit leaves either no record or a whole one; the retry
    of the bundle (the same rows) writes the same commit again, and nothing else is left."""
    fn, batch = _committer(tmp_path), _batch(["a", "b", "t1"])
    killed_at(where, fn.commit, batch)
    left = _whole(tmp_path)
    assert len(left) == (1 if where.startswith("commit_record") else 0)
    record = fn.commit(batch)  # the retry, in another process, as a worker that takes the bundle over
    assert _whole(tmp_path) == {record["id"]: record}
    assert left in ({}, {record["id"]: record})  # the same rows commit the same record
    assert _files(tmp_path) == set(commit.named_paths(record))  # every file replaced in place, no temporaries


def _repair_elements(records: list[dict]) -> list[tuple]:
    """What `ReadCommits` gives its repair step for these records: (id, {record, drop})."""
    import collections

    holders = collections.defaultdict(list)
    for record in records:
        for claim in commit.claims(record):
            holders[claim].append(record["id"])
    drops = collections.defaultdict(list)
    for element in holders.items():
        for commit_id, claim in commit._losers(element):
            drops[commit_id].append(claim)
    return [(r["id"], {"record": [r], "drop": drops[r["id"]]}) for r in records]


def _repair_all(run_dir: Path, elements: list[tuple]) -> list[dict]:
    fn = commit._RepairFn(str(run_dir))
    return [out for element in elements for out in fn.process(element)]


def _overlapping(run_dir: Path) -> tuple[list[dict], list[str]]:
    """Three commits of one attempt, as retried bundles that batched rows differently leave them:
    the first keeps its keys, one loses some (and its whole test part), one loses all."""
    fn = _committer(run_dir)
    first = fn.commit(_batch(["a", "b", "t1"]))
    # Among other batchings of these keys, one that sorts after the first and keeps a key of its
    # own, and one that sorts after it and holds only its keys (commit ids hash the keys).
    partial = next(keys for keys in (["b", "c", "t1"], ["b", "d", "t1"], ["a", "e", "t1"], ["b", "f", "t1"])
                   if commit.group_id(keys) > first["id"])
    subset = next(keys for keys in (["a"], ["b"], ["t1"], ["a", "b"], ["a", "t1"], ["b", "t1"]) if commit.group_id(keys) > first["id"])
    records = [first, fn.commit(_batch(partial)), fn.commit(_batch(subset))]
    return records, sorted({"a", "b", "t1", *partial})


@pytest.mark.parametrize("where", ["rewrite_shards:1", "rewrite_record:1", "rewrite_delete:1", "rewrite_delete:4",
                                   "repair_drop:1", "rewrite_delete:7"])
def test_a_repair_killed_anywhere_is_finished_by_its_retry_and_by_a_resume(tmp_path, where):
    """A kill anywhere in the repair of commits that share keys leaves every record whole (the
    old shards of a record stay until it is replaced); the retry of the step with the same,
    now stale, elements finishes it, and so does a resume, which reads the records again."""
    import shutil

    records, keys = _overlapping(tmp_path / "run")
    elements = _repair_elements(records)
    killed_at(where, _repair_all, tmp_path / "run", elements)
    _whole(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")

    repaired = _repair_all(tmp_path / "run", elements)  # the retry
    assert _whole(tmp_path / "run") == {r["id"]: r for r in repaired}
    assert sorted(row["key"] for r in repaired for row in r["rows"]) == keys
    assert records[0] in repaired and len(repaired) == 2  # the first untouched, the subset gone
    rewritten = next(r for r in repaired if r["id"] == records[1]["id"])
    assert {k for k in rewritten["files"] if k.startswith("tfds/")} == {"tfds/train"}  # its test part went
    assert _files(tmp_path / "run") == {path for r in repaired for path in commit.named_paths(r)}  # old shards deleted

    read = collect(_Read(tmp_path / "resumed"))  # the resume
    assert sorted(read, key=lambda r: r["id"]) == sorted(repaired, key=lambda r: r["id"])
    assert _whole(tmp_path / "resumed") == {r["id"]: r for r in repaired}
    collect(_Orphans(tmp_path / "resumed", read))  # at the end of the resumed run: what a kill left goes
    assert _files(tmp_path / "resumed") == _files(tmp_path / "run")


def test_a_repair_passes_a_kill_point_after_each_old_shard(tmp_path):
    """The kill points the test above uses are where it says: one per old shard of the two commits repaired."""
    import shutil

    records, _ = _overlapping(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    old = len(records[1]["files"]) + len(records[2]["files"])
    assert old >= 8
    killed_at(f"rewrite_delete:{old}", _repair_all, tmp_path / "run", _repair_elements(records))
    with pytest.raises(AssertionError, match="exited with 0"):
        killed_at(f"rewrite_delete:{old + 1}", _repair_all, tmp_path / "again", _repair_elements(records))


def test_orphan_deletes_killed_midway_are_finished_by_the_retry(tmp_path):
    kept = _write_commit(tmp_path, ["a"])
    orphan = _write_commit(tmp_path, ["z"])
    paths = sorted(str(tmp_path / p) for p in commit.named_paths(orphan))
    element = ("bucket", {"valid": [], "found": paths})
    killed_at("orphan_delete:2", commit._DeleteFn().process, element)
    assert len(_files(tmp_path)) == 8 - 2
    assert list(commit._DeleteFn().process(element)) == [2]
    assert _files(tmp_path) == set(commit.named_paths(kept))


@pytest.mark.slow
@pytest.mark.parametrize("deleted", [1, 6, 7, 21])  # the first and last record, the first and last shard
def test_orphan_removal_killed_anywhere_leaves_every_record_whole_and_its_retry_finishes(tmp_path, deleted):
    """Orphan records go before any shard, so a kill while orphans are removed leaves every record
    still on disk with all its files: a resume reads a record of an earlier attempt (such as a
    retried bundle's the runner did not keep) as valid. Running the step again finishes it."""
    import os
    import subprocess
    import sys

    from export.formats import ExportFormats

    valid = [_write_commit(tmp_path, ["a", "b"]), _write_commit(tmp_path, ["c"])]
    for keys in (["b", "c"], ["a", "c"], ["a", "b", "c"], ["b"]):  # retried bundles' commits, not kept: 4 x (1 + 3)
        _write_commit(tmp_path, keys)
    _write_commit(tmp_path, ["d"], attempt="old/h", formats=ExportFormats(formats=("parquet",)))  # a replaced run's: 1 + 2
    (tmp_path / commit.COMMITS / ".x.json.0.tmp").write_bytes(b"{")  # a killed record write
    (tmp_path / "parquet" / "part-stray.parquet").write_bytes(b"half a shard")
    named = {path for record in valid for path in commit.named_paths(record)}
    orphans = _files(tmp_path) - named
    shards = {path for path in _files(tmp_path) if not path.startswith(commit.COMMITS)}
    assert len(orphans) == 21 and len(orphans - shards) == 6  # 6 in _commits/, then 15 shards
    code = ("import json, sys; from tests.beam_util import collect; from tests.export.test_commit import _Orphans; "
            "collect(_Orphans(sys.argv[1], json.loads(sys.argv[2])))")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(valid)], cwd=Path(__file__).parents[2],
                            env={**os.environ, **faultinject.environment(f"kill:orphan_delete:{deleted}")}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    whole = _whole(tmp_path)  # every record left names all its files
    if deleted <= 6:
        assert {path for path in _files(tmp_path) if not path.startswith(commit.COMMITS)} == shards
    else:
        assert set(whole) == {record["id"] for record in valid}
    assert sum(collect(_Orphans(tmp_path, valid))) == 21 - deleted
    assert _files(tmp_path) == named


@pytest.mark.emulator
def test_files_on_gs_are_replaced_in_one_step_and_a_repair_finishes_there(gcs_emulator):
    """On gs:// a shard written again replaces the object by a rename (a copy over it), never by
    deleting it first; and the repair, killed after replacing a record, is finished there too."""
    from apache_beam.io.filesystems import FileSystems

    from export import metadata

    gcs_emulator.make_bucket("fb-commit-retry")
    run_dir = "gs://fb-commit-retry/run"
    path = f"{run_dir}/parquet/part-x.parquet"
    commit._write_file(path, b"first")
    commit._write_file(path, b"second")
    assert commit._read_file(path) == b"second"
    assert [p.rsplit("/", 1)[1] for p in metadata.matching(f"{run_dir}/parquet/*")] == ["part-x.parquet"]  # no temporary left
    FileSystems.delete([path])

    fn = _committer(run_dir)
    first = fn.commit(_batch(["a", "b"]))
    second = fn.commit(_batch(["b", "c"]))
    elements = _repair_elements([first, second])
    killed_at("rewrite_record:1", _repair_all, run_dir, elements)
    repaired = _repair_all(run_dir, elements)
    assert sorted(row["key"] for r in repaired for row in r["rows"]) == ["a", "b", "c"]
    on_gs = {p[len(run_dir) + 1:] for folder in ("_commits", "parquet", "tfrecords", "tables/features", "tfds/_parts/train")
             for p in metadata.matching(f"{run_dir}/{folder}/*")}
    assert on_gs == {path for record in repaired for path in commit.named_paths(record)}
