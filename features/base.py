"""The extractor contract: configs, output specs, batches and shared intermediates.

An extractor turns a `Batch` of equal-rate mono waveforms into named arrays. Extractors never
compute an STFT or mel spectrogram themselves: they ask the batch for an `Intermediate` (a frozen
dataclass of parameters), and the batch computes each distinct intermediate once. So `logmel`,
`mfcc` and `spectral` at the same STFT parameters share one STFT per batch, and `summary` reuses
the outputs of the extractors it summarises instead of recomputing them.

Array conventions (B = batch size, T = frames of the longest item in the batch):
- frame-level outputs are `[B, T, *spec.shape]`, time-major per item; frames past an item's own
  length are padding and are trimmed by `Batch.frame_counts`.
- clip-level outputs are `[B, *spec.shape]`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar, Literal, Mapping

import numpy as np

from featurebeam.errors import ConfigError, FeatureError


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """One named output of an extractor.

    name: the qualified feature name used in TFRecords, Parquet and BigQuery (`logmel`,
      `spectral_centroid`); letters, digits and underscores only.
    level: "frame" (one value of `shape` per frame) or "clip" (one value of `shape` per item).
    shape: per-frame shape for frame-level outputs, per-item shape for clip-level ones
      (`()` is a scalar).
    hop_length: samples between frames, for frame-level outputs (frames are centred, so an item
      of n samples has `1 + n // hop_length` frames).
    sample_rate: the rate the hop is measured in, in Hz.
    """

    name: str
    level: Literal["frame", "clip"]
    shape: tuple[int, ...]
    dtype: str = "float32"
    hop_length: int | None = None
    sample_rate: int | None = None
    description: str = ""

    def __post_init__(self):
        if not self.name.replace("_", "").isalnum() or not self.name[0].isalpha():
            raise FeatureError(
                f"output name {self.name!r} must start with a letter and hold only letters, "
                "digits and underscores (it becomes a TFRecord key and a BigQuery column)"
            )
        if self.level not in ("frame", "clip"):
            raise FeatureError(f"output {self.name!r}: level must be 'frame' or 'clip', not {self.level!r}")
        if self.level == "frame" and not self.hop_length:
            raise FeatureError(f"frame-level output {self.name!r} needs a hop_length")

    @property
    def frame_rate(self) -> float | None:
        """Frames per second, for frame-level outputs."""
        if self.level != "frame":
            return None
        return self.sample_rate / self.hop_length

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["frame_rate"] = self.frame_rate
        return out


class Intermediate(abc.ABC):
    """A shared computation over a batch, identified by its (frozen dataclass) parameters.

    Subclasses are frozen dataclasses, so two extractors asking for the same parameters get the
    same cache key and the batch computes the value once.
    """

    @abc.abstractmethod
    def compute(self, batch: "Batch") -> np.ndarray:
        """Compute the value for the whole batch."""


@functools.lru_cache(maxsize=16)
def stft_window(*, window: str, win_length: int, n_fft: int) -> np.ndarray:
    """librosa's STFT window `[n_fft]` float32: scipy's periodic `window` of `win_length`
    samples, zero-padded on both sides to n_fft (librosa.filters.get_window + util.pad_center)."""
    import scipy.signal

    full = np.zeros(n_fft, dtype=np.float32)
    left = (n_fft - win_length) // 2
    full[left : left + win_length] = scipy.signal.get_window(window, win_length, fftbins=True)
    return full


# Frames transformed per rfft call: a few MiB of float32, so the windowed copy stays in cache
# and a long item never materialises all its frames at once.
_FRAMES_PER_BLOCK = 2048


@dataclasses.dataclass(frozen=True)
class ComplexStft(Intermediate):
    """Complex STFT, `[B, 1 + n_fft // 2, T]` complex64, centred with zero padding as
    `librosa.stft(center=True, pad_mode="constant")`.

    Computed in float32 from frames that are views of the padded waveform (no framed copy
    beyond one block), and laid out time-major in memory: the array is a `[B, F, T]` view of a
    C-contiguous `[B, T, F]` one, so the mel projection and the `[T, n_mels]` outputs read it
    without transposing copies. librosa windows in float64 and rounds to complex64; the values
    here differ from it by float32 rounding only (tests/features compare with librosa).
    """

    n_fft: int = 2048
    hop_length: int = 512
    win_length: int | None = None
    window: str = "hann"

    def compute(self, batch: "Batch") -> np.ndarray:
        import scipy.fft  # pocketfft with its plan cache: 3-4x numpy.fft's speed on these blocks

        n_fft, hop = self.n_fft, self.hop_length
        window = stft_window(window=self.window, win_length=self.win_length or n_fft, n_fft=n_fft)
        size, n = batch.waveforms.shape
        num_frames = 1 + n // hop
        padded = np.zeros((size, n + 2 * (n_fft // 2)), dtype=np.float32)
        padded[:, n_fft // 2 : n_fft // 2 + n] = batch.waveforms
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop][:, :num_frames]
        out = np.empty((size, num_frames, 1 + n_fft // 2), dtype=np.complex64)
        for start in range(0, num_frames, _FRAMES_PER_BLOCK):
            stop = min(start + _FRAMES_PER_BLOCK, num_frames)
            out[:, start:stop] = scipy.fft.rfft(frames[:, start:stop] * window, axis=-1)
        return out.transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class Stft(Intermediate):
    """Magnitude STFT `|ComplexStft|`, `[B, 1 + n_fft // 2, T]` float32 (time-major in memory)."""

    n_fft: int = 2048
    hop_length: int = 512
    win_length: int | None = None
    window: str = "hann"

    def complex(self) -> ComplexStft:
        return ComplexStft(n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length, window=self.window)

    def compute(self, batch: "Batch") -> np.ndarray:
        return np.abs(batch.intermediate(self.complex()))


@dataclasses.dataclass(frozen=True)
class PowerSpectrogram(Intermediate):
    """`|STFT| ** power`, `[B, 1 + n_fft // 2, T]` float32. Power 2 is `re² + im²` straight from
    the complex STFT (no square root then square); other powers go through the magnitude."""

    stft: Stft
    power: float = 2.0

    def compute(self, batch: "Batch") -> np.ndarray:
        if self.power == 2.0:
            spectrum = batch.intermediate(self.stft.complex())
            return np.square(spectrum.real) + np.square(spectrum.imag)
        magnitude = batch.intermediate(self.stft)
        if self.power == 1.0:
            return magnitude
        return magnitude**self.power


def project(basis: np.ndarray, spectrum: np.ndarray, *, frames: np.ndarray) -> np.ndarray:
    """`basis [K, F]` applied to each item of `spectrum [B, F, T]` over its own `frames[i]` frames.

    Returns `[B, K, T]` with padding frames zero. One product per item, shaped by that item
    alone: a single batched product lets BLAS split the sums differently as the batch's padded
    length changes, which moved an item's last bits with whatever shared its batch and broke
    byte-identical reruns.

    The product runs time-major (`[T, F] @ [F, K]`), which is how the STFT lies in memory and
    how the `[T, K]` outputs are laid out, so neither side is copied into another order; the
    result is a `[B, K, T]` view of a C-contiguous `[B, T, K]` array.
    """
    out = np.zeros((spectrum.shape[0], spectrum.shape[2], basis.shape[0]), dtype=np.result_type(basis, spectrum))
    basis_t = basis.T
    for i, n in enumerate(frames):
        n = min(int(n), spectrum.shape[2])
        np.matmul(spectrum[i, :, :n].T, basis_t, out=out[i, :n])
    return out.transpose(0, 2, 1)


def _hz_to_mel(hz: np.ndarray, *, htk: bool) -> np.ndarray:
    """librosa.hz_to_mel: HTK's formula, or Slaney's (linear below 1 kHz, logarithmic above)."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    mels = hz / f_sp
    above = hz >= min_log_hz
    mels[above] = min_log_hz / f_sp + np.log(hz[above] / min_log_hz) / (np.log(6.4) / 27.0)
    return mels


