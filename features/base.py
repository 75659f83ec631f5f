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

Windowed extraction (one item longer than the batch bound). A batch built with `window_samples`
that holds a single item longer than that is extracted in windows, so the STFT and everything
derived from it is bounded by the window, not by the item:
- A `FrameIntermediate` is frame-local: frame t of its value depends only on the samples under
  frame t (centred framing, the item's own edge padding at the item's true edges). Computed on a
  window (`Batch.frame_range`), it gives exactly the item's frames that window holds, byte for
  byte (the mel and chroma projections run in frame blocks aligned to absolute frame numbers so
  BLAS splits the sums the same way), and the windows' values are concatenated along T.
- An extractor declares `window_parts()`: the frame-local intermediates its `extract` reads,
  which must be small per frame (a mel spectrogram, a few descriptors per frame; never the
  STFT). The batch computes every declared part window by window, sharing each window's STFT
  among all parts, and concatenates them. Then `extract` runs once on the whole item, reading the
  assembled parts as if they had been computed whole: whatever needs the whole item (per-item dB
  clipping, onset strength's lag, tempo, summary statistics, a model fed the log-mel) is
  computed from them, so no extractor needs cross-window context. Asking the batch for the
  item's STFT then raises, naming the extractor.
- `window_parts()` returning None (the default, so third-party extractors keep working
  unchanged) means the extractor needs the whole item: it runs on an ordinary batch of the item,
  whose STFT is as long as the item. `chroma` with `tuning: null` does this (its tuning estimate
  takes a median over the whole item's spectral peaks).
Peak memory of a windowed item is then the waveform, one window's intermediates (as for a batch
of `window_samples` samples) and the assembled parts and outputs, which are per frame a small
fraction of the STFT (64 mel bands are 256 bytes a frame, a 1024-point complex STFT 4 KiB).
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
    frames: for frame-level outputs, how many frames an item has. "centred": `1 + n // hop_length`
      for n samples at the run's rate (checked, and padding frames past it are trimmed); "any": the
      extractor decides each item's count (a windowed model: one frame per window), returning a
      list of B arrays `[T_i, *shape]` (or one `[B, T, *shape]` array when every item has T
      frames), and hop_length / sample_rate give the frames' rate (which need not be the run's).
    dtype: a numeric NumPy dtype name ("float32", the default, "float64", "int64", "int32",
      "int16", "uint8", "bool", ...), "string" (text), or "events" (a clip-level list of records,
      shape `(-1,)`, whose fields `fields` declares).
      A shape dimension of -1 is variable length (clip-level outputs only: a list of onset
      times is `shape=(-1,)`); only the first dimension may be -1.
    fields: for dtype "events", the records' fields as (name, dtype) pairs, dtype one of
      EVENT_FIELD_DTYPES.
    """

    name: str
    level: Literal["frame", "clip"]
    shape: tuple[int, ...]
    dtype: str = "float32"
    hop_length: int | None = None
    sample_rate: int | None = None
    description: str = ""
    frames: Literal["centred", "any"] = "centred"
    fields: tuple[tuple[str, str], ...] = ()

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
        if self.frames not in ("centred", "any"):
            raise FeatureError(f"output {self.name!r}: frames must be 'centred' or 'any', not {self.frames!r}")
        if self.dtype not in ("string", "events"):
            try:
                kind = np.dtype(self.dtype).kind
            except TypeError:
                kind = ""
            if kind not in "biuf" or not kind or np.dtype(self.dtype).name != self.dtype:
                raise FeatureError(
                    f"output {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)} "
                    "(or another numeric NumPy dtype name), 'string' or 'events'"
                )
        if any(d == -1 for d in self.shape[1:]) or any(d < -1 for d in self.shape):
            raise FeatureError(f"output {self.name!r}: shape {list(self.shape)}: only the first dimension may be -1 (variable length)")
        if self.variable and self.level != "clip":
            raise FeatureError(f"output {self.name!r}: a variable-length (-1) dimension is for clip-level outputs only")
        if self.dtype == "events":
            if self.level != "clip" or self.shape != (-1,):
                raise FeatureError(f"output {self.name!r}: events are clip-level with shape (-1,)")
            if not self.fields:
                raise FeatureError(f"output {self.name!r}: events need their fields, e.g. fields=(('time', 'float64'), ('label', 'string'))")
            for field, kind in self.fields:
                if not field.replace("_", "").isalnum() or not field[0].isalpha() or kind not in EVENT_FIELD_DTYPES:
                    raise FeatureError(
                        f"output {self.name!r}: event field ({field!r}, {kind!r}) needs a name of letters, digits and "
                        f"underscores and a dtype in {', '.join(EVENT_FIELD_DTYPES)}"
                    )
        elif self.fields:
            raise FeatureError(f"output {self.name!r}: fields are for dtype 'events' only")
        if self.level == "frame" and self.dtype == "string":
            raise FeatureError(f"frame-level output {self.name!r} must be numeric, not a string")

    @property
    def variable(self) -> bool:
        """Whether the first dimension is variable length (-1)."""
        return bool(self.shape) and self.shape[0] == -1

    @property
    def numeric(self) -> bool:
        return self.dtype not in ("string", "events")

    @property
    def floating(self) -> bool:
        return self.numeric and np.dtype(self.dtype).kind == "f"

    @property
    def integral(self) -> bool:
        """Integer or bool: stored as int64 in TFRecords."""
        return self.numeric and np.dtype(self.dtype).kind in "biu"

    @property
    def frame_rate(self) -> float | None:
        """Frames per second, for frame-level outputs."""
        if self.level != "frame":
            return None
        return self.sample_rate / self.hop_length

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "OutputSpec":
        """The spec `to_json` wrote (run.json, features.json, plan.json)."""
        names = ("name", "level", "dtype", "hop_length", "sample_rate", "description", "frames")
        return cls(
            shape=tuple(value["shape"]),
            fields=tuple(tuple(pair) for pair in value.get("fields") or ()),
            **{n: value[n] for n in names if n in value},
        )

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["frame_rate"] = self.frame_rate
        if self.fields:
            out["fields"] = [list(pair) for pair in self.fields]
        else:
            del out["fields"]  # float32/int outputs: run.json as before
        return out


OUTPUT_DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "bool")
EVENT_FIELD_DTYPES = ("float64", "int64", "string")


def as_output(spec: OutputSpec, value: Any) -> Any:
    """One item's value of `spec` as stored in a FeatureRow: a NumPy array of the spec's dtype
    (strings: an object array of str), or for events a tuple of dicts with the declared fields.
    Float32 outputs are `np.array(value, dtype=np.float32)`, a copy, exactly as before dtypes were read."""
    if spec.dtype == "float32":
        return np.array(value, dtype=np.float32)
    if spec.dtype == "string":
        if isinstance(value, str):
            return np.array(value, dtype=object)
        items = np.array(list(value) if isinstance(value, (list, tuple)) else value, dtype=object)
        for item in items.ravel():
            if not isinstance(item, str):
                raise FeatureError(f"output {spec.name!r} is a string output, got a {type(item).__name__}")
        return items
    if spec.dtype == "events":
        if isinstance(value, Mapping) or not isinstance(value, (list, tuple, np.ndarray)):
            raise FeatureError(f"output {spec.name!r} holds events: return a list of dicts, got a {type(value).__name__}")
        events = []
        for record in value:
            if not isinstance(record, Mapping):
                raise FeatureError(f"output {spec.name!r}: an event is a dict of its fields, got a {type(record).__name__}")
            unknown = sorted(set(record) - {name for name, _ in spec.fields})
            if unknown:
                raise FeatureError(f"output {spec.name!r}: event field {unknown[0]!r} is not one of its fields {[n for n, _ in spec.fields]}")
            event = {}
            for name, kind in spec.fields:
                field = record.get(name)
                if kind == "string":
                    event[name] = "" if field is None else str(field)
                elif kind == "int64":
                    event[name] = 0 if field is None else int(field)
                else:
                    event[name] = float("nan") if field is None else float(field)
            events.append(event)
        return tuple(events)
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise FeatureError(f"output {spec.name!r} is {spec.dtype}, got values of dtype {array.dtype}")
    if np.dtype(spec.dtype).kind in "biu" and array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise FeatureError(f"output {spec.name!r} is {spec.dtype}, got fractional values")
    return np.array(array, dtype=spec.dtype)


def shape_matches(spec: OutputSpec, shape: tuple[int, ...], *, frames: int | None = None) -> bool:
    """Whether one item's value of `spec` has a valid shape (`frames`: its frame count, frame-level)."""
    expected = spec.shape if spec.level == "clip" else (frames, *spec.shape)
    return len(shape) == len(expected) and all(e == -1 or e == f for e, f in zip(expected, shape))


