"""Reading, decoding and conditioning audio.

Bytes come through Beam's `FileSystems`, so one code path reads local paths, `file://` and
`gs://`. soundfile (libsndfile 1.2: WAV, FLAC, OGG/Vorbis, Opus, MP3) decodes from memory;
ffmpeg, when installed, is the fallback for containers libsndfile does not read (AAC/M4A).
Conditioning is mono mixdown then explicit resampling with soxr, so every extractor sees one
sample rate. Every failure raises `AudioError` with the stage it happened in.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import tempfile

import numpy as np

from featurebeam.errors import AudioError

# Extensions the local and cloud adapters list by default.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aiff", ".aif")
FFMPEG_EXTENSIONS = (".m4a", ".aac", ".mp4")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Decoded audio: `samples` is `[n, channels]` float32 in [-1, 1] at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int
    codec: str

    @property
    def channels(self) -> int:
        return self.samples.shape[1]

    @property
    def duration_seconds(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def read_bytes(uri: str) -> bytes:
    """Read a whole object through Beam's FileSystems (local, file://, gs://, ...)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            return handle.read()
    except Exception as exc:  # FileSystems wraps every backend's errors differently
        raise AudioError(f"cannot read {uri}: {type(exc).__name__}: {exc}", stage="read") from exc


def decode(data: bytes, *, uri: str) -> Decoded:
    """Decode encoded audio bytes; `uri` names the item in errors and picks the fallback."""
    import soundfile

    if not data:
        raise AudioError(f"{uri} is empty (0 bytes)", stage="decode")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        codec = "libsndfile"
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        if not uri.lower().endswith(FFMPEG_EXTENSIONS):
            raise AudioError(f"cannot decode {uri}: {exc}", stage="decode") from exc
        samples, rate = _decode_ffmpeg(data, uri=uri)
        codec = "ffmpeg"
    if samples.shape[0] == 0:
        raise AudioError(f"{uri} decodes to zero samples", stage="decode")
    if not 100 <= rate <= 1_000_000:
        raise AudioError(f"{uri} declares an implausible sample rate of {rate} Hz", stage="decode")
    return Decoded(samples=samples, sample_rate=int(rate), codec=codec)


def _decode_ffmpeg(data: bytes, *, uri: str) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg into a float WAV that soundfile reads, keeping rate and channels.

    Input goes through a temporary file, not a pipe: MP4/M4A keep their index at the end of the
    file and ffmpeg cannot seek a pipe.
    """
    import soundfile

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"cannot decode {uri}: libsndfile does not read this format and ffmpeg is not installed "
            "(install ffmpeg, e.g. apt-get install ffmpeg)",
            stage="decode",
        )
    with tempfile.TemporaryDirectory(prefix="featurebeam-ffmpeg-") as tmp:
        source, target = os.path.join(tmp, "in"), os.path.join(tmp, "out.wav")
        with open(source, "wb") as handle:
            handle.write(data)
        result = subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-i", source, "-vn", "-acodec", "pcm_f32le", target],
            capture_output=True,
            timeout=3600,
        )
        if result.returncode != 0 or not os.path.exists(target):
            reason = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise AudioError(f"cannot decode {uri} with ffmpeg: {reason[-1] if reason else 'no audio stream'}", stage="decode")
        samples, rate = soundfile.read(target, dtype="float32", always_2d=True)
    return samples, rate


def condition(decoded: Decoded, *, sample_rate: int, uri: str) -> np.ndarray:
    """Mono mixdown (channel mean) and resampling to `sample_rate` Hz with soxr (HQ).

    Returns `[n]` float32 at `sample_rate`.
    """
    import soxr

    mono = decoded.samples.mean(axis=1, dtype=np.float32) if decoded.channels > 1 else decoded.samples[:, 0]
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise AudioError(f"{uri} holds {bad} non-finite samples (NaN or Inf)", stage="condition")
    if decoded.sample_rate != sample_rate:
        mono = soxr.resample(mono, decoded.sample_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def segment(waveform: np.ndarray, *, segment_samples: int | None) -> list[tuple[int, np.ndarray]]:
    """Split into fixed windows of `segment_samples`, returning `(start_sample, window)` pairs.

    None keeps the whole item. The last, shorter window is kept as it is (not padded), so no
    audio is lost and no silence is invented; extractors handle unequal lengths in a batch.
    """
    if not segment_samples:
        return [(0, waveform)]
    return [(start, waveform[start : start + segment_samples]) for start in range(0, len(waveform), segment_samples)]
