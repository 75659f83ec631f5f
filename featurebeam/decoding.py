"""Streaming read, decode and conditioning of one audio item, in bounded memory.

`stream_conditioned` opens an object through Beam's FileSystems (local paths, file://, gs://),
decodes it block by block with libsndfile (AAC/M4A/MP4 through ffmpeg into a temporary float WAV
that is streamed the same way), mixes each block to mono, resamples it with a streaming soxr
resampler and cuts fixed-length segments as they fill. Peak memory is one block plus one segment
however long the file is; only `segment_samples=None` (the whole item as one segment) holds the
item, which is what `max_seconds` bounds. Every failure is an `AudioError` with a stable
`reason`; transient read faults are retried with `featurebeam.retry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import re
import shutil
import struct
import subprocess
import tempfile
from typing import Any, Iterator

import numpy as np

from featurebeam.errors import AudioError, ConfigError
from featurebeam.retry import call_with_retries, http_status, is_transient

FFMPEG_EXTENSIONS = (".m4a", ".aac", ".mp4")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 100, 1_000_000
SILENCE_PEAK = 1e-6
MAX_ITEM_SECONDS_KEY = "max_item_seconds"
# libsndfile reports SF_COUNT_MAX frames when a header leaves the length open (e.g. a FLAC
# written to a pipe); that means "unknown", not "a very long file".
_SF_COUNT_MAX = 2**63 - 1
# Cap on one decoded block across channels (16 MiB of float32), so a 64-channel or 1 MHz file
# does not turn `block_seconds` into gigabytes.
_MAX_BLOCK_SAMPLES = 1 << 22
# WAV data sizes that writers use as "length unknown" placeholders when streaming to a pipe
# (ffmpeg writes 0xFFFFFFFF, others 0 or values near 2**31); not a sign of truncation.
_PLACEHOLDER_DATA_SIZE = 0x7FFF0000
_FFMPEG_TIMEOUT_SECONDS = 3600


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the source declares. frames: source frames in the whole file (None when the header
    does not say). codec: "libsndfile:<FORMAT>/<SUBTYPE>" or "ffmpeg:<codec>"."""

    sample_rate: int
    channels: int
    frames: int | None
    codec: str

    @property
    def duration_seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.sample_rate


@dataclasses.dataclass
class Segment:
    """One window of conditioned audio.

    start: first sample at the target rate, relative to the start of the item (after the
    offset). samples: `[n]` float32 mono at the target rate (n == segment_samples except for the
    last one). last: True on the item's final segment. silent: peak |amplitude| < 1e-6 (allowed,
    but flagged so silence can be counted or filtered).
    """

    start: int
    samples: np.ndarray
    last: bool
    silent: bool


def display_uri(uri: str | bytes) -> str:
    """The URI as printable text: a non-UTF-8 local name shows its bad bytes as \\xNN escapes
    (os.fsdecode keeps them as lone surrogates, which cannot be written to a UTF-8 log)."""
    if isinstance(uri, bytes):
        return uri.decode("utf-8", "backslashreplace")
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        return os.fsencode(uri).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------------------------
# Read errors


def read_error(uri: str, exc: BaseException) -> AudioError:
    """The read-stage AudioError for a permanent failure to open or read `uri`."""
    show = display_uri(uri)
    inner = getattr(exc, "exception_details", None)
    cause = next(iter(inner.values())) if isinstance(inner, dict) and len(inner) == 1 else exc
    status = http_status(cause)
    detail = f"{type(cause).__name__}: {cause}"
    if isinstance(cause, FileNotFoundError) or status == 404:
        return AudioError(
            f"cannot read {show}: no such file or object ({detail}); check the listing or manifest", stage="read", reason="not_found"
        )
    if isinstance(cause, PermissionError) or status in (401, 403):
        return AudioError(
            f"cannot read {show}: permission denied ({detail}); give the workers read access "
            "(file mode, or storage.objects.get on the bucket for their service account)",
            stage="read",
            reason="permission_denied",
        )
    if isinstance(cause, IsADirectoryError):
        return AudioError(f"cannot read {show}: it is a directory, not an audio file", stage="read", reason="is_a_directory")
    return AudioError(f"cannot read {show}: {detail}", stage="read", reason="unreadable")


