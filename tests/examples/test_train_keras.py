"""The Keras example closes the loop: train on the sample run, save the penultimate layer, run it
as `tf_model` (input: logmel) on another dataset through the pipeline, and read the embeddings
back from TFRecords and Parquet equal to the saved model applied to each clip's log-mel."""

from __future__ import annotations

import numpy as np
import pytest

from features import Batch, registry
from pipelines import extract
from tests.features.models import write_wavs
from tests.pipelines.test_model_extract import parquet_array, read_parquet, read_tfrecords, waveform

pytestmark = pytest.mark.slow


def test_saved_embedding_model_extracts_embeddings_on_another_dataset(sample_run, tmp_path):
    import keras

    from examples.train_keras import train

    classifier, embedding = str(tmp_path / "classifier.keras"), str(tmp_path / "embedding.keras")
    result = train(sample_run["outputs"]["run_dir"], epochs=5, seed=0, save=classifier, save_embedding=embedding)
    assert result["test_items"] == 15
    model = keras.saving.load_model(embedding, compile=False)
    assert tuple(model.output.shape) == (None, 32)

    # Another dataset: tones and noise of one length (1.25 s, the sample clips are 2 s), so no
    # clip is zero-padded in its batch (the example's average pooling would count padding frames).
    audio = tmp_path / "other"
    write_wavs(str(audio), [1.25] * 6, seed=5)
    config = tmp_path / "embed.yaml"
    config.write_text(f"features:\n  tf_model: {{path: {embedding}, input: logmel}}\n  logmel: {{}}\n")
    run = extract.run(
        [f"--dataset={audio}", f"--config={config}", f"--output={tmp_path / 'runs'}", "--run_id=embed", "--decode_in_process"]
    )
    assert run["counts"]["ok"] == 6
    (tf_entry,) = [e for e in run["extractors"] if e["name"] == "tf_model"]
    assert tf_entry["outputs"][0]["shape"] == [32] and tf_entry["config"]["fingerprint"].startswith("sha256:")

    records, rows = read_tfrecords(run["outputs"]["run_dir"]), read_parquet(run["outputs"]["run_dir"])
    logmel = registry.build("logmel", sample_rate=16000)
    assert len(records) == len(rows) == 6
    for key, row in rows.items():
        mel = Batch.from_waveforms([waveform(row["uri"])], sample_rate=16000).outputs(logmel)["logmel"]
        expected = np.asarray(model(mel, training=False))[0]
        np.testing.assert_allclose(records[key]["embedding"], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(parquet_array(row, "embedding"), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(records[key]["logmel"], mel[0], rtol=1e-6)  # the shared intermediate, exported too
