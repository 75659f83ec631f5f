"""Transient vs permanent I/O errors, backoff, and retries while streaming an item.

The stream tests read through `flaky://`, a real Beam file system registered by this module
(Beam finds file systems by scanning FileSystem subclasses for their scheme). It serves local
files and fails the way a network store does, following a per-path plan.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import io
import socket

import numpy as np
import pytest
import soundfile
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.localfilesystem import LocalFileSystem
from google.api_core import exceptions as api_exceptions

from featurebeam.decoding import Segment, stream_conditioned
from featurebeam.errors import AudioError
from featurebeam.retry import backoff_delay, call_with_retries, is_transient

FAST = {"retry_base_delay": 0.001}  # keep the backoff real but short


@dataclasses.dataclass
class Plan:
    """How `flaky://` treats one path. open_errors: exceptions raised by the first opens, in
    order. failing_reads: how many of the following opens give a handle whose reads fail after
    `fail_after` bytes."""

    open_errors: list[BaseException] = dataclasses.field(default_factory=list)
    failing_reads: int = 0
    fail_after: int = 0


class FlakyFile(io.FileIO):
    """A local file whose reads raise ConnectionResetError once `fail_after` bytes were served."""

    def __init__(self, path: str, fail_after: int | None):
        super().__init__(path, "rb")
        self.fail_after = fail_after

    def readinto(self, buffer) -> int:
        if self.fail_after is not None and self.tell() + len(buffer) > self.fail_after:
            raise ConnectionResetError(errno.ECONNRESET, f"connection reset by peer at byte {self.tell()}")
        return super().readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(size if size >= 0 else 1 << 24)
        count = self.readinto(buffer)
        return bytes(buffer[:count])


class FlakyFileSystem(LocalFileSystem):
    """flaky://<local path>: the local file behind a scripted, unreliable network."""

    plans: dict[str, Plan] = {}
    opens: collections.Counter = collections.Counter()

    @classmethod
    def scheme(cls):
        return "flaky"

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        local = path[len("flaky://") :]
        FlakyFileSystem.opens[local] += 1
        n = FlakyFileSystem.opens[local]
        plan = FlakyFileSystem.plans.get(local, Plan())
        if "missing" in local:
            raise FileNotFoundError(errno.ENOENT, "No such object", path)
        if n <= len(plan.open_errors):
            raise plan.open_errors[n - 1]
        failing = n <= len(plan.open_errors) + plan.failing_reads
        return FlakyFile(local, plan.fail_after if failing else None)


@pytest.fixture
def flaky(tmp_path):
    """A 6 s stereo FLAC at flaky://...; returns (uri, local path, plan)."""
    FlakyFileSystem.plans.clear()
    FlakyFileSystem.opens.clear()
    path = tmp_path / "a.flac"
    rng = np.random.default_rng(0)
    soundfile.write(path, (0.3 * rng.standard_normal((6 * 22050, 2))).astype(np.float32), 22050)
    plan = FlakyFileSystem.plans[str(path)] = Plan()
    yield f"flaky://{path}", str(path), plan
    FlakyFileSystem.plans.clear()


def samples(parts) -> np.ndarray:
    return np.concatenate([p.samples for p in parts if isinstance(p, Segment)])


# ------------------------------------------------------------------------------ is_transient


def _apitools_error(status: int):
    from apitools.base.py.exceptions import HttpError

    return HttpError({"status": str(status)}, b"", "https://storage.googleapis.com/b/o")


@pytest.mark.parametrize(
    "make",
    [
        lambda: api_exceptions.TooManyRequests("slow down"),
        lambda: api_exceptions.ServiceUnavailable("try later"),
        lambda: api_exceptions.InternalServerError("oops"),
        lambda: api_exceptions.GatewayTimeout("timeout"),
        lambda: _apitools_error(503),
        lambda: _apitools_error(429),
        lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
        lambda: ConnectionRefusedError(),
        lambda: BrokenPipeError(),
        lambda: TimeoutError("read timed out"),
        lambda: socket.timeout("timed out"),
        lambda: BeamIOError("open failed", {"gs://b/a.wav": ConnectionResetError()}),
    ],
)
def test_transient(make):
    assert is_transient(make())


