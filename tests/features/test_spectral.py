"""`spectral` against librosa on each item alone, and on signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, build
from tests.features.signals import SR, item_frames, reference, tone

N_FFT, HOP = 1024, 256
STFT = {"n_fft": N_FFT, "hop_length": HOP}

# Output name -> (librosa reference on one item, rtol, atol). The spectral descriptors read a
# float32 STFT, so they agree to float32 precision; zcr counts crossings and is exact.
REFERENCES = {
    "spectral_centroid": (lambda y: librosa.feature.spectral_centroid(y=y, sr=SR, **STFT)[0], 1e-5, 1e-2),  # Hz
    "spectral_bandwidth": (lambda y: librosa.feature.spectral_bandwidth(y=y, sr=SR, **STFT)[0], 1e-5, 1e-2),  # Hz
    "spectral_rolloff": (lambda y: librosa.feature.spectral_rolloff(y=y, sr=SR, **STFT)[0], 1e-5, 1e-2),  # Hz
    "spectral_flatness": (lambda y: librosa.feature.spectral_flatness(y=y, **STFT)[0], 1e-4, 1e-6),
    "spectral_contrast": (lambda y: librosa.feature.spectral_contrast(y=y, sr=SR, **STFT).T, 1e-5, 1e-3),  # dB
    "spectral_zcr": (lambda y: librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP)[0], 0, 0),
    "spectral_rms": (lambda y: librosa.feature.rms(y=y, frame_length=N_FFT, hop_length=HOP)[0], 1e-6, 1e-8),
}


@pytest.fixture
def spectral_outputs(mixed_batch):
    return mixed_batch.outputs(build("spectral", sample_rate=SR))


def test_declares_every_reference_output():
    specs = {spec.name: spec for spec in build("spectral", sample_rate=SR).output_specs()}
    assert set(specs) == set(REFERENCES)
    assert specs["spectral_contrast"].shape == (7,)
    assert all(spec.shape == () for name, spec in specs.items() if name != "spectral_contrast")


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_librosa_per_item(spectral_outputs, mixed_batch, mixed_waveforms, name):
    function, rtol, atol = REFERENCES[name]
    out = spectral_outputs[name]
    assert out.dtype == np.float32
    for i, frames in item_frames(out, mixed_batch.lengths, HOP):
        expected = reference(function, mixed_waveforms[i])
        np.testing.assert_allclose(frames, expected, rtol=rtol, atol=atol, err_msg=f"{name}, item {i}")


def test_contrast_at_other_bands_matches_librosa(mixed_batch, mixed_waveforms):
    values = {"n_bands": 4, "contrast_fmin": 300.0, "contrast_quantile": 0.05}
    out = mixed_batch.outputs(build("spectral", values, sample_rate=SR))["spectral_contrast"]
    for i, frames in item_frames(out, mixed_batch.lengths, HOP):
        expected = reference(
            librosa.feature.spectral_contrast, y=mixed_waveforms[i], sr=SR, n_bands=4, fmin=300.0, quantile=0.05, **STFT
        ).T
        np.testing.assert_allclose(frames, expected, rtol=1e-5, atol=1e-3, err_msg=f"item {i}")


def test_tone_and_noise_known_answers():
    rng = np.random.default_rng(3)
    noise = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    batch = Batch.from_waveforms([tone(440.0, 1.0, amplitude=0.5), noise], sample_rate=SR)
    out = batch.outputs(build("spectral", sample_rate=SR))
    inner = slice(4, -4)  # frames whose window lies wholly inside the signal

    def at(name, i):
        return out[name][i, inner]

    np.testing.assert_allclose(at("spectral_centroid", 0), 440.0, rtol=0.01)
    np.testing.assert_allclose(at("spectral_rolloff", 0), 440.0, atol=SR / N_FFT)  # within one bin
    assert np.all(at("spectral_bandwidth", 0) < 40.0)
    assert np.all(at("spectral_flatness", 0) < 1e-3)
    np.testing.assert_allclose(at("spectral_zcr", 0), 2 * 440.0 / SR, atol=2 / N_FFT)  # two crossings per cycle
    np.testing.assert_allclose(at("spectral_rms", 0), 0.5 / np.sqrt(2), rtol=0.01)
    # white noise: centroid at a quarter of the rate, power-spectrum flatness near exp(-Euler gamma)
    np.testing.assert_allclose(at("spectral_centroid", 1).mean(), SR / 4, rtol=0.03)
    np.testing.assert_allclose(at("spectral_flatness", 1).mean(), np.exp(-np.euler_gamma), rtol=0.05)
    np.testing.assert_allclose(at("spectral_rms", 1), 0.1, rtol=0.1)
    np.testing.assert_allclose(at("spectral_zcr", 1).mean(), 0.5, atol=0.02)


def test_silence_gives_zeros():
    out = Batch.from_waveforms([np.zeros(3000, np.float32)], sample_rate=SR).outputs(build("spectral", sample_rate=SR))
    for name in ("spectral_centroid", "spectral_bandwidth", "spectral_rolloff", "spectral_contrast", "spectral_zcr", "spectral_rms"):
        np.testing.assert_array_equal(out[name], 0.0, err_msg=name)
    # all bins at the amin floor: geometric mean equals arithmetic mean
    np.testing.assert_allclose(out["spectral_flatness"], 1.0, atol=1e-3)


def test_zcr_pads_with_the_items_own_last_sample():
    """An item ending on a constant negative value has no crossings in its last frames, even though
    the batch pads it with zeros (zero counts as positive, so zero padding would add crossings)."""
    short = np.full(3000, -0.5, dtype=np.float32)
    batch = Batch.from_waveforms([short, tone(440.0, 1.0)], sample_rate=SR)
    zcr = batch.outputs(build("spectral", sample_rate=SR))["spectral_zcr"]
    np.testing.assert_array_equal(zcr[0, : 1 + 3000 // HOP], 0.0)


def test_contrast_band_above_nyquist_is_a_config_error():
    with pytest.raises(ConfigError, match="lower n_bands or contrast_fmin"):
        build("spectral", sample_rate=8000)
    build("spectral", {"n_bands": 4}, sample_rate=8000)  # 200 * 2**3 = 1.6 kHz < 4 kHz


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_helpers_are_bit_identical_to_librosas_numba_ones(dtype):
    from features.spectral import fft_frequencies, frame_rms, zero_crossings

    y = np.random.default_rng(0).standard_normal((3, 20000)).astype(dtype) * 0.1
    y[0, 100:200], y[1, 300:310], y[1, 310], y[2, 5:9] = 0.0, 1e-11, -0.0, -1e-12  # zeros, near-zeros, -0
    np.testing.assert_array_equal(zero_crossings(y), librosa.zero_crossings(y, pad=False, axis=-1))
    for frame_length, hop_length in ((1024, 256), (2048, 160)):
        ours = frame_rms(y, frame_length=frame_length, hop_length=hop_length)
        theirs = librosa.feature.rms(y=y, frame_length=frame_length, hop_length=hop_length, center=False)
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
    assert fft_frequencies(sample_rate=22050, n_fft=511).tobytes() == librosa.fft_frequencies(sr=22050, n_fft=511).tobytes()


def test_the_spectral_extractor_imports_neither_librosa_nor_numba():
    """numba compiles librosa's kernels on first use: 17 s of a fresh machine's first sample run."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from features import Batch, build\n"
        "batch = Batch.from_waveforms([np.sin(np.arange(8000, dtype=np.float32) / 5)], sample_rate=16000)\n"
        "out = batch.outputs(build('spectral', sample_rate=16000))\n"
        "assert out['spectral_zcr'].shape[1] > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('librosa', 'numba')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
