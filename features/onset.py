"""`onset`: onset strength per frame and a global tempo estimate per clip.

`onset_strength` `[T]` matches `librosa.onset.onset_strength(y=..., n_fft, hop_length, n_mels,
fmin, fmax, lag, max_size)` per item: the mean over mel bands of the positive dB increase from
frame t - lag to t, delayed by n_fft // (2 * hop_length) frames as librosa's `center=True` does.
It reads the shared `LogMelSpectrogram` intermediate (librosa's onset_strength uses amin=1e-10 and
top_db=80, logmel's defaults), so at logmel's mel parameters it costs no extra spectrogram.

`onset_tempo` `()` in BPM matches `librosa.feature.tempo(onset_envelope=<the item's own
onset_strength frames>, hop_length, start_bpm, std_bpm, ac_size, max_tempo)`. The tempogram
depends on where an item ends, so it is computed per item on its valid frames. Silence has no
periodicity, so its tempo is wherever the log-normal prior peaks (near start_bpm).

Both run on the whole item's dB mel spectrogram, so a long item is extracted in windows of
its mel power alone (`features/base.py`), and the tempogram, `ac_size` seconds of lags for every
frame, is averaged in blocks of frames rather than built for the whole item (a 30-minute item's
would be gigabytes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from features.base import Batch, Extractor, FrameIntermediate, LogMelSpectrogram, MelConfig, OutputSpec
from features.registry import register_extractor


@dataclasses.dataclass(frozen=True)
class OnsetConfig(MelConfig):
    """MelConfig (n_fft, hop_length, win_length; n_mels, fmin, fmax: mel bands and their edges in
    Hz, fmax None = Nyquist, librosa's default for onset strength) plus lag: frames
    between the compared spectra; max_size: width in mel bands of the maximum filter on the
    reference spectrum (1 = none); start_bpm, std_bpm: log-normal tempo prior (centre in BPM,
    width in octaves); ac_size: autocorrelation window in seconds; max_tempo: upper tempo bound
    in BPM (None = unbounded). Mel defaults equal logmel's, so both share one mel spectrogram."""

    lag: int = 1
    max_size: int = 1
    start_bpm: float = 120.0
    std_bpm: float = 1.0
    ac_size: float = 8.0
    max_tempo: float | None = 320.0

    def __post_init__(self):
        super().__post_init__()
        if self.lag < 1 or self.max_size < 1:
            raise ValueError(f"lag={self.lag} and max_size={self.max_size} must be positive integers")
        if self.start_bpm <= 0 or self.std_bpm <= 0 or self.ac_size <= 0:
            raise ValueError("start_bpm, std_bpm and ac_size must be positive")

    def log_mel(self) -> LogMelSpectrogram:
        """The shared dB mel intermediate, at librosa onset_strength's fixed amin and top_db."""
        return LogMelSpectrogram(self.mel(), amin=1e-10, top_db=80.0)


def onset_strength(db: np.ndarray, *, lag: int, max_size: int, delay: int) -> np.ndarray:
    """Onset strength `[B, T]` from a dB mel spectrogram `[B, n_mels, T]`.

    delay: the frames librosa shifts the envelope by for centred framing, n_fft // (2 * hop_length).
    Frame t depends only on frames up to t, so an item's valid frames never see the padding.
    """
    import scipy.ndimage

    reference = db if max_size == 1 else scipy.ndimage.maximum_filter1d(db, max_size, axis=1)
    rise = np.maximum(0.0, db[..., lag:] - reference[..., :-lag])
    envelope = np.mean(rise, axis=1)
    envelope = np.pad(envelope, [(0, 0), (lag + delay, 0)], mode="constant")
    return envelope[:, : db.shape[-1]]


# Tempogram frames per block: a [ac_size frames, block] float64 block and its FFT stay a few tens of MiB.
_TEMPOGRAM_FRAMES = 2048


def tempo(
    envelope: np.ndarray,
    *,
    sample_rate: int,
    hop_length: int,
    start_bpm: float,
    std_bpm: float,
    ac_size: float,
    max_tempo: float | None,
) -> float:
    """`librosa.feature.tempo(onset_envelope=envelope, ...)` in BPM for one item's envelope `[T]`.

    The mean of librosa's tempogram (`librosa.feature.tempogram`: a Hann-windowed, max-normalised
    autocorrelation of `ac_size` seconds of the envelope around each frame) is summed over blocks
    of `_TEMPOGRAM_FRAMES` frames, so memory is one block's, not `ac_size` frames x T. Each
    frame's column is librosa's; the mean sums them block by block, so it differs from librosa's
    in float64 rounding only, and the prior and the choice of lag are librosa's own.
    """
    import librosa

    win = int(librosa.time_to_frames(ac_size, sr=sample_rate, hop_length=hop_length).item())
    ac_window = librosa.filters.get_window("hann", win, fftbins=True)[:, None]
    num_frames = envelope.shape[-1]
    # librosa's centring: frame j's window is padded[j : j + win]
    padded = np.pad(envelope, (win // 2, win // 2), mode="linear_ramp", end_values=(0, 0))
    total = np.zeros(win)
    for start in range(0, num_frames, _TEMPOGRAM_FRAMES):
        stop = min(num_frames, start + _TEMPOGRAM_FRAMES)
        frames = librosa.util.frame(padded[start : stop + win - 1], frame_length=win, hop_length=1)  # [win, stop - start]
        block = librosa.util.normalize(librosa.autocorrelate(frames * ac_window, axis=-2), norm=np.inf, axis=-2)
        total += block.sum(axis=-1)
    mean = (total / num_frames)[:, None]
    return librosa.feature.tempo(
        tg=mean,
        sr=sample_rate,
        hop_length=hop_length,
        start_bpm=start_bpm,
        std_bpm=std_bpm,
        max_tempo=max_tempo,
        aggregate=None,
    ).item()


@register_extractor
class Onset(Extractor):
    name = "onset"
    version = "1"
    config_type = OnsetConfig
    description = "onset strength envelope and global tempo"

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config
        return (
            OutputSpec(
                name="onset_strength",
                level="frame",
                shape=(),
                hop_length=c.hop_length,
                sample_rate=self.sample_rate,
                description=f"mean positive log-mel flux (dB), {c.n_mels} bands, lag {c.lag}",
            ),
            OutputSpec(
                name="onset_tempo",
                level="clip",
                shape=(),
                sample_rate=self.sample_rate,
                description="global tempo estimate (BPM) from the onset autocorrelation",
            ),
        )

    def window_parts(self) -> tuple[FrameIntermediate, ...]:
        # Strength (lag frames back) and tempo run on the whole item's dB, so windows need no context.
        return (self.config.mel(),)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        c = self.config
        db = batch.intermediate(c.log_mel())
        envelope = onset_strength(db, lag=c.lag, max_size=c.max_size, delay=c.n_fft // (2 * c.hop_length))
        tempi = np.zeros(len(batch), dtype=np.float32)
        for i, frames in enumerate(batch.frame_counts(c.hop_length)):
            tempi[i] = tempo(
                envelope[i, :frames],
                sample_rate=batch.sample_rate,
                hop_length=c.hop_length,
                start_bpm=c.start_bpm,
                std_bpm=c.std_bpm,
                ac_size=c.ac_size,
                max_tempo=c.max_tempo,
            )
        return {
            "onset_strength": np.ascontiguousarray(envelope, dtype=np.float32),
            "onset_tempo": tempi,
        }
