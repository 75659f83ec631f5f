"""Plain functions as extractors end to end (features/function.py): a user's file, one command, and its
integer, bool, string, variable-length and event outputs read back from TFRecord (the loader),
Parquet, DuckDB (export.query) and BigQuery (the emulator), and summarised in the statistics.
The streaming-VAD recipe (examples/streaming_vad.py) runs in the same pipeline by config."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

import export
from export import query
from pipelines import extract

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

USER_CODE = textwrap.dedent(
    '''
    import numpy as np

    HOP = 256


    def describe(*, waveform, sample_rate, threshold=0.05):
        """Per-frame RMS and loudness, the loud-frame count, a label, the peak positions and the loud runs."""
        frames = 1 + len(waveform) // HOP
        padded = np.pad(waveform, (HOP // 2, HOP))
        rms = np.array([np.sqrt(np.mean(padded[i * HOP:(i + 1) * HOP] ** 2)) for i in range(frames)], dtype=np.float32)
        loud = rms > threshold
        edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
        runs = [{"start": float(a * HOP / sample_rate), "frames": int(b - a), "kind": "loud"} for a, b in zip(edges[::2], edges[1::2])]
        return {
            "rms": rms,
            "loud": loud,
            "count": int(loud.sum()),
            "label": "loud" if loud.any() else "quiet",
            "peaks": [int(i) for i in np.flatnonzero(loud)],
            "runs": runs,
        }
    '''
)
LENGTHS = (8000, 12000, 16000)


def _wav(n: int, seed: int) -> np.ndarray:
    """Quiet noise with a loud tone over its middle third (the last clip stays quiet)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.005 * rng.standard_normal(n)
    if seed < 2:
        x[n // 3 : 2 * n // 3] += 0.5 * np.sin(2 * np.pi * 440 * t[n // 3 : 2 * n // 3])
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, bq_emulator):
    root = tmp_path_factory.mktemp("function-run")
    (root / "audio").mkdir()
    for i, n in enumerate(LENGTHS):
        soundfile.write(root / "audio" / f"{i}.wav", _wav(n, i), 16000, subtype="FLOAT")
    (root / "my_algos.py").write_text(USER_CODE)
    config = root / "features.yaml"
    config.write_text(
        "features:\n"
        f"  algo: {{function: {root / 'my_algos.py'}:describe, threshold: 0.05}}\n"
        f"  speech: {{function: {ROOT / 'examples' / 'streaming_vad.py'}:vad, chunk_seconds: 0.25}}\n"
    )
    dataset = f"{bq_emulator.project}.fb_functions"
    run = extract.run([
        f"--dataset={root / 'audio'}", f"--config={config}", f"--output={root / 'runs'}", "--run_id=fn",
        f"--bigquery_dataset={dataset}", "--no_report",
    ])
    return run, dataset, root


def _parquet(run) -> dict[str, dict]:
    table = pq.read_table(Path(run["outputs"]["run_dir"]) / "parquet")
    return {row["key"]: row for row in table.to_pylist()}, table.schema