class Intermediate(abc.ABC):
    """A shared computation over a batch, identified by its (frozen dataclass) parameters.

    Subclasses are frozen dataclasses, so two extractors asking for the same parameters get the
    same cache key and the batch computes the value once.
    """

    @abc.abstractmethod
    def compute(self, batch: "Batch") -> np.ndarray:
        """Compute the value for the whole batch."""


class FrameIntermediate(Intermediate):
    """A frame-local intermediate: `[B, ..., T]` over the frames `batch.frame_range(hop_length)`,
    frame t depending only on the samples under frame t.

    So a long item's value can be computed window by window and concatenated along T with the
    same bytes as computed whole (see the module docstring). `compute` must read only other
    frame-local intermediates of the same batch and `Batch.samples`, and give each frame a
    value that does not depend on how many frames the window holds.
    """

    @property
    @abc.abstractmethod
    def hop_length(self) -> int:
        """Samples between this intermediate's frames."""


@functools.lru_cache(maxsize=16)
def stft_window(*, window: str, win_length: int, n_fft: int) -> np.ndarray:
    """librosa's STFT window `[n_fft]` float32: scipy's periodic `window` of `win_length`
    samples, zero-padded on both sides to n_fft (librosa.filters.get_window + util.pad_center)."""
    full = np.zeros(n_fft, dtype=np.float32)
    left = (n_fft - win_length) // 2
    full[left : left + win_length] = _periodic_window(window, win_length)
    return full


