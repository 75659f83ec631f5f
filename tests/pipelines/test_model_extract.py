"""Model extractors through the real pipeline (FnApiRunner): a SavedModel (frame level), a
`.keras` file and an ONNX file; every embedding read back from the TFRecords (parsed by
TensorFlow with the run's schema) and the Parquet equals the model applied to that waveform
alone; a changed model is a changed extractor for --reuse_from; non-finite outputs are per-item
dead letters."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from featurebeam.errors import ConfigError
from pipelines import extract
from tests.features.models import HOP, save_keras, tiny_models, write_wavs  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

LENGTHS = [0.3, 1.1, 0.7, 1.6, 0.45, 0.9]  # seconds: unequal, so batches are zero-padded


def read_tfrecords(run_dir: str) -> dict[str, dict[str, np.ndarray]]:
    """{key: {feature: array}} parsed by TensorFlow with the run's schema.pbtxt."""
    import tensorflow as tf

    from export.schema import from_pbtxt, parse_specs

    context_spec, sequence_spec = parse_specs(from_pbtxt(Path(run_dir, "schema.pbtxt").read_text()))
    files = sorted(glob.glob(os.path.join(run_dir, "tfrecords", "part-*.tfrecord*")))
    out = {}
    compression = "GZIP" if files and files[0].endswith(".gz") else ""
    for record in tf.data.TFRecordDataset(files, compression_type=compression):
        if sequence_spec:
            context, sequence = tf.io.parse_single_sequence_example(
                record, context_features=context_spec, sequence_features=sequence_spec
            )
        else:
            context, sequence = tf.io.parse_single_example(record, context_spec), {}
        values = {k: v.numpy() for k, v in {**context, **sequence}.items()}
        out[values["key"].decode()] = values
    return out


def read_parquet(run_dir: str) -> dict[str, dict]:
    files = sorted(glob.glob(os.path.join(run_dir, "parquet", "part-*.parquet")))
    return {row["key"]: row for row in pq.read_table(files).to_pylist()}


def parquet_array(row: dict, name: str) -> np.ndarray:
    return np.asarray(row[name], np.float32).reshape(row[f"{name}_shape"])


def waveform(uri: str) -> np.ndarray:
    samples, sr = soundfile.read(uri, dtype="float32")
    assert sr == 16000
    return samples


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "features.yaml"
    path.write_text(text)
    return str(path)


def _run(tmp_path, audio, config, run_id, *extra):
    return extract.run(
        [f"--dataset={audio}", f"--config={config}", f"--output={tmp_path / 'runs'}", f"--run_id={run_id}",
         "--decode_in_process", *extra]
    )


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio") / "clips"
    write_wavs(str(root), LENGTHS)
    return root


