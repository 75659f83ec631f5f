"""examples/streaming_vad.py: a stateful streaming model as a plain function (docs/extractors.md).
It also runs inside a real pipeline in tests/pipelines/test_function_extract.py."""

from __future__ import annotations

import numpy as np
import pytest

from examples import streaming_vad
from features import Batch, registry

RATE = 16000


def _speechy(seconds: float = 2.0) -> np.ndarray:
    """Quiet noise with a loud burst from 0.5 s to 1.2 s."""
    rng = np.random.default_rng(3)
    n = int(seconds * RATE)
    x = 0.003 * rng.standard_normal(n)
    t = np.arange(n) / RATE
    burst = (t >= 0.5) & (t < 1.2)
    x[burst] += 0.3 * np.sin(2 * np.pi * 220 * t[burst])
    return x.astype(np.float32)


@pytest.mark.parametrize("chunk_seconds", [0.01, 0.137, 0.5, 10.0])
def test_chunking_does_not_change_the_result(chunk_seconds):
    """The state (noise floor, hang-over, partial frame) carries across chunks, so any chunking
    gives the whole item's answer."""
    wave = _speechy()
    whole = streaming_vad.vad(waveform=wave, sample_rate=RATE, chunk_seconds=10.0)
    chunked = streaming_vad.vad(waveform=wave, sample_rate=RATE, chunk_seconds=chunk_seconds)
    assert np.array_equal(whole["speech"], chunked["speech"])
    assert whole["segments"] == chunked["segments"]


def test_resetting_the_state_between_chunks_would_change_it():
    """The test above could not fail if the state did nothing: a fresh model per chunk differs."""
    wave = _speechy()
    hop = streaming_vad.HOP
    frames = 1 + len(wave) // hop
    padded = np.zeros(frames * hop, np.float32)
    body = wave[: frames * hop - hop // 2]
    padded[hop // 2 : hop // 2 + len(body)] = body
    chunk = 8 * hop
    reset = np.concatenate([streaming_vad.StreamingVad().step(padded[i : i + chunk]) for i in range(0, len(padded), chunk)])
    assert not np.array_equal(reset, streaming_vad.vad(waveform=wave, sample_rate=RATE)["speech"])


def test_it_finds_the_burst_with_centred_frames():
    wave = _speechy()
    out = streaming_vad.vad(waveform=wave, sample_rate=RATE)
    assert out["speech"].shape == (1 + len(wave) // streaming_vad.HOP,) and out["speech"].dtype == np.float32
    (segment,) = out["segments"]
    assert segment["start_seconds"] == pytest.approx(0.5, abs=0.04)
    assert segment["end_seconds"] == pytest.approx(1.2, abs=0.2)  # the hang-over holds it a little longer
    assert out["speech_seconds"] == pytest.approx(segment["end_seconds"] - segment["start_seconds"])


def test_it_is_an_extractor_by_its_path_with_three_typed_outputs():
    extractor = registry.build("examples/streaming_vad.py:vad", {"chunk_seconds": 0.25}, sample_rate=RATE)
    specs = {s.name: s for s in extractor.output_specs()}
    assert (specs["vad_speech"].level, specs["vad_speech"].hop_length) == ("frame", streaming_vad.HOP)
    assert specs["vad_segments"].fields == (("start_seconds", "float64"), ("end_seconds", "float64"), ("frames", "int64"))
    assert specs["vad_speech_seconds"].dtype == "float64"
    values = extractor.extract(Batch.from_waveforms([_speechy(), _speechy(1.0)], sample_rate=RATE))
    assert len(values["vad_segments"][0]) == 1 and len(values["vad_speech"][1]) == 1 + RATE // streaming_vad.HOP
