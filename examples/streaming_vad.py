"""A stateful streaming voice-activity model run as a plain-function extractor (docs/extractors.md).

Streaming models (voice activity detectors such as Silero VAD, keyword spotters, online pitch
trackers) read audio in fixed chunks and carry a state from one chunk to the next: recurrent
hidden states, a noise-floor estimate, a hang-over counter. Such a model fits featurebeam as a
plain function: the function receives one whole item, cuts it into chunks, and feeds them in
order to ONE model state that it creates for that item, so the state never leaks from one item
to another and the item's result does not depend on how it was chunked.

    python -m pipelines.extract --dataset=sample --features=logmel,examples/streaming_vad.py:vad

`StreamingVad` here is a small NumPy model (an energy detector with an adaptive noise floor and
a hang-over) so the recipe runs anywhere; a real model slots into `step` the same way, e.g. an
ONNX session loaded once per process (`_session()` below shows the pattern) whose state tensors
are passed in and out of every call.

Outputs (named `vad_<key>`):
- `speech`: per-frame speech probability, float32, one frame per `hop` samples (centred frames,
  `1 + n // hop` of them, like every frame-level feature);
- `segments`: events `{start_seconds, end_seconds, frames}`, one per detected speech segment;
- `speech_seconds`: the total, float64.
"""

from __future__ import annotations

import functools

import numpy as np

HOP = 256  # samples per frame (16 ms at 16 kHz)


class StreamingVad:
    """Frame energies -> speech probabilities, chunk by chunk, with state carried across chunks.

    state: the noise floor (an exponential moving average of frame energy that follows decreases
    at once and increases slowly outside speech), the count of hang-over frames left, and the samples of a frame
    not yet complete at the end of the last chunk.
    """

    def __init__(self, *, hop: int = HOP, rise: float = 0.02, ratio_db: float = 6.0, hangover: int = 8):
        self.hop = hop
        self.rise = rise
        self.ratio = 10.0 ** (ratio_db / 10.0)
        self.hangover = hangover
        self.floor: float | None = None
        self.left = 0
        self.pending = np.zeros(0, dtype=np.float32)

    def step(self, chunk: np.ndarray) -> np.ndarray:
        """Feed the next samples; returns the probabilities of the frames they completed."""
        samples = np.concatenate([self.pending, np.asarray(chunk, dtype=np.float32)])
        count = len(samples) // self.hop
        self.pending = samples[count * self.hop :]
        out = np.empty(count, dtype=np.float32)
        for i in range(count):
            energy = float(np.mean(np.square(samples[i * self.hop : (i + 1) * self.hop], dtype=np.float64))) + 1e-10
            if self.floor is None:
                self.floor = energy
            snr = energy / self.floor
            if snr >= self.ratio:
                self.left = self.hangover
            elif self.left:
                self.left -= 1
            # A logistic of the SNR in dB, centred on the ratio; held at 0.5+ during the hang-over.
            p = 1.0 / (1.0 + np.exp(-(10.0 * np.log10(snr) - 10.0 * np.log10(self.ratio))))
            out[i] = max(p, 0.5) if self.left and p < 0.5 else p
            # The floor follows quieter frames at once, and louder non-speech frames slowly (it
            # holds during speech, so a long utterance is not taken for the new background).
            if energy < self.floor:
                self.floor = energy
            elif snr < self.ratio:
                self.floor = (1 - self.rise) * self.floor + self.rise * energy
        return out


@functools.lru_cache(maxsize=1)
def _session(path: str):
    """How a real model is loaded: once per worker process, reused by every item (not per call)."""
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def segments_of(speech: np.ndarray, *, hop: int, sample_rate: int, threshold: float = 0.5) -> list[dict]:
    """Runs of frames with probability >= threshold as events {start_seconds, end_seconds, frames}, in seconds."""
    active = np.concatenate([[False], speech >= threshold, [False]])
    edges = np.flatnonzero(active[1:] != active[:-1])
    return [
        {"start_seconds": float(a * hop / sample_rate), "end_seconds": float(b * hop / sample_rate), "frames": int(b - a)}
        for a, b in zip(edges[::2], edges[1::2])
    ]


def vad(*, waveform: np.ndarray, sample_rate: int, chunk_seconds: float = 0.5, hop: int = HOP, ratio_db: float = 6.0) -> dict:
    """Speech probability per frame, speech segments and total speech time of one item.

    waveform: [n] float32 mono at sample_rate Hz. The item is fed to one fresh model state in
    chunks of chunk_seconds (as a streaming model sees a live stream); frame t is centred on
    sample t * hop, so the item is padded by hop // 2 in front and the last frame's remainder.
    """
    model = StreamingVad(hop=hop, ratio_db=ratio_db)  # one state per item: nothing leaks between items
    frames = 1 + len(waveform) // hop
    padded = np.zeros(frames * hop, dtype=np.float32)
    body = waveform[: frames * hop - hop // 2]
    padded[hop // 2 : hop // 2 + len(body)] = body
    chunk = max(hop, int(chunk_seconds * sample_rate))
    speech = np.concatenate([model.step(padded[i : i + chunk]) for i in range(0, len(padded), chunk)])
    segments = segments_of(speech, hop=hop, sample_rate=sample_rate)
    return {
        "speech": speech,
        "segments": segments,
        "speech_seconds": float(sum(s["end_seconds"] - s["start_seconds"] for s in segments)),
    }
