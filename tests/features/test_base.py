"""The batch contract: shared intermediates, per-item results independent of the batch, shapes."""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np
import pytest

from featurebeam.errors import FeatureError
from features import Batch, Extractor, LogMelSpectrogram, MelSpectrogram, OutputSpec, PowerSpectrogram, Stft, build
from features.base import power_to_db
from features.registry import BUILTIN_MODULES
from tests.features.signals import SR, reference


def _kinds(batch: Batch) -> list[str]:
    return [type(key).__name__ if not isinstance(key, tuple) else f"extractor:{key[1]}" for key in batch.computed]


def test_logmel_mfcc_spectral_share_one_stft(mixed_batch):
    for name in ("logmel", "mfcc", "spectral"):
        mixed_batch.outputs(build(name, sample_rate=SR))
    kinds = _kinds(mixed_batch)
    assert kinds.count("ComplexStft") == 1  # one FFT; magnitude and power both derive from it
    assert kinds.count("Stft") == 1
    assert kinds.count("PowerSpectrogram") == 1
    assert kinds.count("MelSpectrogram") == 1
    assert kinds.count("LogMelSpectrogram") == 1  # logmel and mfcc share the dB mel too
    assert [k for k in kinds if k.startswith("extractor:")] == ["extractor:logmel", "extractor:mfcc", "extractor:spectral"]


def test_every_builtin_at_defaults_shares_one_stft(mixed_batch):
    for name in BUILTIN_MODULES:
        mixed_batch.outputs(build(name, sample_rate=SR))
    assert _kinds(mixed_batch).count("ComplexStft") == 1


def test_different_parameters_do_not_share(mixed_batch):
    mixed_batch.outputs(build("logmel", sample_rate=SR))
    mixed_batch.outputs(build("mfcc", {"n_fft": 512}, sample_rate=SR))
    assert _kinds(mixed_batch).count("ComplexStft") == 2


@pytest.mark.parametrize("name", BUILTIN_MODULES)
def test_item_results_do_not_depend_on_the_batch(mixed_waveforms, name):
    """Each item gives the same values alone as next to longer, louder items (padding is inert)."""
    extractor = build(name, sample_rate=SR)
    together = Batch.from_waveforms(mixed_waveforms, sample_rate=SR).outputs(extractor)
    specs = {spec.name: spec for spec in extractor.output_specs()}
    for i, y in enumerate(mixed_waveforms):
        alone = reference(Batch.from_waveforms([y], sample_rate=SR).outputs, extractor)
        for output, spec in specs.items():
            ours = together[output][i]
            if spec.level == "frame":
                ours = ours[: 1 + len(y) // spec.hop_length]
            np.testing.assert_allclose(ours, alone[output][0], rtol=1e-5, atol=1e-3, err_msg=f"{output}, item {i}")


def test_log_mel_intermediate_is_librosa_power_to_db_per_item(mixed_batch, mixed_waveforms):
    mel = MelSpectrogram(PowerSpectrogram(Stft(n_fft=512, hop_length=128)), n_mels=32)
    db = mixed_batch.intermediate(LogMelSpectrogram(mel, amin=1e-8, top_db=60.0))
    for i, y in enumerate(mixed_waveforms):
        expected = librosa.power_to_db(
            librosa.feature.melspectrogram(y=y, sr=SR, n_fft=512, hop_length=128, n_mels=32), amin=1e-8, top_db=60.0
        )
        np.testing.assert_allclose(db[i, :, : 1 + len(y) // 128], expected, rtol=1e-5, atol=1e-3)


def test_power_to_db_clips_each_item_to_its_own_valid_peak():
    power = np.array([[[1.0, 1e-9, 1e3]], [[1e-6, 1e-12, 1e-3]]])  # [B=2, F=1, T=3]
    db = power_to_db(power, amin=1e-10, top_db=20.0, lengths_in_frames=np.array([2, 3]))
    # item 0: valid peak 0 dB (frame 2 is padding), so -90 dB clips to -20; item 1: peak -30 dB
    np.testing.assert_allclose(db[0, 0, :2], [0.0, -20.0], atol=1e-5)
    np.testing.assert_allclose(db[1, 0], [-50.0, -50.0, -30.0], atol=1e-5)
    assert db.dtype == np.float32
    assert power_to_db(power, amin=1e-10, top_db=None, lengths_in_frames=np.array([3, 3]), dtype=np.float64).dtype == np.float64


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    """No parameters."""


class _ScalarPerFrame(Extractor):
    name = "scalartest"
    version = "1"
    config_type = _NoConfig

    def __init__(self, shape_out, **kwargs):
        super().__init__(**kwargs)
        self.shape_out = shape_out

    def output_specs(self):
        return (OutputSpec(name="scalartest", level="frame", shape=(), hop_length=256, sample_rate=SR),)

    def extract(self, batch):
        return {"scalartest": np.zeros(self.shape_out, np.float32)}


def test_scalar_frame_outputs_are_b_by_t(mixed_waveforms):
    def run(shape):
        batch = Batch.from_waveforms(mixed_waveforms, sample_rate=SR)
        t = 1 + batch.waveforms.shape[1] // 256
        return batch.outputs(_ScalarPerFrame((len(batch), t, *shape), sample_rate=SR))

    run(())
    with pytest.raises(FeatureError, match=r"has shape \(5, 63, 1\), its spec says \(5, 'T'\)"):
        run((1,))


@pytest.mark.parametrize(
    "params",
    [
        dict(sample_rate=16000, n_fft=512, n_mels=64, fmin=0.0, fmax=None, htk=False, norm="slaney"),
        dict(sample_rate=22050, n_fft=2048, n_mels=128, fmin=30.0, fmax=8000.0, htk=False, norm=None),
        dict(sample_rate=8000, n_fft=256, n_mels=40, fmin=50.0, fmax=None, htk=True, norm="slaney"),
        dict(sample_rate=44100, n_fft=1024, n_mels=96, fmin=0.0, fmax=None, htk=False, norm=1.0),
    ],
)
def test_mel_filter_bank_is_librosas_bit_for_bit(params):
    import librosa

    from features.base import mel_filter_bank

    ours = mel_filter_bank(**params)
    theirs = librosa.filters.mel(
        sr=params["sample_rate"], n_fft=params["n_fft"], n_mels=params["n_mels"], fmin=params["fmin"],
        fmax=params["fmax"], htk=params["htk"], norm=params["norm"],
    )
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("window", ["hann", "hamming"])
@pytest.mark.parametrize("length", [2, 3, 255, 256, 400, 512, 2048, 2049])
def test_stft_windows_are_scipys_bit_for_bit(window, length):
    import scipy.signal

    from features.base import _periodic_window

    ours, theirs = _periodic_window(window, length), scipy.signal.get_window(window, length, fftbins=True)
    assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()


def test_logmel_and_mfcc_do_not_import_scipy_signal():
    """scipy.signal costs each worker process about half a second of imports; a Hann window does not need it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from features import registry; from features.base import Batch; "
        "ex = [registry.build(n, {}, sample_rate=16000) for n in ('logmel', 'mfcc')]; [e.setup() for e in ex]; "
        "b = Batch.from_waveforms([np.ones(16000, np.float32)], sample_rate=16000, window_samples=160000); b.prepare(ex); "
        "[b.outputs(e) for e in ex]; assert 'scipy.signal' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