@pytest.mark.parametrize(
    "make",
    [
        lambda: api_exceptions.NotFound("no such object"),
        lambda: api_exceptions.Forbidden("denied"),
        lambda: api_exceptions.BadRequest("bad"),
        lambda: _apitools_error(404),
        lambda: _apitools_error(403),
        lambda: FileNotFoundError(errno.ENOENT, "missing"),
        lambda: PermissionError(errno.EACCES, "denied"),
        lambda: IsADirectoryError(),
        lambda: OSError(errno.EIO, "I/O error"),
        lambda: ValueError("bad argument"),
        lambda: BeamIOError("open failed", {"gs://b/a.wav": api_exceptions.NotFound("gone")}),
        lambda: BeamIOError("open failed", {"gs://b/a.wav": ConnectionResetError(), "gs://b/b.wav": FileNotFoundError()}),
    ],
)
def test_permanent(make):
    assert not is_transient(make())


def test_client_library_transport_errors_are_transient():
    import google.auth.exceptions
    import requests
    import urllib3

    assert is_transient(requests.exceptions.ConnectionError("reset"))
    assert is_transient(requests.exceptions.ReadTimeout("slow"))
    assert is_transient(urllib3.exceptions.ProtocolError("connection aborted"))
    assert is_transient(google.auth.exceptions.TransportError("no route"))


def _raise_chained(inner: BaseException, outer: BaseException, *, explicit: bool) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            if explicit:
                raise outer from inner
            raise outer
    except BaseException as exc:
        return exc


def test_the_cause_chain_is_followed():
    assert is_transient(_raise_chained(ConnectionResetError(), RuntimeError("wrapped"), explicit=True))
    assert is_transient(_raise_chained(api_exceptions.ServiceUnavailable("x"), ValueError("while parsing"), explicit=False))
    # the first exception that says anything decides
    assert not is_transient(_raise_chained(ConnectionResetError(), FileNotFoundError(), explicit=False))
    # our own errors were classified already: an exhausted retry is not retried again
    assert not is_transient(_raise_chained(ConnectionResetError(), AudioError("gave up", stage="read"), explicit=True))


# ------------------------------------------------------------------------- call_with_retries


class Failing:
    def __init__(self, errors: list[BaseException], result="ok"):
        self.errors, self.result, self.calls = list(errors), result, 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_retries_transient_errors_with_growing_delays():
    delays: list[float] = []
    fn = Failing([ConnectionResetError()] * 4)
    assert call_with_retries(fn, what="open x", tries=5, base_delay=1.0, max_delay=30.0, sleep=delays.append) == "ok"
    assert fn.calls == 5 and len(delays) == 4
    for attempt, delay in enumerate(delays, start=1):
        ceiling = 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling  # exponential, with up to half of it random


def test_delays_are_capped_and_jittered():
    delays = [backoff_delay(20, base_delay=0.5, max_delay=30.0) for _ in range(200)]
    assert all(15.0 <= d <= 30.0 for d in delays) and len(set(delays)) > 100


def test_gives_up_after_tries_with_the_last_error():
    errors = [ConnectionResetError(f"reset {i}") for i in range(3)]
    fn = Failing(errors)
    with pytest.raises(ConnectionResetError, match="reset 2") as info:
        call_with_retries(fn, what="open gs://b/x.wav", tries=3, sleep=lambda _: None)
    assert fn.calls == 3
    assert "gave up after 3 tries" in info.value.__notes__[0]


@pytest.mark.parametrize(
    "error", [FileNotFoundError(), PermissionError(), api_exceptions.NotFound("x"), api_exceptions.Forbidden("x")]
)
def test_permanent_errors_are_raised_at_once(error):
    fn = Failing([error])
    slept: list[float] = []
    with pytest.raises(type(error)):
        call_with_retries(fn, what="open x", sleep=slept.append)
    assert fn.calls == 1 and slept == []


