"""Streaming decode + condition: equal to the one-shot path, segment bookkeeping, excerpts,
formats (m4a through ffmpeg), odd-but-valid files, and memory that does not grow with length.

Malformed input lives in test_decoding_failures.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import soxr

from featurebeam import audio
from featurebeam.decoding import Segment, SourceInfo, stream_conditioned
from featurebeam.errors import AudioError

# Lossless sources through the same soxr HQ filter give bit-identical output in practice;
# the stated tolerance leaves room for a different soxr build's SIMD path.
ATOL = 1e-6


def signal(rate: int, channels: int, seconds: float, seed: int = 0) -> np.ndarray:
    """`[n, channels]` float32: a 440 Hz tone per channel (phase-shifted) plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    tone = np.stack([0.4 * np.sin(2 * np.pi * 440 * t + c) for c in range(channels)], axis=1)
    return (tone + 0.05 * rng.standard_normal(tone.shape)).astype(np.float32)


def collect(uri, **kwargs) -> tuple[SourceInfo, list[Segment], np.ndarray]:
    """Run the stream, check its shape (one SourceInfo, then ordered Segments), concatenate."""
    parts = list(stream_conditioned(uri, **kwargs))
    info, segments = parts[0], parts[1:]
    assert isinstance(info, SourceInfo) and segments and all(isinstance(s, Segment) for s in segments)
    size = kwargs.get("segment_samples")
    expected_start = 0
    for i, segment in enumerate(segments):
        assert segment.start == expected_start
        assert segment.samples.dtype == np.float32 and segment.samples.ndim == 1
        assert segment.last == (i == len(segments) - 1)
        if size is not None and not segment.last:
            assert len(segment.samples) == size
        expected_start += len(segment.samples)
    if size is not None:
        assert 0 < len(segments[-1].samples) <= size
    else:
        assert len(segments) == 1
    return info, segments, np.concatenate([s.samples for s in segments])


def one_shot(path, *, sample_rate: int, offset=None, duration=None) -> np.ndarray:
    """The non-streaming reference: decode everything, slice, mix down, soxr.resample once."""
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    start = int(round((offset or 0) * rate))
    stop = None if duration is None else start + int(round(duration * rate))
    mono = samples[start:stop].mean(axis=1, dtype=np.float32)
    return mono if rate == sample_rate else soxr.resample(mono, rate, sample_rate, quality="HQ")


CASES = [
    # fmt, subtype, source rate, channels, target rate, segment_samples
    ("WAV", "PCM_16", 44100, 2, 16000, 16000),
    ("FLAC", "PCM_24", 48000, 1, 16000, 7777),
    ("WAV", "FLOAT", 22050, 6, 22050, None),
    ("OGG", "VORBIS", 32000, 2, 16000, 5000),
    ("MP3", "MPEG_LAYER_III", 44100, 2, 22050, 16000),
    ("FLAC", "PCM_16", 8000, 1, 44100, 44100),
    ("AIFF", "PCM_16", 96000, 2, 16000, None),
]


@pytest.mark.parametrize("fmt, subtype, rate, channels, target, segment_samples", CASES)
def test_streaming_equals_one_shot(tmp_path, fmt, subtype, rate, channels, target, segment_samples):
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, signal(rate, channels, 3.3), rate, format=fmt, subtype=subtype)
    # 0.37 s blocks: about nine blocks, none aligned with the segments.
    info, _, streamed = collect(str(path), sample_rate=target, segment_samples=segment_samples, block_seconds=0.37)
    reference = one_shot(path, sample_rate=target)
    assert info.sample_rate == rate and info.channels == channels and info.codec.startswith(f"libsndfile:{fmt}")
    assert len(streamed) == len(reference)
    np.testing.assert_allclose(streamed, reference, rtol=0, atol=ATOL)
    # and the whole-item functions of featurebeam.audio agree with both
    legacy = audio.condition(audio.decode(path.read_bytes(), uri=str(path)), sample_rate=target, uri=str(path))
    np.testing.assert_allclose(streamed, legacy, rtol=0, atol=ATOL)


