"""export/tables.py: the features, runs and errors tables built from a run's committed shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud.bigquery import SchemaField

from export import tables
from featurebeam.errors import OutputError
from export.metadata import output_files


def test_frame_stats_known_answers():
    # Row 0: frames [1, 2], [3, 4], [5, 6]; row 1: one frame; row 2: no frames at all.
    column = pa.chunked_array([pa.array([[1, 2, 3, 4, 5, 6], [7, 8], []], type=pa.list_(pa.float32()))])
    mean, std, valid = tables._frame_stats(column, shape=(2,), name="x")
    assert valid.tolist() == [True, True, False]
    np.testing.assert_allclose(mean[:2], [[3, 4], [7, 8]])
    np.testing.assert_allclose(std[:2], [[np.sqrt(8 / 3)] * 2, [0, 0]])
    assert np.isnan(mean[2]).all()


def test_frame_stats_equal_numpy_per_row_on_random_rows():
    rng = np.random.default_rng(3)
    frames = [int(n) for n in rng.integers(0, 40, size=50)]
    rows = [rng.normal(size=(n, 5)).astype(np.float32) for n in frames]
    column = pa.array([r.ravel() for r in rows], type=pa.list_(pa.float32()))
    mean, std, valid = tables._frame_stats(column, shape=(5,), name="x")
    for i, r in enumerate(rows):
        if not len(r):
            assert not valid[i]
            continue
        np.testing.assert_allclose(mean[i], r.astype(np.float64).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(std[i], r.astype(np.float64).std(axis=0), rtol=1e-9, atol=1e-12)


def test_a_row_that_is_not_whole_frames_is_an_error():
    column = pa.array([[1.0, 2.0, 3.0]], type=pa.list_(pa.float32()))
    with pytest.raises(OutputError, match="not a multiple of its frame size 2"):
        tables._frame_stats(column, shape=(2,), name="logmel")


def test_arrow_types_follow_the_bigquery_schema():
    fields = [
        SchemaField("k", "STRING", mode="REQUIRED", description="key"),
        SchemaField("d", "DATE"),
        SchemaField("t", "TIMESTAMP"),
        SchemaField("x", "FLOAT"),  # the legacy name BigQuery reports
        SchemaField("s", "RECORD", fields=[SchemaField("a", "FLOAT64", mode="REPEATED"), SchemaField("n", "INT64")]),
        SchemaField("r", "RECORD", mode="REPEATED", fields=[SchemaField("name", "STRING")]),
    ]
    schema = tables.arrow_schema(fields)
    assert schema.field("k").nullable is False and schema.field("k").metadata == {b"description": b"key"}
    assert schema.field("d").type == pa.date32()
    assert schema.field("t").type == pa.timestamp("us", tz="UTC")
    assert schema.field("x").type == pa.float64()
    assert schema.field("s").type == pa.struct([pa.field("a", pa.list_(pa.float64())), pa.field("n", pa.int64())])
    assert schema.field("r").type == pa.list_(pa.struct([pa.field("name", pa.string())]))


def test_extractor_columns_summarise_frame_outputs_and_keep_clip_outputs():
    extractor = {
        "name": "spectral",
        "version": "1",
        "outputs": [
            {"name": "spectral_centroid", "level": "frame", "shape": [], "description": "centroid (Hz)"},
            {"name": "spectral_contrast", "level": "frame", "shape": [7], "description": "contrast (dB)"},
            {"name": "spectral_tempo", "level": "clip", "shape": [], "description": "tempo"},
        ],
    }
    (column,) = tables.extractor_fields(extractor)
    assert column.name == "spectral" and column.field_type == "RECORD"
    kinds = {f.name: (f.field_type, f.mode) for f in column.fields}
    assert kinds == {
        "spectral_centroid_mean": ("FLOAT64", "NULLABLE"),
        "spectral_centroid_std": ("FLOAT64", "NULLABLE"),
        "spectral_contrast_mean": ("FLOAT64", "REPEATED"),
        "spectral_contrast_std": ("FLOAT64", "REPEATED"),
        "spectral_tempo": ("FLOAT64", "NULLABLE"),
    }
    summary, frames = tables.extractor_fields(extractor, frames=True)
    assert frames.name == "spectral_frames" and [f.name for f in frames.fields] == ["spectral_centroid", "spectral_contrast"]
    with pytest.raises(OutputError, match="'label' clashes"):
        tables.features_schema([{**extractor, "name": "label"}])


# --- the sample run (its finalisation wrote the tables) -----------------------------------------


def _shards(run):
    return pq.read_table(output_files(run, "parquet")).to_pylist()


@pytest.mark.slow
def test_workers_and_the_final_step_write_the_three_tables(sample_run):
    paths = tables.files(sample_run["outputs"]["run_dir"])
    assert sample_run["outputs"]["tables"] == str(Path(sample_run["outputs"]["run_dir"]) / "tables")
    assert len(paths["features"]) == sample_run["outputs"]["parquet"]["files"] and len(paths["runs"]) == 1
    assert not paths["errors"]  # no dead letters, no errors shards
    features = pq.read_table(paths["features"])
    assert features.num_rows == sample_run["counts"]["records"] == 60
    expected = tables.arrow_schema(tables.features_schema(sample_run["extractors"]))
    assert features.schema.equals(expected, check_metadata=False)
    fields, signature = tables.read_schema(paths["features"][0])
    assert [f.name for f in fields] == features.schema.names
    assert signature["logmel"] == {"version": "1", "outputs": {"logmel": {"level": "frame", "shape": [64]}}}
    assert set(features.column("run_id").to_pylist()) == {"session"}
    assert {r["key"] for r in features.select(["key"]).to_pylist()} == {r["key"] for r in _shards(sample_run)}


@pytest.mark.slow
def test_summaries_equal_the_summary_extractor_and_numpy_over_the_shards(sample_run):
    rows = {r["key"]: r for r in pq.read_table(tables.files(sample_run["outputs"]["run_dir"])["features"]).to_pylist()}
    for shard in _shards(sample_run):
        row = rows[shard["key"]]
        # The summary extractor computed the log-mel mean/std inside the pipeline (float32).
        np.testing.assert_allclose(row["logmel"]["logmel_mean"], row["summary"]["summary_logmel_mean"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(row["logmel"]["logmel_std"], row["summary"]["summary_logmel_std"], rtol=1e-4, atol=1e-4)
        centroid = np.asarray(shard["spectral_centroid"], dtype=np.float64)
        assert row["spectral"]["spectral_centroid_mean"] == pytest.approx(centroid.mean(), rel=1e-12)
        assert row["spectral"]["spectral_centroid_std"] == pytest.approx(centroid.std(), rel=1e-9)
        mfcc = np.asarray(shard["mfcc"], dtype=np.float64).reshape(shard["mfcc_shape"])
        np.testing.assert_allclose(row["mfcc"]["mfcc_std"], mfcc.std(axis=0), rtol=1e-9, atol=1e-9)
        assert row["summary"]["summary_logmel_mean"] == pytest.approx(shard["summary_logmel_mean"])
        assert (row["label"], row["split"], row["start_sample"], row["silent"]) == (shard["label"], shard["split"], 0, False)


@pytest.mark.slow
def test_runs_and_errors_tables_of_the_sample_run(sample_run):
    paths = tables.files(sample_run["outputs"]["run_dir"])
    (row,) = pq.read_table(paths["runs"]).to_pylist()
    on_disk = json.loads((Path(sample_run["outputs"]["run_dir"]) / "run.json").read_text())
    assert json.loads(row["run_json"]) == on_disk
    assert row["run_json"] == (Path(sample_run["outputs"]["run_dir"]) / "run.json").read_text()
    assert (row["run_id"], row["listed"], row["ok"], row["failed"], row["records"]) == ("session", 60, 60, 0, 60)
    assert row["started"].isoformat() == sample_run["started"]
    assert row["run_date"].isoformat() == sample_run["started"][:10]
    assert [e["name"] for e in row["extractors"]] == [e["name"] for e in sample_run["extractors"]]
    assert {c["label"]: c["records"] for c in row["label_counts"]} == sample_run["label_counts"]
    assert json.loads(row["config"]) == on_disk["config"]
    assert row["outputs"]["parquet"] == [sample_run["outputs"]["parquet"]["pattern"]]  # a pattern, not every shard
    assert paths["errors"] == [] and tables.table_schema(sample_run, "errors") == tables.ERRORS_SCHEMA


@pytest.mark.slow
def test_frames_round_trip_in_a_copied_run_folder(sample_run, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(sample_run["outputs"]["run_dir"], copy)
    original = [Path(p).stat().st_mtime_ns for p in tables.files(sample_run["outputs"]["run_dir"])["features"]]
    tables.rebuild(str(copy), frames=True)
    rows = {r["key"]: r for r in pq.read_table(tables.files(str(copy))["features"]).to_pylist()}
    for shard in _shards(sample_run)[:5]:
        frames = rows[shard["key"]]["logmel_frames"]["logmel"]
        np.testing.assert_array_equal(np.asarray(frames, dtype=np.float32), np.asarray(shard["logmel"], dtype=np.float32))
    assert [Path(p).stat().st_mtime_ns for p in tables.files(sample_run["outputs"]["run_dir"])["features"]] == original
    assert not [p for p in (copy / "tables").rglob(".*")]
