"""--formats and the compression flags end to end: real runs on a small WAV folder, read back through
TensorFlow, the loader, pyarrow, DuckDB and export.query; readers of a missing format fail in
one line naming the fix; resume refuses a formats change; every stage's time is counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

import export
from export import formats, query, report, statistics, tables, tfds
from export.metadata import output_files
from featurebeam.errors import ConfigError, OutputError
from featurebeam.stages import STAGES
from pipelines import extract

pytestmark = pytest.mark.slow
N = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N noise clips of 0.5 to 1.4 s (a folder: its listing gives the content ids reuse matches on)."""
    root = tmp_path_factory.mktemp("formats-corpus")
    rng = np.random.default_rng(11)
    for i in range(N):
        soundfile.write(root / f"{i:02d}.wav", (0.3 * rng.standard_normal(8000 + 1600 * i)).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def _run(corpus):
    def run(output, run_id, *extra):
        return extract.run([f"--dataset={corpus}", "--features=logmel,mfcc", f"--output={output}",
                            f"--run_id={run_id}", "--no_report", *extra])

    return run


@pytest.fixture(scope="module")
def parquet_only(_run, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("p"), "p", "--formats=parquet")


@pytest.fixture(scope="module")
def tfrecord_only(_run, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("t"), "t", "--formats=tfrecord")


def _message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_parquet_only_run_writes_no_tfrecords_and_says_so(parquet_only):
    run_dir = Path(parquet_only["outputs"]["run_dir"])
    assert not (run_dir / "tfrecords").exists()
    assert parquet_only["export"]["formats"] == ["parquet"]
    # The entry keeps its layout with 0 files: readers that list it find nothing.
    assert parquet_only["outputs"]["tfrecords"]["files"] == 0 and output_files(parquet_only, "tfrecords") == []
    assert sum(pq.read_table(p).num_rows for p in output_files(parquet_only, "parquet")) == N
    assert parquet_only["counts"]["records"] == N
    with pytest.raises(OutputError) as info:
        export.load_tfrecords(str(run_dir))
    assert "has no TFRecords" in _message(info) and "rerun it with --formats=tfrecord,parquet" in _message(info)


def test_parquet_only_run_serves_every_parquet_reader(_run, parquet_only, tmp_path):
    run_dir = parquet_only["outputs"]["run_dir"]
    columns, rows = query.query("SELECT count(*) FROM features", runs=str(Path(run_dir).parent.parent))
    assert rows == [(N,)]
    assert statistics.compute_for_run(run_dir)["records"] == N
    assert "<h2>Examples" in report.render(run_dir) and "No examples" not in report.render(run_dir)
    again = _run(tmp_path, "again", f"--reuse_from={run_dir}", "--formats=tfrecord")
    assert again["reuse"]["records_fully_reused"] == N
    assert len(list(export.load_tfrecords(again["outputs"]["run_dir"], batch_size=None))) == N


def test_tfrecord_only_run_loads_and_parquet_readers_name_the_fix(corpus, tfrecord_only, tmp_path, capsys):
    run_dir = tfrecord_only["outputs"]["run_dir"]
    assert not (Path(run_dir) / "parquet").exists() and tfrecord_only["outputs"]["parquet"]["files"] == 0
    assert len(list(export.load_tfrecords(run_dir, batch_size=None))) == N
    # The SQL tables are built from the rows in memory, so they exist without Parquet exports.
    _, rows = query.query("SELECT count(*) FROM features", runs=str(Path(run_dir).parent.parent))
    assert rows == [(N,)]
    assert "No examples: this run has no Parquet shards" in report.render(run_dir)
    for call in (lambda: tfds.export_for_run(run_dir), lambda: statistics.compute_for_run(run_dir), lambda: tables.rebuild(run_dir)):
        with pytest.raises(OutputError) as info:
            call()
        assert "has no Parquet shards" in _message(info) and "--formats=tfrecord,parquet" in _message(info)
    argv = [f"--dataset={corpus}", "--features=logmel,mfcc", f"--output={tmp_path}", f"--reuse_from={run_dir}"]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert "no Parquet shards (--reuse_from needs them" in err and "drop --reuse_from" in err and err.count("\n") == 1


@pytest.mark.parametrize("tfrecord_codec, parquet_codec, parquet_name", [
    ("none", "none", "UNCOMPRESSED"),
    ("gzip:9", "snappy", "SNAPPY"),
    ("gzip", "gzip:6", "GZIP"),
    ("none", "lz4", "LZ4"),
])
def test_every_codec_reads_back_through_tensorflow_loader_pyarrow_and_duckdb(_run, tmp_path, tfrecord_codec, parquet_codec, parquet_name):
    import duckdb
    import tensorflow as tf

    run = _run(tmp_path, "c", f"--tfrecord_compression={tfrecord_codec}", f"--parquet_compression={parquet_codec}")
    assert run["export"] == {"formats": ["tfrecord", "parquet"], "tfrecord_compression": tfrecord_codec,
                             "parquet_compression": parquet_codec}
    files = output_files(run, "tfrecords")
    ending = ".tfrecord" if tfrecord_codec == "none" else ".tfrecord.gz"
    assert files and all(f.endswith(ending) for f in files)
    compression_type = "" if tfrecord_codec == "none" else "GZIP"
    assert sum(1 for _ in tf.data.TFRecordDataset(files, compression_type=compression_type)) == N
    assert len(list(export.load_tfrecords(run["outputs"]["run_dir"], batch_size=None))) == N

    shards = output_files(run, "parquet")
    assert sum(pq.read_table(p).num_rows for p in shards) == N
    meta = pq.ParquetFile(shards[0]).metadata.row_group(0)
    assert {meta.column(i).compression for i in range(meta.num_columns)} == {parquet_name}
    pattern = str(Path(run["outputs"]["run_dir"]) / "parquet" / "*.parquet")
    assert duckdb.sql(f"SELECT count(*), min(len(logmel)) FROM read_parquet('{pattern}')").fetchone()[0] == N
    _, rows = query.query("SELECT count(*) FROM features", runs=str(tmp_path))
    assert rows == [(N,)]


def test_unknown_format_is_one_line(corpus, tmp_path, capsys):
    argv = [f"--dataset={corpus}", "--features=logmel", f"--output={tmp_path}", "--formats=tfrecord,hdf5"]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "featurebeam: error: --formats=tfrecord,hdf5: unknown format 'hdf5'; choose from tfrecord,parquet,tfds (default tfrecord,parquet)\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("change", ["--formats=parquet", "--tfrecord_compression=gzip:1", "--parquet_compression=snappy"])
def test_resume_with_other_formats_or_codecs_is_refused(corpus, tmp_path, change):
    argv = [f"--dataset={corpus}", "--features=logmel", f"--output={tmp_path}", "--run_id=r"]
    extract.plan(argv)  # a started run: its _work/plan.json, no run.json yet
    with pytest.raises(ConfigError) as info:
        extract.plan([*argv, "--mode=resume", change])
    assert "was started with config" in _message(info) and "--formats" in _message(info)
    assert extract.plan([*argv, "--mode=resume"]).formats == formats.ExportFormats()


def test_run_json_carries_every_stage_time_from_the_beam_counters(parquet_only, tfrecord_only):
    for run in (parquet_only, tfrecord_only):
        assert list(run["stage_seconds"]) and set(run["stage_seconds"]) == set(STAGES)
        assert all(seconds > 0 for seconds in run["stage_seconds"].values()), run["stage_seconds"]
        on_disk = json.loads((Path(run["outputs"]["run_dir"]) / "run.json").read_text())
        assert on_disk["stage_seconds"] == run["stage_seconds"]
        summary = json.loads((Path(run["outputs"]["run_dir"]) / extract.WORK / "summary.json").read_text())
        assert summary["stage_seconds"] == run["stage_seconds"]  # python -m pipelines.finalize keeps them
    assert "<h3>Time per stage</h3>" in report.render(parquet_only["outputs"]["run_dir"])
