"""Decoding in a separate, long-lived process, so a crash in a native decoder costs one item.

libsndfile, libmpg123, libvorbis, libFLAC and ffmpeg are C code fed untrusted bytes. A segfault
or an endless loop in them would take down (or stall) the whole Beam worker with every bundle
in it. `IsolatedDecoder` runs `featurebeam.decoding.stream_conditioned` in a child process and
turns a child that dies into `AudioError(reason="decoder_crashed")` and a child that stops
talking into `AudioError(reason="decoder_timeout")`, then starts a fresh child for the next item.

The child is `python -m featurebeam.isolation`, started with subprocess and spoken to over its
stdin/stdout with length-prefixed pickle frames (protocol 5, numpy data sent out of band, so a
segment is written once and read into its final buffer). Why not multiprocessing "spawn": spawn
re-imports the parent's `__main__` in the child, and in a pipeline that module imports
TensorFlow (seconds of start-up and hundreds of MB per worker); with subprocess the child imports
exactly this module, numpy, soundfile, soxr and Beam's file systems. It also makes the child's
exit status (a negative signal number) and its environment (for the fault hook) explicit.

Test hook, not for production: the child reads FEATUREBEAM_FAULT_INJECT, a comma-separated list
of "segfault:<substring>" and "hang:<substring>". For a URI containing the substring, the child
crashes with a real SIGSEGV (it reads address 0 through ctypes), or sleeps forever, right after
it has sent the item's SourceInfo, i.e. mid-item. The variable is read when a child starts.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Iterator, Sequence

from featurebeam import faults
from featurebeam.errors import AudioError

FAULT_ENV = faults.ENV  # shared with the kill:<point>:<n> directives of featurebeam/faults.py
_HEADER = struct.Struct("<QI")  # pickle length, number of out-of-band buffers
_LENGTH = struct.Struct("<Q")
_CHUNK = 1 << 20
# The child's output pipe is widened to this (Linux's default limit for a user): fewer, larger
# reads for the thread that drains it.
_PIPE_BYTES = 1 << 20
# Decoded audio the worker side keeps read ahead of the stream being consumed (`_Reader`), so the
# child decodes the items sent ahead (`IsolatedDecoder.prefetch`) while the worker extracts.
READ_AHEAD_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------
# Framing shared by both sides


def _frame(obj: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    parts: list[bytes | memoryview] = [_HEADER.pack(len(data), len(buffers)), data]
    for buffer in buffers:
        raw = buffer.raw()
        parts += [_LENGTH.pack(raw.nbytes), raw]
    return parts


def _write_all(fd: int, parts: list[bytes | memoryview]):
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            written = os.write(fd, view[:_CHUNK])
            view = view[written:]


class _Closed(Exception):
    """The other side closed the pipe."""


class _Silent(Exception):
    """Nothing arrived within the timeout."""


def _read_into(stream: io.RawIOBase, view: memoryview, timeout: float | None, on_data=None):
    """Fill `view` from `stream`; `timeout` is the longest wait for the next byte, None forever.
    on_data: called after each read that brought bytes."""
    pos = 0
    while pos < len(view):
        if timeout is not None:
            ready, _, _ = select.select([stream], [], [], timeout)
            if not ready:
                raise _Silent()
        count = stream.readinto(view[pos : pos + _CHUNK])
        if not count:
            raise _Closed()
        pos += count
        if on_data is not None:
            on_data()


def _read_frame(stream: io.RawIOBase, timeout: float | None, on_data=None) -> tuple[Any, int]:
    """(the next frame's object, its size in bytes)."""
    header = bytearray(_HEADER.size)
    _read_into(stream, memoryview(header), timeout, on_data)
    length, count = _HEADER.unpack(header)
    data = bytearray(length)
    _read_into(stream, memoryview(data), timeout, on_data)
    buffers = []
    for _ in range(count):
        size = bytearray(_LENGTH.size)
        _read_into(stream, memoryview(size), timeout, on_data)
        buffer = bytearray(_LENGTH.unpack(size)[0])
        _read_into(stream, memoryview(buffer), timeout, on_data)
        buffers.append(buffer)
    return pickle.loads(data, buffers=buffers), length + sum(len(b) for b in buffers)


class _Reader:
    """Drains a child's output pipe on a thread, so the child never waits for the worker to read:
    frames are kept in order, at most `limit` bytes of them (plus the one being read).

    What the child wrote before it died is all read before the end is reported, so a crash is
    still the item that was being decoded: the order of frames is the order of the pipe.
    """

    _END = object()

    def __init__(self, stream: io.RawIOBase, limit: int):
        self.stream = stream
        self.limit = limit
        self.frames: collections.deque[tuple[Any, int]] = collections.deque()
        self.held = 0  # bytes of the frames not yet taken
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
                frame = _read_frame(self.stream, None, self._arrived)
                with self.changed:
                    self.frames.append(frame)
                    self.held += frame[1]
                    self.changed.notify_all()
        except (_Closed, OSError, ValueError):  # EOF, or the pipe closed under us
            pass
        finally:
            with self.changed:
                self.frames.append((self._END, 0))
                self.changed.notify_all()

    def get(self, timeout: float) -> Any:
        """The next frame; _Closed once the child's output ended, _Silent when nothing arrived
        for `timeout` seconds while waiting."""
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
    for `timeout_seconds` it is killed and the stream raises reason "decoder_timeout". Either
    way the next `stream` call starts a new child. Stopping a stream early also kills the child
    (it is mid-item and cannot be interrupted cleanly); the next call starts a new one.

    timeout_seconds: longest silence while an item decodes (a segment of a slow gs:// read
    counts as output). start_timeout_seconds: longest start-up (imports) of a child.
    env: extra environment variables for the child. imports: modules the child imports before
    decoding, e.g. one that registers a custom Beam FileSystem. max_ahead: most requests
    `prefetch` keeps sent ahead of the stream being read. read_ahead_bytes: most decoded bytes
    a thread of this process reads from the child ahead of the stream (plus one frame: a
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
        # Requests sent by `prefetch` and not yet streamed, in the order the child takes them.
        self._ahead: collections.deque[tuple[Any, dict]] = collections.deque()
        self.max_ahead = max_ahead
        self.starts = 0  # children started so far, for metrics and tests

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None when no child is running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self):
        """Start the child now (otherwise the first `stream` does), and wait until it is ready."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._reap()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "featurebeam.isolation", *self.imports],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: the decoders' warnings and a crash's traceback reach the worker log
            bufsize=0,
            close_fds=True,
            env=env,
        )
        self.starts += 1
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower pipe limit: smaller pipes work too
            fcntl.fcntl(self._proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        try:
            message, _ = _read_frame(self._proc.stdout, self.start_timeout_seconds)
        except (_Closed, _Silent) as exc:
            status = self._kill()
            what = "did not start in time" if isinstance(exc, _Silent) else f"exited during start-up ({_describe(status)})"
            raise RuntimeError(f"the isolated decoder process {what}; its stderr above says why") from None
        if message != ("ready",):
            self._kill()
            raise RuntimeError(f"the isolated decoder process sent {message!r} instead of 'ready'")
        self._reader = _Reader(self._proc.stdout, self.read_ahead_bytes)

    def prefetch(self, upcoming: Sequence[tuple[Any, dict]]) -> None:
        """Send ahead the requests of the next `stream` calls, so the child decodes those items
        while this process does other work (reading the open stream, the extractors and commits
        of earlier items) and a `stream` call finds its item decoded or under way.

        upcoming: `(uri, kwargs)` of the items that will be streamed next, in order, the first
        after the open stream (or the next one). Requests already ahead must be their first ones;
        then the rest, up to `max_ahead` in all, are sent. The child takes requests in order, so
        whatever it does once the items before have been read is that item's: a crash or a hang
        becomes its dead letter when it is streamed. A child that dies drops what was sent
        ahead, and a `stream` of another item than the first one ahead starts a fresh child; the
        requests are sent again as usual. Memory stays bounded by bytes: this process reads at
        most `read_ahead_bytes` (plus one frame) ahead, and the child holds at most one decoded
        item (one segment when segmenting) and what the pipe buffers.
        """
        sent = len(self._ahead)
        # Called once per item with the same request objects: equal by identity, so this check
        # costs little even with hundreds ahead.
        if list(upcoming[:sent]) != list(self._ahead):
            return  # not what was sent: the next stream call sorts it out
        for request in upcoming[sent : self.max_ahead]:
            uri, kwargs = request
            try:
                self._send_request(("stream", uri, kwargs))
            except (BrokenPipeError, OSError):
                return  # the stream call sends it again
            self._ahead.append(request)

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
            else:
                if self._ahead:
                    self._kill()  # the child works on other items than this one: start afresh
                self._send_request(("stream", uri, kwargs))
            while True:
                message = self._receive(show)
                kind = message[0]
                if kind == "item":
                    yield message[1]
                    continue
                finished = True
                if kind == "end":
                    return
                if kind == "audio_error":
                    _, text, stage, reason = message
                    raise AudioError(text, stage=stage, reason=reason)
                if kind == "error":
                    raise _rebuild(message)
                raise RuntimeError(f"the isolated decoder sent an unknown message {kind!r}")
        finally:
            self._busy = False
            if not finished:
                self._kill()  # mid-item (stopped early, crashed or timed out): the next call starts afresh

    def _send_request(self, request: tuple):
        for attempt in (1, 2):
            self.start()
            try:
                _write_all(self._proc.stdin.fileno(), _frame(request))
                return
            except (BrokenPipeError, OSError):
                self._kill()  # died while idle (e.g. killed by the OOM killer): once more, fresh
                if attempt == 2:
                    raise

    def _receive(self, show: str) -> Any:
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
            raise AudioError(
                f"the decoder process (pid {pid}) {_describe(status)} while decoding {show}; a native decoder "
                "crashed on this file, which is skipped; the next item gets a fresh decoder",
                stage="decode",
                reason="decoder_crashed",
            ) from None

    def _kill(self, grace: float = 0.0) -> int | None:
        """Stop and reap the child (no zombie); returns its exit status."""
        self._ahead.clear()  # requests sent ahead die with the child
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
                _write_all(proc.stdin.fileno(), _frame(("close",)))
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


def _rebuild(message: tuple) -> BaseException:
    """The child's unexpected exception, unpickled when possible, with its traceback as a note."""
    _, pickled, type_name, text, trace = message
    exc: BaseException | None = None
    if pickled is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(pickled)
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"{type_name}: {text}")
    exc.add_note(f"raised in the isolated decoder process:\n{trace}")
    return exc