def _raise_read(uri: str, exc: BaseException):
    """Re-raise a transient error as it is (the retry layer handles it), else as an AudioError."""
    if is_transient(exc):
        raise exc
    raise read_error(uri, exc) from exc


class _GuardedReader:
    """A file object for libsndfile's virtual I/O that keeps, rather than loses, read errors.

    soundfile calls read/seek/tell through cffi callbacks, and cffi swallows an exception raised
    in a callback (it prints it and returns 0). libsndfile would then see a short file, and a
    connection reset half-way through a gs:// object would come out as a silently truncated
    item. The guard records the first exception and `check()` re-raises it after each
    libsndfile call.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self.error: BaseException | None = None
        self._pos = 0

    def _fail(self, exc: BaseException):
        if self.error is None:
            self.error = exc

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            data = self.raw.read(size)
        except Exception as exc:
            self._fail(exc)
            return b""
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        if self.error is not None:
            return 0
        try:
            readinto = getattr(self.raw, "readinto", None)
            if readinto is None:
                data = self.raw.read(len(buffer))
                buffer[: len(data)] = data
                count = len(data)
            else:
                count = readinto(buffer) or 0
        except Exception as exc:
            self._fail(exc)
            return 0
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.error is not None:
            return self._pos
        try:
            self._pos = self.raw.seek(offset, whence)
        except Exception as exc:
            self._fail(exc)
        return self._pos

    def tell(self) -> int:
        if self.error is not None:
            return self._pos
        try:
            self._pos = self.raw.tell()
        except Exception as exc:
            self._fail(exc)
        return self._pos

    def size(self) -> int:
        end = self.seek(0, os.SEEK_END)
        self.seek(0)
        return end

    def check(self, uri: str):
        if self.error is not None:
            error, self.error = self.error, None
            _raise_read(uri, error)


# --------------------------------------------------------------------------------------------
# Header checks


def sniff_wav_rate(head: bytes) -> int | None:
    """The sample rate in a RIFF/RF64 WAVE `fmt ` chunk within `head`, or None if not found.

    Used when libsndfile refuses a WAV: it rejects a 0 Hz header with the generic "SF_INFO struct
    incomplete", and the user should hear that the rate is the problem.
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            if pos + 16 > len(head):
                return None
            return struct.unpack("<I", head[pos + 12 : pos + 16])[0]
        pos += 8 + size + (size & 1)
    return None


_DATA_SIZE_LOG = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def truncation_in_log(log: str) -> str | None:
    """A description of truncation that libsndfile noticed while parsing the header, or None.

    WAV/AIFF: the data chunk declares more bytes than the file holds ("data : N (should be M)").
    Ogg: the last page has no end-of-stream flag (libsndfile 1.2 then reports 0 frames for
    Vorbis and decodes nothing), or the file ends inside a page ("Junk after the last page").
    """
    for declared, actual in _DATA_SIZE_LOG.findall(log):
        declared, actual = int(declared), int(actual)
        if 0 < declared < _PLACEHOLDER_DATA_SIZE and actual + 1 < declared:
            return f"the data chunk declares {declared} bytes but the file holds {actual}"
    # Only read at open time: after decoding to the end, libsndfile 1.2 sometimes logs a missing
    # end-of-stream flag for intact Vorbis files too.
    if "File ended unexpectedly without an End-Of-Stream flag" in log or "Last page lacks an end-of-stream bit" in log:
        return "the Ogg stream ends without an end-of-stream page"
    if re.search(r"^Ogg ?: Junk after the last page", log, re.MULTILINE):
        return "the Ogg stream ends in a partial page"
    return None


def check_sample_rate(rate: int, *, uri: str):
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{display_uri(uri)} declares a sample rate of {rate} Hz, outside the plausible "
            f"{MIN_SAMPLE_RATE} Hz..{MAX_SAMPLE_RATE} Hz; the header is corrupt or not audio",
            stage="decode",
            reason="bad_sample_rate",
        )


# --------------------------------------------------------------------------------------------
# ffmpeg


