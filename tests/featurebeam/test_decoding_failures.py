"""Malformed and hostile input: every failure of `stream_conditioned` comes out as an AudioError
with a specific stage and reason, and a message that names the item.

All files are real: written with soundfile, cut short, or written byte by byte with struct.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile

from featurebeam.decoding import MAX_ITEM_SECONDS_KEY, Segment, stream_conditioned
from featurebeam.errors import AudioError, ConfigError

RATE = 22050


def tone(seconds: float = 3.0, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    y = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(y[:, None], channels, axis=1).astype(np.float32)


def failure(uri, *, sample_rate=16000, segment_samples=None, **kwargs) -> tuple[AudioError, list]:
    """Run the stream to its AudioError; returns the error and what was yielded before it."""
    got = []
    with pytest.raises(AudioError) as info:
        for part in stream_conditioned(uri, sample_rate=sample_rate, segment_samples=segment_samples, **kwargs):
            got.append(part)
    shown = os.fsdecode(uri) if isinstance(uri, bytes) else str(uri)
    assert shown in str(info.value), "the message names the item"
    return info.value, got


def expect(uri, stage: str, reason: str, **kwargs) -> AudioError:
    error, got = failure(uri, **kwargs)
    assert (error.stage, error.reason) == (stage, reason), str(error)
    return error


def wav_bytes(*, rate: int, channels: int = 1, bits: int = 16, fmt_tag: int = 1, data: bytes = b"\x00\x01" * 100,
              data_size: int | None = None) -> bytes:
    """A canonical 44-byte-header WAV written by hand, so the header can say anything."""
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_through_a_pipe(wav, flac) -> None:
    """FLAC as ffmpeg writes it to a pipe: it cannot seek back, so STREAMINFO holds no length."""
    with open(flac, "wb") as out:
        subprocess.run([shutil.which("ffmpeg"), "-v", "error", "-i", str(wav), "-f", "flac", "pipe:1"], stdout=out, check=True)


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------------- read


def test_missing_file(tmp_path):
    expect(str(tmp_path / "missing.wav"), "read", "not_found")


def test_directory_named_like_audio(tmp_path):
    (tmp_path / "x.wav").mkdir()
    expect(str(tmp_path / "x.wav"), "read", "is_a_directory")


def test_symlink_loop(tmp_path):
    os.symlink(tmp_path / "b.wav", tmp_path / "a.wav")
    os.symlink(tmp_path / "a.wav", tmp_path / "b.wav")
    error = expect(str(tmp_path / "a.wav"), "read", "unreadable")
    assert "Too many levels of symbolic links" in str(error)


def test_file_that_opens_but_cannot_be_read():
    """/proc/self/mem opens fine, then fails with a real I/O error (EINVAL on seek, EIO on read)."""
    expect("/proc/self/mem", "read", "unreadable")


@contextlib.contextmanager
def unprivileged():
    """Drop the effective uid/gid to nobody (65534) when running as root.

    Tests run as root, which bypasses file modes, so a chmod 000 alone would not fail. The
    kernel checks the effective ids, so for the duration the open below is a real EACCES.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_permission_denied():
    folder = tempfile.mkdtemp(prefix="featurebeam-perm-")  # not tmp_path: its parents are 0700
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "secret.wav")
        soundfile.write(path, tone(0.1), RATE)
        os.chmod(path, 0o000)
        with unprivileged():
            expect(path, "read", "permission_denied")
    finally:
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------------- decode


def test_zero_length_file(tmp_path):
    expect(write(tmp_path / "a.wav", b""), "decode", "empty")


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3", ".aiff", ".m4a"])
def test_random_bytes_with_an_audio_extension(tmp_path, ext):
    rng = np.random.default_rng(7)
    # Random bytes, minus 0xFF so no MPEG frame sync appears by chance (mpg123 resyncs on one).
    data = bytes(rng.integers(0, 255, 64_000, dtype=np.uint8))
    expect(write(tmp_path / f"noise{ext}", data), "decode", "undecodable")


def test_riff_header_with_junk(tmp_path):
    expect(write(tmp_path / "a.wav", b"RIFF\x00\x00\x00\x00WAVEjunk"), "decode", "undecodable")


