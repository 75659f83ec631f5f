"""Runs written to a bucket (the GCS emulator through Beam's gs:// file system): overwrite replaces
the run (the launcher lists and deletes no shard; the pipeline's workers remove the old run, also
when the overwrite is killed and resumed), kill -9 then resume exports each key exactly once, and
BigQuery loads the workers' shards by URI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from apache_beam.io.filesystems import FileSystems

from export import commit
from export.metadata import output_files, read_json
from pipelines import extract
from tests import faultinject

pytestmark = [pytest.mark.slow, pytest.mark.emulator]
ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsrun")
    rng = np.random.default_rng(3)
    for i in range(N_ITEMS):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        soundfile.write(root / f"c{i % 2}" / f"{i:02d}.wav", (0.2 * rng.standard_normal(1500 + 10 * i)).astype(np.float32), 8000)
    return root


def _argv(corpus, output, run_id, *extra):
    return [f"--dataset={corpus}", "--features=logmel", f"--output={output}", f"--run_id={run_id}", "--sample_rate=8000",
            "--commit_records=4", *extra]


def _objects(prefix: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([f"{prefix}/**"])[0].metadata_list)


def _keys(run) -> list[str]:
    keys = []
    for path in output_files(run, "parquet"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            keys.extend(pq.read_table(io.BytesIO(handle.read()), columns=["key"]).column("key").to_pylist())
    return keys


def _dead_keys(run) -> list[str]:
    keys = []
    for path in output_files(run, "errors"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            keys.extend(json.loads(line)["key"] for line in handle.read().decode().splitlines())
    return keys


def _old_run(output, corpus, run_id):
    """A finished run with every kind of file an overwrite must not leave behind: TFRecord, Parquet,
    TFDS parts and shards, dead letters (the longer clips are too long for --max_item_seconds)."""
    run = extract.run(_argv(corpus, output, run_id, "--formats=tfrecord,parquet,tfds", "--max_item_seconds=0.2"))
    assert run["counts"]["failed"] > 0 and run["outputs"]["tfds"]
    return run


def _named(run_dir: str, records: list[dict]) -> set[str]:
    """Every object the commit records name (their shards and themselves)."""
    return {f"{run_dir}/{path}" for record in records for path in commit.named_paths(record)}


def _assert_only_the_new_run(run_dir: str, run: dict) -> None:
    """Every object below run_dir belongs to `run`: its metadata, the files its commits name, its
    own progress files; its commits are stamped with its own attempts and hold each key once."""
    plan = read_json(f"{run_dir}/_work/plan.json")
    records = [read_json(p) for p in _objects(f"{run_dir}/_commits")]
    assert {r["attempt"] for r in records} <= set(plan["attempts"])
    named = _named(run_dir, records)
    metadata_files = {f"{run_dir}/{name}" for name in ("run.json", "features.json", "schema.pbtxt", "_work/plan.json",
                                                      "_work/summary.json", "statistics/statistics.pb", "tables/runs/part-00000.parquet")}
    progress = {p for p in _objects(run_dir) if "/_work/progress/" in p}
    assert len({p.rsplit("/", 2)[1] for p in progress}) <= 1  # one launch's folder
    assert set(_objects(run_dir)) == named | metadata_files | progress
    keys = _keys(run)
    assert len(keys) == len(set(keys)) == N_ITEMS == run["counts"]["records"] == sum(len(r.get("rows", ())) for r in records)
    assert _dead_keys(run) == [] and run["counts"]["failed"] == 0 and run["outputs"]["tfds"] is None
    assert read_json(f"{run_dir}/run.json")["counts"] == run["counts"]


def test_overwrite_on_gs_replaces_the_run(gcs_emulator, corpus):
    gcs_emulator.make_bucket("fb-overwrite")
    output = "gs://fb-overwrite/runs"
    first = _old_run(output, corpus, "ow")
    run_dir = first["outputs"]["run_dir"]
    stray = f"{run_dir}/parquet/part-stray.parquet"
    with FileSystems.create(stray) as handle:
        handle.write(b"left over")
    second = extract.run(_argv(corpus, output, "ow", "--mode=overwrite", "--features=mfcc", "--formats=parquet"))
    assert second["counts"]["records"] == N_ITEMS and [e["name"] for e in second["extractors"]] == ["mfcc"]
    assert stray not in _objects(run_dir)
    assert sorted(_keys(second)) == sorted(set(_keys(first)) | set(_dead_keys(first)))  # each key once, no old records
    with FileSystems.open(output_files(second, "parquet")[0], compression_type="uncompressed") as handle:
        assert "logmel" not in pq.read_schema(io.BytesIO(handle.read())).names
    # No TFRecords, TFDS files, old dead letters or old commits (some with the new commits' ids) left.
    _assert_only_the_new_run(run_dir, second)


class _LauncherCalls:
    """Observes (and passes through) the launcher's FileSystems calls during `extract.plan`."""

    def __init__(self, monkeypatch):
        self.matched, self.deleted = [], []
        match, delete = FileSystems.match, FileSystems.delete

        def observed_match(patterns, limits=None):
            self.matched.extend(zip(patterns, limits or [None] * len(patterns)))
            return match(patterns, limits)

        def observed_delete(paths):
            self.deleted.extend(paths)
            return delete(paths)

        monkeypatch.setattr(FileSystems, "match", staticmethod(observed_match))
        monkeypatch.setattr(FileSystems, "delete", staticmethod(observed_delete))


