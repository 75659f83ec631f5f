"""Signal generators and per-item helpers shared by the extractor tests (fixtures live in conftest)."""

from __future__ import annotations

import warnings

import numpy as np

SR = 16000


def tone(freq: float, seconds: float, *, amplitude: float = 0.5, sr: int = SR) -> np.ndarray:
    """A sine at `freq` Hz, float32."""
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def click_train(bpm: float, seconds: float, *, sr: int = SR, seed: int = 1234) -> np.ndarray:
    """Short decaying noise bursts every 60 / bpm seconds, float32."""
    rng = np.random.default_rng(seed)
    y = np.zeros(int(seconds * sr), dtype=np.float32)
    burst = (rng.standard_normal(400) * np.exp(-np.arange(400) / 60.0)).astype(np.float32)
    period = 60.0 / bpm * sr
    for start in np.arange(0, len(y) - len(burst), period).astype(int):
        y[start : start + len(burst)] += burst
    return y


def item_frames(outputs: np.ndarray, lengths: np.ndarray, hop_length: int):
    """Yield (i, the item's valid frames) of a `[B, T, ...]` frame-level output."""
    for i, n in enumerate(lengths):
        yield i, outputs[i, : 1 + int(n) // hop_length]


def reference(function, *args, **kwargs):
    """Call a librosa reference on one item, silencing its warning for items shorter than n_fft."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_fft=.* is too large")
        return function(*args, **kwargs)
