"""`mfcc` against librosa on each item alone, and on signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.fft

from featurebeam.errors import ConfigError
from features import Batch, build
from tests.features.signals import SR, item_frames, reference

# Coefficients are sums of 64 dB values (magnitudes up to ~1e3); near-zero ones need the atol.
ATOL = 1e-3
RTOL = 1e-5


@pytest.mark.parametrize("lifter", [0.0, 22.0])
def test_matches_librosa_per_item(mixed_batch, mixed_waveforms, lifter):
    out = mixed_batch.outputs(build("mfcc", {"lifter": lifter}, sample_rate=SR))["mfcc"]
    assert out.shape[2] == 20 and out.dtype == np.float32
    for i, frames in item_frames(out, mixed_batch.lengths, 256):
        expected = reference(
            librosa.feature.mfcc, y=mixed_waveforms[i], sr=SR, n_mfcc=20, n_fft=1024, hop_length=256, n_mels=64,
            lifter=lifter,
        ).T
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL, err_msg=f"item {i}")


def test_is_the_dct_of_logmel(mixed_batch):
    """Same mel parameters, same dB spectrogram: mfcc is exactly the orthonormal DCT of logmel."""
    logmel = mixed_batch.outputs(build("logmel", sample_rate=SR))["logmel"]
    mfcc = mixed_batch.outputs(build("mfcc", sample_rate=SR))["mfcc"]
    np.testing.assert_allclose(mfcc, scipy.fft.dct(logmel, axis=-1, type=2, norm="ortho")[..., :20], rtol=1e-6, atol=1e-4)


def test_silence_has_only_c0():
    """A constant -100 dB spectrum: c0 = -100 * sqrt(n_mels) under the orthonormal DCT, the rest 0."""
    batch = Batch.from_waveforms([np.zeros(3000, np.float32)], sample_rate=SR)
    out = batch.outputs(build("mfcc", sample_rate=SR))["mfcc"]
    np.testing.assert_allclose(out[..., 0], -100.0 * np.sqrt(64), rtol=1e-6)
    np.testing.assert_allclose(out[..., 1:], 0.0, atol=1e-3)


def test_more_coefficients_than_bands_is_a_config_error():
    with pytest.raises(ConfigError, match="n_mfcc=40 exceeds n_mels=32"):
        build("mfcc", {"n_mfcc": 40, "n_mels": 32}, sample_rate=SR)