def test_block_size_does_not_change_the_output(tmp_path):
    path = tmp_path / "a.flac"
    soundfile.write(path, signal(44100, 2, 4.0), 44100)
    outputs = [collect(str(path), sample_rate=16000, segment_samples=4000, block_seconds=b)[2] for b in (0.01, 0.5, 10.0)]
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("offset, duration", [(1.25, 2.0), (2.5, None), (None, 0.75), (0.5, 60.0)])
def test_offset_and_duration_cut_the_excerpt(tmp_path, ext, offset, duration):
    path = tmp_path / f"a.{ext}"
    soundfile.write(path, signal(22050, 2, 4.0, seed=1), 22050)
    info, segments, streamed = collect(
        str(path), sample_rate=16000, segment_samples=3000, offset_seconds=offset, duration_seconds=duration, block_seconds=0.3
    )
    reference = one_shot(path, sample_rate=16000, offset=offset, duration=duration)
    assert segments[0].start == 0  # starts count from the excerpt, not the file
    assert info.frames == 4 * 22050  # SourceInfo describes the file, not the excerpt
    assert len(streamed) == len(reference)
    np.testing.assert_allclose(streamed, reference, rtol=0, atol=ATOL)


def test_silent_segments_are_flagged(tmp_path):
    rate = 16000
    y = np.concatenate([np.zeros(rate, np.float32), signal(rate, 1, 1.0)[:, 0], np.full(rate, 1e-7, np.float32)])
    path = tmp_path / "a.wav"
    soundfile.write(path, y, rate, subtype="FLOAT")
    _, segments, _ = collect(str(path), sample_rate=rate, segment_samples=rate)
    assert [s.silent for s in segments] == [True, False, True]


def test_m4a_decodes_through_ffmpeg(tmp_path):
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is installed by .ci/setup-system.sh"
    wav, m4a, ref = tmp_path / "a.wav", tmp_path / "a.m4a", tmp_path / "ref.wav"
    soundfile.write(wav, signal(44100, 2, 2.0), 44100)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(m4a), "-c:a", "pcm_f32le", str(ref)], check=True)
    info, _, streamed = collect(str(m4a), sample_rate=16000, segment_samples=8000, block_seconds=0.25)
    assert info.codec == "ffmpeg:aac" and info.channels == 2 and info.sample_rate == 44100
    reference = one_shot(ref, sample_rate=16000)
    assert len(streamed) == len(reference)
    np.testing.assert_allclose(streamed, reference, rtol=0, atol=ATOL)


def test_m4a_excerpt(tmp_path):
    """ffmpeg is told to stop after the excerpt; the excerpt still matches the full decode."""
    ffmpeg = shutil.which("ffmpeg")
    wav, m4a, ref = tmp_path / "a.wav", tmp_path / "a.m4a", tmp_path / "ref.wav"
    soundfile.write(wav, signal(22050, 1, 4.0), 22050)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(m4a), "-c:a", "pcm_f32le", str(ref)], check=True)
    _, _, streamed = collect(str(m4a), sample_rate=16000, segment_samples=4000, offset_seconds=1.0, duration_seconds=1.5)
    reference = one_shot(ref, sample_rate=16000, offset=1.0, duration=1.5)
    np.testing.assert_allclose(streamed, reference, rtol=0, atol=ATOL)