def ffmpeg_to_wav(source: str, target: str, *, uri: str, limit_seconds: float | None = None) -> str:
    """Decode `source` (a local file) with ffmpeg into a 32-bit float WAV at `target`.

    Keeps the source rate and channels; RF64 past 4 GiB. `limit_seconds` stops the output
    there (so an over-long file is not decoded to disk in full). Returns ffmpeg's name for the
    source codec. The input is a file, not a pipe: MP4/M4A keep their index at the end of the file and
    ffmpeg cannot seek a pipe.
    """
    ffmpeg = shutil.which("ffmpeg")
    show = display_uri(uri)
    if ffmpeg is None:
        raise AudioError(
            f"cannot decode {show}: libsndfile does not read this format and ffmpeg is not installed "
            "(install ffmpeg, e.g. apt-get install ffmpeg)",
            stage="decode",
            reason="undecodable",
        )
    command = [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-v", "info", "-i", source, "-map", "0:a:0"]
    if limit_seconds is not None:
        command += ["-t", f"{limit_seconds:.6f}"]
    command += ["-c:a", "pcm_f32le", "-f", "wav", "-rf64", "auto", "-y", target]
    try:
        result = subprocess.run(command, capture_output=True, timeout=_FFMPEG_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        message = f"cannot decode {show}: ffmpeg ran over {_FFMPEG_TIMEOUT_SECONDS} s"
        raise AudioError(message, stage="decode", reason="undecodable") from exc
    log = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0 or not os.path.exists(target):
        lines = [line for line in log.strip().splitlines() if line.strip()]
        message = f"cannot decode {show} with ffmpeg: {lines[-1] if lines else 'no audio stream'}"
        raise AudioError(message, stage="decode", reason="undecodable")
    match = re.search(r"Stream #0:\d+.*?: Audio: (\w+)", log)
    return match.group(1) if match else "unknown"


# --------------------------------------------------------------------------------------------
# Block reading


def _read_block(sf, out: np.ndarray, frames: int) -> tuple[int, str | None]:
    """Read up to `frames` frames into `out[:frames]`; returns (frames read, libsndfile error).

    Calls sf_readf_float directly: SoundFile.read seeks to "current + frames" after every read
    to keep its position in step, which fails on FLAC streams of unknown length and costs a
    decoder re-sync per block on others.
    """
    import soundfile

    snd, ffi = getattr(soundfile, "_snd", None), getattr(soundfile, "_ffi", None)
    if snd is None or ffi is None or not hasattr(sf, "_file"):  # pragma: no cover - soundfile internals moved
        try:
            return sf.read(frames, dtype="float32", always_2d=True, out=out[:frames]).shape[0], None
        except soundfile.LibsndfileError as exc:
            return 0, exc.error_string
    count = snd.sf_readf_float(sf._file, ffi.cast("float *", out.ctypes.data), frames)
    code = snd.sf_error(sf._file)
    if code:
        return int(count), ffi.string(snd.sf_error_number(code)).decode("utf-8", "replace")
    return int(count), None


def mix_to_mono(samples: np.ndarray) -> np.ndarray:
    """`samples.mean(axis=1, dtype=float32)` of `[n, channels]` float32, bit for bit, as a new
    array (one channel is copied as it is).

    NumPy reduces a short inner axis with strided per-row loops: for stereo that was 20x slower
    than adding the channel columns (1.4 ms a second of 44.1 kHz audio, a fifth of decoding a
    one-second FLAC clip). Below 8 channels NumPy's pairwise sum is a plain sequential sum from
    +0.0, which the column additions repeat (signed zeros included); from 8 on it pairs terms,
    so those keep NumPy's own mean.
    """
    channels = samples.shape[1]
    if channels == 1:
        return samples[:, 0].copy()
    if channels >= 8:
        return samples.mean(axis=1, dtype=np.float32)
    out = np.zeros(len(samples), dtype=np.float32)
    for channel in range(channels):
        out += samples[:, channel]
    out /= np.float32(channels)
    return out


class _Output:
    """Conditioned samples on their way out: cuts segments of `size`, or grows one buffer.

    A segment is only released once a later sample exists (so `last` is known) and once the
    item has reached `min_samples` (so a too-short item yields nothing).
    """

    def __init__(self, *, size: int | None, min_samples: int, capacity: int):
        self.size = size
        self.min_samples = min_samples
        self.total = 0
        self.emitted = 0
        self._parts: list[np.ndarray] = []
        self._pending = 0
        self._whole = np.empty(max(capacity, 1024) if size is None else 0, dtype=np.float32)

    def push(self, chunk: np.ndarray) -> list[Segment]:
        if not len(chunk):
            return []
        self.total += len(chunk)
        if self.size is None:
            if self.total > len(self._whole):  # grow by half: amortised copies, bounded slack
                grown = np.empty(max(self.total, len(self._whole) * 3 // 2), dtype=np.float32)
                grown[: self.total - len(chunk)] = self._whole[: self.total - len(chunk)]
                self._whole = grown
            self._whole[self.total - len(chunk) : self.total] = chunk
            return []
        self._parts.append(chunk)
        self._pending += len(chunk)
        if self.total < self.min_samples or self._pending <= self.size:
            return []
        return self._cut(final=False)

    def finish(self, tail: np.ndarray) -> list[Segment]:
        if self.size is None:
            self.push(tail)
            whole = self._whole[: self.total]
            self._whole = np.empty(0, dtype=np.float32)
            return [_segment(0, whole, last=True)]
        if len(tail):
            self._parts.append(tail)
            self._pending += len(tail)
            self.total += len(tail)
        return self._cut(final=True)

    def _cut(self, *, final: bool) -> list[Segment]:
        buffer = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        out, pos = [], 0
        while len(buffer) - pos > self.size:
            out.append(_segment(self.emitted, buffer[pos : pos + self.size].copy(), last=False))
            pos += self.size
            self.emitted += self.size
        rest = buffer[pos:].copy()
        if final:
            out.append(_segment(self.emitted, rest, last=True))
            self.emitted += len(rest)
            self._parts, self._pending = [], 0
        else:
            self._parts, self._pending = [rest], len(rest)
        return out


def _segment(start: int, samples: np.ndarray, *, last: bool) -> Segment:
    # max/min rather than abs().max(): no temporary the size of a whole-item segment
    peak = max(float(samples.max()), -float(samples.min())) if len(samples) else 0.0
    return Segment(start=start, samples=samples, last=last, silent=peak < SILENCE_PEAK)


# --------------------------------------------------------------------------------------------
# The stream


@dataclasses.dataclass(frozen=True)
class _Options:
    sample_rate: int
    segment_samples: int | None
    offset_seconds: float | None
    duration_seconds: float | None
    max_seconds: float | None
    block_seconds: float
    min_samples: int


def _check_options(o: _Options, *, uri: str):
    """Run-level settings are ConfigErrors; a manifest row's excerpt is the item's problem."""
    if not isinstance(o.sample_rate, numbers.Integral) or not MIN_SAMPLE_RATE <= o.sample_rate <= MAX_SAMPLE_RATE:
        raise ConfigError(f"sample_rate must be an integer in {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {o.sample_rate!r}")
    if o.segment_samples is not None and (not isinstance(o.segment_samples, numbers.Integral) or o.segment_samples < 1):
        raise ConfigError(f"segment_samples must be a positive integer or None, got {o.segment_samples!r}")
    if o.max_seconds is not None and not o.max_seconds > 0:
        raise ConfigError(f"{MAX_ITEM_SECONDS_KEY} must be positive or None (no limit), got {o.max_seconds!r}")
    if not o.block_seconds > 0:
        raise ConfigError(f"block_seconds must be positive, got {o.block_seconds!r}")
    if not isinstance(o.min_samples, numbers.Integral) or o.min_samples < 1:
        raise ConfigError(f"min_samples must be a positive integer, got {o.min_samples!r}")
    offset, duration = o.offset_seconds, o.duration_seconds
    if (offset is not None and not (math.isfinite(offset) and offset >= 0)) or (
        duration is not None and not (math.isfinite(duration) and duration > 0)
    ):
        raise AudioError(
            f"{display_uri(uri)}: the excerpt offset={offset} s, duration={duration} s is invalid; "
            "the offset must be >= 0 and the duration > 0",
            stage="condition",
            reason="bad_excerpt",
        )


def _too_long(uri: str, seconds: float, limit: float, *, known: bool) -> AudioError:
    what = f"is {seconds:.1f} s long" if known else f"runs past {seconds:.1f} s"
    return AudioError(
        f"{display_uri(uri)} {what}, over the limit of {limit:g} s per item; raise "
        f"--{MAX_ITEM_SECONDS_KEY} (config key {MAX_ITEM_SECONDS_KEY}) or cut it with a manifest "
        "offset/duration, or set segment_seconds so long items stream in windows",
        stage="condition",
        reason="too_long",
    )


def _open_decoder(uri: str, o: _Options, stack: contextlib.ExitStack) -> tuple[Any, _GuardedReader | None, str]:
    """(SoundFile, guard or None, codec) for `uri`; `stack` owns every resource opened."""
    import soundfile

    show = display_uri(uri)
    # Beam has no file:// file system; the dataset adapters strip it the same way.
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    local = "://" not in path
    try:
        if local:  # no Beam import (a second of a decoder child's start-up) for local files
            raw = open(path, "rb")
        else:
            from apache_beam.io.filesystems import FileSystems

            raw = FileSystems.open(path, compression_type="uncompressed")
    except Exception as exc:  # FileSystems passes each backend's own exceptions through
        _raise_read(uri, exc)
    stack.callback(_close_quietly, raw)
    guard = _GuardedReader(raw)
    size = guard.size()
    guard.check(uri)
    if size == 0:
        raise AudioError(f"{show} is empty (0 bytes)", stage="decode", reason="empty")
    try:
        # A local file is read by libsndfile itself from the descriptor (at offset 0 after
        # size()); any other store goes through the guard's Python callbacks.
        sf = soundfile.SoundFile(raw.fileno(), closefd=False) if local else soundfile.SoundFile(guard)
    except Exception as exc:  # LibsndfileError, or RuntimeError/TypeError from odd headers
        guard.check(uri)
        if uri.lower().endswith(FFMPEG_EXTENSIONS):
            return _open_ffmpeg(uri, raw, o, stack)
        guard.seek(0)
        head = guard.read(4096)
        guard.check(uri)
        rate = sniff_wav_rate(head)
        if rate is not None:
            check_sample_rate(rate, uri=uri)
        message = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(
            f"cannot decode {show}: libsndfile: {message} (not a WAV/FLAC/OGG/MP3/AIFF file libsndfile can read; "
            "re-encode it or drop it from the listing)",
            stage="decode",
            reason="undecodable",
        ) from exc
    stack.callback(sf.close)
    return sf, guard, f"libsndfile:{sf.format}/{sf.subtype}"


def _open_ffmpeg(uri: str, raw: Any, o: _Options, stack: contextlib.ExitStack) -> tuple[Any, None, str]:
    """Copy the object to a temporary file, decode it with ffmpeg to a float WAV, open that.

    ffmpeg stops one second past what the item can use (offset + duration, or offset +
    max_seconds), so the header check on the WAV still sees an over-long item as too long
    without a 10-hour file being decoded to disk first.
    """
    import soundfile

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="featurebeam-ffmpeg-"))
    source, target = os.path.join(tmp, "in"), os.path.join(tmp, "out.wav")
    with open(source, "wb") as handle:
        try:
            raw.seek(0)
        except Exception as exc:
            _raise_read(uri, exc)
        while True:  # chunked: never the whole object in memory
            try:
                chunk = raw.read(1 << 20)
            except Exception as exc:
                _raise_read(uri, exc)
            if not chunk:
                break
            handle.write(chunk)
    start = o.offset_seconds or 0.0
    spans = [d for d in (o.duration_seconds, o.max_seconds) if d is not None]
    limit = start + min(spans) + 1.0 if spans else None
    codec = ffmpeg_to_wav(source, target, uri=uri, limit_seconds=limit)
    os.unlink(source)  # the float WAV is all that is needed; do not hold two copies on disk
    sf = soundfile.SoundFile(target)
    stack.callback(sf.close)
    return sf, None, f"ffmpeg:{codec}"


def _close_quietly(handle: Any):
    with contextlib.suppress(Exception):
        handle.close()


def _stream_once(uri: str, o: _Options) -> Iterator[SourceInfo | Segment]:
    """One attempt: open, decode, condition. Transient read errors escape as they are."""
    import soxr

    show = display_uri(uri)
    with contextlib.ExitStack() as stack:
        sf, guard, codec = _open_decoder(uri, o, stack)
        rate, channels = int(sf.samplerate), int(sf.channels)
        frames = int(sf.frames) if 0 < sf.frames < _SF_COUNT_MAX else None
        check_sample_rate(rate, uri=uri)
        truncation = truncation_in_log(sf.extra_info)
        if truncation:
            raise AudioError(f"{show} is truncated: {truncation}", stage="decode", reason="truncated")
        info = SourceInfo(sample_rate=rate, channels=channels, frames=frames, codec=codec)
        # MP3 lengths are estimates (from the file size when there is no Xing header, so a tag at
        # the end inflates them): a shortfall there is not evidence of truncation.
        exact_length = frames is not None and sf.format != "MP3"

        start = int(round(o.offset_seconds * rate)) if o.offset_seconds else 0
        stop = None if o.duration_seconds is None else start + max(1, int(round(o.duration_seconds * rate)))
        if frames is not None:
            if start > 0 and start >= frames:
                raise _past_end(uri, o.offset_seconds, frames / rate)
            end = frames if stop is None else min(stop, frames)
            if o.max_seconds is not None and (end - start) / rate > o.max_seconds:
                # ffmpeg output is cut one second past the limit: its length is a lower bound
                raise _too_long(uri, (end - start) / rate, o.max_seconds, known=guard is not None)
        if start:
            _seek(sf, guard, start, uri=uri)

        block = max(1, min(int(round(o.block_seconds * rate)), _MAX_BLOCK_SAMPLES // channels))
        buffer = np.empty((block, channels), dtype=np.float32)
        resampler = None
        if rate != o.sample_rate:
            resampler = soxr.ResampleStream(rate, o.sample_rate, 1, dtype="float32", quality="HQ")
        expected = None if frames is None else (frames if stop is None else min(stop, frames)) - start
        capacity = int(math.ceil(expected * o.sample_rate / rate)) + 64 if expected is not None else 0
        output = _Output(size=o.segment_samples, min_samples=o.min_samples, capacity=capacity)
        limit = None if o.max_seconds is None else int(math.floor(o.max_seconds * rate))
        decoded, info_sent = 0, False

        while True:
            want = block if stop is None else min(block, stop - start - decoded)
            count, error = _read_block(sf, buffer, want) if want > 0 else (0, None)
            if guard is not None:
                guard.check(uri)
            if error:
                where = f"at {(start + decoded + count) / rate:.3f} s"
                if exact_length and start + decoded + count < frames:
                    raise AudioError(
                        f"{show} is truncated: decoding stopped {where} of the {frames / rate:.3f} s the header "
                        f"declares (libsndfile: {error})",
                        stage="decode",
                        reason="truncated",
                    )
                raise AudioError(f"cannot decode {show} {where}: libsndfile: {error}", stage="decode", reason="undecodable")
            if count == 0:
                break
            samples = buffer[:count]
            finite = np.isfinite(samples)
            if not finite.all():
                first = int(np.argmin(finite.all(axis=1)))
                raise AudioError(
                    f"{show} holds {int((~finite).sum())} non-finite samples (NaN or Inf) in this block, the first at "
                    f"{(start + decoded + first) / rate:.3f} s; the file is corrupt or was written from broken float data",
                    stage="condition",
                    reason="non_finite",
                )
            decoded += count
            if limit is not None and decoded > limit:
                raise _too_long(uri, decoded / rate, o.max_seconds, known=False)
            mono = mix_to_mono(samples)
            out = resampler.resample_chunk(mono) if resampler is not None else mono
            for segment in output.push(out):
                if not info_sent:
                    info_sent = True
                    yield info
                yield segment

        if decoded == 0:
            if start > 0:
                raise _past_end(uri, o.offset_seconds, None)
            message = f"{show} decodes to zero samples (the header is valid but holds no audio)"
            raise AudioError(message, stage="decode", reason="no_samples")
        if exact_length and start + decoded < (frames if stop is None else min(stop, frames)):
            raise AudioError(
                f"{show} is truncated: the header declares {frames} frames ({frames / rate:.3f} s) but the data "
                f"ends after {start + decoded} ({(start + decoded) / rate:.3f} s)",
                stage="decode",
                reason="truncated",
            )
        tail = np.zeros(0, dtype=np.float32)
        if resampler is not None:  # flush the filter's delay line
            tail = resampler.resample_chunk(tail, last=True)
        if output.total + len(tail) < o.min_samples:
            raise AudioError(
                f"{show} gives {output.total + len(tail)} samples at {o.sample_rate} Hz ({decoded} at the source's {rate} Hz), "
                f"fewer than the {o.min_samples} required",
                stage="condition",
                reason="too_short",
            )
        for segment in output.finish(tail):
            if not info_sent:
                info_sent = True
                yield info
            yield segment


def _past_end(uri: str, offset: float | None, duration: float | None) -> AudioError:
    length = f"the file is {duration:.3f} s long" if duration is not None else "the file ends before it"
    return AudioError(
        f"{display_uri(uri)}: offset {offset} s is past the end ({length}); fix the manifest row",
        stage="condition",
        reason="offset_past_end",
    )


def _seek(sf, guard: _GuardedReader | None, frame: int, *, uri: str):
    """Seek to `frame`; when the decoder cannot seek, read and drop frames up to it instead."""
    import soundfile

    try:
        sf.seek(frame)
        if guard is not None:
            guard.check(uri)
        return
    except soundfile.LibsndfileError:
        if guard is not None:
            guard.check(uri)
    # A failed sf_seek leaves the decoder where it was: at frame 0, just opened.
    scratch = np.empty((min(frame, 1 << 16), sf.channels), dtype=np.float32)
    left = frame
    while left > 0:
        count, _ = _read_block(sf, scratch, min(left, len(scratch)))
        if guard is not None:
            guard.check(uri)
        if count == 0:
            break
        left -= count


def stream_conditioned(
    uri: str | bytes,
    *,
    sample_rate: int,
    segment_samples: int | None,
    offset_seconds: float | None = None,
    duration_seconds: float | None = None,
    max_seconds: float | None = 4 * 3600.0,
    block_seconds: float = 10.0,
    min_samples: int = 1,
    tries: int = 5,
    retry_base_delay: float = 0.5,
) -> Iterator[SourceInfo | Segment]:
    """Decode and condition one item as a stream: one `SourceInfo`, then `Segment`s in order.

    uri: local path (str, or bytes for a non-UTF-8 name), file:// or gs:// URI.
    sample_rate: target rate in Hz; every segment is mono float32 at this rate (soxr HQ; the
    concatenated segments equal a one-shot `soxr.resample` of the whole mono excerpt).
    segment_samples: window length at the target rate; the last window may be shorter. None
    yields the whole item as one segment, holding it in memory (bounded by `max_seconds`).
    offset_seconds / duration_seconds: the excerpt to keep (a manifest row's offset/duration).
    max_seconds: longest excerpt accepted, checked from the header when it declares a length
    and while decoding otherwise; None disables the check.
    block_seconds: source audio decoded per step (capped at 16 MiB of float32 per block).
    min_samples: fewest samples at the target rate an item may have.
    tries / retry_base_delay: for transient read errors (`featurebeam.retry`): an item is
    restarted from scratch while nothing has been yielded yet (SourceInfo is held back until
    the first segment is ready, so a whole-item decode is fully retried).

    Raises AudioError with stage/reason: read: not_found, permission_denied, is_a_directory,
    unreadable, transient_read_failed, read_interrupted; decode: empty, undecodable, truncated,
    no_samples, bad_sample_rate; condition: non_finite, too_long, offset_past_end, too_short,
    bad_excerpt. With `segment_samples` set, a failure found late in the file (truncation,
    NaN, too_long on a header without a length) is raised after earlier segments were yielded.
    """
    if isinstance(uri, bytes):
        uri = os.fsdecode(uri)
    options = _Options(sample_rate, segment_samples, offset_seconds, duration_seconds, max_seconds, block_seconds, min_samples)
    _check_options(options, uri=uri)
    show = display_uri(uri)

    def start():
        stream = _stream_once(uri, options)
        try:
            return stream, next(stream)
        except BaseException:
            stream.close()
            raise

    try:
        stream, first = call_with_retries(start, what=f"read {show}", tries=tries, base_delay=retry_base_delay)
    except AudioError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise AudioError(
            f"cannot read {show}: {tries} tries all failed with transient errors, the last {type(exc).__name__}: {exc}; "
            "the store is overloaded or unreachable, rerun the items later",
            stage="read",
            reason="transient_read_failed",
        ) from exc
    with contextlib.closing(stream):
        yield first
        try:
            yield from stream
        except AudioError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise AudioError(
                f"reading {show} was interrupted after segments were emitted ({type(exc).__name__}: {exc}); "
                "the item cannot restart without duplicating them, so it is dropped; rerun it",
                stage="read",
                reason="read_interrupted",
            ) from exc
