"""Decoding in a separate, long-lived process, so a crash in a native decoder costs one item.

libsndfile, libmpg123, libvorbis, libFLAC and ffmpeg are C code fed untrusted bytes. A segfault
or an endless loop in them would take down (or stall) the whole Beam worker with every bundle
in it. `IsolatedDecoder` runs `featurebeam.decoding.stream_conditioned` in a child process and
turns a child that dies into `AudioError(reason="decoder_crashed")` and a child that stops
talking into `AudioError(reason="decoder_timeout")`, then starts a fresh child for the next item.

The child is also a trust boundary. A crafted file that exploits a codec runs its code in the
child, and the worker holds the job's credentials; so the worker takes data, never code, from
the child. Each message is a fixed prefix (magic, kind, header length, payload length), a
header (a fixed struct for a SourceInfo, a segment or an item's end; JSON for the rare rest) and,
for a segment, its raw little-endian float32 samples: nothing is unpickled. The worker checks
every length before it reads (a header of at most `MAX_HEADER_BYTES`, a segment of at most what
the request allows: `segment_samples`, or the item's length limit) and every value (types,
ranges, the item it answers, segments in order). A message that fails a check becomes
`AudioError(reason="decoder_protocol")` for the item being read, and the child is replaced. An
unexpected exception in the child arrives as its type name, message and traceback text; only
featurebeam's own error classes are rebuilt by name (a ConfigError stays a ConfigError), any
other type becomes a RuntimeError. The worker's requests to the child are JSON too.

The child is `python -m featurebeam.isolation`, started with subprocess and spoken to over its
stdin/stdout. Why not multiprocessing "spawn": spawn re-imports the parent's `__main__` in the
child, and in a pipeline that module imports TensorFlow (seconds of start-up and hundreds of MB
per worker); with subprocess the child imports exactly this module, numpy, soundfile, soxr and
Beam's file systems. It also makes the child's exit status (a negative signal number) explicit.

Tests crash or hang the child with `featurebeam.faults` directives (`segfault:`, `hang:`),
which a child obeys only when a test turned fault injection on in it (see that module).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import inspect
import io
import json
import math
import numbers
import os
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from featurebeam import errors, faults
from featurebeam.deadletter import STAGES
from featurebeam.decoding import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Segment, SourceInfo, stream_conditioned
from featurebeam.errors import AudioError

# Every message is this prefix (magic, kind, header bytes, payload bytes), a header, a payload.
# Kinds: b"S" a SourceInfo (header `_SOURCE`; payload: the codec's name, UTF-8), b"G" a segment
# (header `_SEGMENT`; payload: its samples, little-endian float32), b"E" the end of an item
# (header `_END`), b"J" a JSON object (the child's "ready" and errors, the worker's requests).
# The frequent messages are fixed structs: unpacking and checking them costs less than a pickle.
_PREFIX = struct.Struct("<4scIQ")
_MAGIC = b"FBd2"
_SOURCE = struct.Struct("<QIIq")  # item, sample rate, channels, frames (-1: unknown)
_SEGMENT = struct.Struct("<QQB")  # item, start, flags
_END = struct.Struct("<Q")  # item
_LAST, _SILENT = 1, 2  # a segment's flags
# The longest JSON header the worker reads. The child clips the text it sends (an error's
# message and traceback, `_MAX_TEXT` characters each, at most 6 bytes each as escaped JSON).
MAX_HEADER_BYTES = 256 << 10
_MAX_TEXT = 16 << 10
_MAX_NAME = 256  # bytes of a codec's name, characters of an exception's type name
_MAX_CHANNELS = 65535  # WAV's channel count is 16 bits
# Samples in one whole-item segment when the request sets no bound on its length (no
# segment_samples, max_seconds=None, no duration): 2**32 float32, 16 GiB (74 h at 16 kHz).
_UNBOUNDED_FRAMES = 1 << 32
_SAMPLE = np.dtype("<f4")
_CHUNK = 1 << 20
# The child's output pipe is widened to this (Linux's default limit for a user): fewer, larger
# reads for the thread that drains it.
_PIPE_BYTES = 1 << 20
# Decoded audio the worker side keeps read ahead of the stream being consumed (`_Reader`), so the
# child decodes the items sent ahead (`IsolatedDecoder.prefetch`) while the worker extracts.
READ_AHEAD_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------
# Framing shared by both sides


def _json_number(value: Any) -> int | float:
    # A request's numbers may be NumPy scalars (from a manifest or a config).
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"a {type(value).__name__} cannot be sent to the decoder process")


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_json_number)


def _message(kind: bytes, header: bytes, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    size = memoryview(payload).nbytes
    parts: list[bytes | memoryview] = [_PREFIX.pack(_MAGIC, kind, len(header), size) + header]
    if size:
        parts.append(payload)
    return parts


def _json_message(obj: dict) -> list[bytes | memoryview]:
    return _message(b"J", _ENCODER.encode(obj).encode("ascii"))


def _write_all(fd: int, parts: list[bytes | memoryview]):
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            written = os.write(fd, view[:_CHUNK])
            view = view[written:]


class _Closed(Exception):
    """The other side closed the pipe between two messages."""


class _Silent(Exception):
    """Nothing arrived within the timeout."""


class _ProtocolError(Exception):
    """The other side sent something that is not a valid message; the text says what."""


class _Truncated(_ProtocolError):
    """The other side's output ended in the middle of a message."""