@pytest.mark.emulator
def test_a_users_function_file_runs_and_every_output_type_reads_back_everywhere(user_run, bq_emulator):
    run, dataset, root = user_run
    assert (run["counts"]["failed"], run["counts"]["records"]) == (0, len(LENGTHS))
    by_name = {e["name"]: e for e in run["extractors"]}
    desc = by_name["algo"]
    assert desc["function"]["file"] == "my_algos.py" and desc["version"].startswith("sha256:")
    outputs = {o["name"]: o for o in desc["outputs"]}
    assert outputs["algo_rms"]["level"] == "frame" and outputs["algo_rms"]["hop_length"] == 256
    assert (outputs["algo_loud"]["dtype"], outputs["algo_loud"]["level"]) == ("bool", "frame")
    assert (outputs["algo_count"]["dtype"], outputs["algo_count"]["shape"]) == ("int64", [])
    assert (outputs["algo_label"]["dtype"], outputs["algo_peaks"]["shape"]) == ("string", [-1])
    assert outputs["algo_runs"]["fields"] == [["start", "float64"], ["frames", "int64"], ["kind", "string"]]

    # Parquet: native types, events as a list of structs; the values agree with each other.
    rows, schema = _parquet(run)
    assert len(rows) == len(LENGTHS)
    assert schema.field("algo_count").type == pa.int64() and schema.field("algo_label").type == pa.string()
    assert schema.field("algo_loud").type == pa.list_(pa.bool_())
    assert schema.field("algo_peaks").type == pa.list_(pa.int64())
    assert pa.types.is_struct(schema.field("algo_runs").type.value_type)
    for row in rows.values():
        assert row["algo_count"] == sum(row["algo_loud"]) == len(row["algo_peaks"])
        assert row["algo_label"] == ("loud" if row["algo_count"] else "quiet")
        assert sum(r["frames"] for r in row["algo_runs"]) == row["algo_count"]
    assert {row["algo_label"] for row in rows.values()} == {"loud", "quiet"}
    loud = next(row for row in rows.values() if row["algo_runs"])
    assert loud["speech_segments"] and loud["speech_speech_seconds"] > 0

    # TFRecord: export.load_tfrecords yields each type.
    records = {}
    for features, _ in export.load_tfrecords(run["outputs"]["run_dir"], batch_size=None):
        records[features["key"].numpy().decode()] = features
    assert set(records) == set(rows)
    for key, row in rows.items():
        got = records[key]
        assert got["algo_count"].dtype.name == "int64" and int(got["algo_count"]) == row["algo_count"]
        assert got["algo_label"].numpy().decode() == row["algo_label"]
        assert got["algo_peaks"].numpy().tolist() == row["algo_peaks"]
        assert got["algo_loud"].numpy().astype(bool).tolist() == row["algo_loud"]
        assert np.array_equal(got["algo_rms"].numpy(), np.asarray(row["algo_rms"], dtype=np.float32))
        runs = got["algo_runs"]
        assert [b.decode() for b in runs["kind"].numpy()] == [r["kind"] for r in row["algo_runs"]]
        assert runs["frames"].numpy().tolist() == [r["frames"] for r in row["algo_runs"]]
        assert np.allclose(runs["start"].numpy(), [r["start"] for r in row["algo_runs"]])

    # DuckDB (the local features view) and BigQuery: typed columns.
    sql = (
        "SELECT key, algo.algo_count AS count, algo.algo_label AS label, algo.algo_peaks AS peaks, "
        "ARRAY_LENGTH(algo.algo_runs) AS runs, speech.speech_speech_seconds AS seconds FROM features ORDER BY key"
    )
    expected = [
        (key, row["algo_count"], row["algo_label"], row["algo_peaks"], len(row["algo_runs"]), row["speech_speech_seconds"])
        for key, row in sorted(rows.items())
    ]
    _, local = query.query(sql, runs=str(root / "runs"))
    assert [tuple(r) for r in local] == [(k, c, lab, list(p), n, s) for k, c, lab, p, n, s in expected]
    assert all(isinstance(r[1], int) and isinstance(r[2], str) for r in local)
    client = bq_emulator.client()
    remote = [
        tuple(r.values())
        for r in client.query(sql.replace("FROM features", f"FROM `{dataset}.features`")).result()
    ]
    assert [(k, c, lab, list(p), n, s) for k, c, lab, p, n, s in remote] == [
        (k, c, lab, list(p), n, s) for k, c, lab, p, n, s in expected
    ]

    # Statistics: numeric outputs summarised, strings counted.
    stats = run["statistics"]
    assert stats["numeric"]["algo_count"]["count"] == len(LENGTHS)
    assert stats["numeric"]["algo_runs/count"]["count"] == len(LENGTHS)
    assert stats["categorical"]["algo_label"] == {"loud": 2, "quiet": 1}
    assert stats["categorical"]["algo_runs/kind"]["loud"] >= 2


@pytest.mark.emulator
def test_the_same_function_runs_on_a_dask_cluster_that_cannot_see_its_file(user_run, gcs_emulator, isolated_dask_cluster):
    """`--features=/tmp/.../my_algos.py:describe` with workers whose /tmp is their own: the code
    reaches them pickled by value, the audio through gs://, and they compute what FnApiRunner did."""
    import io

    from apache_beam.io.filesystems import FileSystems

    from export.metadata import output_files

    run, _, root = user_run
    bucket = gcs_emulator.make_bucket("fb-functions")
    for path in sorted((root / "audio").iterdir()):
        bucket.blob(f"audio/{path.name}").upload_from_filename(str(path))
    dask_run = extract.run([
        "--dataset=gs://fb-functions/audio/", f"--features={root / 'my_algos.py'}:describe",
        "--output=gs://fb-functions/runs", "--run_id=dask", "--no_report", *isolated_dask_cluster.flags,
    ])
    rows, _ = _parquet(run)
    remote = {}
    for path in output_files(dask_run, "parquet"):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            remote.update({r["key"]: r for r in pq.read_table(io.BytesIO(handle.read())).to_pylist()})
    assert set(remote) == set(rows)
    for key, row in rows.items():
        for out in ("count", "label", "peaks", "runs", "loud"):
            assert remote[key][f"describe_{out}"] == row[f"algo_{out}"], (key, out)
        assert np.array_equal(np.asarray(remote[key]["describe_rms"], np.float32), np.asarray(row["algo_rms"], np.float32))
