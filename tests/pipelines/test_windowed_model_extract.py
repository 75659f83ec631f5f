"""Two models of real shapes in one run, by configuration alone (FnApiRunner): an ONNX pitch-like
model on ~2 s windows at 22.05 kHz with a trailing channel axis and three outputs, next to a
SavedModel tagger on 0.96 s windows at 16 kHz, each a named instance (`extractor:`), beside
logmel. Every stored window, read back from the TFRecords (parsed by TensorFlow with the run's
schema) and the Parquet, equals the model applied directly to that window; bad configs stop the
launch with one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soxr

from pipelines import extract
from tests.features.models import (  # noqa: F401  (fixture)
    PITCH_HOP,
    PITCH_RATE,
    PITCH_WINDOW,
    TAGS_RATE,
    model_windows,
    windowed_models,
    write_wavs,
)
from tests.pipelines.test_model_extract import parquet_array, read_parquet, read_tfrecords, waveform

pytestmark = pytest.mark.slow

LENGTHS = [0.4, 2.9, 4.3]  # seconds at 16 kHz: 1, 2 and 4 pitch windows; 1, 6 and 9 tagger windows


def _config(tmp_path, models, **pitch_changes) -> str:
    pitch = {"extractor": "onnx_model", "path": models["pitch"], "sample_rate": PITCH_RATE, "window_samples": PITCH_WINDOW,
             "hop_samples": PITCH_HOP, "input_shape": [-1, 1], "outputs": {"f0": "peak", "emb": "embedding", "grid": "quarters"}}
    pitch.update(pitch_changes)
    text = {"features": {
        "logmel": {},
        "pitch": {k: v for k, v in pitch.items() if v is not None},
        "tags": {"extractor": "tf_model", "path": models["tags"], "sample_rate": TAGS_RATE, "window_seconds": 0.96,
                 "hop_seconds": 0.48, "input_shape": [-1, 1]},
    }}
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio") / "clips"
    write_wavs(str(root), LENGTHS)
    return root


def test_two_windowed_models_by_config_in_one_run_equal_the_models_per_window(tmp_path, audio, windowed_models):
    import onnxruntime
    import tensorflow as tf

    run = extract.run([f"--dataset={audio}", f"--config={_config(tmp_path, windowed_models)}",
                       f"--output={tmp_path / 'runs'}", "--run_id=windows", "--decode_in_process"])
    assert run["counts"]["ok"] == len(LENGTHS) and run["counts"]["failed"] == 0
    entries = {e["name"]: e for e in run["extractors"]}
    assert entries["pitch"]["extractor"] == "onnx_model" and entries["tags"]["extractor"] == "tf_model"
    assert "extractor" not in entries["logmel"]
    outputs = {o["name"]: o for e in run["extractors"] for o in e["outputs"]}
    assert {n: (o["shape"], o["frames"], o["frame_rate"]) for n, o in outputs.items() if n.startswith("pitch")} == {
        "pitch_f0": ([], "any", PITCH_RATE / PITCH_HOP), "pitch_emb": ([4], "any", PITCH_RATE / PITCH_HOP),
        "pitch_grid": ([2, 2], "any", PITCH_RATE / PITCH_HOP)}
    assert outputs["tags_logits"]["frame_rate"] == pytest.approx(1 / 0.48) and outputs["tags_frame_energy"]["shape"] == [4]
    assert run["config"]["features"]["pitch"]["extractor"] == "onnx_model"  # what a resume or --reuse_from rebuilds
    plan = json.loads(Path(run["outputs"]["run_dir"], "_work", "plan.json").read_text())
    assert {e["name"]: e.get("extractor") for e in plan["extractors"]} == {"logmel": None, "pitch": "onnx_model", "tags": "tf_model"}

    records, rows = read_tfrecords(run["outputs"]["run_dir"]), read_parquet(run["outputs"]["run_dir"])
    assert set(records) == set(rows) and len(rows) == len(LENGTHS)
    session = onnxruntime.InferenceSession(windowed_models["pitch"], providers=["CPUExecutionProvider"])
    tagger = tf.saved_model.load(windowed_models["tags"]).signatures["serving_default"]
    counts = []
    for key, row in rows.items():
        w = waveform(row["uri"])
        at_pitch = soxr.resample(w, 16000, PITCH_RATE, quality="HQ").astype(np.float32)
        windows = model_windows(at_pitch, window=PITCH_WINDOW, hop=PITCH_HOP)
        counts.append(len(windows))
        for j, x in enumerate(windows):  # the model applied directly to window j alone
            peak, embedding, quarters = session.run(None, {"audio": x[None, :, None]})
            for name, expected in (("pitch_f0", peak[0]), ("pitch_emb", embedding[0]), ("pitch_grid", quarters[0])):
                stored = np.asarray(records[key][name]).reshape(len(windows), *outputs[name]["shape"])[j]
                np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(parquet_array(row, name)[j], expected, rtol=1e-5, atol=1e-7)
        tag_windows = model_windows(w, window=15360, hop=7680)  # already at the tagger's 16 kHz
        expected = tagger(waveform=tf.constant(tag_windows[:, :, None]))["logits"].numpy()
        np.testing.assert_allclose(records[key]["tags_logits"], expected, rtol=1e-5, atol=1e-7)
        assert records[key]["logmel"].shape[0] == 1 + len(w) // 256  # the centred features are unchanged
    assert sorted(counts) == [1, 2, 4]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"extractor": "onnx_modle"}, "features.pitch: unknown extractor: onnx_modle"),
        ({"hop_samples": None}, "needs a hop: set hop_seconds or hop_samples"),
        ({"input_shape": [-1]}, "input 'audio' is [N, 43844, 1], but input_shape: [-1] makes [N, n]"),
    ],
)
def test_bad_model_config_is_one_line_and_exit_2(tmp_path, audio, windowed_models, capsys, changes, message):
    code = extract.main([f"--dataset={audio}", f"--config={_config(tmp_path, windowed_models, **changes)}",
                         f"--output={tmp_path / 'runs'}"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
    assert not (tmp_path / "runs").exists()