def _read_into(stream: io.RawIOBase, view: memoryview, timeout: float | None, on_data=None) -> int:
    """Fill `view` from `stream`; `timeout` is the longest wait for the next byte, None forever.
    on_data: called after each read that brought bytes. Returns len(view); at the end of the
    stream raises _Closed when nothing was read, else _Truncated."""
    pos = 0
    while pos < len(view):
        if timeout is not None:
            ready, _, _ = select.select([stream], [], [], timeout)
            if not ready:
                raise _Silent()
        count = stream.readinto(view[pos : pos + _CHUNK])
        if not count:
            if pos:
                raise _Truncated(f"a message cut short (the output ended {pos} bytes into a {len(view)}-byte part of it)")
            raise _Closed()
        pos += count
        if on_data is not None:
            on_data()
    return pos


def _read_message(
    stream: io.RawIOBase, timeout: float | None, on_data, check: Callable[[bytes, bytearray, int], tuple]
) -> tuple[tuple, bytearray | None, int]:
    """Read one message: (what `check(kind, header, payload_bytes)` made of it, its payload or
    None, its size in bytes). `check` raises _ProtocolError before the payload is allocated."""
    prefix = bytearray(_PREFIX.size)
    _read_into(stream, memoryview(prefix), timeout, on_data)
    magic, kind, header_size, payload_size = _PREFIX.unpack(prefix)
    try:
        if magic != _MAGIC:
            raise _ProtocolError(f"a message that does not start with {_MAGIC!r} (it starts with {bytes(magic)!r})")
        if header_size > MAX_HEADER_BYTES:
            raise _ProtocolError(f"a header of {header_size} bytes, above the limit of {MAX_HEADER_BYTES}")
        header = bytearray(header_size)
        _read_into(stream, memoryview(header), timeout, on_data)
        checked = check(kind, header, payload_size)
        payload = None
        if payload_size:
            payload = bytearray(payload_size)
            _read_into(stream, memoryview(payload), timeout, on_data)
    except _Closed:  # mid-message: the prefix arrived
        raise _Truncated("a message cut short (the output ended within it)") from None
    return checked, payload, _PREFIX.size + header_size + payload_size


def _json(header: bytearray) -> Any:
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise _ProtocolError(f"a header that is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


# --------------------------------------------------------------------------------------------
# What the worker accepts from the child


# The JSON replies, with their fields besides "kind".
_JSON_REPLIES = {
    "ready": (),
    "audio_error": ("item", "stage", "reason", "message"),
    "error": ("item", "type", "message", "traceback"),
}
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
# Exceptions of the child rebuilt as their own class (by qualified name); any other is a RuntimeError.
_REBUILT = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (errors.FeaturebeamError, errors.ConfigError, errors.DatasetError, errors.FeatureError,
                errors.OutputError, errors.SchemaError)
}


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # not bool, not float


def _is_text(value: Any, limit: int) -> bool:
    return type(value) is str and len(value) <= limit


