"""`summary`: per-item mean and std over valid frames only, reusing the summarised outputs."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, build
from features.base import make_config
from features.summary import SummaryConfig
from tests.features.signals import SR, item_frames, reference, tone

# Statistics of dB values (-100..+40) accumulated in float64 from float32 frames.
ATOL_DB = 1e-3
RTOL = 1e-5


def test_logmel_statistics_match_librosa_per_item(mixed_batch, mixed_waveforms):
    out = mixed_batch.outputs(build("summary", sample_rate=SR))
    assert set(out) == {"summary_logmel_mean", "summary_logmel_std"}
    assert out["summary_logmel_mean"].shape == (len(mixed_waveforms), 64)
    for i, y in enumerate(mixed_waveforms):
        mel = reference(librosa.feature.melspectrogram, y=y, sr=SR, n_fft=1024, hop_length=256, n_mels=64)
        db = librosa.power_to_db(mel, top_db=80.0)  # [n_mels, T_i]: the item's own frames only
        np.testing.assert_allclose(out["summary_logmel_mean"][i], db.mean(axis=1), rtol=RTOL, atol=ATOL_DB)
        np.testing.assert_allclose(out["summary_logmel_std"][i], db.std(axis=1), rtol=RTOL, atol=ATOL_DB)


def test_padding_frames_are_masked():
    """The short item's statistics equal those of its own frames, not of its padded row."""
    short = tone(440.0, 0.2)
    batch = Batch.from_waveforms([tone(1000.0, 1.0), short], sample_rate=SR)
    frames = batch.outputs(build("logmel", sample_rate=SR))["logmel"]
    out = batch.outputs(build("summary", sample_rate=SR))
    own = frames[1, : 1 + len(short) // 256].astype(np.float64)
    np.testing.assert_allclose(out["summary_logmel_mean"][1], own.mean(axis=0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out["summary_logmel_std"][1], own.std(axis=0), rtol=1e-6, atol=1e-5)
    padded_mean = frames[1].mean(axis=0)
    assert np.abs(out["summary_logmel_mean"][1] - padded_mean).max() > 10.0  # padding would have mattered


def test_every_frame_output_of_several_extractors(mixed_batch):
    summary = build("summary", {"of": ["spectral", "onset"]}, sample_rate=SR)
    specs = {spec.name: spec for spec in summary.output_specs()}
    assert "summary_onset_tempo_mean" not in specs  # clip-level outputs are not summarised
    assert specs["summary_spectral_contrast_mean"].shape == (7,)
    assert specs["summary_onset_strength_std"].shape == ()
    assert all(spec.level == "clip" for spec in specs.values())
    out = mixed_batch.outputs(summary)
    assert set(out) == set(specs)
    rolloff = mixed_batch.outputs(build("spectral", sample_rate=SR))["spectral_rolloff"]
    for i, frames in item_frames(rolloff, mixed_batch.lengths, 256):
        np.testing.assert_allclose(out["summary_spectral_rolloff_mean"][i], frames.mean(), rtol=1e-6)
        np.testing.assert_allclose(out["summary_spectral_rolloff_std"][i], frames.std(), rtol=1e-5, atol=1e-3)


def test_reuses_the_summarised_outputs(mixed_batch):
    mixed_batch.outputs(build("logmel", sample_rate=SR))
    mixed_batch.outputs(build("summary", sample_rate=SR))
    extractor_runs = [key[1] for key in mixed_batch.computed if isinstance(key, tuple)]
    assert extractor_runs == ["logmel", "summary"]


def test_silence_statistics():
    out = Batch.from_waveforms([np.zeros(5000, np.float32)], sample_rate=SR).outputs(build("summary", sample_rate=SR))
    np.testing.assert_allclose(out["summary_logmel_mean"], -100.0, atol=1e-4)
    np.testing.assert_allclose(out["summary_logmel_std"], 0.0, atol=1e-4)


def test_configs_choose_the_summarised_config(mixed_batch):
    values = {"of": ["mfcc"], "configs": {"mfcc": {"n_mfcc": 13}}}
    summary = build("summary", values, sample_rate=SR)
    hash(summary.config)  # stays usable as a cache key
    assert {spec.shape for spec in summary.output_specs()} == {(13,)}
    mixed_batch.outputs(build("mfcc", {"n_mfcc": 13}, sample_rate=SR))
    mixed_batch.outputs(summary)
    assert [key[1] for key in mixed_batch.computed if isinstance(key, tuple)] == ["mfcc", "summary"]
    # what run.json records reads back to the same config
    recorded = json.loads(json.dumps(summary.describe()["config"]))
    assert make_config(SummaryConfig, recorded, where="run.json") == summary.config


def test_unknown_name_is_a_config_error_listing_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown feature 'nope'; available features are .*logmel.*mfcc"):
        build("summary", {"of": ["logmel", "nope"]}, sample_rate=SR)


def test_cannot_summarise_itself_or_configure_strangers():
    with pytest.raises(ConfigError, match="cannot name 'summary' itself"):
        build("summary", {"of": ["summary"]}, sample_rate=SR)
    with pytest.raises(ConfigError, match=r"configs given for \['mfcc'\]"):
        build("summary", {"of": ["logmel"], "configs": {"mfcc": {"n_mfcc": 13}}}, sample_rate=SR)
    with pytest.raises(ConfigError, match="features.summary.configs.mfcc: unknown key 'n_mfccs'"):
        build("summary", {"of": ["mfcc"], "configs": {"mfcc": {"n_mfccs": 13}}}, sample_rate=SR)