def test_non_utf8_file_name(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9-\xff.wav"  # Latin-1 and an invalid byte: not UTF-8
    with open(name, "wb") as handle:
        soundfile.write(handle, signal(16000, 1, 1.0), 16000, format="WAV")
    _, _, from_bytes = collect(name, sample_rate=16000, segment_samples=None)
    _, _, from_str = collect(os.fsdecode(name), sample_rate=16000, segment_samples=None)
    assert len(from_bytes) == 16000
    np.testing.assert_array_equal(from_bytes, from_str)


def test_non_utf8_name_in_an_error_message_is_printable(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.wav"
    with open(name, "wb") as handle:
        handle.write(b"not audio at all" * 10)
    with pytest.raises(AudioError) as info:
        list(stream_conditioned(name, sample_rate=16000, segment_samples=None))
    assert info.value.reason == "undecodable"
    assert "caf\\xe9.wav" in str(info.value)
    str(info.value).encode("utf-8")  # a dead-letter JSON line can hold it


def test_64_channels(tmp_path):
    path = tmp_path / "a.wav"
    y = signal(16000, 64, 0.5)
    soundfile.write(path, y, 16000, subtype="FLOAT")
    info, _, streamed = collect(str(path), sample_rate=16000, segment_samples=1000)
    assert info.channels == 64
    np.testing.assert_allclose(streamed, y.mean(axis=1, dtype=np.float32), rtol=0, atol=ATOL)


def test_one_sample_file(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.array([0.5], np.float32), 16000, subtype="FLOAT")
    info, segments, streamed = collect(str(path), sample_rate=16000, segment_samples=16000)
    assert info.frames == 1 and streamed.tolist() == [0.5] and segments[0].last
    # resampled to a lower rate, one sample becomes none: too short (see the failure tests)


def test_whole_item_when_segment_samples_is_none(tmp_path):
    path = tmp_path / "a.flac"
    soundfile.write(path, signal(44100, 2, 5.0), 44100)
    _, segments, streamed = collect(str(path), sample_rate=16000, segment_samples=None, block_seconds=0.5)
    assert len(segments) == 1 and len(streamed) == 80000


def test_length_unknown_from_the_header(tmp_path):
    """A FLAC written to a pipe has no length in STREAMINFO; libsndfile reports SF_COUNT_MAX."""
    wav, flac = tmp_path / "a.wav", tmp_path / "a.flac"
    soundfile.write(wav, signal(22050, 1, 2.0), 22050)
    with open(flac, "wb") as out:
        subprocess.run([shutil.which("ffmpeg"), "-v", "error", "-i", str(wav), "-f", "flac", "pipe:1"], stdout=out, check=True)
    info, _, streamed = collect(str(flac), sample_rate=16000, segment_samples=5000, offset_seconds=0.5)
    assert info.frames is None
    np.testing.assert_allclose(streamed, one_shot(wav, sample_rate=16000, offset=0.5), rtol=0, atol=ATOL)


def test_file_uri(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, signal(16000, 1, 1.0), 16000)
    _, _, streamed = collect(path.as_uri(), sample_rate=16000, segment_samples=None)
    assert len(streamed) == 16000


def test_abandoned_stream_closes_the_file(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, signal(16000, 1, 3.0), 16000)
    stream = stream_conditioned(str(path), sample_rate=16000, segment_samples=1000)
    next(stream), next(stream)
    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    stream.close()
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before - 1


@pytest.mark.emulator
def test_streams_from_gcs(gcs_emulator, tmp_path):  # noqa: F811 - the fixture imported above
    """gs:// through Beam's GCS file system and the real client, against the local emulator:
    libsndfile seeks and reads the remote object in blocks; a missing object is not_found."""
    bucket = gcs_emulator.make_bucket("featurebeam-decoding")
    path = tmp_path / "a.flac"
    soundfile.write(path, signal(44100, 2, 3.0), 44100)
    bucket.blob("clips/a.flac").upload_from_filename(str(path))
    kwargs = dict(sample_rate=16000, segment_samples=8000, offset_seconds=0.5, block_seconds=0.5)
    remote_info, _, remote = collect("gs://featurebeam-decoding/clips/a.flac", **kwargs)
    local_info, _, local = collect(str(path), **kwargs)
    assert remote_info == local_info
    np.testing.assert_array_equal(remote, local)
    with pytest.raises(AudioError) as info:
        list(stream_conditioned("gs://featurebeam-decoding/clips/missing.flac", sample_rate=16000, segment_samples=None))
    assert (info.value.stage, info.value.reason) == ("read", "not_found")


_MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    from featurebeam.decoding import stream_conditioned

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    import numpy, soundfile, soxr
    from apache_beam.io.filesystems import FileSystems
    # Warm up every code path on a short file, so the baseline includes imports and first-use costs.
    for part in stream_conditioned(sys.argv[2], sample_rate=16000, segment_samples=160000):
        pass
    base = hwm_kib()
    samples = 0
    for part in stream_conditioned(sys.argv[1], sample_rate=16000, segment_samples=160000, max_seconds=None):
        samples += len(getattr(part, "samples", ()))
    print(base, hwm_kib(), samples)
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_length(tmp_path):
    """Stream a 20-minute 44.1 kHz stereo WAV (212 MB; 423 MB as decoded float32) in a fresh
    process and check its peak RSS grows by far less than the decoded size."""
    rate, minutes = 44100, 20
    path, short = tmp_path / "long.wav", tmp_path / "short.wav"
    block = signal(rate, 2, 10.0)
    with soundfile.SoundFile(path, "w", rate, 2, subtype="PCM_16") as out:
        for _ in range(minutes * 6):
            out.write(block)
    soundfile.write(short, block, rate, subtype="PCM_16")
    command = [sys.executable, "-c", _MEMORY_PROBE, str(path), str(short)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    base_kib, peak_kib, samples = map(int, result.stdout.split())
    assert samples == minutes * 60 * 16000
    decoded_mib = minutes * 60 * rate * 2 * 4 / 2**20
    growth_mib = (peak_kib - base_kib) / 1024
    print(f"baseline {base_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB, growth {growth_mib:.1f} MiB "
          f"(decoded size {decoded_mib:.0f} MiB)")
    assert growth_mib < 100, f"peak RSS grew by {growth_mib:.0f} MiB streaming a {minutes}-minute file"


def test_a_local_file_decodes_without_importing_beam(tmp_path):
    """The decoder child imports Beam's file systems (about a second) only for a remote URI;
    libsndfile reads a local file itself, with the same samples as soundfile.read."""
    path = tmp_path / "tone.flac"
    soundfile.write(path, signal(44100, 2, 1.5), 44100)
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, soundfile, soxr
        from featurebeam.decoding import Segment, stream_conditioned
        parts = [p for p in stream_conditioned({str(path)!r}, sample_rate=16000, segment_samples=None) if isinstance(p, Segment)]
        y, rate = soundfile.read({str(path)!r}, dtype="float32", always_2d=True)
        expected = soxr.resample(y.mean(axis=1, dtype=np.float32), rate, 16000, quality="HQ")
        assert len(parts) == 1 and np.allclose(parts[0].samples, expected, atol={ATOL}), "samples differ"
        assert "apache_beam" not in sys.modules, "Beam was imported"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("channels", [1, 2, 3, 5, 7, 8, 9])
def test_mix_to_mono_is_numpys_mean_bit_for_bit(channels):
    from featurebeam.decoding import mix_to_mono

    rng = np.random.default_rng(channels)
    for n in (1, 7, 4410, 44100):
        samples = (rng.standard_normal((n, channels)) * 0.3).astype(np.float32)
        samples[::7] = -0.0  # signed zeros: NumPy's sum starts from +0.0
        samples[::11, 0] = 0.0
        # (one channel is kept as it is: NumPy's mean would also turn -0.0 into +0.0)
        expected = samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float32)
        mono = mix_to_mono(samples)
        assert mono.dtype == np.float32 and mono.tobytes() == expected.tobytes()
        assert not np.shares_memory(mono, samples)