def _check_reply(kind: bytes, header: bytearray, payload_size: int, limits: dict[int, int]) -> tuple:
    """What a reply announces, once every field has the type and range it must have:
    ("ready",), ("source", item, rate, channels, frames) (the codec's name follows),
    ("segment", item, start, last, silent) (the samples follow), ("end", item),
    ("audio_error", item, AudioError), ("error", item, exception).

    limits: the items requested and not finished, each with the most samples a segment of it may
    hold. Raises _ProtocolError naming what is wrong.
    """
    fixed = {b"S": _SOURCE, b"G": _SEGMENT, b"E": _END}.get(kind)
    if fixed is not None:
        if len(header) != fixed.size:
            raise _ProtocolError(f"a reply of kind {kind!r} with a header of {len(header)} bytes, not {fixed.size}")
        fields = fixed.unpack(header)
        item = fields[0]
        if item not in limits:
            raise _ProtocolError(f"a reply of kind {kind!r} for item {item}, which was not requested")
        if kind == b"S":
            _, rate, channels, frames = fields
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise _ProtocolError(f"a SourceInfo with a sample rate of {rate} Hz")
            if not 1 <= channels <= _MAX_CHANNELS:
                raise _ProtocolError(f"a SourceInfo with {channels} channels")
            if frames < -1:
                raise _ProtocolError(f"a SourceInfo with {frames} frames")
            if payload_size > _MAX_NAME:
                raise _ProtocolError(f"a codec name of {payload_size} bytes, above the limit of {_MAX_NAME}")
            return ("source", item, rate, channels, None if frames == -1 else frames)
        if kind == b"G":
            _, start, flags = fields
            if start > 2**62 or flags & ~(_LAST | _SILENT):
                raise _ProtocolError(f"a segment with start {start} and flags {flags}")
            if payload_size % _SAMPLE.itemsize:
                raise _ProtocolError(f"a segment of {payload_size} bytes, not a whole number of float32 samples")
            frames = payload_size // _SAMPLE.itemsize
            if frames > limits[item]:
                raise _ProtocolError(f"a segment of {frames} samples, above the {limits[item]} its request allows")
            return ("segment", item, start, bool(flags & _LAST), bool(flags & _SILENT))
        if payload_size:
            raise _ProtocolError(f"the end of item {item} followed by {payload_size} bytes")
        return ("end", item)
    if kind != b"J":
        raise _ProtocolError(f"a message of unknown kind {bytes(kind)!r}")
    if payload_size:
        raise _ProtocolError(f"a JSON reply followed by {payload_size} bytes")
    obj = _json(header)
    name = obj.get("kind") if isinstance(obj, dict) else None
    if type(name) is not str or name not in _JSON_REPLIES:
        raise _ProtocolError(f"a JSON header that is not a reply: {_shown(obj)}")
    if set(obj) != {"kind", *_JSON_REPLIES[name]}:
        raise _ProtocolError(f"a reply of kind {name!r} with the fields {sorted(obj)}, not {sorted({'kind', *_JSON_REPLIES[name]})}")
    if name == "ready":
        return ("ready",)
    item = obj["item"]
    if type(item) is not int or item not in limits:
        raise _ProtocolError(f"a reply of kind {name!r} for item {_shown(item)}, which was not requested")

    def bad(field: str) -> _ProtocolError:
        return _ProtocolError(f"a reply of kind {name!r} whose {field} is {_shown(obj[field])}")

    if not _is_text(obj["message"], _MAX_TEXT):
        raise bad("message")
    if name == "audio_error":
        if obj["stage"] not in STAGES:
            raise bad("stage")
        if type(obj["reason"]) is not str or not _REASON.fullmatch(obj["reason"]):
            raise bad("reason")
        return ("audio_error", item, AudioError(obj["message"], stage=obj["stage"], reason=obj["reason"]))
    if not _is_text(obj["type"], _MAX_NAME) or not _TYPE_NAME.fullmatch(obj["type"]):
        raise bad("type")
    if not _is_text(obj["traceback"], _MAX_TEXT):
        raise bad("traceback")
    return ("error", item, _rebuild(obj["type"], obj["message"], obj["traceback"]))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rebuild(type_name: str, text: str, trace: str) -> BaseException:
    """The child's unexpected exception: featurebeam's own error classes by name, else a
    RuntimeError naming the type; the child's traceback is added as a note."""
    cls = _REBUILT.get(type_name)
    exc: BaseException = cls(text) if cls is not None else RuntimeError(f"{type_name}: {text}")
    exc.add_note(f"raised in the isolated decoder process:\n{trace}")
    return exc


