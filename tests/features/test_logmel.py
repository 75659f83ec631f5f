"""`logmel` against librosa on each item alone, and on signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, build
from tests.features.signals import SR, item_frames, reference, tone

# dB values span about -100..+40; float32 STFTs of the batch and of one item differ in the last bits.
ATOL_DB = 1e-3
RTOL = 1e-5


def test_matches_librosa_per_item(mixed_batch, mixed_waveforms):
    extractor = build("logmel", sample_rate=SR)
    out = mixed_batch.outputs(extractor)["logmel"]
    assert out.shape == (len(mixed_waveforms), 1 + max(map(len, mixed_waveforms)) // 256, 64)
    assert out.dtype == np.float32
    for i, frames in item_frames(out, mixed_batch.lengths, 256):
        mel = reference(librosa.feature.melspectrogram, y=mixed_waveforms[i], sr=SR, n_fft=1024, hop_length=256, n_mels=64)
        expected = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0).T
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL_DB, err_msg=f"item {i}")


def test_non_default_config_matches_librosa(mixed_batch, mixed_waveforms):
    values = {"n_fft": 512, "hop_length": 160, "n_mels": 40, "fmin": 50.0, "fmax": 7000.0, "top_db": None}
    out = mixed_batch.outputs(build("logmel", values, sample_rate=SR))["logmel"]
    for i, frames in item_frames(out, mixed_batch.lengths, 160):
        mel = reference(
            librosa.feature.melspectrogram,
            y=mixed_waveforms[i], sr=SR, n_fft=512, hop_length=160, n_mels=40, fmin=50.0, fmax=7000.0,
        )
        expected = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL_DB, err_msg=f"item {i}")


def test_silence_is_the_floor():
    batch = Batch.from_waveforms([np.zeros(4000, np.float32)], sample_rate=SR)
    out = batch.outputs(build("logmel", sample_rate=SR))["logmel"]
    np.testing.assert_allclose(out, 10 * np.log10(1e-10), atol=1e-4)


def test_tone_peaks_in_its_mel_band():
    batch = Batch.from_waveforms([tone(1000.0, 0.5)], sample_rate=SR)
    out = batch.outputs(build("logmel", sample_rate=SR))["logmel"]
    centres = librosa.mel_frequencies(n_mels=64 + 2, fmax=SR / 2)[1:-1]
    peak_band = int(np.argmax(out[0, 5:-5].mean(axis=0)))
    # the peak band is the one whose triangle covers 1 kHz best: its neighbours' centres bracket it
    assert centres[peak_band - 1] < 1000.0 < centres[peak_band + 1]


def test_top_db_is_per_item():
    """A quiet item keeps its own 80 dB range next to a loud one, as librosa gives it alone."""
    rng = np.random.default_rng(7)
    quiet = (1e-4 * rng.standard_normal(3000)).astype(np.float32)
    loud = tone(440.0, 0.5, amplitude=0.9)
    out = Batch.from_waveforms([loud, quiet], sample_rate=SR).outputs(build("logmel", sample_rate=SR))["logmel"]
    alone = Batch.from_waveforms([quiet], sample_rate=SR).outputs(build("logmel", sample_rate=SR))["logmel"]
    np.testing.assert_allclose(out[1, : alone.shape[1]], alone[0], rtol=RTOL, atol=ATOL_DB)


def test_odd_n_fft_is_a_config_error():
    with pytest.raises(ConfigError, match="n_fft=1023 must be even"):
        build("logmel", {"n_fft": 1023}, sample_rate=SR)
