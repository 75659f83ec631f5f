"""`onset` against librosa on each item alone, and on signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, build
from tests.features.signals import SR, click_train, item_frames, reference

HOP = 256
MEL = {"n_fft": 1024, "hop_length": HOP, "n_mels": 64}
# Onset strength is a mean of dB differences from a float32 mel spectrogram.
ATOL_DB = 1e-4
RTOL = 1e-5


@pytest.mark.parametrize("values", [{}, {"lag": 2, "max_size": 3, "fmin": 30.0, "fmax": 6000.0}])
def test_strength_matches_librosa_per_item(mixed_batch, mixed_waveforms, values):
    out = mixed_batch.outputs(build("onset", values, sample_rate=SR))["onset_strength"]
    assert out.ndim == 2 and out.dtype == np.float32
    for i, frames in item_frames(out, mixed_batch.lengths, HOP):
        expected = reference(librosa.onset.onset_strength, y=mixed_waveforms[i], sr=SR, **MEL, **values)
        np.testing.assert_allclose(frames, expected, rtol=RTOL, atol=ATOL_DB, err_msg=f"item {i}")


def test_tempo_matches_librosa_per_item(mixed_batch, mixed_waveforms):
    out = mixed_batch.outputs(build("onset", sample_rate=SR))["onset_tempo"]
    assert out.shape == (len(mixed_waveforms),)
    for i, y in enumerate(mixed_waveforms):
        envelope = reference(librosa.onset.onset_strength, y=y, sr=SR, **MEL)
        expected = librosa.feature.tempo(onset_envelope=envelope, sr=SR, hop_length=HOP)[0]
        # tempo is picked from a grid of lags: equal to float32 precision, or a different bin
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, err_msg=f"item {i}")


@pytest.mark.parametrize("bpm", [90.0, 120.0])
def test_click_train_tempo(bpm):
    """Clicks every 60 / bpm s: the estimate is on the lag grid next to bpm (grid steps ~3% here)."""
    short = click_train(bpm, 3.0, seed=5)  # a shorter item in the same batch, to exercise padding
    batch = Batch.from_waveforms([click_train(bpm, 4.0), short], sample_rate=SR)
    tempo = batch.outputs(build("onset", sample_rate=SR))["onset_tempo"]
    np.testing.assert_allclose(tempo, bpm, rtol=0.03)


def test_strength_peaks_at_clicks():
    y = click_train(120.0, 2.0)  # a click every 0.5 s = every 31.25 frames
    strength = Batch.from_waveforms([y], sample_rate=SR).outputs(build("onset", sample_rate=SR))["onset_strength"][0]
    delay = 1024 // (2 * HOP)  # librosa's centring shift
    # Frame 0 already holds the first click (centred window), so its rise is not visible; the
    # other clicks each give the strongest frames, within the window reach plus the shift after them.
    clicks = [round(k * 0.5 * SR / HOP) for k in (1, 2, 3)]
    strong = np.flatnonzero(strength > 0.5 * strength.max())
    assert strong.size
    for frame in strong:
        assert any(c - 2 <= frame <= c + delay + 2 for c in clicks), f"strong frame {frame} is not near a click"
    for c in clicks:
        assert strength[c - 2 : c + delay + 3].max() > 0.5 * strength.max(), f"no onset near frame {c}"


def test_silence_has_no_onsets():
    out = Batch.from_waveforms([np.zeros(8000, np.float32)], sample_rate=SR).outputs(build("onset", sample_rate=SR))
    np.testing.assert_array_equal(out["onset_strength"], 0.0)
    assert np.isfinite(out["onset_tempo"]).all()  # no periodicity: the prior decides, as in librosa


def test_bad_lag_is_a_config_error():
    with pytest.raises(ConfigError, match="lag=0"):
        build("onset", {"lag": 0}, sample_rate=SR)