# scipy's general_cosine coefficients of the windows computed here without importing
# scipy.signal, which costs about half a second per worker process: most runs need only these.
# (scipy's general_hamming: [alpha, 1 - alpha], where 1 - 0.54 is not the float 0.46.)
_COSINE_WINDOWS = {"hann": (0.5, 1.0 - 0.5), "hamming": (0.54, 1.0 - 0.54)}


def _periodic_window(window: str, length: int) -> np.ndarray:
    """`scipy.signal.get_window(window, length, fftbins=True)`, float64, with the same bytes
    (scipy's `_general_cosine_impl`, operation for operation) for the windows above."""
    coefficients = _COSINE_WINDOWS.get(window) if isinstance(window, str) else None
    if coefficients is None or length <= 1:  # other windows, and scipy's own checks of odd lengths
        import scipy.signal

        return scipy.signal.get_window(window, length, fftbins=True)
    factor = np.linspace(-np.pi, np.pi, length + 1, dtype=np.float64)
    values = np.zeros(length + 1, dtype=np.float64)
    for k, a in enumerate(np.asarray(coefficients, dtype=np.float64)):
        values += a * np.cos(k * factor)
    return values[:-1]


# Frames transformed per rfft call: a few MiB of float32, so the windowed copy stays in cache
# and a long item never materialises all its frames at once.
_FRAMES_PER_BLOCK = 2048


