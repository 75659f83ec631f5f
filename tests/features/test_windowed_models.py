"""Models of real shapes by configuration alone: fixed windows at the model's own sample rate
with a trailing channel axis, several outputs each a frame-level feature at the hop's rate;
named instances (`extractor:`) so one run holds several of a kind. Every window's output is
compared with the model applied directly to that window (onnxruntime / TensorFlow, no
featurebeam code between), and every bad config is one line naming the fix."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from featurebeam.errors import ConfigError
from features import Batch, registry
from features import model as model_module
from tests.features.models import (  # noqa: F401  (fixtures)
    PITCH_HOP,
    PITCH_RATE,
    PITCH_WINDOW,
    TAGS_RATE,
    model_windows,
    tiny_models,
    windowed_models,
)
from tests.features.signals import SR

PITCH = {"extractor": "onnx_model", "sample_rate": PITCH_RATE, "window_samples": PITCH_WINDOW,
         "hop_samples": PITCH_HOP, "input_shape": [-1, 1], "outputs": {"peak": "peak", "emb": "embedding", "grid": "quarters"}}


def _waveforms() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # 0.4 s (one padded window), 2.9 s (two), 4.3 s (four at 22.05 kHz; the last mostly padding)
    return [(0.3 * rng.standard_normal(int(s * SR)) * np.linspace(0.2, 1, int(s * SR))).astype(np.float32) for s in (0.4, 2.9, 4.3)]


def _onnx_per_window(path: str, samples: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    windows = model_windows(samples, window=PITCH_WINDOW, hop=PITCH_HOP)
    outs = [session.run(None, {"audio": w[None, :, None]}) for w in windows]  # one window at a time
    return {name: np.concatenate([o[k] for o in outs]) for k, name in enumerate(("peak", "embedding", "quarters"))}


def test_windowed_onnx_instance_outputs_equal_the_model_on_each_window(windowed_models, monkeypatch):
    # Two windows per model call: a long item's windows run in several chunks.
    monkeypatch.setattr(model_module, "WINDOW_CHUNK_SAMPLES", 2 * PITCH_WINDOW)
    pitch = registry.build_instance("pitch", {**PITCH, "path": windowed_models["pitch"]}, sample_rate=SR)
    assert pitch.name == "pitch" and pitch.describe()["extractor"] == "onnx_model"
    specs = {s.name: s for s in pitch.output_specs()}
    assert {n: (s.level, s.shape, s.frames, s.hop_length, s.sample_rate) for n, s in specs.items()} == {
        "pitch_peak": ("frame", (), "any", PITCH_HOP, PITCH_RATE),
        "pitch_emb": ("frame", (4,), "any", PITCH_HOP, PITCH_RATE),
        "pitch_grid": ("frame", (2, 2), "any", PITCH_HOP, PITCH_RATE),
    }
    assert specs["pitch_peak"].frame_rate == pytest.approx(1.0)
    waveforms = _waveforms()
    out = Batch.from_waveforms(waveforms, sample_rate=SR).outputs(pitch)
    for i, w in enumerate(waveforms):
        at_rate = soxr.resample(w, SR, PITCH_RATE, quality="HQ").astype(np.float32)
        alone = _onnx_per_window(windowed_models["pitch"], at_rate)
        assert len(out["pitch_peak"][i]) == len(alone["peak"]) == 1 + max(0, -(-(len(at_rate) - PITCH_WINDOW) // PITCH_HOP))
        np.testing.assert_allclose(out["pitch_peak"][i], alone["peak"], rtol=1e-6)
        np.testing.assert_allclose(out["pitch_emb"][i], alone["embedding"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["pitch_grid"][i], alone["quarters"], rtol=1e-5, atol=1e-8)
    assert [len(x) for x in out["pitch_peak"]] == [1, 2, 4]


def test_tf_windows_in_seconds_all_outputs_and_a_shared_resample(windowed_models):
    import tensorflow as tf

    tags = registry.build_instance(
        "tags", {"extractor": "tf_model", "path": windowed_models["tags"], "sample_rate": TAGS_RATE,
                 "window_seconds": 0.96, "hop_seconds": 0.48, "input_shape": [-1, 1]}, sample_rate=22050)
    # outputs omitted: every output, named <instance>_<output>
    assert [(s.name, s.shape, s.hop_length) for s in tags.output_specs()] == [("tags_frame_energy", (4,), 7680), ("tags_logits", (3,), 7680)]
    other = registry.build_instance("tags2", {"extractor": "tf_model", "path": windowed_models["tags"], "sample_rate": TAGS_RATE,
                                              "window_samples": 15360, "hop_samples": 15360, "input_shape": [-1, 1],
                                              "outputs": {"e": "frame_energy"}}, sample_rate=22050)
    rng = np.random.default_rng(1)
    waveforms = [(0.2 * rng.standard_normal(n)).astype(np.float32) for n in (22050 * 2, 5000)]
    batch = Batch.from_waveforms(waveforms, sample_rate=22050)
    out, out2 = batch.outputs(tags), batch.outputs(other)
    assert sum(type(k).__name__ == "Resampled" for k in batch.computed) == 1  # one resample for both instances
    signature = tf.saved_model.load(windowed_models["tags"]).signatures["serving_default"]
    for i, w in enumerate(waveforms):
        at_rate = soxr.resample(w, 22050, TAGS_RATE, quality="HQ").astype(np.float32)
        for key, hop, got in (("logits", 7680, out["tags_logits"][i]), ("frame_energy", 15360, out2["tags2_e"][i])):
            windows = model_windows(at_rate, window=15360, hop=hop)
            expected = np.concatenate([signature(waveform=tf.constant(x[None, :, None]))[key].numpy() for x in windows])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_a_named_instance_of_a_builtin_renames_its_outputs():
    mel = registry.build_instance("mel32", {"extractor": "logmel", "n_mels": 32}, sample_rate=SR)
    assert [s.name for s in mel.output_specs()] == ["mel32"] and mel.describe()["extractor"] == "logmel"
    plain = registry.build_instance("logmel", {}, sample_rate=SR)
    assert registry.instance_values(mel)["extractor"] == "logmel" and "extractor" not in registry.instance_values(plain)
    w = _waveforms()[:2]
    batch = Batch.from_waveforms(w, sample_rate=SR)
    expected = Batch.from_waveforms(w, sample_rate=SR).outputs(registry.build("logmel", {"n_mels": 32}, sample_rate=SR))
    np.testing.assert_array_equal(batch.outputs(mel)["mel32"], expected["logmel"])
    timbre = registry.build_instance("timbre", {"extractor": "spectral"}, sample_rate=SR)
    assert all(s.name.startswith("timbre_") for s in timbre.output_specs())


def _error(name, values) -> str:
    with pytest.raises(ConfigError) as excinfo:
        registry.build_instance(name, values, sample_rate=SR)
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_bad_model_configs_are_one_line_config_errors(windowed_models, tiny_models):
    path = windowed_models["pitch"]
    assert "unknown extractor: onnx_modle" in _error("pitch", {**PITCH, "extractor": "onnx_modle", "path": path})
    assert "needs a hop: set hop_seconds or hop_samples" in _error("pitch", {**PITCH, "path": path, "hop_samples": None})
    assert "set window_seconds or window_samples too" in _error("pitch", {"extractor": "onnx_model", "path": path, "hop_samples": 3})
    assert "give window_seconds or window_samples, not both" in _error("pitch", {**PITCH, "path": path, "window_seconds": 2.0})
    message = _error("pitch", {**PITCH, "path": path, "input_shape": [-1]})
    assert "input 'audio' is [N, 43844, 1], but input_shape: [-1] makes [N, n]; set input_shape:" in message
    message = _error("pitch", {**PITCH, "path": path, "input_shape": [1, -1]})
    assert "input_shape: [1, -1] gives axis 1 size 1, but the model's input 'audio' is [N, 43844, 1]" in message
    message = _error("pitch", {**PITCH, "path": path, "window_samples": 22050})
    assert "takes windows of 43844 samples (its input 'audio' is [N, 43844, 1]), but the config gives 22050" in message
    assert "input_shape=[-1, -1]" in _error("pitch", {**PITCH, "path": path, "input_shape": [-1, -1]}).replace("(", "[").replace(")", "]")
    assert "no output 'f0'" in _error("pitch", {**PITCH, "path": path, "outputs": {"f0": "f0"}})
    assert "features.pitch (path" in _error("pitch", {**PITCH, "path": path, "outputs": {"f0": "f0"}})
    assert "sample_rate=100 must be an integer" in _error("pitch", {**PITCH, "path": path, "sample_rate": 100})
    # a clip-level model at its own rate: outputs stay clip-level
    onnx = registry.build_instance("emb22", {"extractor": "onnx_model", "path": tiny_models["onnx"], "sample_rate": 22050}, sample_rate=SR)
    (spec,) = onnx.output_specs()
    assert (spec.name, spec.level, spec.shape) == ("emb22", "clip", (2,))


def test_summary_of_a_windowed_model_averages_its_windows(windowed_models):
    values = {k: v for k, v in PITCH.items() if k != "extractor"}
    values["path"] = windowed_models["pitch"]
    summary = registry.build("summary", {"of": ["onnx_model"], "configs": {"onnx_model": values}}, sample_rate=SR)
    waveforms = _waveforms()
    out = Batch.from_waveforms(waveforms, sample_rate=SR).outputs(summary)
    frames = Batch.from_waveforms(waveforms, sample_rate=SR).outputs(registry.build("onnx_model", values, sample_rate=SR))
    for i in range(len(waveforms)):
        np.testing.assert_allclose(out["summary_embedding_emb_mean"][i], frames["embedding_emb"][i].mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(out["summary_embedding_grid_std"][i], frames["embedding_grid"][i].std(axis=0), rtol=1e-4, atol=1e-7)