def _mel_to_hz(mels: np.ndarray, *, htk: bool) -> np.ndarray:
    """librosa.mel_to_hz, the inverse of `_hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    hz = f_sp * mels
    above = mels >= min_log_hz / f_sp
    hz[above] = min_log_hz * np.exp(np.log(6.4) / 27.0 * (mels[above] - min_log_hz / f_sp))
    return hz


@functools.lru_cache(maxsize=64)
def mel_filter_bank(
    *, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None, htk: bool, norm: str | None
) -> np.ndarray:
    """librosa's mel filter bank `[n_mels, 1 + n_fft // 2]` float32, built once per process per parameters.

    The same arithmetic as `librosa.filters.mel` (tests/features/test_base.py checks it bit for
    bit) in NumPy, so the log-mel and MFCC path never imports librosa, and with it numba: seconds
    of start-up in every worker. Other `norm`s than "slaney" and None go to librosa.
    """
    if norm not in ("slaney", None):
        import librosa

        return librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm
        ).astype(np.float32)
    fmax = float(sample_rate) / 2 if fmax is None else fmax
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    low, high = _hz_to_mel(np.array([fmin, fmax]), htk=htk)
    edges = _mel_to_hz(np.linspace(low, high, n_mels + 2), htk=htk)
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_freqs)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":  # constant energy per band
        weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, np.newaxis]
    return weights


@dataclasses.dataclass(frozen=True)
class MelSpectrogram(Intermediate):
    """Mel spectrogram `[B, n_mels, T]` of a power spectrogram (librosa.feature.melspectrogram)."""

    power: PowerSpectrogram
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    htk: bool = False
    norm: str | None = "slaney"

    def compute(self, batch: "Batch") -> np.ndarray:
        basis = mel_filter_bank(
            sample_rate=batch.sample_rate,
            n_fft=self.power.stft.n_fft,
            n_mels=self.n_mels,
            fmin=self.fmin,
            fmax=self.fmax,
            htk=self.htk,
            norm=self.norm,
        )
        spectrum = batch.intermediate(self.power)
        return project(basis, spectrum, frames=batch.frame_counts(self.power.stft.hop_length))


def power_to_db(
    mel: np.ndarray,
    *,
    amin: float,
    top_db: float | None,
    lengths_in_frames: np.ndarray,
    dtype: Any = np.float32,
) -> np.ndarray:
    """`10 log10(max(amin, S))` with librosa's per-item top_db clip over the item's own frames.

    mel: `[B, F, T]` power (any non-negative `[B, F, T]` array); returns dB of the same shape in
    `dtype` (float32 unless asked otherwise).
    amin: floor before the log (power units); top_db: dB below each item's peak to clip at
    (None = unclipped); lengths_in_frames: `[B]` valid frames per item.

    `librosa.power_to_db(S, ref=1.0)` clips relative to the maximum of the whole array it is
    given, so on a batch it would clip against the loudest item (and against padding); the peak
    here is taken per item over its valid frames, which is what librosa gives on each item alone.
    """
    db = 10.0 * np.log10(np.maximum(amin, mel))
    if top_db is not None:
        mask = np.arange(db.shape[-1])[None, None, :] < lengths_in_frames[:, None, None]
        peak = np.where(mask, db, -np.inf).max(axis=(1, 2), keepdims=True)
        db = np.maximum(db, peak - top_db)
    return db.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class LogMelSpectrogram(Intermediate):
    """Mel power in dB, `[B, n_mels, T]`: `librosa.power_to_db(mel, ref=1.0, amin, top_db)` per item.

    Shared by `logmel`, `mfcc` and `onset` (librosa's mfcc and onset_strength both start from
    `power_to_db(melspectrogram(...))` with amin=1e-10 and top_db=80, logmel's defaults).
    """

    mel: MelSpectrogram
    amin: float = 1e-10
    top_db: float | None = 80.0

    def compute(self, batch: "Batch") -> np.ndarray:
        return power_to_db(
            batch.intermediate(self.mel),
            amin=self.amin,
            top_db=self.top_db,
            lengths_in_frames=batch.frame_counts(self.mel.power.stft.hop_length),
        )


@dataclasses.dataclass(frozen=True)
class FramingConfig:
    """Centred STFT framing shared by the built-in configs: n_fft, hop_length, win_length in
    samples (win_length None = n_fft). The defaults are equal across built-ins, so extractors
    run together share one STFT per batch."""

    n_fft: int = 1024
    hop_length: int = 256
    win_length: int | None = None

    def __post_init__(self):
        if self.n_fft <= 0 or self.hop_length <= 0:
            raise ValueError(f"n_fft={self.n_fft} and hop_length={self.hop_length} must be positive")
        if self.n_fft % 2:
            raise ValueError(f"n_fft={self.n_fft} must be even (centred frames then number 1 + n // hop_length)")
        if self.win_length is not None and not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length={self.win_length} must lie in 1..n_fft={self.n_fft}")

    def stft(self) -> Stft:
        return Stft(n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length)

    def power(self) -> PowerSpectrogram:
        return PowerSpectrogram(self.stft(), power=2.0)


@dataclasses.dataclass(frozen=True)
class MelConfig(FramingConfig):
    """FramingConfig plus mel bands: n_mels, and band edges fmin/fmax in Hz (fmax None = Nyquist)."""

    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n_mels <= 0:
            raise ValueError(f"n_mels={self.n_mels} must be positive")

    def mel(self) -> MelSpectrogram:
        """The shared mel-spectrogram intermediate these parameters describe."""
        return MelSpectrogram(self.power(), n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax)


class Batch:
    """A batch of mono waveforms at one sample rate, zero-padded to a common length.

    waveforms: `[B, n]` float32; item i is valid for `lengths[i]` samples.
    sample_rate: in Hz.
    """

    def __init__(self, *, waveforms: np.ndarray, lengths: np.ndarray, sample_rate: int):
        if waveforms.ndim != 2:
            raise FeatureError(f"a batch holds [B, n] waveforms, got shape {waveforms.shape}")
        if len(lengths) != waveforms.shape[0]:
            raise FeatureError(f"{len(lengths)} lengths for {waveforms.shape[0]} waveforms")
        self.waveforms = np.ascontiguousarray(waveforms, dtype=np.float32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.sample_rate = int(sample_rate)
        self._cache: dict[Any, np.ndarray] = {}
        self.computed: list[Any] = []  # cache keys in computation order, for tests and profiling

    @classmethod
    def from_waveforms(cls, waveforms: list[np.ndarray], *, sample_rate: int) -> "Batch":
        """Zero-pad a list of 1-D waveforms into one batch."""
        lengths = np.array([len(w) for w in waveforms], dtype=np.int64)
        padded = np.zeros((len(waveforms), int(lengths.max(initial=0))), dtype=np.float32)
        for i, w in enumerate(waveforms):
            padded[i, : len(w)] = w
        return cls(waveforms=padded, lengths=lengths, sample_rate=sample_rate)

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def frame_counts(self, hop_length: int) -> np.ndarray:
        """Frames of each item for centred framing at `hop_length`: `1 + n // hop_length`."""
        return 1 + self.lengths // hop_length

    def frame_mask(self, hop_length: int, num_frames: int) -> np.ndarray:
        """`[B, num_frames]` bool, True where a frame belongs to the item rather than padding."""
        return np.arange(num_frames)[None, :] < self.frame_counts(hop_length)[:, None]

    def intermediate(self, spec: Intermediate) -> np.ndarray:
        """The value of `spec` for this batch, computed once and shared."""
        if spec not in self._cache:
            self._cache[spec] = spec.compute(self)
            self.computed.append(spec)
        return self._cache[spec]

    def outputs(self, extractor: "Extractor") -> dict[str, np.ndarray]:
        """The outputs of `extractor` for this batch, computed once per (name, version, config)."""
        key = ("extractor", extractor.name, extractor.version, extractor.config)
        if key not in self._cache:
            outputs = extractor.extract(self)
            _check_outputs(extractor, outputs, len(self))
            self._cache[key] = outputs
            self.computed.append(key)
        return self._cache[key]


def _check_outputs(extractor: "Extractor", outputs: Mapping[str, np.ndarray], batch_size: int) -> None:
    specs = {spec.name: spec for spec in extractor.output_specs()}
    if set(outputs) != set(specs):
        raise FeatureError(
            f"extractor {extractor.name!r} returned outputs {sorted(outputs)}, "
            f"but its spec declares {sorted(specs)}"
        )
    for name, array in outputs.items():
        spec = specs[name]
        expected = (batch_size, *spec.shape) if spec.level == "clip" else (batch_size, None, *spec.shape)
        found = array.shape
        ok = len(found) == len(expected) and all(e is None or e == f for e, f in zip(expected, found))
        if not ok:
            raise FeatureError(
                f"extractor {extractor.name!r} output {name!r} has shape {found}, "
                f"its spec says {tuple('T' if e is None else e for e in expected)}"
            )


class Extractor(abc.ABC):
    """A registered feature extractor.

    Subclasses set `name`, `version` and `config_type` (a frozen dataclass), and implement
    `output_specs` and `extract`. Heavy state (filter banks, models) is built in `setup`, which
    the pipeline calls once per worker.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    config_type: ClassVar[type]
    description: ClassVar[str] = ""

    def __init__(self, config: Any = None, *, sample_rate: int):
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise FeatureError(
                f"extractor {self.name!r} takes a {self.config_type.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.sample_rate = int(sample_rate)

    def setup(self) -> None:
        """Build heavy state once per worker. The default does nothing."""

    def check(self) -> None:
        """Check at launch what the config alone cannot show (a model loads and runs on a dummy
        batch), raising ConfigError naming the fix. `registry.build` calls it. The default does
        nothing."""

    @abc.abstractmethod
    def output_specs(self) -> tuple[OutputSpec, ...]:
        """The outputs this extractor produces, with shapes at `self.sample_rate`."""

    @abc.abstractmethod
    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        """Compute every output for the batch (see the module docstring for array shapes)."""

    def describe(self) -> dict[str, Any]:
        """Name, version, source package, config and output specs, as recorded in run.json and
        features.json."""
        from features import registry

        return {
            "name": self.name,
            "version": self.version,
            "package": registry.source(self.name),
            "config": dataclasses.asdict(self.config),
            "outputs": [spec.to_json() for spec in self.output_specs()],
        }


def make_config(config_type: type, values: Mapping[str, Any] | None, *, where: str) -> Any:
    """Build a frozen config dataclass from user values, naming unknown keys and bad types.

    where: what the values came from, for the message (`features.logmel in configs/x.yaml`).
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(fields))}"
        )
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)  # YAML lists become tuples so configs stay hashable
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
