"""`chroma` against librosa on each item alone, and on signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from features import Batch, build
from tests.features.signals import SR, item_frames, reference, tone

# Max-normalised energies in 0..1 from a float32 power STFT.
ATOL = 1e-5
RTOL = 1e-5
STFT = {"n_fft": 1024, "hop_length": 256}


@pytest.mark.parametrize("tuning", [0.0, 0.25])
def test_matches_librosa_per_item(mixed_batch, mixed_waveforms, tuning):
    out = mixed_batch.outputs(build("chroma", {"tuning": tuning}, sample_rate=SR))["chroma"]
    assert out.shape[2] == 12 and out.dtype == np.float32
    for i, frames in item_frames(out, mixed_batch.lengths, 256):
        expected = reference(librosa.feature.chroma_stft, y=mixed_waveforms[i], sr=SR, tuning=tuning, **STFT).T
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL, err_msg=f"item {i}")


def test_estimated_tuning_is_per_item(mixed_batch, mixed_waveforms):
    """tuning=None estimates each item's tuning from its own frames, as librosa does on one item."""
    out = mixed_batch.outputs(build("chroma", {"tuning": None}, sample_rate=SR))["chroma"]
    for i, frames in item_frames(out, mixed_batch.lengths, 256):
        expected = reference(librosa.feature.chroma_stft, y=mixed_waveforms[i], sr=SR, **STFT).T
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL, err_msg=f"item {i}")


def test_unnormalised_matches_librosa(mixed_batch, mixed_waveforms):
    out = mixed_batch.outputs(build("chroma", {"norm": None}, sample_rate=SR))["chroma"]
    for i, frames in item_frames(out, mixed_batch.lengths, 256):
        expected = reference(librosa.feature.chroma_stft, y=mixed_waveforms[i], sr=SR, tuning=0.0, norm=None, **STFT).T
        np.testing.assert_allclose(frames, expected, rtol=1e-5, atol=1e-6 * expected.max(), err_msg=f"item {i}")


@pytest.mark.parametrize(("freq", "pitch_class"), [(440.0, 9), (261.63, 0), (392.0, 7)])  # A4, C4, G4
def test_tone_peaks_at_its_pitch_class(freq, pitch_class):
    batch = Batch.from_waveforms([tone(freq, 0.5)], sample_rate=SR)
    out = batch.outputs(build("chroma", sample_rate=SR))["chroma"]
    assert np.all(np.argmax(out[0, 4:-4], axis=-1) == pitch_class)
    np.testing.assert_allclose(out[0, 4:-4, pitch_class], 1.0)  # max-normalised


def test_silence_gives_zeros():
    out = Batch.from_waveforms([np.zeros(3000, np.float32)], sample_rate=SR).outputs(build("chroma", sample_rate=SR))
    np.testing.assert_array_equal(out["chroma"], 0.0)