def _read_reply(stream: io.RawIOBase, timeout: float | None, on_data, limits: dict[int, int]) -> tuple[tuple, int]:
    """The next reply of the child, checked, and its size in bytes."""
    checked, payload, size = _read_message(stream, timeout, on_data, lambda *message: _check_reply(*message, limits))
    if checked[0] == "segment":
        _, item, start, last, silent = checked
        # The samples stay in the buffer they were read into: no copy.
        samples = np.frombuffer(payload, dtype=_SAMPLE) if payload is not None else np.zeros(0, np.float32)
        return ("segment", item, Segment(start=start, samples=samples, last=last, silent=silent)), size
    if checked[0] == "source":
        _, item, rate, channels, frames = checked
        try:
            codec = bytes(payload or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise _ProtocolError(f"a codec name that is not UTF-8: {_shown(bytes(payload))}") from None
        return ("source", item, SourceInfo(sample_rate=rate, channels=channels, frames=frames, codec=codec)), size
    return checked, size


class _ItemOrder:
    """What may come for one item, in order: its SourceInfo, segments that follow each other,
    the end after the last one; an error at any point."""

    def __init__(self, item: int):
        self.item = item
        self.state = "info"  # then "segments", then "done"
        self.next_start = 0

    def take(self, message: tuple) -> tuple[str, Any]:
        kind = message[0]
        if kind == "ready" or message[1] != self.item:
            which = "" if kind == "ready" else f" for item {message[1]}"
            raise _ProtocolError(f"a reply of kind {kind!r}{which} while item {self.item} was due")
        if kind == "source":
            if self.state != "info":
                raise _ProtocolError("a second SourceInfo for one item")
            self.state = "segments"
            return kind, message[2]
        if kind == "segment":
            segment = message[2]
            if self.state != "segments":
                raise _ProtocolError("a segment before its SourceInfo" if self.state == "info" else "a segment after the last one")
            if segment.start != self.next_start:
                raise _ProtocolError(f"a segment starting at sample {segment.start}, not {self.next_start}")
            self.next_start += len(segment.samples)
            if segment.last:
                self.state = "done"
            return kind, segment
        if kind == "end" and self.state != "done":
            raise _ProtocolError("the end of an item before its last segment")
        return kind, message[2] if len(message) > 2 else None


def _max_frames(kwargs: dict[str, Any]) -> int:
    """The most samples one segment of the request `kwargs` (of `stream_conditioned`) can hold."""
    size = kwargs.get("segment_samples")
    if size is not None:
        return int(size) if isinstance(size, numbers.Integral) and size > 0 else 0
    rate = kwargs.get("sample_rate")
    rate = rate if isinstance(rate, numbers.Integral) and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE else MAX_SAMPLE_RATE
    bounds = [kwargs.get("max_seconds", _DEFAULT_MAX_SECONDS), kwargs.get("duration_seconds")]
    seconds = [s for s in bounds if isinstance(s, numbers.Real) and math.isfinite(s) and s > 0]
    if not seconds:
        return _UNBOUNDED_FRAMES
    # The decoder stops past the bound at the source rate; resampling adds its filter's delay.
    return min(_UNBOUNDED_FRAMES, int(math.ceil(min(seconds) * rate * 1.01)) + 4096)


_DEFAULT_MAX_SECONDS = inspect.signature(stream_conditioned).parameters["max_seconds"].default


class _Reader:
    """Drains a child's output pipe on a thread, so the child never waits for the worker to read:
    replies are checked and kept in order, at most `limit` bytes of them (plus the one being read).

    What the child wrote before it died is all read before the end is reported, so a crash is
    still the item that was being decoded: the order of replies is the order of the pipe. So is
    a reply that breaks the protocol: after it nothing more is read (the stream has lost its
    framing), and it is reported, again and again, where it stands in the order.

    limits: shared with the decoder, which adds each item before it sends its request.
    """

    _END = object()

    def __init__(self, stream: io.RawIOBase, limit: int, limits: dict[int, int]):
        self.stream = stream
        self.limit = limit
        self.limits = limits
        self.frames: collections.deque[tuple[Any, int]] = collections.deque()
        self.held = 0  # bytes of the replies not yet taken
        self.last_data = time.monotonic()  # when bytes last arrived
        self.stopped = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._drain, name="featurebeam-decoder-reader", daemon=True)
        self.thread.start()

    def _arrived(self):
        self.last_data = time.monotonic()

    def _drain(self):
        try:
            while True:
                with self.changed:
                    while self.held >= self.limit and not self.stopped:
                        self.changed.wait()
                    if self.stopped:
                        return
                try:
                    frame = _read_reply(self.stream, None, self._arrived, self.limits)
                except _ProtocolError as exc:
                    frame = (exc, 0)
                with self.changed:
                    self.frames.append(frame)
                    self.held += frame[1]
                    self.changed.notify_all()
                if isinstance(frame[0], _ProtocolError):
                    return
        except (_Closed, OSError, ValueError):  # EOF, or the pipe closed under us
            pass
        finally:
            with self.changed:
                self.frames.append((self._END, 0))
                self.changed.notify_all()

    def get(self, timeout: float) -> tuple:
        """The next reply; _Closed once the child's output ended, the _ProtocolError of a reply
        that broke the protocol, _Silent when nothing arrived for `timeout` seconds while waiting."""
        waiting_since = time.monotonic()
        with self.changed:
            while not self.frames:
                quiet_since = max(waiting_since, self.last_data)
                remaining = timeout - (time.monotonic() - quiet_since)
                if remaining <= 0:
                    raise _Silent()
                self.changed.wait(min(remaining, 1.0))
            message, size = self.frames[0]
            if message is self._END:
                raise _Closed()  # kept: every later call says the same
            if isinstance(message, _ProtocolError):
                raise message  # kept too
            self.frames.popleft()
            self.held -= size
            self.changed.notify_all()
            return message

    def stop(self):
        """Ask the thread to end (it does once the pipe ends, or at once when it waits for room)."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()


# --------------------------------------------------------------------------------------------
# Parent side


class IsolatedDecoder:
    """`stream_conditioned` in a long-lived child process.

        with IsolatedDecoder(timeout_seconds=600) as decoder:
            for part in decoder.stream(uri, sample_rate=16000, segment_samples=160000):
                ...

    `stream(uri, **kwargs)` takes the keyword arguments of `decoding.stream_conditioned` and
    yields the same SourceInfo and Segment objects; an AudioError raised in the child is raised
    here with the same stage, reason and message. If the child dies mid-item the stream raises
    AudioError(stage="decode", reason="decoder_crashed") naming the signal; if it sends nothing
    for `timeout_seconds` it is killed and the stream raises reason "decoder_timeout"; if it
    sends a message that is malformed, oversized or out of order, it is killed and the stream
    raises reason "decoder_protocol". Each way the next `stream` call starts a new child.
    Stopping a stream early also kills the child (it is mid-item and cannot be interrupted
    cleanly); the next call starts a new one.

    timeout_seconds: longest silence while an item decodes (a segment of a slow gs:// read
    counts as output). start_timeout_seconds: longest start-up (imports) of a child.
    env: extra environment variables for the child. imports: modules the child imports before
    decoding, e.g. one that registers a custom Beam FileSystem. max_ahead: most requests
    `prefetch` keeps sent ahead of the stream being read. read_ahead_bytes: most decoded bytes
    a thread of this process reads from the child ahead of the stream (plus one message: a
    segment, or a whole unsegmented item), so the child is never held up by a full pipe.

    One decoder serves one thread at a time; give each DoFn instance its own (in `setup()`) and
    call `close()` in `teardown()`.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float = 600.0,
        start_timeout_seconds: float = 120.0,
        env: dict[str, str] | None = None,
        imports: Sequence[str] = (),
        max_ahead: int = 256,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ):
        if not timeout_seconds > 0 or not start_timeout_seconds > 0:
            raise ValueError(f"timeouts must be positive, got {timeout_seconds!r} and {start_timeout_seconds!r}")
        self.timeout_seconds = float(timeout_seconds)
        self.start_timeout_seconds = float(start_timeout_seconds)
        self.env = dict(env or {})
        self.imports = tuple(imports)
        self._proc: subprocess.Popen | None = None
        self._reader: _Reader | None = None
        self.read_ahead_bytes = read_ahead_bytes
        self._busy = False
        # Requests sent by `prefetch` and not yet streamed, in the order the child takes them,
        # and the item number each was sent as.
        self._ahead: collections.deque[tuple[Any, dict]] = collections.deque()
        self._ahead_items: collections.deque[int] = collections.deque()
        self.max_ahead = max_ahead
        # Items sent to the running child and not finished, with the longest segment each may
        # have: the reader refuses a reply for any other item, or a longer segment.
        self._limits: dict[int, int] = {}
        self._next_item = 0  # never reused, so a stray reply cannot pass for another item's
        self.starts = 0  # children started so far, for metrics and tests

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None when no child is running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _command(self) -> list[str]:
        """The child's command line (tests put a misbehaving child in its place)."""
        return [sys.executable, "-m", "featurebeam.isolation", *self.imports]

    def start(self):
        """Start the child now (otherwise the first `stream` does), and wait until it is ready."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._reap()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: the decoders' warnings and a crash's traceback reach the worker log
            bufsize=0,
            close_fds=True,
            env=env,
        )
        self.starts += 1
        self._limits = {}
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower pipe limit: smaller pipes work too
            fcntl.fcntl(self._proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        try:
            message, _ = _read_reply(self._proc.stdout, self.start_timeout_seconds, None, self._limits)
        except (_Closed, _Silent) as exc:
            status = self._kill()
            what = "did not start in time" if isinstance(exc, _Silent) else f"exited during start-up ({_describe(status)})"
            raise RuntimeError(f"the isolated decoder process {what}; its stderr above says why") from None
        except _ProtocolError as exc:
            self._kill()
            raise RuntimeError(f"the isolated decoder process sent {exc} instead of 'ready'") from None
        if message != ("ready",):
            self._kill()
            raise RuntimeError(f"the isolated decoder process sent {message[0]!r} instead of 'ready'")
        self._reader = _Reader(self._proc.stdout, self.read_ahead_bytes, self._limits)

    def prefetch(self, upcoming: Sequence[tuple[Any, dict]]) -> None:
        """Send ahead the requests of the next `stream` calls, so the child decodes those items
        while this process does other work (reading the open stream, the extractors and commits
        of earlier items) and a `stream` call finds its item decoded or under way.

        upcoming: `(uri, kwargs)` of the items that will be streamed next, in order, the first
        after the open stream (or the next one). Requests already ahead must be their first ones;
        then the rest, up to `max_ahead` in all, are sent. The child takes requests in order, so
        whatever it does once the items before have been read is that item's: a crash, a hang
        or a broken message becomes its dead letter when it is streamed. A child that dies drops
        what was sent ahead, and a `stream` of another item than the first one ahead starts a
        fresh child; the requests are sent again as usual. Memory stays bounded by bytes: this
        process reads at most `read_ahead_bytes` (plus one message) ahead, and the child holds at
        most one decoded item (one segment when segmenting) and what the pipe buffers.
        """
        sent = len(self._ahead)
        # Called once per item with the same request objects: equal by identity, so this check
        # costs little even with hundreds ahead.
        if list(upcoming[:sent]) != list(self._ahead):
            return  # not what was sent: the next stream call sorts it out
        for request in upcoming[sent : self.max_ahead]:
            uri, kwargs = request
            try:
                item = self._send_request(uri, kwargs)
            except (BrokenPipeError, OSError):
                return  # the stream call sends it again
            self._ahead.append(request)
            self._ahead_items.append(item)

    @property
    def ahead(self) -> int:
        """How many requests are sent ahead of the stream calls."""
        return len(self._ahead)

    def stream(self, uri: str | bytes, **kwargs: Any) -> Iterator[Any]:
        """Yield what `decoding.stream_conditioned(uri, **kwargs)` yields, decoded in the child."""
        from featurebeam.decoding import display_uri

        if self._busy:
            raise RuntimeError("IsolatedDecoder.stream: another stream of this decoder is still open; finish or close it first")
        self._busy = True
        show = display_uri(uri)
        finished = False
        try:
            # Requests ahead imply a live child: `_kill` drops them with it.
            if self._ahead and self._ahead[0] == (uri, kwargs):
                self._ahead.popleft()
                item = self._ahead_items.popleft()
            else:
                if self._ahead:
                    self._kill()  # the child works on other items than this one: start afresh
                item = self._send_request(uri, kwargs)
            order = _ItemOrder(item)
            while True:
                try:
                    kind, part = order.take(self._receive(show))
                except _ProtocolError as exc:
                    raise self._broken(exc, show) from None
                if kind in ("source", "segment"):
                    yield part
                    continue
                finished = True
                self._limits.pop(item, None)
                if kind == "end":
                    return
                raise part  # the item's AudioError, or the child's unexpected exception
        finally:
            self._busy = False
            if not finished:
                self._kill()  # mid-item (stopped early, crashed, timed out, broken): the next call starts afresh

    def _send_request(self, uri: str | bytes, kwargs: dict[str, Any]) -> int:
        """Send one stream request (starting a child if none runs); returns its item number."""
        request = {"kind": "stream", "uri": os.fsdecode(uri) if isinstance(uri, bytes) else uri, "kwargs": kwargs}
        for attempt in (1, 2):
            self.start()
            item = request["item"] = self._next_item
            self._next_item += 1
            self._limits[item] = _max_frames(kwargs)  # before the child can answer
            try:
                _write_all(self._proc.stdin.fileno(), _json_message(request))
                return item
            except (BrokenPipeError, OSError):
                self._kill()  # died while idle (e.g. killed by the OOM killer): once more, fresh
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _receive(self, show: str) -> tuple:
        try:
            return self._reader.get(self.timeout_seconds)
        except _Silent:
            pid = self._proc.pid
            self._kill()
            raise AudioError(
                f"the decoder process (pid {pid}) sent nothing for {self.timeout_seconds:g} s while decoding {show}; "
                "it was killed (a decoder stuck on this file, or a stalled read); raise the decoder timeout if "
                "items are legitimately this slow",
                stage="decode",
                reason="decoder_timeout",
            ) from None
        except _Closed:
            pid = self._proc.pid
            status = self._kill(grace=5.0)
            raise self._crashed(pid, status, show) from None

    @staticmethod
    def _crashed(pid: int, status: int | None, show: str) -> AudioError:
        return AudioError(
            f"the decoder process (pid {pid}) {_describe(status)} while decoding {show}; a native decoder "
            "crashed on this file, which is skipped; the next item gets a fresh decoder",
            stage="decode",
            reason="decoder_crashed",
        )

    def _broken(self, exc: _ProtocolError, show: str) -> AudioError:
        """Kill a child that broke the protocol; the item's AudioError (decoder_crashed when its
        output was cut off by a signal, which is a crash)."""
        pid = self._proc.pid
        status = self._kill(grace=5.0 if isinstance(exc, _Truncated) else 0.0)
        if isinstance(exc, _Truncated) and status is not None and status < 0:
            return self._crashed(pid, status, show)
        return AudioError(
            f"the decoder process (pid {pid}) sent {exc} while decoding {show}; nothing of it was used, the "
            "process was replaced and the file is skipped (a decoder taken over by a crafted file can do this)",
            stage="decode",
            reason="decoder_protocol",
        )

    def _kill(self, grace: float = 0.0) -> int | None:
        """Stop and reap the child (no zombie); returns its exit status."""
        self._ahead.clear()  # requests sent ahead die with the child
        self._ahead_items.clear()
        proc, self._proc = self._proc, None
        reader, self._reader = self._reader, None
        if proc is None:
            return None
        if reader is not None:
            reader.stop()
        if grace:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        if reader is not None:
            reader.thread.join(timeout=5.0)  # the pipe ended with the child; then its fd can close
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        return status

    def _reap(self):
        if self._proc is not None:
            self._kill()

    def close(self):
        """Ask the child to exit, reap it; kill it if it does not exit within 5 s."""
        proc = self._proc
        if proc is None:
            return
        if self._ahead:  # mid-item on a request sent ahead: it would not exit in time
            self._kill()
            return
        if proc.poll() is None and not self._busy:
            with contextlib.suppress(OSError):
                _write_all(proc.stdin.fileno(), _json_message({"kind": "close"}))
                proc.stdin.close()
        self._kill(grace=5.0)

    def __enter__(self) -> "IsolatedDecoder":
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self._kill()


def _describe(status: int | None) -> str:
    if status is None:
        return "exited"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"died from {name} (signal {-status})"
    return f"exited with status {status}"


# --------------------------------------------------------------------------------------------
# Child side


def _watch_parent(parent: int):
    """Exit when the parent is gone, even if a decoder is stuck: nobody would ever reap us."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _request(kind: bytes, header: bytearray, payload_size: int) -> tuple:
    # The parent is trusted; a message it did not mean to send ends this process all the same.
    request = _json(header) if kind == b"J" and not payload_size else None
    if not isinstance(request, dict) or request.get("kind") not in ("stream", "close"):
        raise _ProtocolError(f"a request that is not one: {_shown(request)}")
    return (request,)


