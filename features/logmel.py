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
    FrameIntermediate,
    LogMelSpectrogram,
    MelConfig,
    OutputSpec,
    power_to_db,
)
from features.registry import register_extractor

# power_to_db moved to features.base with the shared LogMelSpectrogram; still importable from here.
__all__ = ["LogMel", "LogMelConfig", "power_to_db"]


@dataclasses.dataclass(frozen=True)
class LogMelConfig(MelConfig):
    """MelConfig (n_fft, hop_length, win_length, n_mels, fmin, fmax) plus amin: floor before the
    log; top_db: per-item dynamic range below the item's peak in dB (None = unclipped)."""

    amin: float = 1e-10
    top_db: float | None = 80.0

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

    def window_parts(self) -> tuple[FrameIntermediate, ...]:
        # The dB clip needs the item's peak, so only the mel power is windowed; the log runs on the item.
        return (self.config.mel(),)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        c = self.config
        db = batch.intermediate(c.log_mel())
        return {"logmel": np.ascontiguousarray(db.transpose(0, 2, 1))}
