"""Windowed extraction: an item longer than the batch bound gives the bytes it gives whole.

`Batch(window_samples=w)` computes a long item's frame-local parts window by window (see
features/base.py). Every built-in must give exactly the outputs of the whole-item computation
(byte for byte, clip-level ones included), for items that fill one window, overflow it by a
sample, span several windows or are shorter than a hop, while no window's STFT is longer than
the window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featurebeam.errors import FeatureError
from features import Batch, ComplexStft, Extractor, FrameIntermediate, OutputSpec, build
from features.registry import BUILTIN_MODULES
from tests.features.models import save_onnx
from tests.features.signals import SR, click_train

HOP = 256
WINDOW = 4000  # not a multiple of the hop, so windows start and end between frame centres


def _signal(n: int, *, seed: int = 0) -> np.ndarray:
    """A tone with clicks and noise, and a stretch 60 dB quieter (it meets the per-item dB clip)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(n)
    y[: min(n, 3 * SR)] += click_train(150.0, 3.0)[: min(n, 3 * SR)]
    y[n // 3 : n // 2] *= 1e-3
    return y.astype(np.float32)


def _extractors():
    """Every built-in at its defaults, plus configs that change framing, hop, context and tuning."""
    extractors = [build(name, {}, sample_rate=SR) for name in BUILTIN_MODULES]
    extractors += [
        build("spectral", {"n_fft": 2048, "hop_length": 512, "n_bands": 4}, sample_rate=SR),
        build("onset", {"lag": 3, "max_size": 3, "n_mels": 40}, sample_rate=SR),
        build("mfcc", {"n_mfcc": 13, "lifter": 22.0, "hop_length": 160, "n_fft": 400, "n_mels": 40}, sample_rate=SR),
        build("chroma", {"tuning": None}, sample_rate=SR),  # no window parts: the whole-item path
        build("summary", {"of": ["spectral", "chroma"]}, sample_rate=SR),
    ]
    return extractors


def _outputs(waveform: np.ndarray, extractors, *, window_samples: int | None) -> tuple[dict, Batch]:
    batch = Batch.from_waveforms([waveform], sample_rate=SR, window_samples=window_samples)
    batch.prepare(extractors)
    out = {}
    for i, extractor in enumerate(extractors):
        for name, value in batch.outputs(extractor).items():
            out[(i, name)] = value
    return out, batch


@pytest.fixture(scope="module")
def extractors():
    return _extractors()


@pytest.mark.parametrize(
    "n, window, windows",
    [
        (WINDOW, WINDOW, 0),  # exactly one window: the ordinary path
        (WINDOW + 1, WINDOW, 2),  # one window plus one sample
        (5 * WINDOW + 123, WINDOW, 6),  # several windows
        (16 * 4 * HOP, 4 * HOP, 17),  # windows ending on frame centres
        (HOP - 56, 64, 4),  # shorter than a hop: one frame, most windows hold none
        (3 * SR + 999, SR, 4),
        (40 * HOP + 5, HOP, 41),  # one frame per window
        (40 * HOP + 5, 300, 35),  # one or two frames per window
    ],
)
def test_windowed_outputs_are_byte_identical(extractors, n, window, windows):
    y = _signal(n, seed=n)
    whole, _ = _outputs(y, extractors, window_samples=None)
    windowed, batch = _outputs(y, extractors, window_samples=window)
    assert batch.windowed == bool(windows) and (not windows or len(batch.window_spans()) == windows)
    assert set(windowed) == set(whole)
    for key, value in whole.items():
        assert windowed[key].shape == value.shape and windowed[key].dtype == value.dtype, key
        assert windowed[key].tobytes() == value.tobytes(), (key, np.abs(windowed[key] - value).max())


def test_windows_hold_no_more_than_their_frames(extractors):
    """No window computes an STFT (or anything) longer than its own frames, and the item itself
    never computes a spectrogram: only the declared small parts are item-long."""
    n, window = 10 * SR + 77, SR
    _, batch = _outputs(_signal(n), extractors, window_samples=window)
    assert batch.windowed and len(batch.window_spans()) == 11
    stfts = [(span, spec, shape) for span, spec, shape in batch.window_log if isinstance(spec, ComplexStft)]
    assert stfts, "the windows computed no STFT"
    for span, spec, shape in batch.window_log:
        if isinstance(spec, FrameIntermediate):
            most = -(-(span[1] - span[0]) // spec.hop_length)  # frames centred in the span
            assert shape[-1] <= most, (span, spec, shape)
    largest = max(shape[-1] for _, _, shape in stfts)
    assert largest <= -(-window // min(spec.hop_length for _, spec, _ in stfts))
    # the item-long values are the declared parts and what extractors derive from them
    item_spectra = [s for s in batch.computed if isinstance(s, ComplexStft) or type(s).__name__ in ("Stft", "PowerSpectrogram")]
    assert item_spectra == []
    # chroma with tuning=None declares no parts, so its STFT is the whole item's, on its own batch
    whole_stfts = [s for s in batch.whole_item().computed if isinstance(s, ComplexStft)]
    assert len(whole_stfts) == 1 and batch.whole_item().intermediate(whole_stfts[0]).shape[-1] == 1 + n // HOP


def test_multi_item_batches_are_never_windowed(mixed_waveforms):
    batch = Batch.from_waveforms(mixed_waveforms, sample_rate=SR, window_samples=100)
    assert not batch.windowed


@dataclasses.dataclass(frozen=True)
class _PeakConfig:
    pass


class _StftPeak(Extractor):
    """A plug-in style extractor: the loudest STFT bin per frame."""

    name = "stftpeak"
    version = "1"
    config_type = _PeakConfig

    def output_specs(self):
        return (OutputSpec(name="stftpeak", level="frame", shape=(), hop_length=HOP, sample_rate=self.sample_rate),)

    def extract(self, batch):
        magnitude = batch.intermediate(ComplexStft(n_fft=1024, hop_length=HOP))
        return {"stftpeak": np.abs(magnitude).max(axis=1).astype(np.float32)}


class _StftPeakMisdeclared(_StftPeak):
    name = "stftpeak_misdeclared"

    def window_parts(self):
        return ()  # claims to read only the waveform, but reads the STFT


def test_an_extractor_without_window_parts_sees_the_whole_item():
    y = _signal(3 * WINDOW)
    extractor = _StftPeak(sample_rate=SR)
    whole = Batch.from_waveforms([y], sample_rate=SR).outputs(extractor)
    windowed = Batch.from_waveforms([y], sample_rate=SR, window_samples=WINDOW)
    assert windowed.outputs(extractor)["stftpeak"].tobytes() == whole["stftpeak"].tobytes()
    assert windowed.window_log == []  # nothing was windowed


def test_reading_the_stft_of_a_windowed_item_names_the_extractor():
    batch = Batch.from_waveforms([_signal(3 * WINDOW)], sample_rate=SR, window_samples=WINDOW)
    with pytest.raises(FeatureError, match="stftpeak_misdeclared.*window_parts"):
        batch.outputs(_StftPeakMisdeclared(sample_rate=SR))


def _save_logmel_onnx(path: str, *, level: str) -> str:
    """An ONNX file over `logmel [B, T, 64]`: its max over time `[B, 64]` (clip level, pooled over
    the whole item) or the log-mel doubled `[B, T, 64]` (frame level)."""
    import onnx
    from onnx import TensorProto, helper

    if level == "clip":
        nodes = [helper.make_node("ReduceMax", ["logmel"], ["out"], axes=[1], keepdims=0)]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 64])
    else:
        nodes = [helper.make_node("Add", ["logmel", "logmel"], ["out"])]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "T", 64])
    graph = helper.make_graph(nodes, "logmel_" + level, [helper.make_tensor_value_info("logmel", TensorProto.FLOAT, ["B", "T", 64])], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_model_extractors_windowed_give_the_same_bytes(tmp_path):
    """onnx_model (tf_model shares ModelExtractor.window_parts): a log-mel model reads the
    assembled log-mel of the whole item, a waveform model the waveform; both as whole."""
    pytest.importorskip("onnxruntime")
    configs = [
        {"path": save_onnx(str(tmp_path / "waveform.onnx"))},
        {"path": _save_logmel_onnx(str(tmp_path / "clip.onnx"), level="clip"), "input": "logmel", "name": "pooled"},
        {"path": _save_logmel_onnx(str(tmp_path / "frame.onnx"), level="frame"), "input": "logmel", "level": "frame",
         "name": "doubled", "hop_length": HOP},
    ]
    extractors = [build("onnx_model", c, sample_rate=SR) for c in configs]
    y = _signal(4 * WINDOW + 321, seed=9)
    whole, _ = _outputs(y, extractors, window_samples=None)
    windowed, batch = _outputs(y, extractors, window_samples=WINDOW)
    assert batch.windowed and any(isinstance(spec, ComplexStft) for _, spec, _ in batch.window_log)
    for key, value in whole.items():
        assert windowed[key].tobytes() == value.tobytes(), key