def _take_requests(requests: io.RawIOBase, pending: "queue.SimpleQueue") -> None:
    try:
        while True:
            (request,), _, _ = _read_message(requests, None, None, _request)
            pending.put(request)
            if request["kind"] == "close":
                return
    except (_Closed, _ProtocolError, OSError):
        pending.put({"kind": "close"})  # the parent closed our input: exit like on "close"


def _clip(text: str, *, tail: bool = False) -> str:
    """At most _MAX_TEXT characters of `text` (the end of a traceback says the most)."""
    if len(text) <= _MAX_TEXT:
        return text
    return "..." + text[-(_MAX_TEXT - 3) :] if tail else text[: _MAX_TEXT - 3] + "..."


def _reply_part(item: int, part: SourceInfo | Segment) -> list[bytes | memoryview]:
    if isinstance(part, SourceInfo):
        frames = -1 if part.frames is None else part.frames
        codec = part.codec.encode("utf-8", "backslashreplace")[:_MAX_NAME].decode("utf-8", "ignore").encode("utf-8")
        return _message(b"S", _SOURCE.pack(item, part.sample_rate, part.channels, frames), codec)
    samples = np.ascontiguousarray(part.samples, dtype=_SAMPLE)
    flags = (_LAST if part.last else 0) | (_SILENT if part.silent else 0)
    return _message(b"G", _SEGMENT.pack(item, part.start, flags), memoryview(samples).cast("B"))


