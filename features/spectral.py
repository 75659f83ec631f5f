"""`spectral`: per-frame spectral shape descriptors and two time-domain ones.

Outputs (frame-level, one value per frame unless noted), each matching the librosa function of
the same name called on each item's own waveform with `n_fft`, `hop_length` and `center=True`:
centroid, bandwidth (p=2) and rolloff in Hz, flatness (power spectrum, unitless), contrast in dB
(`[T, n_bands + 1]`), zero-crossing rate (fraction of sample pairs per frame, frame_length=n_fft)
and RMS (time-domain, frame_length=n_fft).

The spectral descriptors read the shared magnitude and power STFT intermediates. Two librosa
functions are not batch-safe as-is and are reimplemented here per item: spectral contrast clips
its dB values against the maximum of the whole array it is given (so a loud item would move a
quiet one's values), and zero-crossing rate pads each end with the item's own edge sample (so the
batch's zero padding would change an item's last frames).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from featurebeam.errors import ConfigError
from features.base import Batch, Extractor, FramingConfig, OutputSpec, PowerSpectrogram, power_to_db
from features.registry import register_extractor


@dataclasses.dataclass(frozen=True)
class SpectralConfig(FramingConfig):
    """FramingConfig (n_fft, hop_length, win_length; n_fft is also the frame length of
    zero-crossing rate and RMS) plus roll_percent: fraction of a frame's magnitude below the rolloff
    frequency; n_bands: octave bands of spectral contrast above contrast_fmin (Hz), giving
    n_bands + 1 values per frame; contrast_quantile: fraction of each band's bins averaged for its
    peak and valley; flatness_amin: power floor of spectral flatness.
    The STFT defaults equal logmel's, so both share one STFT."""

    roll_percent: float = 0.85
    n_bands: int = 6
    contrast_fmin: float = 200.0
    contrast_quantile: float = 0.02
    flatness_amin: float = 1e-10

    def __post_init__(self):
        super().__post_init__()
        if self.n_bands <= 0:
            raise ValueError(f"n_bands={self.n_bands} must be positive")
        if not 0.0 < self.roll_percent < 1.0:
            raise ValueError(f"roll_percent={self.roll_percent} must lie strictly between 0 and 1")
        if not 0.0 < self.contrast_quantile < 1.0:
            raise ValueError(f"contrast_quantile={self.contrast_quantile} must lie strictly between 0 and 1")
        if self.contrast_fmin <= 0 or self.flatness_amin <= 0:
            raise ValueError("contrast_fmin and flatness_amin must be positive")


def spectral_flatness(power: np.ndarray, *, amin: float) -> np.ndarray:
    """librosa.feature.spectral_flatness(S=power, power=1.0) of `[B, F, T]`, returned `[B, 1, T]`.

    The means run over a contiguous last axis, so an item's values do not depend on which other
    items share its batch (numpy's reduction over a middle axis changes order with the array's
    shape, which made flatness differ in the last bit between batch compositions).
    """
    floored = np.ascontiguousarray(np.maximum(amin, power).transpose(0, 2, 1))  # [B, T, F]
    geometric = np.exp(np.mean(np.log(floored), axis=-1))
    arithmetic = np.mean(floored, axis=-1)
    return (geometric / arithmetic)[:, None, :]


def spectral_moments(magnitude: np.ndarray, *, freq: np.ndarray, roll_percent: float) -> tuple[np.ndarray, ...]:
    """Centroid, bandwidth (p=2) and rolloff in Hz, each `[B, T]`, from a magnitude STFT `[B, F, T]`.

    The arithmetic of `librosa.feature.spectral_centroid`, `spectral_bandwidth` and
    `spectral_rolloff` on each frame (a frame whose magnitude sums below float32's `tiny` is
    left unnormalised, as librosa.util.normalize does), without their normalised `[B, F, T]`
    copies and in float32. Sums run over each frame's contiguous bins (the STFT is time-major in
    memory), so a frame's values do not depend on the rest of its batch.
    """
    spectrum = magnitude.transpose(0, 2, 1)  # [B, T, F]; C-contiguous for the shared STFT
    freq = freq.astype(spectrum.dtype)
    total = np.sum(spectrum, axis=-1)
    norm = np.where(total < np.finfo(spectrum.dtype).tiny, 1.0, total).astype(spectrum.dtype)
    centroid = np.sum(spectrum * freq, axis=-1) / norm
    deviation = freq - centroid[..., None]
    deviation *= deviation
    deviation *= spectrum
    bandwidth = np.sqrt(np.sum(deviation, axis=-1) / norm)
    cumulative = np.cumsum(spectrum, axis=-1)
    # the lowest bin whose cumulative magnitude reaches roll_percent of the frame's total
    reached = cumulative >= (roll_percent * cumulative[..., -1])[..., None]
    rolloff = freq[np.argmax(reached, axis=-1)]
    return centroid, bandwidth, rolloff