@dataclasses.dataclass(frozen=True)
class ComplexStft(FrameIntermediate):
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
        if batch.windowed:
            raise FeatureError(
                f"extractor {batch.extracting or '?'} asked for the STFT of a {batch.lengths[0]}-sample item that is "
                "extracted in windows (it is longer than the batch bound); list every intermediate its extract() "
                "reads in window_parts(), or return None there to run it on the whole item"
            )
        window = stft_window(window=self.window, win_length=self.win_length or n_fft, n_fft=n_fft)
        first, stop = batch.frame_range(hop)
        num_frames = stop - first
        # frame t covers samples t * hop - n_fft // 2 .. + n_fft, zeros outside the item (librosa's
        # constant centre padding)
        padded = batch.samples(first * hop - n_fft // 2, (stop - 1) * hop + n_fft - n_fft // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop][:, :num_frames]
        size = len(batch)
        out = np.empty((size, num_frames, 1 + n_fft // 2), dtype=np.complex64)
        for start in range(0, num_frames, _FRAMES_PER_BLOCK):
            stop = min(start + _FRAMES_PER_BLOCK, num_frames)
            out[:, start:stop] = scipy.fft.rfft(frames[:, start:stop] * window, axis=-1)
        return out.transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class Stft(FrameIntermediate):
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
class PowerSpectrogram(FrameIntermediate):
    """`|STFT| ** power`, `[B, 1 + n_fft // 2, T]` float32. Power 2 is `re² + im²` straight from
    the complex STFT (no square root then square); other powers go through the magnitude."""

    stft: Stft
    power: float = 2.0

    @property
    def hop_length(self) -> int:
        return self.stft.hop_length

    def compute(self, batch: "Batch") -> np.ndarray:
        if self.power == 2.0:
            spectrum = batch.intermediate(self.stft.complex())
            return np.square(spectrum.real) + np.square(spectrum.imag)
        magnitude = batch.intermediate(self.stft)
        if self.power == 1.0:
            return magnitude
        return magnitude**self.power


# Frames per projection product. Every product is exactly this many rows, aligned to absolute
# frame numbers, because BLAS splits a row's sums by the product's row count and by the row's
# place in it.
_PROJECT_ROWS = 256


def project(basis: np.ndarray, spectrum: np.ndarray, *, frames: np.ndarray, first_frame: int = 0) -> np.ndarray:
    """`basis [K, F]` applied to each item of `spectrum [B, F, T]` over its own `frames[i]` frames.

    Returns `[B, K, T]` with padding frames zero. first_frame: the item frame number of
    `spectrum`'s frame 0 (non-zero in a window of a long item).

    Each frame's bytes depend only on the frame itself: products run over blocks of
    `_PROJECT_ROWS` frames aligned to absolute frame numbers (a block the spectrum covers only
    partly, at an item's end or a window's edge, is multiplied as a zero-padded full block). A
    product over a whole batch, or a whole item, lets BLAS split the sums differently as the
    batch's padded length, the item's length or a window's position changes, which moved a
    frame's last bits and broke byte-identical reruns and windowed extraction.

    The product runs time-major (`[T, F] @ [F, K]`), which is how the STFT lies in memory and
    how the `[T, K]` outputs are laid out, so neither side is copied into another order; the
    result is a `[B, K, T]` view of a C-contiguous `[B, T, K]` array.
    """
    rows_per_block = _PROJECT_ROWS
    out = np.zeros((spectrum.shape[0], spectrum.shape[2], basis.shape[0]), dtype=np.result_type(basis, spectrum))
    basis_t = basis.T
    scratch = None
    for i, n in enumerate(frames):
        n = min(int(n), spectrum.shape[2])
        item = spectrum[i, :, :n].T  # [n, F], contiguous for the time-major STFT
        t = 0
        while t < n:
            offset = (first_frame + t) % rows_per_block
            stop = min(n, t + rows_per_block - offset)
            if offset == 0 and stop - t == rows_per_block:
                np.matmul(item[t:stop], basis_t, out=out[i, t:stop])
            else:
                if scratch is None:
                    scratch = np.zeros((rows_per_block, item.shape[1]), dtype=spectrum.dtype)
                scratch[:] = 0
                scratch[offset : offset + stop - t] = item[t:stop]
                out[i, t:stop] = (scratch @ basis_t)[offset : offset + stop - t]
            t = stop
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
class MelSpectrogram(FrameIntermediate):
    """Mel spectrogram `[B, n_mels, T]` of a power spectrogram (librosa.feature.melspectrogram)."""

    power: PowerSpectrogram
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    htk: bool = False
    norm: str | None = "slaney"

    @property
    def hop_length(self) -> int:
        return self.power.stft.hop_length

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
        hop = self.power.stft.hop_length
        return project(basis, spectrum, frames=batch.frame_counts(hop), first_frame=batch.frame_range(hop)[0])


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
    window_samples: a batch of one item longer than this many samples is extracted in windows
      of this many samples (see the module docstring); None: never.
    """

    def __init__(self, *, waveforms: np.ndarray, lengths: np.ndarray, sample_rate: int, window_samples: int | None = None):
        if waveforms.ndim != 2:
            raise FeatureError(f"a batch holds [B, n] waveforms, got shape {waveforms.shape}")
        if len(lengths) != waveforms.shape[0]:
            raise FeatureError(f"{len(lengths)} lengths for {waveforms.shape[0]} waveforms")
        if window_samples is not None and window_samples < 1:
            raise FeatureError(f"window_samples={window_samples} must be a positive number of samples")
        self.waveforms = np.ascontiguousarray(waveforms, dtype=np.float32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.sample_rate = int(sample_rate)
        self.window_samples = window_samples
        # True for one item longer than window_samples: its frame-level parts are computed in windows
        self.windowed = window_samples is not None and len(self.lengths) == 1 and int(self.lengths[0]) > window_samples
        self.span: tuple[int, int] | None = None  # set on the window batches of a windowed item
        self.extracting: str | None = None  # the extractor running, for messages
        self._cache: dict[Any, np.ndarray] = {}
        self._whole: Batch | None = None
        self.computed: list[Any] = []  # cache keys in computation order, for tests and profiling
        # (window span, intermediate, shape) of everything computed in each window, for tests and profiling
        self.window_log: list[tuple[tuple[int, int], Any, tuple[int, ...]]] = []

    @classmethod
    def from_waveforms(cls, waveforms: list[np.ndarray], *, sample_rate: int, window_samples: int | None = None) -> "Batch":
        """Zero-pad a list of 1-D waveforms into one batch (one waveform is used as it is, not copied)."""
        lengths = np.array([len(w) for w in waveforms], dtype=np.int64)
        if len(waveforms) == 1:
            padded = np.asarray(waveforms[0], dtype=np.float32).reshape(1, -1)
        else:
            padded = np.zeros((len(waveforms), int(lengths.max(initial=0))), dtype=np.float32)
            for i, w in enumerate(waveforms):
                padded[i, : len(w)] = w
        return cls(waveforms=padded, lengths=lengths, sample_rate=sample_rate, window_samples=window_samples)

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def frame_range(self, hop_length: int) -> tuple[int, int]:
        """`(first, stop)`: the item frame numbers this batch computes at `hop_length`.

        `(0, 1 + n // hop_length)` for the padded length n; in a window of a long item, the
        frames centred in the window's span of samples (frame t is centred on sample t * hop_length).
        """
        total = 1 + self.waveforms.shape[1] // hop_length
        if self.span is None:
            return 0, total
        start, stop = self.span
        return min(-(-start // hop_length), total), min(-(-stop // hop_length), total)

    def frame_counts(self, hop_length: int) -> np.ndarray:
        """Frames of each item for centred framing at `hop_length`: `1 + n // hop_length`
        (in a window of a long item: the frames the window holds)."""
        if self.span is not None:
            first, stop = self.frame_range(hop_length)
            return np.array([stop - first], dtype=np.int64)
        return 1 + self.lengths // hop_length

    def frame_mask(self, hop_length: int, num_frames: int) -> np.ndarray:
        """`[B, num_frames]` bool, True where a frame belongs to the item rather than padding."""
        return np.arange(num_frames)[None, :] < self.frame_counts(hop_length)[:, None]

    def samples(self, start: int, stop: int) -> np.ndarray:
        """`[B, stop - start]` float32 copy of samples start..stop of every item (start may be
        negative), zero outside the padded waveforms: what a window's frames read."""
        out = np.zeros((len(self), stop - start), dtype=np.float32)
        lo, hi = max(start, 0), min(stop, self.waveforms.shape[1])
        if hi > lo:
            out[:, lo - start : hi - start] = self.waveforms[:, lo:hi]
        return out

    def window_spans(self) -> list[tuple[int, int]]:
        """The sample spans of a windowed item's windows, `[k w, (k + 1) w)` for w =
        window_samples; the last one ends at n + 1, so it holds the frame centred on sample n."""
        n, w = int(self.lengths[0]), int(self.window_samples)
        return [(start, min(start + w, n + 1)) for start in range(0, n + 1, w)]

    def _window(self, span: tuple[int, int]) -> "Batch":
        window = Batch(waveforms=self.waveforms, lengths=self.lengths, sample_rate=self.sample_rate)
        window.span = span
        return window

    def whole_item(self) -> "Batch":
        """An ordinary batch of this batch's item(s), for extractors whose `window_parts()` is None."""
        if not self.windowed:
            return self
        if self._whole is None:
            self._whole = Batch(waveforms=self.waveforms, lengths=self.lengths, sample_rate=self.sample_rate)
        return self._whole

    def intermediate(self, spec: Intermediate) -> np.ndarray:
        """The value of `spec` for this batch, computed once and shared."""
        if spec not in self._cache:
            self._cache[spec] = spec.compute(self)
            self.computed.append(spec)
        return self._cache[spec]

    def assemble(self, parts: Any) -> None:
        """Compute the frame-local intermediates `parts` (an iterable) for this batch and keep them.

        For a windowed item, window by window: each window computes every part from one STFT of
        its own frames, its values are copied into the item-length arrays, and the window (with
        its STFT) is dropped before the next. Otherwise simply `intermediate(part)` for each.
        """
        todo = [part for part in dict.fromkeys(parts) if part not in self._cache]
        if not todo:
            return
        if not self.windowed:
            for part in todo:
                self.intermediate(part)
            return
        for part in todo:
            if not isinstance(part, FrameIntermediate):
                raise FeatureError(
                    f"extractor {self.extracting or '?'}: window_parts() lists {type(part).__name__}, which is not a "
                    "FrameIntermediate; only frame-local intermediates can be computed in windows"
                )
        values: dict[Intermediate, np.ndarray] = {}
        for span in self.window_spans():
            window = self._window(span)
            for part in todo:
                first, stop = window.frame_range(part.hop_length)
                if stop <= first:  # a window shorter than this part's hop may hold none of its frames
                    continue
                value = window.intermediate(part)
                if part not in values:
                    values[part] = _empty_frames_like(value, int(self.frame_counts(part.hop_length)[0]))
                values[part][..., first:stop] = value
            self.window_log.extend((span, spec, window._cache[spec].shape) for spec in window.computed)
        for part in todo:
            self._cache[part] = values[part]
            self.computed.append(part)

    def prepare(self, extractors: Any) -> None:
        """For a windowed item, assemble every part that `extractors` declare in one pass over the
        windows, so they share each window's STFT. (`outputs` assembles whatever is missing on its
        own, in a pass per extractor.)"""
        if self.windowed:
            declared = [extractor.window_parts() for extractor in extractors]
            self.assemble(part for parts in declared if parts is not None for part in parts)

    def outputs(self, extractor: "Extractor") -> dict[str, np.ndarray]:
        """The outputs of `extractor` for this batch, computed once per (name, version, config).

        For a windowed item: on the assembled parts the extractor declares, or on the whole item
        when it declares none (`Extractor.window_parts`)."""
        key = ("extractor", extractor.name, extractor.version, extractor.config)
        if key not in self._cache:
            outer, self.extracting = self.extracting, extractor.name
            try:
                parts = extractor.window_parts() if self.windowed else ()
                if parts is None:
                    outputs = self.whole_item().outputs(extractor)
                else:
                    self.assemble(parts)
                    outputs = extractor.extract(self)
                    _check_outputs(extractor, outputs, len(self))
            finally:
                self.extracting = outer
            self._cache[key] = outputs
            self.computed.append(key)
        return self._cache[key]


def _empty_frames_like(value: np.ndarray, num_frames: int) -> np.ndarray:
    """An empty array shaped like `value` with `num_frames` on its last (time) axis and laid out
    in memory as `value` is (time-major or not), so an assembled part is laid out as the whole
    item's compute would lay it out and later steps run the same code path over it."""
    order = sorted(range(value.ndim), key=lambda axis: -value.strides[axis])
    shape = value.shape[:-1] + (num_frames,)
    return np.empty([shape[axis] for axis in order], dtype=value.dtype).transpose(np.argsort(order))


def _check_outputs(extractor: "Extractor", outputs: Mapping[str, np.ndarray], batch_size: int) -> None:
    specs = {spec.name: spec for spec in extractor.output_specs()}
    if set(outputs) != set(specs):
        raise FeatureError(
            f"extractor {extractor.name!r} returned outputs {sorted(outputs)}, "
            f"but its spec declares {sorted(specs)}"
        )
    for name, array in outputs.items():
        spec = specs[name]
        if spec.level == "frame" and spec.frames == "any" and isinstance(array, (list, tuple)):
            # one [T_i, *shape] array per item, each with its own frame count
            bad = [np.shape(a) for a in array if np.ndim(a) != 1 + len(spec.shape) or tuple(np.shape(a)[1:]) != spec.shape]
            if len(array) != batch_size or bad:
                raise FeatureError(
                    f"extractor {extractor.name!r} output {name!r} is a list of {len(array)} arrays "
                    f"{bad[:1] or ''}, its spec says {batch_size} arrays of shape (T, {', '.join(map(str, spec.shape))})"
                )
            continue
        if array.dtype == object and array.shape == (batch_size,):
            continue  # one value per item (a function's, or strings and events): ExtractFn checks each
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

    def window_parts(self) -> tuple[FrameIntermediate, ...] | None:
        """The frame-local intermediates `extract` reads, so an item longer than the batch bound can
        be extracted in windows (see the module docstring): each part is computed window by window
        and concatenated, then `extract` runs once on the whole item with the parts in place and
        must read nothing else frame-sized (asking for the item's STFT raises). Keep parts small
        per frame: list a mel spectrogram or per-frame descriptors, not the STFT. `()`: extract
        reads only the waveform.

        None (the default): `extract` needs the whole item and runs on an ordinary batch of it,
        with an STFT as long as the item. Declaring parts is a promise about `extract`, so it is
        never guessed for an extractor that does not declare it.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Name, version, source package, config and output specs, as recorded in run.json and
        features.json."""
        from features import registry

        kind = type(self).name
        described = {
            "name": self.name,
            "version": self.version,
            "package": registry.source(kind),
            "config": dataclasses.asdict(self.config),
            "outputs": [spec.to_json() for spec in self.output_specs()],
        }
        if kind != self.name:  # a named instance (features: {NAME: {extractor: CLASS}}) records its class
            described[registry.INSTANCE_KEY] = kind
        return described


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
