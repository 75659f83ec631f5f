"""Runs written to a bucket (the GCS emulator through Beam's gs:// file system): overwrite replaces
the run, kill -9 then resume exports each key exactly once, and BigQuery loads the workers' shards
by URI."""

from __future__ import annotations

import io
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

from export.metadata import output_files, read_json
from pipelines import extract

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


def test_overwrite_on_gs_replaces_the_run(gcs_emulator, corpus):
    gcs_emulator.make_bucket("fb-overwrite")
    output = "gs://fb-overwrite/runs"
    first = extract.run(_argv(corpus, output, "ow"))
    run_dir = first["outputs"]["run_dir"]
    stray = f"{run_dir}/parquet/part-stray.parquet"
    with FileSystems.create(stray) as handle:
        handle.write(b"left over")
    second = extract.run(_argv(corpus, output, "ow", "--mode=overwrite", "--features=mfcc"))
    assert second["counts"]["records"] == N_ITEMS and [e["name"] for e in second["extractors"]] == ["mfcc"]
    assert stray not in _objects(run_dir)
    assert sorted(_keys(second)) == sorted(_keys(first))  # each key once, not the old run's records too
    with FileSystems.open(output_files(second, "parquet")[0], compression_type="uncompressed") as handle:
        assert "logmel" not in pq.read_schema(io.BytesIO(handle.read())).names


def test_kill_then_resume_on_gs_exports_each_key_once(gcs_emulator, corpus):
    gcs_emulator.make_bucket("fb-resume")
    output = "gs://fb-resume/runs"
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", *_argv(corpus, output, "k")],
        cwd=ROOT, env={**os.environ, "FEATUREBEAM_FAULT_INJECT": "kill:commit:4"}, capture_output=True, text=True, timeout=600,
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
