"""BigQuery export end to end against the local bqemulator, through the real google-cloud-bigquery client.

The module runs extractions with `--bigquery_dataset` into one emulator dataset, in this order:
A, the sample set (logmel, mfcc, spectral); B, a small folder with a corrupt and an empty file and
one more extractor (chroma); C, the sample set with logmel at n_mels=32 (same logmel version), which
must be refused. Every assertion filters by run_id, so tests hold in any order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from export import bigquery, tables
from featurebeam.errors import SchemaError
from pipelines import extract
from export.metadata import output_files


DATASET = "fb_export"
FEATURES_A = "logmel,mfcc,spectral"


def _rows(client, sql, **params):
    from google.cloud import bigquery as bq

    kinds = {str: "STRING", int: "INT64", float: "FLOAT64"}
    config = bq.QueryJobConfig(
        default_dataset=f"{client.project}.{DATASET}",
        query_parameters=[bq.ScalarQueryParameter(k, kinds[type(v)], v) for k, v in params.items()],
    )
    return [dict(row) for row in client.query(sql, job_config=config).result()]


def _count(client, table, run_id):
    return _rows(client, f"SELECT COUNT(*) AS n FROM {table} WHERE run_id = @run_id", run_id=run_id)[0]["n"]


def _snapshot(client, dataset):
    """What a refused load must not change: every table's schema, description and row count."""
    out = {}
    for name in tables.TABLE_NAMES:
        table = client.get_table(f"{dataset}.{name}")
        total = _rows(client, f"SELECT COUNT(*) AS n FROM {name}")[0]["n"]
        out[name] = ([f.to_api_repr() for f in table.schema], table.description, total)
    return out


@pytest.fixture(scope="module")
def bq(bq_emulator):
    client = bq_emulator.client()
    return {"client": client, "dataset": f"{bq_emulator.project}.{DATASET}"}


@pytest.fixture(scope="module")
def run_a(bq, tmp_path_factory):
    output = tmp_path_factory.mktemp("bq_runs")
    run = extract.run(
        [
            "--dataset=sample",
            f"--features={FEATURES_A}",
            f"--output={output}",
            "--run_id=bq_a",
            f"--bigquery_dataset={bq['dataset']}",
        ]
    )
    return run


def _write_corpus(root: Path) -> None:
    """Four good files in two labels, one corrupt and one empty file."""
    rng = np.random.default_rng(11)
    t = np.arange(16000) / 16000
    for label, clips in {
        "tone": [0.3 * np.sin(2 * np.pi * f * t) for f in (440, 880)],
        "noise": [0.1 * rng.standard_normal(16000) for _ in range(2)],
    }.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(clips):
            soundfile.write(root / label / f"{label}{i}.wav", clip.astype(np.float32), 16000)
    (root / "noise" / "corrupt.wav").write_bytes(rng.bytes(4096))
    (root / "tone" / "empty.wav").write_bytes(b"")


