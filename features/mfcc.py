"""`mfcc`: mel-frequency cepstral coefficients, frame-level `[T, n_mfcc]`.

Matches `librosa.feature.mfcc(y=..., n_mfcc=n_mfcc, dct_type=2, norm="ortho", lifter=lifter)` per
item: an orthonormal DCT-II over the bands of `power_to_db(melspectrogram(...))`. The dB mel
spectrogram is the shared `LogMelSpectrogram` intermediate, so with the default mel parameters
(logmel's defaults) `logmel` and `mfcc` cost one STFT, one mel projection and one log per batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft

from features.base import Batch, Extractor, FrameIntermediate, OutputSpec
from features.logmel import LogMelConfig
from features.registry import register_extractor


@dataclasses.dataclass(frozen=True)
class MfccConfig(LogMelConfig):
    """LogMelConfig (framing, mel bands, amin, top_db; defaults equal logmel's, so both share one
    mel computation) plus n_mfcc: coefficients kept (the first n_mfcc of the DCT over n_mels
    bands); lifter: cepstral liftering coefficient (0 = none, as in librosa)."""

    n_mfcc: int = 20
    lifter: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_mfcc <= 0:
            raise ValueError(f"n_mfcc={self.n_mfcc} must be positive")
        if self.n_mfcc > self.n_mels:
            raise ValueError(f"n_mfcc={self.n_mfcc} exceeds n_mels={self.n_mels}; the DCT has only n_mels terms")
        if self.lifter < 0:
            raise ValueError(f"lifter={self.lifter} must be 0 (off) or positive")


@register_extractor
class Mfcc(Extractor):
    name = "mfcc"
    version = "1"
    config_type = MfccConfig
    description = "MFCCs: orthonormal DCT-II of the log-mel spectrogram"

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config
        return (
            OutputSpec(
                name="mfcc",
                level="frame",
                shape=(c.n_mfcc,),
                hop_length=c.hop_length,
                sample_rate=self.sample_rate,
                description=f"{c.n_mfcc} MFCCs from {c.n_mels} mel bands (dB), n_fft={c.n_fft}",
            ),
        )

    def window_parts(self) -> tuple[FrameIntermediate, ...]:
        # The DCT runs on the item's clipped dB, which needs the item's peak: only the mel power is windowed.
        return (self.config.mel(),)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        c = self.config
        db = batch.intermediate(c.log_mel())  # [B, n_mels, T]
        coefficients = scipy.fft.dct(db, axis=1, type=2, norm="ortho")[:, : c.n_mfcc, :]
        if c.lifter > 0:
            # in the coefficients' dtype, as librosa does, so liftered values match it bit for bit
            lift = np.sin(np.pi * np.arange(1, 1 + c.n_mfcc, dtype=coefficients.dtype) / c.lifter)
            coefficients = coefficients * (1 + (c.lifter / 2) * lift)[None, :, None]
        return {"mfcc": np.ascontiguousarray(coefficients.transpose(0, 2, 1), dtype=np.float32)}