@pytest.mark.parametrize("rate", [0, 50, 10_000_000])
def test_implausible_header_sample_rate(tmp_path, rate):
    """libsndfile refuses a 0 Hz WAV ("SF_INFO struct incomplete") and opens 50 Hz or 10 MHz."""
    error = expect(write(tmp_path / f"r{rate}.wav", wav_bytes(rate=rate)), "decode", "bad_sample_rate")
    assert f"{rate} Hz" in str(error)


def test_valid_header_without_samples(tmp_path):
    expect(write(tmp_path / "a.wav", wav_bytes(rate=RATE, data=b"")), "decode", "no_samples")


def test_wav_whose_header_claims_more_data_than_the_file_holds(tmp_path):
    """A hand-written header that lies (1 MB declared, 200 bytes present)."""
    path = write(tmp_path / "a.wav", wav_bytes(rate=RATE, data_size=1_000_000))
    error, got = failure(path, segment_samples=10)
    assert (error.stage, error.reason) == ("decode", "truncated") and got == []  # found in the header
    assert "1000000" in str(error)


def test_streamed_wav_with_placeholder_length_is_fine(tmp_path):
    """ffmpeg writing to a pipe leaves 0xFFFFFFFF as the data size: a placeholder, not truncation."""
    path = write(tmp_path / "a.wav", wav_bytes(rate=RATE, data_size=0xFFFFFFFF))
    parts = list(stream_conditioned(path, sample_rate=RATE, segment_samples=None))
    assert len(parts[1].samples) == 100