# --------------------------------------------------------------------------------------------
# Child side


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get(FAULT_ENV, "")
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, needle = entry.partition(":")
        if kind in ("segfault", "hang") and needle:
            faults.append((kind, needle))
    return faults


def _inject(uri: str | bytes, faults: list[tuple[str, str]]):
    text = os.fsdecode(uri) if isinstance(uri, bytes) else uri
    for kind, needle in faults:
        if needle in text:
            if kind == "segfault":
                import ctypes

                ctypes.string_at(0)  # a real SIGSEGV: reads address 0
            while True:  # hang
                time.sleep(3600)


def _watch_parent(parent: int):
    """Exit when the parent is gone, even if a decoder is stuck: nobody would ever reap us."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _take_requests(requests: io.RawIOBase, pending: "queue.SimpleQueue") -> None:
    try:
        while True:
            request, _ = _read_frame(requests, None)
            pending.put(request)
            if request[0] == "close":
                return
    except (_Closed, OSError):
        pending.put(("close",))  # the parent closed our input: exit like on "close"


def _child_main(imports: Sequence[str]) -> int:
    # The protocol gets private copies of stdin/stdout; fd 1 then points at stderr so that a
    # library printing to stdout cannot corrupt the frames, and fd 0 at /dev/null.
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
    from featurebeam.decoding import stream_conditioned

    # Import the decoders now, so start-up (not the first item's timeout) pays for it. Beam's
    # file systems (about a second of imports) load with the first item that is not a local file.
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    faults = _faults()
    # Requests are taken off the pipe as they come, so a worker sending many ahead never waits
    # for this process to finish an item (it may be waiting for room in the output pipe).
    pending: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_take_requests, args=(requests, pending), daemon=True).start()
    _write_all(replies, _frame(("ready",)))
    while True:
        request = pending.get()
        if request[0] == "close":
            return 0
        _, uri, kwargs = request
        try:
            first = True
            for part in stream_conditioned(uri, **kwargs):
                _write_all(replies, _frame(("item", part)))
                if first:
                    first = False
                    _inject(uri, faults)
            reply: tuple = ("end",)
        except AudioError as exc:
            reply = ("audio_error", str(exc), exc.stage, exc.reason)
        except BrokenPipeError:
            return 1  # the parent stopped listening (it kills us right after)
        except Exception as exc:
            try:
                pickled = pickle.dumps(exc)
            except Exception:
                pickled = None
            reply = ("error", pickled, type(exc).__name__, str(exc), traceback.format_exc())
        try:
            _write_all(replies, _frame(reply))
        except BrokenPipeError:
            return 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
