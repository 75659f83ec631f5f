"""`logmel`: log-scaled mel spectrogram, frame-level `[T, n_mels]` in dB.

Matches `librosa.power_to_db(librosa.feature.melspectrogram(y=...), ref=1.0, amin=amin,
top_db=top_db)` per item (top_db clipping is per item in librosa, so it is applied per item here).
The dB spectrogram is the shared `LogMelSpectrogram` intermediate, which `mfcc` and `onset` reuse.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from features.base import (
    Batch,
    Extractor,
    LogMelSpectrogram,
    MelSpectrogram,
    OutputSpec,
    PowerSpectrogram,
    Stft,
    power_to_db,
)
from features.registry import register_extractor

# power_to_db moved to features.base with the shared LogMelSpectrogram; still importable from here.
__all__ = ["LogMel", "LogMelConfig", "power_to_db"]


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
    """n_fft, hop_length, win_length: STFT framing in samples; n_mels: bands;
    fmin/fmax: band edges in Hz (fmax None = Nyquist); amin: floor before the log;
    top_db: per-item dynamic range below the item's peak in dB (None = unclipped)."""

    n_fft: int = 1024
    hop_length: int = 256
    win_length: int | None = None
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    amin: float = 1e-10
    top_db: float | None = 80.0

    def __post_init__(self):
        if self.n_fft <= 0 or self.hop_length <= 0 or self.n_mels <= 0:
            raise ValueError("n_fft, hop_length and n_mels must be positive")
        if self.n_fft % 2:
            raise ValueError(f"n_fft={self.n_fft} must be even (centred frames then number 1 + n // hop_length)")

    def mel(self) -> MelSpectrogram:
        """The shared mel-spectrogram intermediate these parameters describe."""
        stft = Stft(n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length)
        return MelSpectrogram(PowerSpectrogram(stft, power=2.0), n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax)

    def log_mel(self) -> LogMelSpectrogram:
        """The shared dB mel intermediate (also used by `mfcc` and `onset` at equal parameters)."""
        return LogMelSpectrogram(self.mel(), amin=self.amin, top_db=self.top_db)


@register_extractor
class LogMel(Extractor):
    name = "logmel"
    version = "1"
    config_type = LogMelConfig
    description = "log-mel spectrogram in dB"

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config
        return (
            OutputSpec(
                name="logmel",
                level="frame",
                shape=(c.n_mels,),
                hop_length=c.hop_length,
                sample_rate=self.sample_rate,
                description=f"log-mel power spectrogram (dB), {c.n_mels} bands, n_fft={c.n_fft}",
            ),
        )

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        c = self.config
        db = batch.intermediate(c.log_mel())
        return {"logmel": np.ascontiguousarray(db.transpose(0, 2, 1))}
