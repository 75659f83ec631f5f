"""Fixtures for the extractor tests: synthetic signals generated with a fixed seed.

`mixed_waveforms` holds items of different lengths and loudness (one shorter than n_fft, one
60 dB quieter than the loudest), so a batch of them exercises zero padding, per-item trimming
and per-item dB clipping. Everything is 16 kHz and at most a few seconds long.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.features.signals import SR


@pytest.fixture(scope="session")
def sr() -> int:
    return SR


@pytest.fixture(scope="session")
def mixed_waveforms() -> list[np.ndarray]:
    rng = np.random.default_rng(20240611)
    t = np.arange(SR) / SR
    chirp = np.sin(2 * np.pi * (200 * t + 1900 * t**2))  # 200 Hz -> 4 kHz over one second
    waveforms = [
        # 1 s: tone, its octave and noise
        0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 880 * t) + 0.05 * rng.standard_normal(SR),
        # 0.56 s chirp plus noise, ending mid-hop on a non-zero sample
        0.3 * chirp[:9001] + 0.02 * rng.standard_normal(9001),
        # a burst 60 dB below the loudest item: catches a dB clip taken across the batch
        1e-3 * rng.standard_normal(4097) * np.hanning(4097),
        # shorter than n_fft = 1024
        0.2 * rng.standard_normal(700),
        # 0.4 s of decaying noise clicks every 25 ms
        0.5 * rng.standard_normal(6400) * np.exp(-(np.arange(6400) % 400) / 40.0),
    ]
    return [w.astype(np.float32) for w in waveforms]


@pytest.fixture
def mixed_batch(mixed_waveforms):
    """A fresh Batch of `mixed_waveforms` (so each test starts with an empty intermediate cache)."""
    from features import Batch

    return Batch.from_waveforms(mixed_waveforms, sample_rate=SR)
