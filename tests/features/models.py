"""Tiny real models for the model-extractor tests, built and saved in a few hundred milliseconds.

Each one gives an item the same output whether it runs alone or zero-padded in a batch (the
SavedModel and ONNX models mask by `lengths`; the Keras one takes a max over non-negative
per-sample activations, which zeros cannot raise), so the tests can compare the pipeline's
embeddings with the model applied to each waveform alone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

HOP = 256


def save_tf_savedmodel(path: str) -> str:
    """A SavedModel with two signatures over `waveform [B, n]` and `lengths [B]`:

    serving_default -> {"embedding": [B, 4], "stats": [B, 3]}: masked mean, mean square and max
      |x| of the valid samples, then tanh of a fixed 3x4 projection;
    frames -> {"frame_rms": [B, 1 + n // 256, 2]}: per centred 512-sample frame, RMS and max |x|;
    log_peak -> {"log_peak": [B, 1]}: log of the largest sample, NaN for an all-negative item.
    """
    import tensorflow as tf

    weights = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)

    class Embedder(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
        def embed(self, waveform, lengths):
            mask = tf.sequence_mask(lengths, tf.shape(waveform)[1], dtype=tf.float32)
            n = tf.cast(lengths, tf.float32)[:, None]
            x = waveform * mask
            stats = tf.concat(
                [
                    tf.reduce_sum(x, 1, keepdims=True) / n,
                    tf.reduce_sum(x * x, 1, keepdims=True) / n,
                    tf.reduce_max(tf.abs(x), 1, keepdims=True),
                ],
                axis=1,
            )
            return {"embedding": tf.tanh(stats @ self.w), "stats": stats}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
        def frames(self, waveform, lengths):
            mask = tf.sequence_mask(lengths, tf.shape(waveform)[1], dtype=tf.float32)
            x = tf.pad(waveform * mask, [[0, 0], [HOP, HOP]])
            framed = tf.signal.frame(x, 2 * HOP, HOP)  # [B, 1 + n // HOP, 512]
            rms = tf.sqrt(tf.reduce_mean(framed * framed, -1))
            peak = tf.reduce_max(tf.abs(framed), -1)
            return {"frame_rms": tf.stack([rms, peak], -1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
        def log_peak(self, waveform, lengths):
            valid = tf.sequence_mask(lengths, tf.shape(waveform)[1])
            peak = tf.reduce_max(tf.where(valid, waveform, -np.inf), 1, keepdims=True)
            return {"log_peak": tf.math.log(peak)}

    module = Embedder()
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.embed, "frames": module.frames, "log_peak": module.log_peak}
    )
    return path


def save_keras(path: str) -> str:
    """A `.keras` file over `waveform [B, n]` alone: per-sample ReLU(Dense 8, no bias), max over
    time, Dense 3."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input(shape=(None,), name="waveform"),
            keras.layers.Reshape((-1, 1)),
            keras.layers.Dense(8, use_bias=False, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(3),
        ]
    )
    model.save(path)
    return path


def save_onnx(path: str) -> str:
    """An ONNX file over `waveform [B, n]` and `lengths [B]` -> `embedding [B, 2]`: max |x| and
    sum of squares / length, built with onnx's own graph helpers."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Abs", ["waveform"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["peak"], axes=[1], keepdims=1),
        helper.make_node("ReduceSumSquare", ["waveform"], ["energy"], axes=[1], keepdims=1),
        helper.make_node("Cast", ["lengths"], ["n"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one_v", TensorProto.INT64, [1], [1])),
        helper.make_node("Unsqueeze", ["n", "one"], ["n2"]),
        helper.make_node("Div", ["energy", "n2"], ["power"]),
        helper.make_node("Concat", ["peak", "power"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [
            helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["B", "n"]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["B"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_wavs(root, lengths_seconds, *, sr: int = 16000, seed: int = 11) -> list[str]:
    """Noisy tones of the given lengths as 16-bit WAVs in label folders `a/` and `b/`."""
    import soundfile

    rng = np.random.default_rng(seed)
    paths = []
    for i, seconds in enumerate(lengths_seconds):
        label = "ab"[i % 2]
        t = np.arange(int(seconds * sr)) / sr
        y = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(len(t))
        folder = os.path.join(root, label)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"clip{i:02d}.wav")
        soundfile.write(path, y.astype(np.float32), sr, subtype="PCM_16")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of the three tiny models: `savedmodel` (a folder), `keras` and `onnx` (files)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "savedmodel": save_tf_savedmodel(str(root / "embedder")),
        "keras": save_keras(str(root / "embedder.keras")),
        "onnx": save_onnx(str(root / "embedder.onnx")),
    }