def test_savedmodel_frames_and_onnx_through_the_pipeline(tmp_path, audio, tiny_models):
    import onnxruntime
    import tensorflow as tf

    config = _config(
        tmp_path,
        f"""features:
  tf_model: {{path: {tiny_models['savedmodel']}, signature: frames, level: frame, hop_length: {HOP}, name: frame_rms}}
  onnx_model: {{path: {tiny_models['onnx']}, name: onnx_embedding}}
""",
    )
    run = _run(tmp_path, audio, config, "sm")
    assert run["counts"]["ok"] == len(LENGTHS) and run["counts"]["failed"] == 0
    tf_entry, onnx_entry = run["extractors"]
    assert tf_entry["config"]["fingerprint"].startswith("sha256:") and tf_entry["version"].startswith("1+")
    assert tf_entry["outputs"][0]["shape"] == [2] and tf_entry["outputs"][0]["level"] == "frame"
    assert onnx_entry["package"]["name"] == "featurebeam"
    records, rows = read_tfrecords(run["outputs"]["run_dir"]), read_parquet(run["outputs"]["run_dir"])
    assert set(records) == set(rows) and len(rows) == len(LENGTHS)
    frames = tf.saved_model.load(tiny_models["savedmodel"]).signatures["frames"]
    session = onnxruntime.InferenceSession(tiny_models["onnx"], providers=["CPUExecutionProvider"])
    for key, row in rows.items():
        w = waveform(row["uri"])
        alone = frames(waveform=tf.constant(w[None]), lengths=tf.constant([len(w)], tf.int32))["frame_rms"].numpy()[0]
        assert alone.shape == (1 + len(w) // HOP, 2)
        np.testing.assert_allclose(records[key]["frame_rms"], alone, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(parquet_array(row, "frame_rms"), alone, rtol=1e-5, atol=1e-7)
        (expected,) = session.run(["embedding"], {"waveform": w[None], "lengths": np.array([len(w)], np.int32)})
        np.testing.assert_allclose(records[key]["onnx_embedding"], expected[0], rtol=1e-5)
        np.testing.assert_allclose(parquet_array(row, "onnx_embedding"), expected[0], rtol=1e-5)


def test_keras_file_through_the_pipeline_and_reuse_follows_the_model(tmp_path, audio, tiny_models):
    import keras

    model_path = str(tmp_path / "model.keras")
    shutil.copy(tiny_models["keras"], model_path)
    config = _config(tmp_path, f"features:\n  tf_model: {{path: {model_path}}}\n")
    first = _run(tmp_path, audio, config, "keras")
    assert first["counts"]["ok"] == len(LENGTHS)
    records, rows = read_tfrecords(first["outputs"]["run_dir"]), read_parquet(first["outputs"]["run_dir"])
    model = keras.saving.load_model(model_path, compile=False)
    for key, row in rows.items():
        expected = np.asarray(model(waveform(row["uri"])[None], training=False))[0]
        np.testing.assert_allclose(records[key]["embedding"], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(parquet_array(row, "embedding"), expected, rtol=1e-5, atol=1e-7)

    # The same model again: every record is copied forward, nothing is recomputed.
    again = _run(tmp_path, audio, config, "keras-again", f"--reuse_from={first['outputs']['run_dir']}")
    assert again["reuse"]["records_fully_reused"] == len(LENGTHS)
    # Another model at the same path (same architecture, other weights) is another extractor.
    os.remove(model_path)
    keras.utils.set_random_seed(99)
    save_keras(model_path)
    with pytest.raises(ConfigError, match="none of tf_model was computed there with the same version and config"):
        _run(tmp_path, audio, config, "keras-changed", f"--reuse_from={first['outputs']['run_dir']}")


def test_non_finite_outputs_are_per_item_dead_letters(tmp_path, tiny_models):
    root = tmp_path / "mixed" / "x"
    root.mkdir(parents=True)
    for name, value in (("pos", 0.25), ("neg", -0.25), ("pos2", 0.5)):
        soundfile.write(str(root / f"{name}.wav"), np.full(8000, value, np.float32), 16000, subtype="PCM_16")
    config = _config(tmp_path, f"features:\n  tf_model: {{path: {tiny_models['savedmodel']}, signature: log_peak}}\n")
    run = _run(tmp_path, tmp_path / "mixed", config, "nan", "--max_failure_ratio=1")
    assert run["counts"]["ok"] == 2 and run["counts"]["failed"] == 1
    errors = [json.loads(line) for f in glob.glob(os.path.join(run["outputs"]["run_dir"], "errors", "part-*.jsonl"))
              for line in Path(f).read_text().splitlines()]
    (error,) = errors
    assert error["reason"] == "feature_non_finite" and error["uri"].endswith("neg.wav")
    rows = read_parquet(run["outputs"]["run_dir"])
    assert sorted(np.round(np.exp([r["embedding"][0] for r in rows.values()]), 3)) == [0.25, 0.5]


def test_launch_fails_in_one_line_before_any_worker(tmp_path, audio, tiny_models, capsys):
    config = _config(tmp_path, f"features:\n  tf_model: {{path: {tiny_models['savedmodel']}, signature: nope}}\n")
    code = extract.main([f"--dataset={audio}", f"--config={config}", f"--output={tmp_path / 'runs'}"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no signature 'nope'" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.emulator
def test_another_model_loads_into_the_same_bigquery_table_as_another_version(tmp_path, audio, bq_emulator):
    """Two models of different widths under one name: the fingerprinted versions keep them apart,
    so BigQuery's check (same version, other shape = refused) lets both runs in."""
    import keras

    dataset = f"{bq_emulator.project}.fb_models"
    runs = []
    for width in (3, 5):
        keras.utils.set_random_seed(width)
        path = str(tmp_path / f"w{width}.keras")
        keras.Sequential([keras.Input(shape=(None,)), keras.layers.Reshape((-1, 1)), keras.layers.GlobalMaxPooling1D(),
                          keras.layers.Dense(width)]).save(path)
        config = tmp_path / f"w{width}.yaml"
        config.write_text(f"features:\n  tf_model: {{path: {path}}}\n")
        runs.append(_run(tmp_path, audio, str(config), f"bq{width}", f"--bigquery_dataset={dataset}"))
    versions = [run["extractors"][0]["version"] for run in runs]
    assert versions[0] != versions[1] and all(v.startswith("1+") for v in versions)
    client = bq_emulator.client()
    counts = {
        row["run_id"]: row["n"]
        for row in client.query(f"SELECT run_id, COUNT(*) AS n FROM `{dataset}.features` GROUP BY run_id").result()
    }
    assert counts == {"bq3": len(LENGTHS), "bq5": len(LENGTHS)}
    description = client.get_table(f"{dataset}.features").description
    assert versions[0] in description and versions[1] in description
