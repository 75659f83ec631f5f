"""A decoder child that misbehaves on purpose: it sends data, never code, and whatever it sends
that is malformed, truncated, oversized or out of order becomes one item's `decoder_protocol`
dead letter; the child is replaced and the next item decodes.

The child is a real process (tests/featurebeam/hostile_decoder.py) that speaks the protocol for
ordinary items and sends a chosen bad message for an item named "evil-<mode>".
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from featurebeam.decoding import Segment, SourceInfo
from featurebeam.errors import AudioError
from featurebeam.isolation import IsolatedDecoder
from tests.featurebeam import hostile_decoder

KW = {"sample_rate": 16000, "segment_samples": 8000}
SCRIPT = str(Path(hostile_decoder.__file__).resolve())


class HostileDecoder(IsolatedDecoder):
    def __init__(self, marker: Path, **kwargs):
        super().__init__(timeout_seconds=3.0, **kwargs)
        self.marker = marker

    def _command(self) -> list[str]:
        return [sys.executable, SCRIPT, str(self.marker)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def good(folder) -> str:
    path = folder / "good.wav"
    soundfile.write(path, (0.1 * np.random.default_rng(5).standard_normal(16000)).astype(np.float32), 16000)
    return str(path)


@pytest.fixture(scope="module")
def decoder(folder):
    """One decoder for the module, as a DoFn holds one: every bad message costs it a child, and
    the next test's item runs in a fresh one."""
    with HostileDecoder(folder / "ran") as decoder:
        yield decoder


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def evil(folder: Path, mode: str) -> str:
    return str(folder / f"evil-{mode}.wav")


def test_the_pickle_runs_code_when_loaded(tmp_path):
    """What the tests below rely on: loading the child's pickle would create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(hostile_decoder.runs_code_pickle(str(marker)))
    assert marker.exists()


def test_pickle_bytes_sent_as_samples_are_only_samples(decoder, folder, good):
    parts = list(decoder.stream(evil(folder, "pickle_as_samples"), sample_rate=16000, segment_samples=None))
    assert [type(p) for p in parts] == [SourceInfo, Segment]
    data = hostile_decoder.padded(hostile_decoder.runs_code_pickle(str(folder / "ran")))
    assert parts[1].samples.dtype == np.float32 and parts[1].samples.tobytes() == data
    assert not (folder / "ran").exists()
    pid = decoder.pid
    assert len(list(decoder.stream(good, **KW))) == 3 and decoder.pid == pid  # the protocol held: same child


BAD = [mode for mode in hostile_decoder.MODES if mode not in ("pickle_as_samples", "truncated_then_killed")]


@pytest.mark.parametrize("mode", BAD)
def test_a_bad_message_is_decoder_protocol_and_costs_the_child(mode, decoder, folder):
    """Oversized messages are refused from their sizes, before anything is allocated or awaited
    (waiting for the bytes announced would end in decoder_timeout instead)."""
    decoder.start()
    pid, starts = decoder.pid, decoder.starts
    got = []
    with pytest.raises(AudioError) as info:
        for part in decoder.stream(evil(folder, mode), **KW):
            got.append(part)
    assert (info.value.stage, info.value.reason) == ("decode", "decoder_protocol"), str(info.value)
    assert evil(folder, mode) in str(info.value) and "nothing of it was used" in str(info.value)
    assert len(str(info.value)) < 1000
    assert all(isinstance(p, (SourceInfo, Segment)) for p in got)
    assert gone(pid) and decoder.pid is None and decoder.starts == starts
    assert not (folder / "ran").exists()  # no pickle was loaded


def test_the_next_item_decodes_in_a_fresh_child(decoder, good):
    starts = decoder.starts
    assert len(list(decoder.stream(good, **KW))) == 3
    assert decoder.starts == starts + 1


def test_a_message_cut_off_by_a_signal_is_a_crash(decoder, folder, good):
    with pytest.raises(AudioError) as info:
        list(decoder.stream(evil(folder, "truncated_then_killed"), **KW))
    assert info.value.reason == "decoder_crashed" and "SIGKILL" in str(info.value)


def test_a_bad_message_for_a_prefetched_item_is_that_items_dead_letter(decoder, folder, good):
    stream = decoder.stream(good, **KW)
    next(stream)
    decoder.prefetch([(evil(folder, "oversized_segment"), KW), (good, KW)])
    assert len(list(stream)) == 2  # the open item is whole
    with pytest.raises(AudioError) as info:
        list(decoder.stream(evil(folder, "oversized_segment"), **KW))
    assert info.value.reason == "decoder_protocol" and "above the 8000 its request allows" in str(info.value)
    assert len(list(decoder.stream(good, **KW))) == 3
