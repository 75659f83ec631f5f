"""`chroma`: pitch-class energy, frame-level `[T, n_chroma]`.

Matches `librosa.feature.chroma_stft(y=..., n_fft, hop_length, tuning, n_chroma, norm)` per item:
the shared power STFT projected onto librosa's chroma filter bank, each frame normalised.

With a fixed `tuning` (default 0.0, i.e. A440) one filter bank serves the whole batch. With
`tuning=None` the tuning is estimated per item from the item's own frames, as librosa does when
given a single waveform; that needs one filter bank per item, so it loops over the batch.

With a fixed tuning every frame is its own (the shared `ChromaSpectrogram` intermediate, then a
per-frame norm), so a long item is extracted in windows; the estimate of `tuning=None` takes a
median over the whole item's spectral peaks, so that setting keeps the whole-item path.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from features.base import Batch, Extractor, FrameIntermediate, FramingConfig, OutputSpec, PowerSpectrogram, project
from features.registry import register_extractor


@dataclasses.dataclass(frozen=True)
class ChromaConfig(FramingConfig):
    """FramingConfig (n_fft, hop_length, win_length) plus n_chroma: bins per octave;
    tuning: deviation from A440 in fractions of a chroma bin (0.0 = A440; None = estimate it per
    item with librosa.estimate_tuning, slower); norm: per-frame norm ("max" = max-normalised, as
    librosa's norm=inf; a positive number p = L^p norm; None = unnormalised power). "max" rather
    than inf keeps run.json standard JSON."""

    n_chroma: int = 12
    tuning: float | None = 0.0
    norm: str | float | None = "max"

    def __post_init__(self):
        super().__post_init__()
        if self.n_chroma <= 0:
            raise ValueError(f"n_chroma={self.n_chroma} must be positive")
        if self.norm is not None and self.norm != "max" and not (isinstance(self.norm, (int, float)) and self.norm > 0):
            raise ValueError(f"norm={self.norm!r} must be 'max', a positive number or None")

    @property
    def librosa_norm(self) -> float | None:
        return np.inf if self.norm == "max" else self.norm


# librosa.estimate_tuning reports tuning in steps of 0.01 bin within [-0.5, 0.5): 100 values, so
# with tuning=None every estimate's bank is built once per process, not once per item.
@functools.lru_cache(maxsize=128)
def chroma_filter_bank(*, sample_rate: int, n_fft: int, n_chroma: int, tuning: float) -> np.ndarray:
    """librosa's chroma filter bank `[n_chroma, 1 + n_fft // 2]` float32, built once per process per parameters."""
    import librosa

    return librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, tuning=tuning, n_chroma=n_chroma)


@dataclasses.dataclass(frozen=True)
class ChromaSpectrogram(FrameIntermediate):
    """Unnormalised chroma `[B, n_chroma, T]` (time-major in memory): the power STFT projected on
    the chroma filter bank at a fixed `tuning`."""

    power: PowerSpectrogram
    n_chroma: int = 12
    tuning: float = 0.0

    @property
    def hop_length(self) -> int:
        return self.power.stft.hop_length

    def compute(self, batch: Batch) -> np.ndarray:
        stft = self.power.stft
        bank = chroma_filter_bank(sample_rate=batch.sample_rate, n_fft=stft.n_fft, n_chroma=self.n_chroma, tuning=self.tuning)
        power = batch.intermediate(self.power)
        return project(bank, power, frames=batch.frame_counts(stft.hop_length), first_frame=batch.frame_range(stft.hop_length)[0])


@register_extractor
class Chroma(Extractor):
    name = "chroma"
    version = "1"
    config_type = ChromaConfig
    description = "chromagram from the power STFT"

    def setup(self) -> None:
        c = self.config
        if c.tuning is not None:
            chroma_filter_bank(sample_rate=self.sample_rate, n_fft=c.n_fft, n_chroma=c.n_chroma, tuning=c.tuning)

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config
        tuning = "estimated per item" if c.tuning is None else f"tuning {c.tuning:g}"
        return (
            OutputSpec(
                name="chroma",
                level="frame",
                shape=(c.n_chroma,),
                hop_length=c.hop_length,
                sample_rate=self.sample_rate,
                description=f"{c.n_chroma}-bin chroma (C first, norm={c.norm}, {tuning}), n_fft={c.n_fft}",
            ),
        )

    def _raw(self) -> ChromaSpectrogram:
        c = self.config
        return ChromaSpectrogram(c.power(), n_chroma=c.n_chroma, tuning=c.tuning)

    def window_parts(self) -> tuple[FrameIntermediate, ...] | None:
        return None if self.config.tuning is None else (self._raw(),)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        import librosa

        c = self.config

        def bank(tuning: float) -> np.ndarray:
            return chroma_filter_bank(sample_rate=batch.sample_rate, n_fft=c.n_fft, n_chroma=c.n_chroma, tuning=tuning)

        if c.tuning is not None:
            raw = batch.intermediate(self._raw())
        else:
            power = batch.intermediate(c.power())  # [B, F, T]
            raw = np.zeros((len(batch), c.n_chroma, power.shape[-1]), dtype=power.dtype)
            for i, frames in enumerate(batch.frame_counts(c.hop_length)):
                own = power[i, :, :frames]  # estimate from the item's frames only, not the padding
                tuning = float(librosa.estimate_tuning(S=own, sr=batch.sample_rate, bins_per_octave=c.n_chroma))
                raw[i] = project(bank(tuning), power[i : i + 1], frames=np.array([frames]))[0]
        chroma = librosa.util.normalize(raw, norm=c.librosa_norm, axis=1)
        return {"chroma": np.ascontiguousarray(chroma.transpose(0, 2, 1), dtype=np.float32)}