@functools.lru_cache(maxsize=16)
def contrast_bands(
    *, sample_rate: int, n_fft: int, n_bands: int, fmin: float, quantile: float
) -> tuple[tuple[np.ndarray, int], ...]:
    """Per band of `librosa.feature.spectral_contrast`: the STFT rows it sorts, and how many of the
    lowest and highest of them its valley and peak average. Raises ConfigError if a band is empty
    or starts above Nyquist."""
    import librosa

    octaves = np.zeros(n_bands + 2)
    octaves[1:] = fmin * (2.0 ** np.arange(0, n_bands + 1))
    if np.any(octaves[:-1] >= 0.5 * sample_rate):
        raise ConfigError(
            f"spectral: the top contrast band starts at {octaves[-2]:g} Hz, at or above Nyquist "
            f"({sample_rate / 2:g} Hz at sample_rate={sample_rate}); lower n_bands or contrast_fmin"
        )
    freq = librosa.fft_frequencies(sr=sample_rate, n_fft=n_fft)
    bands = []
    for k, (f_low, f_high) in enumerate(zip(octaves[:-1], octaves[1:])):
        in_band = (freq >= f_low) & (freq <= f_high)
        rows = np.flatnonzero(in_band)
        if rows.size == 0:
            raise ConfigError(
                f"spectral: contrast band {k} ({f_low:g}-{f_high:g} Hz) holds no STFT bin at "
                f"n_fft={n_fft}; raise n_fft or contrast_fmin"
            )
        # librosa widens each band by the bin below it and the last band up to Nyquist, counts the
        # quantile on that widened band, then drops each lower band's top bin from the sort.
        if k > 0:
            in_band[rows[0] - 1] = True
        if k == n_bands:
            in_band[rows[-1] + 1 :] = True
        count = max(int(np.rint(quantile * np.sum(in_band))), 1)
        rows = np.flatnonzero(in_band)
        if k < n_bands:
            rows = rows[:-1]
        bands.append((rows, count))
    return tuple(bands)


def spectral_contrast(
    magnitude: np.ndarray, *, bands: tuple[tuple[np.ndarray, int], ...], lengths_in_frames: np.ndarray
) -> np.ndarray:
    """Spectral contrast in dB, `[B, n_bands + 1, T]`, from a magnitude STFT `[B, F, T]`.

    Same arithmetic as `librosa.feature.spectral_contrast(S=..., linear=False)` on each item,
    with its power_to_db top_db=80 clip taken per item over the item's valid frames.
    """
    batch_size, _, num_frames = magnitude.shape
    valley = np.zeros((batch_size, len(bands), num_frames))
    peak = np.zeros_like(valley)
    for k, (rows, count) in enumerate(bands):
        ordered = np.sort(magnitude[:, rows, :], axis=1)
        valley[:, k, :] = np.mean(ordered[:, :count, :], axis=1)
        peak[:, k, :] = np.mean(ordered[:, -count:, :], axis=1)
    db = functools.partial(power_to_db, amin=1e-10, top_db=80.0, lengths_in_frames=lengths_in_frames, dtype=np.float64)
    return db(peak) - db(valley)