# --------------------------------------------------------------------- streaming over flaky://


def test_transient_open_failures_are_retried(flaky):
    uri, local, plan = flaky
    plan.open_errors = [ConnectionResetError(errno.ECONNRESET, "reset"), api_exceptions.ServiceUnavailable("busy")]
    parts = list(stream_conditioned(uri, sample_rate=16000, segment_samples=16000, **FAST))
    assert FlakyFileSystem.opens[local] == 3  # two failures, then success
    expected = list(stream_conditioned(local, sample_rate=16000, segment_samples=16000))
    np.testing.assert_array_equal(samples(parts), samples(expected))


def test_beam_wrapped_transient_errors_are_retried(flaky):
    uri, local, plan = flaky
    plan.open_errors = [BeamIOError("Open failed", {uri: ConnectionResetError(errno.ECONNRESET, "reset")})]
    list(stream_conditioned(uri, sample_rate=16000, segment_samples=None, **FAST))
    assert FlakyFileSystem.opens[local] == 2


def test_exhausted_tries_are_transient_read_failed(flaky):
    uri, local, plan = flaky
    plan.open_errors = [ConnectionResetError(errno.ECONNRESET, "reset")] * 10
    with pytest.raises(AudioError) as info:
        list(stream_conditioned(uri, sample_rate=16000, segment_samples=16000, tries=4, **FAST))
    assert (info.value.stage, info.value.reason) == ("read", "transient_read_failed")
    assert "4 tries" in str(info.value) and uri in str(info.value)
    assert FlakyFileSystem.opens[local] == 4


def test_missing_object_is_not_retried(flaky):
    uri, _, _ = flaky
    missing = uri.replace("a.flac", "missing.flac")
    with pytest.raises(AudioError) as info:
        list(stream_conditioned(missing, sample_rate=16000, segment_samples=None, **FAST))
    assert (info.value.stage, info.value.reason) == ("read", "not_found")
    assert FlakyFileSystem.opens[missing[len("flaky://") :]] == 1


def test_forbidden_is_not_retried(flaky):
    uri, local, plan = flaky
    plan.open_errors = [api_exceptions.Forbidden("storage.objects.get denied")] * 5
    with pytest.raises(AudioError) as info:
        list(stream_conditioned(uri, sample_rate=16000, segment_samples=None, **FAST))
    assert info.value.reason == "permission_denied" and FlakyFileSystem.opens[local] == 1


def test_read_fault_before_anything_was_yielded_restarts_the_item(flaky):
    """A reset inside libsndfile's read callback must not pass for the end of the file: the
    guard keeps it, the item restarts and comes out complete."""
    uri, local, plan = flaky
    plan.failing_reads, plan.fail_after = 1, 100_000  # the first handle dies a third of the way in
    parts = list(stream_conditioned(uri, sample_rate=16000, segment_samples=None, block_seconds=0.5, **FAST))
    assert FlakyFileSystem.opens[local] == 2
    assert len(samples(parts)) == 6 * 16000


def test_read_fault_every_time_is_transient_read_failed(flaky):
    uri, local, plan = flaky
    plan.failing_reads, plan.fail_after = 10, 100_000
    with pytest.raises(AudioError) as info:
        list(stream_conditioned(uri, sample_rate=16000, segment_samples=None, block_seconds=0.5, tries=3, **FAST))
    assert info.value.reason == "transient_read_failed" and FlakyFileSystem.opens[local] == 3


def test_read_fault_after_segments_were_yielded_is_read_interrupted(flaky):
    uri, local, plan = flaky
    plan.failing_reads, plan.fail_after = 1, 200_000
    got = []
    with pytest.raises(AudioError) as info:
        for part in stream_conditioned(uri, sample_rate=16000, segment_samples=4000, block_seconds=0.25, **FAST):
            got.append(part)
    assert (info.value.stage, info.value.reason) == ("read", "read_interrupted")
    assert sum(isinstance(p, Segment) for p in got) >= 2  # these were out already: no restart
    assert FlakyFileSystem.opens[local] == 1
