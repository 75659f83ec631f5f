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

Every descriptor is frame-local (the frame-level intermediates below: `SpectralShape`,
`ContrastPeaksValleys`, `ZeroCrossingRate`, `Rms`), so a long item is extracted in windows; only
contrast's per-item dB clip, which needs the item's loudest frame, runs on the whole item, over
its assembled peaks and valleys.

Nothing here imports librosa: its zero-crossing and frame helpers are numba code, which a fresh
install compiles on first use (17 s of a 20 s first sample run). `fft_frequencies`,
`zero_crossings` and `rms` below are NumPy transcriptions of librosa 0.11's, with the same
operations on the same memory layout, so their results are bit-identical
(tests/features/test_spectral.py compares them with librosa's).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from featurebeam.errors import ConfigError
from features.base import Batch, Extractor, FrameIntermediate, FramingConfig, OutputSpec, PowerSpectrogram, Stft, power_to_db
from features.registry import register_extractor


def fft_frequencies(*, sample_rate: float, n_fft: int) -> np.ndarray:
    """`librosa.fft_frequencies(sr=sample_rate, n_fft=n_fft)`: the STFT rows' centre frequencies in Hz."""
    return np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)


def zero_crossings(y: np.ndarray, *, threshold: float = 1e-10) -> np.ndarray:
    """`librosa.zero_crossings(y, threshold=threshold, pad=False, zero_pos=True, axis=-1)`.

    Values within +-threshold count as zero, and zero as positive: a crossing is a change of sign
    bit from the previous sample. The first sample is never one."""
    y = np.asarray(y)
    small = np.abs(y) <= np.asarray(threshold, dtype=y.dtype)  # librosa's kernel compares in y's dtype
    sign = np.signbit(np.where(small, np.zeros((), dtype=y.dtype), y))
    z = np.empty(y.shape, dtype=bool)
    z[..., 0] = False
    np.not_equal(sign[..., 1:], sign[..., :-1], out=z[..., 1:])
    return z


def frame_rms(y: np.ndarray, *, frame_length: int, hop_length: int) -> np.ndarray:
    """`librosa.feature.rms(y=y, frame_length, hop_length, center=False)`, `[..., 1, T]` float32.

    The frames are the strided view `librosa.util.frame` makes, `[..., frame_length, T]`, so the
    mean runs over the same memory in the same order as librosa's."""
    y = np.asarray(y)
    windows = np.lib.stride_tricks.as_strided(
        y, shape=(*y.shape[:-1], y.shape[-1] - frame_length + 1, frame_length), strides=(*y.strides, y.strides[-1]), writeable=False
    )
    frames = np.moveaxis(windows, -1, -2)[..., ::hop_length]
    return np.sqrt(np.mean(np.square(frames, dtype=np.float32), axis=-2, keepdims=True))


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
    octaves = np.zeros(n_bands + 2)
    octaves[1:] = fmin * (2.0 ** np.arange(0, n_bands + 1))
    if np.any(octaves[:-1] >= 0.5 * sample_rate):
        raise ConfigError(
            f"spectral: the top contrast band starts at {octaves[-2]:g} Hz, at or above Nyquist "
            f"({sample_rate / 2:g} Hz at sample_rate={sample_rate}); lower n_bands or contrast_fmin"
        )
    freq = fft_frequencies(sample_rate=sample_rate, n_fft=n_fft)
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


def contrast_peaks_valleys(magnitude: np.ndarray, *, bands: tuple[tuple[np.ndarray, int], ...]) -> np.ndarray:
    """`[B, 2, n_bands + 1, T]` float64: each band's valley (index 0) and peak (1) magnitude per
    frame from a magnitude STFT `[B, F, T]`, as librosa.feature.spectral_contrast averages them.

    Each frame's bins are sorted and averaged along a contiguous last axis: numpy sums a
    contiguous axis pairwise but a strided one in sequence, and which axis indexing leaves
    contiguous changes with the number of frames, so a frame's last bits depended on the batch's
    or the window's length.
    """
    spectrum = magnitude.transpose(0, 2, 1)  # [B, T, F]; C-contiguous for the shared STFT
    batch_size, num_frames, _ = spectrum.shape
    out = np.zeros((batch_size, 2, len(bands), num_frames))
    for k, (rows, count) in enumerate(bands):
        # indexing can lay the band out time-contiguous; copy so each frame's bins are contiguous
        ordered = np.sort(np.ascontiguousarray(spectrum[:, :, rows]), axis=-1)  # [B, T, rows]
        out[:, 0, k, :] = np.mean(ordered[..., :count], axis=-1)
        out[:, 1, k, :] = np.mean(ordered[..., -count:], axis=-1)
    return out


def contrast_db(peaks_valleys: np.ndarray, *, lengths_in_frames: np.ndarray) -> np.ndarray:
    """Spectral contrast in dB, `[B, n_bands + 1, T]`, from `contrast_peaks_valleys`: librosa's
    `power_to_db(peak) - power_to_db(valley)` with its top_db=80 clip taken per item over the
    item's valid frames."""
    db = functools.partial(power_to_db, amin=1e-10, top_db=80.0, lengths_in_frames=lengths_in_frames, dtype=np.float64)
    return db(peaks_valleys[:, 1]) - db(peaks_valleys[:, 0])


def _edge_padded(batch: Batch, start: int, stop: int) -> np.ndarray:
    """`[B, stop - start]` samples start..stop of every item, each item extended past its ends
    by its own first and last sample (librosa's `pad_mode="edge"` centring)."""
    segment = batch.samples(start, stop)
    if batch.waveforms.shape[1] == 0:
        return segment
    positions = np.arange(start, stop)[None, :]
    first = batch.waveforms[:, :1]
    last = batch.waveforms[np.arange(len(batch)), np.maximum(batch.lengths - 1, 0)][:, None]
    segment = np.where(positions < 0, first, segment)
    return np.where(positions >= batch.lengths[:, None], last, segment)