@pytest.mark.parametrize("fraction", [0.5, 0.97])
@pytest.mark.parametrize(
    "fmt, subtype, ext", [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"), ("OGG", "OPUS", "opus")]
)
def test_truncated_files(tmp_path, fmt, subtype, ext, fraction):
    rate = 48000 if subtype == "OPUS" else RATE
    full = tmp_path / f"full.{ext}"
    soundfile.write(full, tone(3.0, rate), rate, format=fmt, subtype=subtype)
    data = full.read_bytes()
    path = write(tmp_path / f"cut.{ext}", data[: int(len(data) * fraction)])
    error, _ = failure(path, segment_samples=1000)
    assert (error.stage, error.reason) == ("decode", "truncated"), str(error)


def test_truncated_flac_is_found_after_the_segments_before_the_cut(tmp_path):
    """FLAC truncation shows up as a decoder error where the data stops: with small segments,
    the ones before it were already yielded (the price of streaming)."""
    full = tmp_path / "full.flac"
    soundfile.write(full, tone(20.0), RATE)
    data = full.read_bytes()
    path = write(tmp_path / "cut.flac", data[: len(data) // 2])
    error, got = failure(path, segment_samples=16000, block_seconds=1.0)
    assert error.reason == "truncated" and "declares" in str(error)
    assert sum(isinstance(p, Segment) for p in got) >= 5


def test_flac_whose_header_claims_more_samples(tmp_path):
    """STREAMINFO total_samples patched to twice the real count: the data ends cleanly early."""
    path = tmp_path / "a.flac"
    soundfile.write(path, tone(2.0), RATE)
    data = bytearray(path.read_bytes())
    # fLaC, 4-byte block header, then STREAMINFO: 10 bytes of block/frame sizes, then 64 bits of
    # rate (20) | channels-1 (3) | bits-1 (5) | total samples (36).
    (packed,) = struct.unpack(">Q", data[18:26])
    total = packed & ((1 << 36) - 1)
    assert total == 2 * RATE
    data[18:26] = struct.pack(">Q", (packed & ~((1 << 36) - 1)) | (2 * total))
    path.write_bytes(bytes(data))
    error = expect(str(path), "decode", "truncated", segment_samples=8000)
    assert f"{2 * total} frames" in str(error)


def test_truncated_mp3_decodes_shorter(tmp_path):
    """MP3 has no reliable length to compare with (libsndfile estimates it from the file size
    when there is no Xing header, and a tag at the end inflates that), so a cut MP3 is not
    detected: it decodes to what is there. This pins that behaviour."""
    full = tmp_path / "full.mp3"
    soundfile.write(full, tone(3.0), RATE, format="MP3")
    data = full.read_bytes()
    cut = write(tmp_path / "cut.mp3", data[: len(data) // 2])
    whole = list(stream_conditioned(str(full), sample_rate=16000, segment_samples=None))[1].samples
    half = list(stream_conditioned(cut, sample_rate=16000, segment_samples=None))[1].samples
    assert 0.3 * len(whole) < len(half) < 0.7 * len(whole)


def test_random_bytes_as_m4a_fail_in_ffmpeg(tmp_path):
    error = expect(write(tmp_path / "a.m4a", b"\x00\x01\x02" * 5000), "decode", "undecodable")
    assert "ffmpeg" in str(error)


# -------------------------------------------------------------------------------- condition


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    y = tone(1.0)
    y[RATE // 2] = bad
    path = tmp_path / "a.wav"
    soundfile.write(path, y, RATE, subtype="FLOAT")
    error = expect(str(path), "condition", "non_finite")
    assert "0.500 s" in str(error)  # where the first bad sample is


def test_non_finite_late_in_a_long_file_after_segments(tmp_path):
    y = tone(10.0)
    y[-10] = np.nan
    path = tmp_path / "a.wav"
    soundfile.write(path, y, RATE, subtype="FLOAT")
    error, got = failure(str(path), segment_samples=16000, block_seconds=1.0)
    assert error.reason == "non_finite" and sum(isinstance(p, Segment) for p in got) >= 8


def test_too_long_from_the_header(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(3.0), RATE)
    error, got = failure(str(path), segment_samples=1000, max_seconds=2.0)
    assert (error.stage, error.reason) == ("condition", "too_long") and got == []
    assert MAX_ITEM_SECONDS_KEY in str(error) and "2 s" in str(error)


def test_too_long_counts_the_excerpt_not_the_file(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(3.0), RATE)
    parts = list(stream_conditioned(str(path), sample_rate=16000, segment_samples=None, max_seconds=2.0, duration_seconds=1.5))
    assert len(parts[1].samples) == 24000


def test_too_long_while_streaming_when_the_header_has_no_length(tmp_path):
    wav, flac = tmp_path / "a.wav", tmp_path / "a.flac"
    soundfile.write(wav, tone(3.0), RATE)
    flac_through_a_pipe(wav, flac)
    error = expect(str(flac), "condition", "too_long", max_seconds=1.0, block_seconds=0.25)
    assert "runs past" in str(error)


def test_too_long_m4a_is_not_decoded_in_full(tmp_path):
    wav, m4a = tmp_path / "a.wav", tmp_path / "a.m4a"
    soundfile.write(wav, tone(6.0), RATE)
    subprocess.run([shutil.which("ffmpeg"), "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    error = expect(str(m4a), "condition", "too_long", max_seconds=2.0)
    assert "runs past 3.0 s" in str(error)  # ffmpeg stopped 1 s past the limit


@pytest.mark.parametrize("piped", [False, True])
def test_offset_past_end(tmp_path, piped):
    wav = tmp_path / "a.wav"
    soundfile.write(wav, tone(3.0), RATE)
    path = wav
    if piped:  # length unknown: found by reading, not from the header
        path = tmp_path / "a.flac"
        flac_through_a_pipe(wav, path)
    expect(str(path), "condition", "offset_past_end", offset_seconds=5.0)


def test_one_sample_resampled_to_nothing_is_too_short(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.array([0.5], np.float32), 44100, subtype="FLOAT")
    expect(str(path), "condition", "too_short")


def test_min_samples(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(1.0), RATE)
    error, got = failure(str(path), segment_samples=1000, min_samples=20000)
    assert error.reason == "too_short" and got == []  # nothing is released before the minimum
    parts = list(stream_conditioned(str(path), sample_rate=16000, segment_samples=1000, min_samples=15000))
    assert sum(len(p.samples) for p in parts[1:]) == 16000


@pytest.mark.parametrize("offset, duration", [(-1.0, None), (0.0, 0.0), (float("nan"), None), (None, -2.0)])
def test_invalid_excerpt(tmp_path, offset, duration):
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(1.0), RATE)
    expect(str(path), "condition", "bad_excerpt", offset_seconds=offset, duration_seconds=duration)


@pytest.mark.parametrize("kwargs", [{"sample_rate": 0}, {"segment_samples": 0}, {"max_seconds": -1.0}, {"block_seconds": 0}])
def test_invalid_settings_are_config_errors(kwargs):
    settings = {"sample_rate": 16000, "segment_samples": None, **kwargs}
    with pytest.raises(ConfigError):
        next(stream_conditioned("/nonexistent.wav", **settings))
