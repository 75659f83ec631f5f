"""Model extractors given what cannot work: each is a one-line ConfigError at build time (the
launch), naming the fix, before any worker starts."""

from __future__ import annotations

import re

import pytest

from featurebeam.errors import ConfigError
from features import registry
from tests.features.models import tiny_models  # noqa: F401  (fixture)
from tests.features.signals import SR


def _error(values, name="tf_model") -> str:
    with pytest.raises(ConfigError) as excinfo:
        registry.build(name, values, sample_rate=SR)
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_path_is_required():
    assert "path is required" in _error({})
    assert "path is required" in _error({"input": "waveform"}, name="onnx_model")


def test_missing_path(tmp_path):
    message = _error({"path": str(tmp_path / "nope.keras")})
    assert "no such file or folder" in message and "nope.keras" in message


def test_not_a_model(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "README").write_text("not a model")
    assert re.search(r"not a loadable SavedModel .*check path:", _error({"path": str(folder)}))
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    assert "Keras cannot load it" in _error({"path": str(junk)})
    assert "onnxruntime cannot load it" in _error({"path": str(junk)}, name="onnx_model")


def test_wrong_signature_lists_the_signatures(tiny_models):
    message = _error({"path": tiny_models["savedmodel"], "signature": "embed"})
    assert "no signature 'embed'" in message and "'frames', 'log_peak', 'serving_default'" in message and "fix signature:" in message


def test_several_outputs_are_all_kept_unless_one_is_picked(tiny_models):
    every = registry.build("tf_model", {"path": tiny_models["savedmodel"]}, sample_rate=SR)
    assert [(s.name, s.shape) for s in every.output_specs()] == [("embedding_embedding", (4,)), ("embedding_stats", (3,))]
    message = _error({"path": tiny_models["savedmodel"], "output_key": "emb"})
    assert "no output 'emb'; the model's outputs are ['embedding', 'stats']; fix output_key:" in message
    message = _error({"path": tiny_models["savedmodel"], "outputs": {"e": "embedding", "x": "nope"}})
    assert "no output 'nope'" in message and "fix outputs:" in message


def test_wrong_rank_for_the_level(tiny_models):
    message = _error({"path": tiny_models["savedmodel"], "output_key": "embedding", "level": "frame"})
    assert "returned shape [2, 4], but level: frame needs [B, T, D]" in message
    message = _error({"path": tiny_models["savedmodel"], "signature": "frames"})
    assert "level: clip needs [B, D]" in message


def test_frame_hop_that_does_not_match_the_model(tiny_models):
    message = _error({"path": tiny_models["savedmodel"], "signature": "frames", "level": "frame", "hop_length": 128})
    assert "fewer than the 126 (1 + n // hop_length)" in message and "set hop_length:" in message


def test_wrong_input_kind(tiny_models):
    message = _error({"path": tiny_models["keras"], "input": "logmel"})
    assert "failed on a dummy batch of logmel input" in message and "check input:" in message


def test_bad_values():
    assert "input='mel' must be 'waveform' or 'logmel'" in _error({"path": "x", "input": "mel"})
    assert "level='item'" in _error({"path": "x", "level": "item"})
    assert "name='2d'" in _error({"path": "x", "name": "2d"})
    assert "unknown key 'signature'" in _error({"path": "x", "signature": "s"}, name="onnx_model")