def _child_main(imports: Sequence[str]) -> int:
    # The protocol gets private copies of stdin/stdout; fd 1 then points at stderr so that a
    # library printing to stdout cannot corrupt the messages, and fd 0 at /dev/null.
    requests = io.FileIO(os.dup(0), "rb")
    replies = os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    import importlib

    for name in imports:
        importlib.import_module(name)

    # Import the decoders now, so start-up (not the first item's timeout) pays for it. Beam's
    # file systems (about a second of imports) load with the first item that is not a local file.
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    # Requests are taken off the pipe as they come, so a worker sending many ahead never waits
    # for this process to finish an item (it may be waiting for room in the output pipe).
    pending: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_take_requests, args=(requests, pending), daemon=True).start()
    _write_all(replies, _json_message({"kind": "ready"}))
    while True:
        request = pending.get()
        if request["kind"] == "close":
            return 0
        item, uri = request["item"], request["uri"]
        try:
            first = True
            for part in stream_conditioned(uri, **request["kwargs"]):
                _write_all(replies, _reply_part(item, part))
                if first:
                    first = False
                    faults.decoded(uri)
            reply = None
        except AudioError as exc:
            reply = {"kind": "audio_error", "item": item, "stage": exc.stage, "reason": exc.reason, "message": _clip(str(exc))}
        except BrokenPipeError:
            return 1  # the parent stopped listening (it kills us right after)
        except Exception as exc:
            # Text only: the worker never unpickles what this process sends.
            reply = {"kind": "error", "item": item, "type": f"{type(exc).__module__}.{type(exc).__qualname__}"[:_MAX_NAME],
                     "message": _clip(str(exc)), "traceback": _clip(traceback.format_exc(), tail=True)}
        try:
            _write_all(replies, _message(b"E", _END.pack(item)) if reply is None else _json_message(reply))
        except BrokenPipeError:
            return 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
