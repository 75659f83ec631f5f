"""Decoding real encoded files of every supported format, mixdown, resampling and segmentation."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from featurebeam import audio
from featurebeam.errors import AudioError

RATE = 22050


@pytest.fixture(scope="module")
def tone():
    t = np.arange(RATE) / RATE
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _peak_hz(y: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.fft.rfftfreq(len(y), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(
    "ext, fmt, subtype",
    [(".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_24"), (".ogg", "OGG", "VORBIS"), (".ogg", "OGG", "OPUS"),
     (".mp3", "MP3", "MPEG_LAYER_III"), (".aiff", "AIFF", "PCM_16")],
)
def test_decode_formats(tmp_path, tone, ext, fmt, subtype):
    rate = 48000 if subtype == "OPUS" else RATE  # Opus only runs at 8/12/16/24/48 kHz
    y = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    path = tmp_path / f"a{ext}"
    soundfile.write(path, y, rate, format=fmt, subtype=subtype)
    decoded = audio.decode(audio.read_bytes(str(path)), uri=str(path))
    assert decoded.sample_rate == rate and decoded.channels == 1
    assert abs(decoded.duration_seconds - 1.0) < 0.1  # lossy codecs add encoder delay/padding
    assert abs(_peak_hz(decoded.samples[:, 0], rate) - 440) < 5


def test_decode_m4a_through_ffmpeg(tmp_path, tone):
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is installed by .ci/setup-system.sh"
    wav, m4a = tmp_path / "a.wav", tmp_path / "a.m4a"
    soundfile.write(wav, np.stack([tone, tone], axis=1), RATE)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    decoded = audio.decode(m4a.read_bytes(), uri=str(m4a))
    assert decoded.codec == "ffmpeg" and decoded.channels == 2 and decoded.sample_rate == RATE
    assert abs(_peak_hz(decoded.samples[:, 0], RATE) - 440) < 5


def test_condition_mixes_to_mono_and_resamples(tone):
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    decoded = audio.Decoded(samples=stereo, sample_rate=RATE, codec="test")
    y = audio.condition(decoded, sample_rate=16000, uri="mem")
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == 16000  # 1 s at the target rate
    assert abs(_peak_hz(y, 16000) - 440) < 2
    assert abs(np.abs(y[1000:-1000]).max() - 0.25) < 0.01  # mean of a 0.5 tone and silence


def test_condition_rejects_non_finite():
    samples = np.ones((100, 1), dtype=np.float32)
    samples[5] = np.inf
    with pytest.raises(AudioError, match="non-finite") as info:
        audio.condition(audio.Decoded(samples=samples, sample_rate=8000, codec="t"), sample_rate=8000, uri="x.wav")
    assert info.value.stage == "condition"


def test_segment_keeps_every_sample():
    y = np.arange(25, dtype=np.float32)
    parts = audio.segment(y, segment_samples=10)
    assert [start for start, _ in parts] == [0, 10, 20]
    assert np.array_equal(np.concatenate([w for _, w in parts]), y)
    assert audio.segment(y, segment_samples=None)[0][1] is y


@pytest.mark.parametrize(
    "data, match",
    [(b"", "empty"), (b"RIFF\x00\x00\x00\x00WAVEjunk", "cannot decode"), (bytes(range(256)) * 8, "cannot decode")],
)
def test_undecodable_bytes_raise_audio_error(data, match):
    with pytest.raises(AudioError, match=match) as info:
        audio.decode(data, uri="gs://b/x.wav")
    assert info.value.stage == "decode" and "gs://b/x.wav" in str(info.value)


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(AudioError, match="cannot read") as info:
        audio.read_bytes(str(tmp_path / "missing.wav"))
    assert info.value.stage == "read"
