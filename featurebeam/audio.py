"""Reading, decoding and conditioning audio.

Bytes come through Beam's `FileSystems`, so one code path reads local paths, `file://` and
`gs://`. soundfile (libsndfile 1.2: WAV, FLAC, OGG/Vorbis, Opus, MP3) decodes from memory;
ffmpeg, when installed, is the fallback for containers libsndfile does not read (AAC/M4A).
Conditioning is mono mixdown then explicit resampling with soxr, so every extractor sees one
sample rate. Every failure raises `AudioError` with the stage it happened in and a `reason`
code shared with `featurebeam.decoding`, the streaming version of this module that bounds memory
on long files; these whole-item functions remain for callers that already hold the bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

import numpy as np

from featurebeam.decoding import FFMPEG_EXTENSIONS, check_sample_rate, display_uri, ffmpeg_to_wav, read_error, sniff_wav_rate
from featurebeam.errors import AudioError
from featurebeam.retry import call_with_retries, is_transient

# Extensions the local and cloud adapters list by default.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aiff", ".aif")
__all__ = ["AUDIO_EXTENSIONS", "FFMPEG_EXTENSIONS", "Decoded", "read_bytes", "decode", "condition", "segment"]


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
    """Read a whole object through Beam's FileSystems (local, file://, gs://, ...).

    Transient faults (429/5xx, reset connections) are retried; see `featurebeam.retry`.
    """
    from apache_beam.io.filesystems import FileSystems

    def read() -> bytes:
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            return handle.read()

    try:
        return call_with_retries(read, what=f"read {display_uri(uri)}")
    except Exception as exc:  # FileSystems passes each backend's own exceptions through
        if is_transient(exc):
            raise AudioError(
                f"cannot read {display_uri(uri)}: every try failed with transient errors, the last "
                f"{type(exc).__name__}: {exc}",
                stage="read",
                reason="transient_read_failed",
            ) from exc
        raise read_error(uri, exc) from exc


def decode(data: bytes, *, uri: str) -> Decoded:
    """Decode encoded audio bytes; `uri` names the item in errors and picks the fallback."""
    import soundfile

    show = display_uri(uri)
    if not data:
        raise AudioError(f"{show} is empty (0 bytes)", stage="decode", reason="empty")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        codec = "libsndfile"
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        if not uri.lower().endswith(FFMPEG_EXTENSIONS):
            rate = sniff_wav_rate(data[:4096])
            if rate is not None:
                check_sample_rate(rate, uri=uri)
            raise AudioError(f"cannot decode {show}: {exc}", stage="decode", reason="undecodable") from exc
        samples, rate = _decode_ffmpeg(data, uri=uri)
        codec = "ffmpeg"
    if samples.shape[0] == 0:
        raise AudioError(f"{show} decodes to zero samples", stage="decode", reason="no_samples")
    check_sample_rate(int(rate), uri=uri)
    return Decoded(samples=samples, sample_rate=int(rate), codec=codec)


def _decode_ffmpeg(data: bytes, *, uri: str) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg into a float WAV that soundfile reads, keeping rate and channels."""
    import soundfile

    with tempfile.TemporaryDirectory(prefix="featurebeam-ffmpeg-") as tmp:
        source, target = os.path.join(tmp, "in"), os.path.join(tmp, "out.wav")
        with open(source, "wb") as handle:
            handle.write(data)
        ffmpeg_to_wav(source, target, uri=uri)
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
        message = f"{display_uri(uri)} holds {bad} non-finite samples (NaN or Inf)"
        raise AudioError(message, stage="condition", reason="non_finite")
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