def zero_crossing_rate(
    waveforms: np.ndarray, *, lengths: np.ndarray, frame_length: int, hop_length: int
) -> np.ndarray:
    """`librosa.feature.zero_crossing_rate(y, frame_length, hop_length, center=True)` per item,
    `[B, T]` with T = 1 + n // hop_length for the padded length n.

    librosa pads each end with the item's edge sample, so the padding after each item repeats its
    own last sample rather than the batch's zeros. Crossings are counted once per sample pair and
    summed per frame with a cumulative sum, instead of materialising every frame.
    """
    import librosa

    batch_size, n = waveforms.shape
    half = frame_length // 2
    padded = np.zeros((batch_size, n + 2 * half), dtype=waveforms.dtype)
    padded[:, half : half + n] = waveforms
    if n:
        padded[:, :half] = waveforms[:, :1]
        last = waveforms[np.arange(batch_size), np.maximum(lengths - 1, 0)]
        after_item = np.arange(padded.shape[1])[None, :] >= (half + lengths)[:, None]
        padded = np.where(after_item, last[:, None], padded)
    # crossings[:, j] says whether samples j - 1 and j cross; a frame starting at s counts the
    # pairs ending at s + 1 .. s + frame_length - 1 (librosa's pad=False) and divides by frame_length.
    crossings = librosa.zero_crossings(padded, pad=False, axis=-1)
    cumulative = np.cumsum(crossings, axis=-1, dtype=np.int32)  # half int64's memory traffic; counts < 2**31
    starts = np.arange(1 + n // hop_length) * hop_length
    counts = cumulative[:, starts + frame_length - 1] - cumulative[:, starts]
    return counts / frame_length


@register_extractor
class Spectral(Extractor):
    name = "spectral"
    version = "1"
    config_type = SpectralConfig
    description = "spectral centroid, bandwidth, rolloff, flatness, contrast, zero-crossing rate and RMS"

    def __init__(self, config: SpectralConfig | None = None, *, sample_rate: int):
        super().__init__(config, sample_rate=sample_rate)
        self._bands()  # a band above Nyquist is a config error: say so at build time, not mid-run

    def _bands(self) -> tuple[tuple[np.ndarray, int], ...]:
        c = self.config
        return contrast_bands(
            sample_rate=self.sample_rate,
            n_fft=c.n_fft,
            n_bands=c.n_bands,
            fmin=c.contrast_fmin,
            quantile=c.contrast_quantile,
        )

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config

        def frame(name: str, shape: tuple[int, ...], description: str) -> OutputSpec:
            return OutputSpec(
                name=name,
                level="frame",
                shape=shape,
                hop_length=c.hop_length,
                sample_rate=self.sample_rate,
                description=description,
            )

        return (
            frame("spectral_centroid", (), "spectral centroid (Hz)"),
            frame("spectral_bandwidth", (), "spectral bandwidth around the centroid, p=2 (Hz)"),
            frame("spectral_rolloff", (), f"frequency below which {c.roll_percent:.0%} of the magnitude lies (Hz)"),
            frame("spectral_flatness", (), "spectral flatness of the power spectrum (0..1)"),
            frame(
                "spectral_contrast",
                (c.n_bands + 1,),
                f"spectral contrast (dB) in {c.n_bands + 1} octave bands from {c.contrast_fmin:g} Hz",
            ),
            frame("spectral_zcr", (), f"zero-crossing rate over {c.n_fft}-sample frames (crossings per sample)"),
            frame("spectral_rms", (), f"time-domain RMS over {c.n_fft}-sample frames"),
        )

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        import librosa

        c = self.config
        sr = batch.sample_rate
        stft = c.stft()
        magnitude = batch.intermediate(stft)  # [B, F, T]
        power = batch.intermediate(PowerSpectrogram(stft, power=2.0))
        # Explicit bin frequencies: librosa would infer n_fft from the row count.
        freq = librosa.fft_frequencies(sr=sr, n_fft=c.n_fft)

        centroid, bandwidth, rolloff = spectral_moments(magnitude, freq=freq, roll_percent=c.roll_percent)
        flatness = spectral_flatness(power, amin=c.flatness_amin)
        contrast = spectral_contrast(
            magnitude, bands=self._bands(), lengths_in_frames=batch.frame_counts(c.hop_length)
        )
        zcr = zero_crossing_rate(batch.waveforms, lengths=batch.lengths, frame_length=c.n_fft, hop_length=c.hop_length)
        # From the waveform, not the STFT: librosa's rms(S=...) weights samples by the window, so
        # the two differ; rms(y=...) is the plain RMS of each frame's samples. Zero padding of the
        # batch equals librosa's constant centre padding, so this is exact per item.
        rms = librosa.feature.rms(y=batch.waveforms, frame_length=c.n_fft, hop_length=c.hop_length, center=True)

        def frames(values: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(values, dtype=np.float32)

        return {
            "spectral_centroid": frames(centroid),
            "spectral_bandwidth": frames(bandwidth),
            "spectral_rolloff": frames(rolloff),
            "spectral_flatness": frames(flatness[:, 0, :]),
            "spectral_contrast": frames(contrast.transpose(0, 2, 1)),
            "spectral_zcr": frames(zcr),
            "spectral_rms": frames(rms[:, 0, :]),
        }