@pytest.fixture(scope="module")
def run_b(bq, run_a, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("bq_corpus")
    _write_corpus(corpus)
    output = tmp_path_factory.mktemp("bq_runs_b")
    return extract.run(
        [
            f"--dataset={corpus}",
            "--features=logmel,spectral,chroma",
            f"--output={output}",
            "--run_id=bq_b",
            "--max_failure_ratio=1",
            f"--bigquery_dataset={bq['dataset']}",
        ]
    )


def _parquet_records(run):
    table = pq.read_table(output_files(run, "parquet"))
    return table.to_pylist()


@pytest.mark.emulator
@pytest.mark.slow
def test_features_rows_equal_ok_records_and_layout(bq, run_a):
    client = bq["client"]
    assert _count(client, "features", "bq_a") == run_a["counts"]["records"] == run_a["counts"]["ok"] == 60
    table = client.get_table(f"{bq['dataset']}.features")
    assert table.time_partitioning.field == "run_date" and table.time_partitioning.type_ == "DAY"
    assert table.clustering_fields == ["run_id", "key"]
    names = [f.name for f in table.schema]
    assert names[: len(tables.FEATURES_BASE)] == [f.name for f in tables.FEATURES_BASE]
    assert {"logmel", "mfcc", "spectral"} <= set(names)
    assert all(f.description for f in table.schema)
    logmel = {f.name: f for f in next(f for f in table.schema if f.name == "logmel").fields}
    assert (logmel["logmel_mean"].field_type, logmel["logmel_mean"].mode) in {("FLOAT64", "REPEATED"), ("FLOAT", "REPEATED")}
    # The table records what ARRAY types cannot show: versions and output shapes.
    assert bigquery.read_signatures(table.description)["logmel"] == {"1": {"logmel": {"level": "frame", "shape": [64]}}}
    keys = {r["key"] for r in _rows(client, "SELECT key FROM features WHERE run_id = 'bq_a'")}
    assert keys == {r["key"] for r in _parquet_records(run_a)}


@pytest.mark.emulator
@pytest.mark.slow
def test_per_label_means_match_the_parquet_shards(bq, run_a):
    expected_centroid: dict[str, list[float]] = {}
    expected_band5: dict[str, list[float]] = {}
    for record in _parquet_records(run_a):
        frames = np.asarray(record["logmel"], dtype=np.float64).reshape(record["logmel_shape"])
        expected_band5.setdefault(record["label"], []).append(frames[:, 5].mean())
        expected_centroid.setdefault(record["label"], []).append(np.mean(np.asarray(record["spectral_centroid"], dtype=np.float64)))
    rows = _rows(
        bq["client"],
        "SELECT label, COUNT(*) AS n, AVG(spectral.spectral_centroid_mean) AS centroid, "
        "AVG(logmel.logmel_mean[OFFSET(5)]) AS band5 FROM features WHERE run_id = @run_id GROUP BY label",
        run_id="bq_a",
    )
    assert {r["label"] for r in rows} == set(expected_centroid)
    for row in rows:
        assert row["n"] == 12
        assert row["centroid"] == pytest.approx(np.mean(expected_centroid[row["label"]]), rel=1e-9)
        assert row["band5"] == pytest.approx(np.mean(expected_band5[row["label"]]), rel=1e-9)
    # Tones and chords sit far below noise in spectral centroid: the numbers mean something.
    by_label = {r["label"]: r["centroid"] for r in rows}
    assert by_label["tone"] < 1000 < by_label["noise"]


@pytest.mark.emulator
@pytest.mark.slow
def test_runs_table_has_the_run_in_typed_columns(bq, run_a):
    (row,) = _rows(bq["client"], "SELECT * FROM runs WHERE run_id = @run_id", run_id="bq_a")
    assert (row["listed"], row["ok"], row["failed"], row["records"]) == (60, 60, 0, 60)
    assert row["config_hash"] == run_a["config_hash"]
    assert row["dataset"]["name"] == "sample" and row["dataset"]["fingerprint"] == run_a["dataset"]["fingerprint"]
    assert row["started"].isoformat() == run_a["started"]
    assert [(e["name"], e["version"]) for e in row["extractors"]] == [("logmel", "1"), ("mfcc", "1"), ("spectral", "1")]
    assert json.loads(row["extractors"][0]["config"])["n_mels"] == 64
    assert row["extractors"][0]["outputs"][0]["shape"] == [64]
    assert row["audio_seconds"] == pytest.approx(120.0)
    assert row["runner"] == "FnApiRunner"
    # Loaded by the pipeline's final step: run.json as that step wrote it. The per-stage seconds come
    # from the job's counters once the job is done, so only the launcher's run.json has them.
    local = json.loads(Path(run_a["outputs"]["run_dir"], "run.json").read_text())
    assert local["stage_seconds"] and json.loads(row["run_json"]) == {**local, "stage_seconds": None}


@pytest.mark.emulator
@pytest.mark.slow
def test_errors_table_has_the_dead_letters(bq, run_b):
    dead = []
    for path in output_files(run_b, "errors"):
        dead += [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(dead) == run_b["counts"]["failed"] == 2
    rows = _rows(bq["client"], "SELECT key, uri, stage, reason, message FROM errors WHERE run_id = @run_id ORDER BY key", run_id="bq_b")
    assert [(r["key"], r["stage"], r["reason"]) for r in rows] == sorted((d["key"], d["stage"], d["reason"]) for d in dead)
    assert {os.path.basename(r["uri"]) for r in rows} == {"corrupt.wav", "empty.wav"}
    assert _count(bq["client"], "features", "bq_b") == run_b["counts"]["records"] == 4
    assert _count(bq["client"], "errors", "bq_a") == 0


@pytest.mark.emulator
@pytest.mark.slow
def test_a_new_extractor_adds_a_column(bq, run_a, run_b):
    client = bq["client"]
    table = client.get_table(f"{bq['dataset']}.features")
    chroma = next(f for f in table.schema if f.name == "chroma")
    assert [f.name for f in chroma.fields] == ["chroma_mean", "chroma_std"]
    assert "chroma" in bigquery.read_signatures(table.description)
    rows = _rows(client, "SELECT run_id, ARRAY_LENGTH(chroma.chroma_mean) AS n FROM features WHERE run_id IN ('bq_a', 'bq_b')")
    assert {r["n"] for r in rows if r["run_id"] == "bq_b"} == {12}
    assert {r["n"] for r in rows if r["run_id"] == "bq_a"} == {None}
    assert _count(client, "features", "bq_a") == 60  # the earlier run is intact


@pytest.mark.emulator
@pytest.mark.slow
def test_reloading_and_resuming_a_loaded_run_adds_nothing(bq, run_a, run_b, bq_jobs):
    client = bq["client"]
    before = {name: _count(client, name, "bq_a") for name in tables.TABLE_NAMES}
    report = bigquery.load_run(run_a["outputs"]["run_dir"], dataset=bq["dataset"], client=client)
    assert {name: entry["action"] for name, entry in report.items()} == {"features": "skipped", "runs": "skipped", "errors": "empty"}
    # Finalisation again through the pipeline: a complete run resumed with --bigquery_dataset.
    output = str(Path(run_a["outputs"]["run_dir"]).parents[1])
    del bq_jobs[:]
    extract.run(["--dataset=sample", f"--features={FEATURES_A}", f"--output={output}", "--run_id=bq_a",
                 "--mode=resume", f"--bigquery_dataset={bq['dataset']}", "--max_bytes_billed=5MB"])
    assert len(bq_jobs) == 8  # the runs check and three counts, each dry-run first
    assert {(job.kind, job.maximum_bytes_billed) for job in bq_jobs} == {("query", 5_000_000)}
    assert {name: _count(client, name, "bq_a") for name in tables.TABLE_NAMES} == before == {"features": 60, "runs": 1, "errors": 0}
    b = bigquery.load_run(run_b["outputs"]["run_dir"], dataset=bq["dataset"], client=client)
    assert {entry["action"] for entry in b.values()} == {"skipped"}
    assert _count(client, "errors", "bq_b") == 2


@pytest.mark.emulator
@pytest.mark.slow
def test_changed_output_shape_under_the_same_version_is_refused(bq, run_a, run_b, tmp_path):
    client = bq["client"]
    before = _snapshot(client, bq["dataset"])
    config = tmp_path / "narrow.yaml"
    config.write_text("features:\n  logmel:\n    n_mels: 32\n")
    with pytest.raises(SchemaError) as refused:
        extract.run(["--dataset=sample", "--features=logmel", f"--config={config}", "--limit=5",
                     f"--output={tmp_path / 'runs'}", "--run_id=bq_c", f"--bigquery_dataset={bq['dataset']}"])
    message = str(refused.value)
    # The job's final step refused the load; the launcher says why in the step's own words.
    assert "while running" not in message and "Traceback" not in message
    assert "column logmel" in message
    assert "logmel frame [64]" in message and "logmel frame [32]" in message
    assert "if logmel's code changed, bump its version" in message and "--bigquery_dataset=" in message
    assert "not changed" in message
    assert _snapshot(client, bq["dataset"]) == before
    assert _count(client, "runs", "bq_c") == 0
    # The run itself is complete on disk, ready to load elsewhere.
    assert (tmp_path / "runs" / "sample" / "bq_c" / "run.json").exists()
    other = bigquery.load_run(str(tmp_path / "runs" / "sample" / "bq_c"), dataset=f"{bq['dataset']}_n32", client=client)
    assert other["features"] == {**other["features"], "action": "loaded", "rows": 5}


@pytest.mark.emulator
@pytest.mark.slow
def test_cli_loads_an_existing_run(bq, run_a, capsys):
    code = bigquery.main([run_a["outputs"]["run_dir"], f"--bigquery_dataset={bq['dataset']}_cli"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "features: loaded (60 rows" in out and "table created" in out
    assert bigquery.main([run_a["outputs"]["run_dir"], f"--bigquery_dataset={bq['dataset']}_cli"]) == 0
    assert "already loaded, skipped (60 rows" in capsys.readouterr().out
    assert bigquery.main(["/nonexistent/run", f"--bigquery_dataset={bq['dataset']}"]) == 2
    assert "no run.json" in capsys.readouterr().err


@pytest.mark.emulator
@pytest.mark.slow
def test_every_statement_of_a_load_is_dry_run_then_capped(bq, run_a, run_b, bq_jobs):
    """Each job configuration sent while loading (the runs check, the ALTER that adds run b's
    chroma column, the row counts) carries maximum_bytes_billed, after a dry run of the same SQL."""
    client, dataset = bq["client"], f"{bq['dataset']}_caps"
    bigquery.load_run(run_a["outputs"]["run_dir"], dataset=dataset, client=client, max_bytes_billed=123_456_789)
    bigquery.load_run(run_b["outputs"]["run_dir"], dataset=dataset, client=client, max_bytes_billed=123_456_789)
    assert bigquery.main([run_b["outputs"]["run_dir"], f"--bigquery_dataset={dataset}", "--max_bytes_billed=7MB"]) == 0
    queries = [job for job in bq_jobs if job.kind == "query"]
    statements = [job.sql for job in queries if not job.dry_run]
    assert sum("ALTER TABLE" in sql and "`chroma`" in sql for sql in statements) == 1
    assert sum("COUNT(*)" in sql for sql in statements) == 6 and sum("config_hash" in sql for sql in statements) == 2
    assert len(queries) == 2 * len(statements) == 18
    for dry, job in zip(queries[::2], queries[1::2]):
        assert (dry.dry_run, job.dry_run, dry.sql) == (True, False, job.sql)
    assert [job.maximum_bytes_billed for job in queries] == [123_456_789] * 10 + [7_000_000] * 8
    assert {job.kind for job in bq_jobs} <= {"query", "load"}  # nothing else was sent


# --- the compatibility rules, on schemas alone (no emulator) -----------------------------------


def _existing(fields, signatures):
    from google.cloud import bigquery as bq

    table = bq.Table("p.d.features", schema=list(fields))
    table.description = bigquery.describe("features", signatures)
    return table


def _extractor(name, version, outputs):
    return {"name": name, "version": version, "outputs": [{"name": n, "level": lv, "shape": s} for n, lv, s in outputs]}


def test_type_change_is_refused_naming_column_and_types():
    old = _extractor("spectral", "1", [("spectral_centroid", "frame", [])])
    new = _extractor("spectral", "1", [("spectral_centroid", "frame", [3])])
    existing = _existing(tables.features_schema([old]), {"spectral": {"1": tables.signature([old])["spectral"]["outputs"]}})
    with pytest.raises(SchemaError) as refused:
        bigquery.check(table_id="p.d.features", name="features", existing=existing, fields=tables.features_schema([new]),
                       run_signature=tables.signature([new]), run_id="r2", dataset="p.d")
    message = str(refused.value)
    assert "column spectral.spectral_centroid_mean is FLOAT64 in the table but ARRAY<FLOAT64> in this run" in message
    assert "spectral@1" in message and "--bigquery_dataset=p.d_v2" in message and "bump its version" in message


def test_new_extractor_is_added_and_a_new_version_is_recorded():
    logmel = _extractor("logmel", "1", [("logmel", "frame", [64])])
    existing = _existing(tables.features_schema([logmel]), {"logmel": {"1": {"logmel": {"level": "frame", "shape": [64]}}}})
    bumped = _extractor("logmel", "2", [("logmel", "frame", [128])])
    chroma = _extractor("chroma", "1", [("chroma", "frame", [12])])
    added, description = bigquery.check(
        table_id="p.d.features", name="features", existing=existing, fields=tables.features_schema([bumped, chroma]),
        run_signature=tables.signature([bumped, chroma]), run_id="r2", dataset="p.d",
    )
    assert [f.name for f in added] == ["chroma"]
    assert bigquery.read_signatures(description)["logmel"] == {
        "1": {"logmel": {"level": "frame", "shape": [64]}},
        "2": {"logmel": {"level": "frame", "shape": [128]}},
    }


def test_load_job_ids_are_fixed_per_table_dataset_and_attempt():
    """A retried final step derives the same ids (so BigQuery answers a second submission with 409
    and the step waits for the first job); another attempt, table or dataset gets others."""
    ids = bigquery.job_ids(table="features", dataset="p.d", job_key="gs://b/runs/s/r|2026-01-01T00:00:00+00:00/sha256:1")
    assert ids == bigquery.job_ids(table="features", dataset="p.d", job_key="gs://b/runs/s/r|2026-01-01T00:00:00+00:00/sha256:1")
    assert len(ids) == len(set(ids)) == bigquery.MAX_JOB_IDS and all(re.fullmatch(r"[A-Za-z0-9_]{1,1024}", i) for i in ids)
    others = [
        bigquery.job_ids(table="runs", dataset="p.d", job_key="gs://b/runs/s/r|2026-01-01T00:00:00+00:00/sha256:1"),
        bigquery.job_ids(table="features", dataset="p.e", job_key="gs://b/runs/s/r|2026-01-01T00:00:00+00:00/sha256:1"),
        bigquery.job_ids(table="features", dataset="p.d", job_key="gs://b/runs/s/r|2026-01-02T00:00:00+00:00/sha256:1"),
    ]
    assert all(not set(ids) & set(other) for other in others)


def test_dataset_flag_is_checked_before_the_pipeline_runs():
    from featurebeam.errors import ConfigError

    with pytest.raises(ConfigError, match="project.dataset"):
        bigquery.parse_dataset("just_a_dataset")
    assert bigquery.parse_dataset("example.com:proj.features") == ("example.com:proj", "features")


@pytest.mark.emulator
@pytest.mark.slow
def test_saved_queries_over_two_runs_agree_with_duckdb(bq, run_a, run_b, tmp_path):
    from export import query

    root = tmp_path / "runs"
    for run in (run_a, run_b):
        (root / run["run_id"]).mkdir(parents=True)
        (root / run["run_id"] / "run").symlink_to(run["outputs"]["run_dir"])
    saved = query.saved_queries()
    diff = query.parse_params(["run_a=bq_a", "run_b=bq_b"], saved["config_diff"].params)
    local = query.query(saved["config_diff"].sql, params=diff, runs=str(root))
    remote = query.query(saved["config_diff"].sql, params=diff, bigquery_dataset=bq["dataset"], client=bq["client"])
    assert local == remote
    settings = {row[0]: row[1:] for row in local[1]}
    assert settings["dataset"] == ("sample", "bq_corpus0")
    assert settings["extractor mfcc"][1] is None and settings["extractor chroma"][0] is None
    assert settings["extractor chroma"][1].startswith('chroma@1 {"hop_length": 256')
    assert "extractor logmel" not in settings  # same version and config in both runs
    local = query.query(saved["failures"].sql, runs=str(root))
    remote = query.query(saved["failures"].sql, bigquery_dataset=bq["dataset"], client=bq["client"])
    assert local == (remote[0], [r for r in remote[1] if r[0] == "bq_b"])
    assert sorted((r[2], r[3]) for r in local[1]) == [("empty", 1), ("undecodable", 1)]


@pytest.mark.emulator
@pytest.mark.slow
def test_an_overwritten_run_with_the_same_id_is_not_mistaken_for_the_loaded_one(bq, tmp_path):
    from featurebeam.errors import OutputError

    dataset = f"{bq['dataset']}_overwrite"
    argv = ["--dataset=sample", "--features=spectral", "--limit=3", f"--output={tmp_path}", "--run_id=bq_same",
            f"--bigquery_dataset={dataset}"]
    extract.run(argv)
    with pytest.raises(OutputError, match="already holds another run with id 'bq_same'.*unique --run_id"):
        extract.run(argv + ["--mode=overwrite"])
    assert _rows(bq["client"], f"SELECT COUNT(*) AS n FROM `{dataset}.features`")[0]["n"] == 3


@pytest.mark.emulator
@pytest.mark.slow
def test_a_run_on_cloud_storage_loads_through_the_same_path(bq, run_a, gcs_emulator):
    """As on Dataflow: the run folder is gs://, tables are built and read there (GCS emulator)."""
    from apache_beam.io.filesystems import FileSystems

    gcs_emulator.make_bucket("fb-runs")
    local = Path(run_a["outputs"]["run_dir"])
    remote = "gs://fb-runs/runs/sample/bq_a"
    for path in local.rglob("*"):
        if path.is_file() and "tables" not in path.parts:
            with FileSystems.create(f"{remote}/{path.relative_to(local)}") as handle:
                handle.write(path.read_bytes())
    report = bigquery.load_run(remote, dataset=f"{bq['dataset']}_gcs", client=bq["client"], rebuild=True)
    assert (report["features"]["action"], report["features"]["rows"]) == ("loaded", 60)
    shards = sorted(m.path.rsplit("/", 1)[1] for m in FileSystems.match([f"{remote}/parquet/part-*.parquet"])[0].metadata_list)
    assert sorted(p.rsplit("/", 1)[1] for p in tables.files(remote)["features"]) == shards  # rebuilt in the bucket
    means = _rows(bq["client"], f"SELECT AVG(spectral.spectral_centroid_mean) AS c FROM `{bq['dataset']}_gcs.features`")
    local_means = _rows(bq["client"], "SELECT AVG(spectral.spectral_centroid_mean) AS c FROM features WHERE run_id = 'bq_a'")
    assert means[0]["c"] == pytest.approx(local_means[0]["c"], rel=1e-12)


@pytest.mark.emulator
@pytest.mark.slow
def test_frames_are_added_as_their_own_columns(bq, tmp_path):
    dataset = f"{bq['dataset']}_frames"
    base = ["--dataset=sample", "--features=spectral", "--limit=3", f"--output={tmp_path}", f"--bigquery_dataset={dataset}"]
    extract.run(base + ["--run_id=bq_plain"])
    run = extract.run(base + ["--run_id=bq_frames", "--bigquery_frames"])
    table = bq["client"].get_table(f"{dataset}.features")
    assert [f.name for f in table.schema][-2:] == ["spectral", "spectral_frames"]
    rows = _rows(bq["client"], f"SELECT run_id, key, ARRAY_LENGTH(spectral_frames.spectral_centroid) AS n FROM `{dataset}.features`")
    shards = {r["key"]: r for r in _parquet_records(run)}
    assert {r["n"] for r in rows if r["run_id"] == "bq_plain"} == {None}
    assert {r["key"]: r["n"] for r in rows if r["run_id"] == "bq_frames"} == {
        k: len(r["spectral_centroid"]) for k, r in shards.items()
    }