@dataclasses.dataclass(frozen=True)
class SpectralShape(FrameIntermediate):
    """`[B, 4, T]` float32 (time-major in memory): spectral centroid, bandwidth and rolloff in Hz
    and flatness per frame, from the shared magnitude and power STFT."""

    stft: Stft
    roll_percent: float = 0.85
    flatness_amin: float = 1e-10

    @property
    def hop_length(self) -> int:
        return self.stft.hop_length

    def compute(self, batch: Batch) -> np.ndarray:
        magnitude = batch.intermediate(self.stft)  # [B, F, T]
        power = batch.intermediate(PowerSpectrogram(self.stft, power=2.0))
        # Explicit bin frequencies: librosa would infer n_fft from the row count.
        freq = fft_frequencies(sample_rate=batch.sample_rate, n_fft=self.stft.n_fft)
        centroid, bandwidth, rolloff = spectral_moments(magnitude, freq=freq, roll_percent=self.roll_percent)
        flatness = spectral_flatness(power, amin=self.flatness_amin)[:, 0, :]
        return np.stack([centroid, bandwidth, rolloff, flatness], axis=-1).astype(np.float32, copy=False).transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class ContrastPeaksValleys(FrameIntermediate):
    """`contrast_peaks_valleys` of the shared magnitude STFT, `[B, 2, n_bands + 1, T]` float64."""

    stft: Stft
    n_bands: int = 6
    fmin: float = 200.0
    quantile: float = 0.02

    @property
    def hop_length(self) -> int:
        return self.stft.hop_length

    def compute(self, batch: Batch) -> np.ndarray:
        bands = contrast_bands(
            sample_rate=batch.sample_rate, n_fft=self.stft.n_fft, n_bands=self.n_bands, fmin=self.fmin, quantile=self.quantile
        )
        return contrast_peaks_valleys(batch.intermediate(self.stft), bands=bands)


@dataclasses.dataclass(frozen=True)
class ZeroCrossingRate(FrameIntermediate):
    """`librosa.feature.zero_crossing_rate(y, frame_length, hop_length, center=True)` per item,
    `[B, T]` float64.

    librosa pads each end with the item's edge sample, so the padding after each item repeats its
    own last sample rather than the batch's zeros. Crossings are counted once per sample pair and
    summed per frame with a cumulative sum, instead of materialising every frame; the counts are
    integers, so windows give the whole item's values exactly.
    """

    frame_length: int = 2048
    hop_length: int = 512

    def compute(self, batch: Batch) -> np.ndarray:
        first, stop = batch.frame_range(self.hop_length)
        half = self.frame_length // 2
        # padded[j] is item sample first * hop - half + j; frame t starts at (t - first) * hop
        padded = _edge_padded(batch, first * self.hop_length - half, (stop - 1) * self.hop_length + self.frame_length - half)
        crossings = zero_crossings(padded)
        cumulative = np.cumsum(crossings, axis=-1, dtype=np.int32)  # half int64's memory traffic; counts < 2**31
        starts = np.arange(stop - first) * self.hop_length
        counts = cumulative[:, starts + self.frame_length - 1] - cumulative[:, starts]
        return counts / self.frame_length


@dataclasses.dataclass(frozen=True)
class Rms(FrameIntermediate):
    """Time-domain RMS `[B, T]` float32 over `frame_length`-sample centred frames with zero padding:
    `librosa.feature.rms(y=..., center=True)` per item."""

    frame_length: int = 2048
    hop_length: int = 512

    def compute(self, batch: Batch) -> np.ndarray:
        first, stop = batch.frame_range(self.hop_length)
        half = self.frame_length // 2
        # The batch's zero padding equals librosa's constant centre padding, so this is exact per item.
        padded = batch.samples(first * self.hop_length - half, (stop - 1) * self.hop_length + self.frame_length - half)
        rms = frame_rms(padded, frame_length=self.frame_length, hop_length=self.hop_length)
        return rms[:, 0, :]


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

    def _parts(self) -> tuple[FrameIntermediate, ...]:
        c = self.config
        stft = c.stft()
        return (
            SpectralShape(stft, roll_percent=c.roll_percent, flatness_amin=c.flatness_amin),
            ContrastPeaksValleys(stft, n_bands=c.n_bands, fmin=c.contrast_fmin, quantile=c.contrast_quantile),
            ZeroCrossingRate(frame_length=c.n_fft, hop_length=c.hop_length),
            # From the waveform, not the STFT: librosa's rms(S=...) weights samples by the window, so
            # the two differ; rms(y=...) is the plain RMS of each frame's samples.
            Rms(frame_length=c.n_fft, hop_length=c.hop_length),
        )

    def window_parts(self) -> tuple[FrameIntermediate, ...]:
        return self._parts()

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        shape_part, contrast_part, zcr_part, rms_part = self._parts()
        shape = batch.intermediate(shape_part)  # [B, 4, T]
        contrast = contrast_db(batch.intermediate(contrast_part), lengths_in_frames=batch.frame_counts(self.config.hop_length))

        def frames(values: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(values, dtype=np.float32)

        return {
            "spectral_centroid": frames(shape[:, 0]),
            "spectral_bandwidth": frames(shape[:, 1]),
            "spectral_rolloff": frames(shape[:, 2]),
            "spectral_flatness": frames(shape[:, 3]),
            "spectral_contrast": frames(contrast.transpose(0, 2, 1)),
            "spectral_zcr": frames(batch.intermediate(zcr_part)),
            "spectral_rms": frames(batch.intermediate(rms_part)),
        }
