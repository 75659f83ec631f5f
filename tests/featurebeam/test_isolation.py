"""The decoder child process: same output as in-process decoding, errors passed through with
their reason, real segfaults and hangs contained, and no zombie processes left behind.

Faults are injected with featurebeam.faults' segfault: and hang: directives, turned on in the
children of the module's decoder (tests/faultinject).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import soundfile

from featurebeam.decoding import Segment, SourceInfo, stream_conditioned
from featurebeam.errors import AudioError, ConfigError
from featurebeam.isolation import IsolatedDecoder
from tests import faultinject

KW = {"sample_rate": 16000, "segment_samples": 8000}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Short valid files, one named to crash and one to hang the child, and a bad one."""
    tmp_path = tmp_path_factory.mktemp("isolation")
    rng = np.random.default_rng(3)
    paths = {}
    for name in ("good.flac", "other.wav", "crash-me.wav", "hang-me.wav"):
        paths[name] = str(tmp_path / name)
        soundfile.write(paths[name], (0.2 * rng.standard_normal((44100 * 2, 2))).astype(np.float32), 44100)
    paths["bad.wav"] = str(tmp_path / "bad.wav")
    with open(paths["bad.wav"], "wb") as handle:
        handle.write(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return paths


@pytest.fixture(scope="module")
def decoder():
    """One decoder for the module, as a DoFn would hold one: tests that crash or kill its child
    also show that it carries on with a fresh one."""
    with IsolatedDecoder(timeout_seconds=3.0, env=faultinject.environment("segfault:crash-me,hang:hang-me")) as decoder:
        yield decoder


def gone(pid: int) -> bool:
    """True once `pid` no longer exists at all: killed and reaped, not a zombie."""
    return not os.path.exists(f"/proc/{pid}")


def test_same_output_as_in_process(decoder, files):
    isolated = list(decoder.stream(files["good.flac"], **KW))
    local = list(stream_conditioned(files["good.flac"], **KW))
    assert isinstance(isolated[0], SourceInfo) and isolated[0] == local[0]
    assert len(isolated) == len(local)
    for a, b in zip(isolated[1:], local[1:]):
        assert isinstance(a, Segment) and (a.start, a.last, a.silent) == (b.start, b.last, b.silent)
        np.testing.assert_array_equal(a.samples, b.samples)


def test_audio_errors_keep_stage_reason_and_message(decoder, files, tmp_path):
    list(decoder.stream(files["good.flac"], **KW))
    starts = decoder.starts
    for uri in (files["bad.wav"], str(tmp_path / "missing.wav")):
        with pytest.raises(AudioError) as local:
            list(stream_conditioned(uri, **KW))
        with pytest.raises(AudioError) as isolated:
            list(decoder.stream(uri, **KW))
        assert (isolated.value.stage, isolated.value.reason, str(isolated.value)) == (
            local.value.stage, local.value.reason, str(local.value))
    assert decoder.starts == starts  # an ordinary bad file does not cost a child


def test_other_errors_are_rebuilt_with_the_child_traceback(decoder, files):
    with pytest.raises(ConfigError, match="segment_samples") as info:
        list(decoder.stream(files["good.flac"], sample_rate=16000, segment_samples=-5))
    assert "raised in the isolated decoder process" in info.value.__notes__[0]


def test_segfault_is_decoder_crashed_and_the_next_file_decodes(decoder, files):
    list(decoder.stream(files["good.flac"], **KW))
    first_pid, starts = decoder.pid, decoder.starts
    got = []
    with pytest.raises(AudioError) as info:
        for part in decoder.stream(files["crash-me.wav"], **KW):
            got.append(part)
    assert (info.value.stage, info.value.reason) == ("decode", "decoder_crashed")
    assert "SIGSEGV" in str(info.value) and files["crash-me.wav"] in str(info.value)
    assert [type(p) for p in got] == [SourceInfo]  # it died mid-item
    assert gone(first_pid)
    parts = list(decoder.stream(files["other.wav"], **KW))
    assert len(np.concatenate([p.samples for p in parts[1:]])) == 32000
    assert decoder.starts == starts + 1 and decoder.pid != first_pid


def test_hang_is_decoder_timeout_and_the_next_file_decodes(decoder, files):
    decoder.start()
    pid = decoder.pid
    started = time.monotonic()
    with pytest.raises(AudioError) as info:
        list(decoder.stream(files["hang-me.wav"], **KW))
    waited = time.monotonic() - started
    assert (info.value.stage, info.value.reason) == ("decode", "decoder_timeout")
    assert files["hang-me.wav"] in str(info.value)
    assert 3.0 <= waited < 10.0
    assert gone(pid)
    assert len(list(decoder.stream(files["good.flac"], **KW))) > 1


def test_stopping_a_stream_early_replaces_the_child(decoder, files):
    stream = decoder.stream(files["good.flac"], **KW)
    next(stream), next(stream)
    pid = decoder.pid
    stream.close()
    assert gone(pid)
    assert len(list(decoder.stream(files["good.flac"], **KW))) > 1


def test_one_stream_at_a_time(decoder, files):
    stream = decoder.stream(files["good.flac"], **KW)
    next(stream)
    with pytest.raises(RuntimeError, match="another stream"):
        next(decoder.stream(files["other.wav"], **KW))
    stream.close()


def test_a_stream_never_started_does_not_block_the_decoder(decoder, files):
    decoder.stream(files["good.flac"], **KW)  # created, never iterated, dropped
    assert len(list(decoder.stream(files["good.flac"], **KW))) > 1


def test_child_does_not_load_tensorflow(decoder, files):
    list(decoder.stream(files["good.flac"], **KW))
    with open(f"/proc/{decoder.pid}/maps") as maps:
        libraries = maps.read()
    assert "libsndfile" in libraries and "soxr" in libraries  # sanity: the decoders are there
    assert "tensorflow" not in libraries


def test_stray_stdout_in_the_child_does_not_corrupt_the_protocol(tmp_path, files):
    (tmp_path / "noisy_plugin.py").write_text(
        "import os\nprint('hello from a plugin' * 100)\nos.write(1, b'raw bytes on fd 1\\n' * 100)\n"
    )
    with IsolatedDecoder(env={"PYTHONPATH": str(tmp_path)}, imports=["noisy_plugin"]) as decoder:
        assert len(list(decoder.stream(files["good.flac"], **KW))) > 1


def test_close_reaps_the_child(files):
    decoder = IsolatedDecoder()
    list(decoder.stream(files["good.flac"], **KW))
    pid = decoder.pid
    decoder.close()
    assert decoder.pid is None and gone(pid)
    decoder.close()  # idempotent


def _samples(parts) -> np.ndarray:
    return np.concatenate([p.samples for p in parts if isinstance(p, Segment)])


def test_a_prefetched_item_streams_what_it_would_have_and_the_child_is_never_idle(decoder, files):
    expected = _samples(stream_conditioned(files["other.wav"], **KW))
    list(decoder.stream(files["good.flac"], **KW))
    pid, starts = decoder.pid, decoder.starts
    stream = decoder.stream(files["good.flac"], **KW)
    next(stream)
    decoder.prefetch([(files["other.wav"], KW)])  # sent while the open stream is being read
    list(stream)
    np.testing.assert_array_equal(_samples(decoder.stream(files["other.wav"], **KW)), expected)
    assert (decoder.pid, decoder.starts) == (pid, starts)  # the same child took both, in order


def test_streaming_another_item_than_the_prefetched_one_starts_afresh(decoder, files):
    decoder.prefetch([(files["good.flac"], KW)])
    expected = _samples(stream_conditioned(files["other.wav"], **KW))
    np.testing.assert_array_equal(_samples(decoder.stream(files["other.wav"], **KW)), expected)
    assert len(list(decoder.stream(files["good.flac"], **KW))) > 1  # nothing of the dropped request is left over


def test_a_crash_on_a_prefetched_item_is_that_items_dead_letter(decoder, files):
    """The child takes requests in order: a crash after it finished the open stream is the
    prefetched item's, whoever is reading at that moment."""
    list(decoder.stream(files["good.flac"], **KW))
    pid = decoder.pid
    decoder.prefetch([(files["crash-me.wav"], KW), (files["other.wav"], KW)])
    assert decoder.ahead == 2
    with pytest.raises(AudioError) as info:
        list(decoder.stream(files["crash-me.wav"], **KW))
    assert info.value.reason == "decoder_crashed" and files["crash-me.wav"] in str(info.value)
    assert gone(pid)
    stream = decoder.stream(files["crash-me.wav"], **KW)  # the item after a crashed one, sent ahead
    with pytest.raises(AudioError):
        next(stream)
        decoder.prefetch([(files["other.wav"], KW)])  # dies with the crashed child
        list(stream)
    assert len(_samples(decoder.stream(files["other.wav"], **KW))) == 32000


def test_close_with_a_request_in_flight_does_not_wait(files):
    decoder = IsolatedDecoder()
    list(decoder.stream(files["good.flac"], **KW))
    pid = decoder.pid
    decoder.prefetch([(files["other.wav"], KW), (files["good.flac"], KW)])
    started = time.monotonic()
    decoder.close()
    assert time.monotonic() - started < 2.0 and gone(pid)


def test_prefetch_keeps_the_order_and_the_limit(files):
    with IsolatedDecoder(max_ahead=2) as decoder:
        names = ["good.flac", "other.wav", "good.flac"]
        upcoming = [(files[n], KW) for n in names]
        decoder.prefetch(upcoming)
        assert decoder.ahead == 2  # max_ahead
        decoder.prefetch(upcoming[1:])  # not a continuation of what is ahead: ignored
        assert decoder.ahead == 2
        for i, name in enumerate(names):
            parts = list(decoder.stream(files[name], **KW))
            np.testing.assert_array_equal(_samples(parts), _samples(stream_conditioned(files[name], **KW)))
            decoder.prefetch(upcoming[i + 1 :])
        assert decoder.starts == 1 and decoder.ahead == 0


def _held_when_idle(decoder: IsolatedDecoder, settle: float = 0.5, limit: float = 30.0) -> int:
    """The bytes read ahead once the child has stopped producing (no growth for `settle` s)."""
    deadline = time.monotonic() + limit
    held, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = decoder._reader.held
        if now != held:
            held, since = now, time.monotonic()
        elif time.monotonic() - since > settle:
            return held
        time.sleep(0.05)
    raise AssertionError("the child kept producing")


def test_the_child_decodes_every_item_sent_ahead_past_the_pipe_while_nobody_reads(tmp_path):
    """20 one-second clips are 1.28 MB of float32, more than the 1 MiB output pipe: the child is
    not held up by a full pipe, because a thread of the worker drains it."""
    paths = []
    for i in range(21):
        paths.append(str(tmp_path / f"clip{i}.wav"))
        soundfile.write(paths[-1], np.full(16000, 0.01 * (i + 1), np.float32), 16000)
    kw = {"sample_rate": 16000, "segment_samples": None}
    with IsolatedDecoder(max_ahead=32) as decoder:
        first = decoder.stream(paths[0], **kw)
        assert isinstance(next(first), SourceInfo)
        decoder.prefetch([(p, kw) for p in paths[1:]])
        assert _held_when_idle(decoder) >= 20 * 16000 * 4
        for i, path in enumerate(paths):
            parts = list(first) if i == 0 else list(decoder.stream(path, **kw))[1:]
            assert len(parts) == 1 and np.allclose(parts[0].samples, 0.01 * (i + 1), atol=1e-3)  # each its own, in order
        assert decoder.starts == 1 and decoder._reader.held == 0


def test_what_is_read_ahead_is_bounded_by_bytes_and_many_requests_ahead_do_not_block(tmp_path):
    """At most read_ahead_bytes plus the frame being read are held; 300 requests ahead (more
    than the request pipe holds) are taken by the child as they come, not when it has room."""
    path = str(tmp_path / "clip.wav")
    soundfile.write(path, np.zeros(16000, np.float32), 16000)
    kw = {"sample_rate": 16000, "segment_samples": None}
    uris = [path] * 300
    with IsolatedDecoder(max_ahead=300, read_ahead_bytes=100_000) as decoder:
        first = decoder.stream(uris[0], **kw)
        next(first)
        decoder.prefetch([(u, dict(kw, max_seconds=60.0 + i)) for i, u in enumerate(uris[1:])])
        assert decoder.ahead == 299
        held = _held_when_idle(decoder)
        assert 100_000 <= held <= 100_000 + 64_100  # the limit, plus at most one clip's frame
        list(first)
        for i, uri in enumerate(uris[1:]):
            assert len(_samples(decoder.stream(uri, **dict(kw, max_seconds=60.0 + i)))) == 16000
        assert decoder.starts == 1


def test_the_worker_takes_data_not_code_from_the_child(files, tmp_path):
    """A child taken over by a crafted file sends a pickle that would create a file when loaded
    (tests/featurebeam/hostile_decoder.py): the worker never loads it; the item is a
    decoder_protocol dead letter and the next item decodes in a fresh child."""
    import pickle
    import sys

    from tests.featurebeam import hostile_decoder

    class Hostile(IsolatedDecoder):
        def _command(self):
            return [sys.executable, hostile_decoder.__file__, str(tmp_path / "ran")]

    pickle.loads(hostile_decoder.runs_code_pickle(str(tmp_path / "loaded")))
    assert (tmp_path / "loaded").exists()  # loading it would run code
    with Hostile(timeout_seconds=3.0) as decoder:
        with pytest.raises(AudioError) as info:
            list(decoder.stream(str(tmp_path / "evil-pickle_frame.wav"), **KW))
        assert (info.value.stage, info.value.reason) == ("decode", "decoder_protocol")
        assert not (tmp_path / "ran").exists()
        parts = list(decoder.stream(files["good.flac"], **KW))
        assert _samples(parts).dtype == np.float32 and len(_samples(parts)) == 32000
        assert decoder.starts == 2
