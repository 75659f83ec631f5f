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


# --- windowed models: fixed windows with a trailing channel axis, several outputs ---------------

PITCH_RATE, PITCH_WINDOW, PITCH_HOP = 22050, 43844, 22050  # about 2 s windows every second at 22.05 kHz
TAGS_RATE, TAGS_WINDOW_SECONDS, TAGS_HOP_SECONDS = 16000, 0.96, 0.48


def save_windowed_onnx(path: str, *, window: int = PITCH_WINDOW) -> str:
    """An ONNX file over `audio [N, window, 1]` (the window length fixed, as pretrained pitch
    trackers fix it) with three outputs per window: `peak [N]` (max |x|), `embedding [N, 4]`
    (tanh of a fixed projection of [peak, mean square]) and `quarters [N, 2, 2]` (mean |x| of each
    quarter of the window, as a 2x2 grid)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["axes2"], value=helper.make_tensor("a2", TensorProto.INT64, [1], [2])),
        helper.make_node("Squeeze", ["audio", "axes2"], ["x"]),
        helper.make_node("Abs", ["x"], ["ax"]),
        helper.make_node("ReduceMax", ["ax"], ["peak"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["ax"], ["peak_k"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["x", "x"], ["x2"]),
        helper.make_node("ReduceMean", ["x2"], ["power"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["peak_k", "power"], ["stats"], axis=1),
        helper.make_node("MatMul", ["stats", "w"], ["projected"]),
        helper.make_node("Tanh", ["projected"], ["embedding"]),
        helper.make_node("Constant", [], ["qshape"], value=helper.make_tensor("q", TensorProto.INT64, [3], [-1, 4, window // 4])),
        helper.make_node("Reshape", ["ax", "qshape"], ["q4"]),
        helper.make_node("ReduceMean", ["q4"], ["qmean"], axes=[2], keepdims=0),
        helper.make_node("Constant", [], ["gshape"], value=helper.make_tensor("g", TensorProto.INT64, [3], [-1, 2, 2])),
        helper.make_node("Reshape", ["qmean", "gshape"], ["quarters"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_pitch",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", window, 1])],
        [
            helper.make_tensor_value_info("peak", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("quarters", TensorProto.FLOAT, ["N", 2, 2]),
        ],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def save_windowed_tf(path: str, *, window: int = int(TAGS_WINDOW_SECONDS * TAGS_RATE)) -> str:
    """A SavedModel over `waveform [N, window, 1]` (0.96 s at 16 kHz, an audio tagger's input) ->
    `{"logits": [N, 3], "frame_energy": [N, 4]}`: the mean square of each quarter of the window
    and a fixed projection of it."""
    import tensorflow as tf

    weights = np.random.default_rng(9).standard_normal((4, 3)).astype(np.float32)

    class Tagger(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, window, 1], tf.float32, name="waveform")])
        def tag(self, waveform):
            quarters = tf.reshape(waveform[:, :, 0], [-1, 4, window // 4])
            energy = tf.reduce_mean(quarters * quarters, axis=2)
            return {"logits": energy @ self.w, "frame_energy": energy}

    module = Tagger()
    tf.saved_model.save(module, path, signatures={"serving_default": module.tag})
    return path


def model_windows(samples: np.ndarray, *, window: int, hop: int) -> np.ndarray:
    """`[N, window]`: the item's windows as a windowed model extractor cuts them (every `hop`
    samples until one reaches the end, at least one, the last zero-padded), computed here
    independently of features/model.py."""
    starts = [0]
    while starts[-1] + window < len(samples):
        starts.append(starts[-1] + hop)
    out = np.zeros((len(starts), window), np.float32)
    for k, s in enumerate(starts):
        piece = samples[s : s + window]
        out[k, : len(piece)] = piece
    return out


@pytest.fixture(scope="session")
def windowed_models(tmp_path_factory) -> dict[str, str]:
    """Paths of the windowed models: `pitch` (ONNX, 22.05 kHz, three outputs) and `tags`
    (SavedModel, 16 kHz, two outputs)."""
    root = tmp_path_factory.mktemp("windowed")
    return {"pitch": save_windowed_onnx(str(root / "pitch.onnx")), "tags": save_windowed_tf(str(root / "tagger"))}