def test_overwrite_launcher_neither_lists_nor_deletes_the_old_runs_shards(gcs_emulator, corpus, monkeypatch):
    """The launcher deletes a constant set of metadata files (run.json first) and lists nothing
    but one page to see that the folder exists; the old shards are still there when it submits."""
    gcs_emulator.make_bucket("fb-overwrite-launcher")
    output = "gs://fb-overwrite-launcher/runs"
    first = _old_run(output, corpus, "ow")
    run_dir = first["outputs"]["run_dir"]
    before = _objects(run_dir)
    calls = _LauncherCalls(monkeypatch)
    plan = extract.plan(_argv(corpus, output, "ow", "--mode=overwrite", "--features=mfcc"))
    monkeypatch.undo()
    assert calls.deleted and calls.deleted[0] == f"{run_dir}/run.json"
    records = [read_json(p) for p in before if "/_commits/" in p]
    shards = _named(run_dir, records)
    shards = (shards | {p for p in before if "/tfds/" in p}) & set(before)  # TFDS parts are renamed to TFDS shards
    assert len(shards) > N_ITEMS // 2
    assert len(calls.deleted) <= 10 and not shards & set(calls.deleted), calls.deleted
    listings = [(pattern, limit) for pattern, limit in calls.matched if "*" in pattern]
    assert all(limit == 1 for _, limit in listings), listings
    after = _objects(run_dir)
    assert shards <= set(after)  # left for the pipeline's workers
    assert f"{run_dir}/run.json" not in after and f"{run_dir}/dataset_info.json" not in after
    assert read_json(f"{run_dir}/_work/plan.json")["attempts"] == [extract._attempt(plan)]


def test_overwrite_killed_then_resumed_on_gs_keeps_nothing_of_the_old_run(gcs_emulator, corpus):
    gcs_emulator.make_bucket("fb-overwrite-kill")
    output = "gs://fb-overwrite-kill/runs"
    first = _old_run(output, corpus, "owk")
    run_dir = first["outputs"]["run_dir"]
    argv = _argv(corpus, output, "owk", "--features=mfcc", "--formats=parquet")
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", *argv, "--mode=overwrite"],
        cwd=ROOT, env={**os.environ, **faultinject.environment("kill:commit:4")}, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert f"{run_dir}/run.json" not in _objects(run_dir)
    (killed_attempt,) = read_json(f"{run_dir}/_work/plan.json")["attempts"]
    resumed = extract.run([*argv, "--mode=resume"])
    assert read_json(f"{run_dir}/_work/plan.json")["attempts"][0] == killed_attempt  # the resume keeps the epoch
    assert [e["name"] for e in resumed["extractors"]] == ["mfcc"]
    _assert_only_the_new_run(run_dir, resumed)


def test_kill_then_resume_on_gs_exports_each_key_once(gcs_emulator, corpus):
    gcs_emulator.make_bucket("fb-resume")
    output = "gs://fb-resume/runs"
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", *_argv(corpus, output, "k")],
        cwd=ROOT, env={**os.environ, **faultinject.environment("kill:commit:4")}, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = f"{output}/{corpus.name}/k"
    assert len([p for p in _objects(run_dir) if "/_commits/" in p]) == 3
    resumed = extract.run(_argv(corpus, output, "k", "--mode=resume"))
    keys = _keys(resumed)
    assert len(keys) == len(set(keys)) == N_ITEMS == resumed["counts"]["records"]
    committed = {p.rsplit("/", 1)[1].split(".")[0] for p in _objects(run_dir) if "/_commits/" in p}
    shards = {p.rsplit("/", 1)[1].removeprefix("part-").split(".")[0] for p in _objects(f"{run_dir}/parquet")}
    assert shards == committed  # the shard in flight at the kill was removed
    assert read_json(f"{run_dir}/run.json")["counts"] == resumed["counts"]


def test_bigquery_loads_a_gs_run_by_uri(gcs_emulator, bq_emulator, corpus):
    from export import bigquery

    gcs_emulator.make_bucket("fb-bq-uri")
    run = extract.run(_argv(corpus, "gs://fb-bq-uri/runs", "bq"))
    client = bq_emulator.client()
    report = bigquery.load_run(run["outputs"]["run_dir"], dataset=f"{bq_emulator.project}.uri_loads", client=client)
    assert report["features"]["rows"] == N_ITEMS and report["runs"]["rows"] == 1
    rows = list(client.query(f"SELECT COUNT(*) AS n FROM `{bq_emulator.project}.uri_loads.features`").result())
    assert rows[0]["n"] == N_ITEMS
