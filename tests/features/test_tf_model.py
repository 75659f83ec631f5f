"""`tf_model` on real tiny models: every item's output equals the model applied to it alone, at
clip and frame level, from a SavedModel and from a `.keras` file; the model is loaded once per
process; its fingerprint enters the config and the version; TensorFlow stays unimported."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, registry
from features import model as model_module
from tests.features.models import HOP, tiny_models  # noqa: F401  (fixture)
from tests.features.signals import SR


def _saved_signature(path, name="serving_default"):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return loaded, loaded.signatures[name]


def test_savedmodel_clip_embeddings_match_the_model_on_each_item(tiny_models, mixed_waveforms):
    import tensorflow as tf

    extractor = registry.build("tf_model", {"path": tiny_models["savedmodel"], "output_key": "embedding"}, sample_rate=SR)
    (spec,) = extractor.output_specs()
    assert (spec.name, spec.level, spec.shape) == ("embedding", "clip", (4,))
    batched = Batch.from_waveforms(mixed_waveforms, sample_rate=SR).outputs(extractor)["embedding"]
    loaded, fn = _saved_signature(tiny_models["savedmodel"])
    for i, w in enumerate(mixed_waveforms):
        alone = fn(waveform=tf.constant(w[None]), lengths=tf.constant([len(w)], tf.int32))["embedding"].numpy()[0]
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-7)


def test_savedmodel_frame_outputs_match_per_item(tiny_models, mixed_waveforms):
    import tensorflow as tf

    extractor = registry.build(
        "tf_model",
        {"path": tiny_models["savedmodel"], "signature": "frames", "level": "frame", "hop_length": HOP, "name": "rms"},
        sample_rate=SR,
    )
    (spec,) = extractor.output_specs()
    assert (spec.name, spec.level, spec.shape, spec.hop_length) == ("rms", "frame", (2,), HOP)
    batch = Batch.from_waveforms(mixed_waveforms, sample_rate=SR)
    batched = batch.outputs(extractor)["rms"]
    _, fn = _saved_signature(tiny_models["savedmodel"], "frames")
    for i, w in enumerate(mixed_waveforms):
        alone = fn(waveform=tf.constant(w[None]), lengths=tf.constant([len(w)], tf.int32))["frame_rms"].numpy()[0]
        frames = 1 + len(w) // HOP
        assert alone.shape == (frames, 2)
        np.testing.assert_allclose(batched[i, :frames], alone, rtol=1e-5, atol=1e-7)


def test_keras_file_embeddings_match_the_model_on_each_item(tiny_models, mixed_waveforms):
    import keras

    extractor = registry.build("tf_model", {"path": tiny_models["keras"], "name": "kemb"}, sample_rate=SR)
    assert extractor.output_specs()[0].shape == (3,)
    batched = Batch.from_waveforms(mixed_waveforms, sample_rate=SR).outputs(extractor)["kemb"]
    model = keras.saving.load_model(tiny_models["keras"], compile=False)
    for i, w in enumerate(mixed_waveforms):
        np.testing.assert_allclose(batched[i], np.asarray(model(w[None], training=False))[0], rtol=1e-5, atol=1e-7)


def test_logmel_input_gets_the_shared_logmel_intermediate(tiny_models, tmp_path, mixed_waveforms):
    """input: logmel feeds [B, T, n_mels] (the batch's LogMelSpectrogram, computed once for logmel too)."""
    import keras

    keras.utils.set_random_seed(5)
    path = str(tmp_path / "on_logmel.keras")
    keras.Sequential(
        [keras.Input(shape=(None, 32)), keras.layers.Dense(2, use_bias=False), keras.layers.GlobalMaxPooling1D()]
    ).save(path)
    extractor = registry.build("tf_model", {"path": path, "input": "logmel", "n_mels": 32}, sample_rate=SR)
    logmel = registry.build("logmel", {"n_mels": 32}, sample_rate=SR)
    batch = Batch.from_waveforms(mixed_waveforms[:2], sample_rate=SR)  # 1 s and 0.56 s
    ours = batch.outputs(extractor)["embedding"]
    mels = batch.outputs(logmel)["logmel"]
    assert sum(1 for key in batch.computed if type(key).__name__ == "LogMelSpectrogram") == 1
    model = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(ours, np.asarray(model(mels, training=False)), rtol=1e-5)


def test_model_is_loaded_once_per_process_and_shared(tiny_models, monkeypatch):
    loads = []
    original = registry.get("tf_model").load_model

    def counting(self, local_path):
        loads.append(local_path)
        return original(self, local_path)

    monkeypatch.setattr(registry.get("tf_model"), "load_model", counting)
    monkeypatch.setattr(model_module, "_HANDLES", {})
    first = registry.build("tf_model", {"path": tiny_models["keras"]}, sample_rate=SR)
    second = registry.build("tf_model", {"path": tiny_models["keras"]}, sample_rate=SR)  # as a second worker thread would
    first.setup()
    second.setup()
    assert len(loads) == 1
    assert first.model() is second.model()


def test_fingerprint_goes_into_config_and_version(tiny_models, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_models["savedmodel"], copy)
    a = registry.build("tf_model", {"path": copy, "output_key": "embedding"}, sample_rate=SR)
    fp = a.config.fingerprint
    assert fp.startswith("sha256:") and a.version == f"1+{fp[7:19]}"
    assert a.describe()["config"]["fingerprint"] == fp
    assert a.describe()["package"]["name"] == "featurebeam"
    # Workers get the recorded config back, fingerprint included, and accept the same files...
    again = registry.build("tf_model", json.loads(json.dumps(dataclasses.asdict(a.config))), sample_rate=SR)
    assert again.config == a.config
    # ...but not a changed model: one more byte in a variables file is another model.
    with open(os.path.join(copy, "variables", "variables.data-00000-of-00001"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match=r"the model changed since the run was planned"):
        registry.build("tf_model", dataclasses.asdict(a.config), sample_rate=SR)
    assert registry.build("tf_model", {"path": copy, "output_key": "embedding"}, sample_rate=SR).config.fingerprint != fp


def test_importing_features_does_not_import_tensorflow_or_onnxruntime():
    code = (
        "import sys, features; from features import registry; registry.available(); "
        "registry.get('tf_model'); registry.get('onnx_model'); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ})
    assert out.stdout.strip() == "[]", out.stderr
