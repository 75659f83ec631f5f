"""What `tf_model` and `onnx_model` share: the config, the model's fingerprint, the per-process
model cache and the launch-time check.

A model extractor feeds a batch to a learned model and stores some or all of its outputs as
features: the whole batch at once, or fixed windows of each item at the model's own sample rate
(pretrained taggers, embedding and pitch models), each window's output one frame of the feature
(`OutputSpec.frames="any"`, at the hop's rate). Several model extractors share a run as named
instances (`features: {pitch: {extractor: onnx_model, ...}}`, features/registry.py).
The model is loaded once per worker process and shared by every thread (Beam's
`apache_beam.utils.shared.Shared`, the way RunInference shares models); a module-level handle
per model is what makes the sharing work, because extractors are built inside each DoFn's setup,
so a `Shared()` made per extractor would be a new key per thread.

Why not Beam's RunInference/ModelHandler: a model here is one extractor of the batch contract,
run inside the pipeline's one extraction DoFn next to the others on the same decoded batch (the
resampled audio shared by the models at one rate, a failed item retried alone and dead-lettered,
rows committed with every feature). RunInference is a PTransform of its own over a PCollection
of examples: the windows would leave the extraction step as elements and their outputs would be
joined back to their items by a GroupByKey, so decoded audio would cross a shuffle, and its
BatchElements emits the last batch of a bundle from finish_bundle, which Beam's DaskRunner drops.
What it offers is kept: one model per process through `Shared`, uniform batches (the windows go
to the model in fixed chunks of `WINDOW_CHUNK_SAMPLES`), and its metrics (`num_inferences`,
`inference_batch_latency_micro_secs`, per instance under `featurebeam.model.<name>`).

The model's content fingerprint (sha256 over its files' relative paths and bytes) is written into
the config (`fingerprint`) when the launcher builds the extractor, so it reaches run.json, the
config hash (`--mode=resume` refuses a changed model), `--reuse_from` (a changed model is a
changed config) and the workers, which refuse to run a model whose files no longer match. The
fingerprint's first 12 hex digits also go into the version (`1+3f9a0c2b1d4e`), because the
BigQuery schema check keeps output shapes per extractor version: another model is another version
there, not a shape change under the same one.

Neither TensorFlow nor onnxruntime is imported here; the backends import theirs when a model is
first loaded, so runs without a model never import them.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, ClassVar, Literal, Mapping

import numpy as np

from featurebeam.errors import ConfigError
from features.base import Batch, Extractor, FrameIntermediate, Intermediate, OutputSpec
from features.logmel import LogMelConfig

LENGTHS_INPUT = "lengths"  # a model input with this name gets the valid lengths, [B] int32
DUMMY_SECONDS = 1.0  # length of the launch-time check's longest dummy item


@dataclasses.dataclass(frozen=True)
class ModelConfig(LogMelConfig):
    """path: the model, a SavedModel folder or a .keras or .onnx file, local or gs:// (required);
    input: what the model is fed, "waveform" (float32 [B, n] at the run's sample rate, zero-padded
    to the longest item) or "logmel" (the shared log-mel [B, T, n_mels] in dB, set by n_fft,
    hop_length, win_length, n_mels, fmin, fmax, amin and top_db as for logmel), plus int32 [B]
    valid lengths (samples or frames) for a model input named `lengths`;
    output_key: the one model output to keep (None = those outputs: names, else every output);
    name: the feature name, or the prefix of the names of several outputs (a named instance's
    name by default);
    level: "clip" (the model returns [B, D]) or "frame" ([B, T, D] with T >= 1 + n // hop_length);
    hop_length: samples between frames, of the log-mel input and of frame-level outputs;
    fingerprint: sha256 of the model's files, filled in at launch (set it to insist on exactly
    that model);
    sample_rate: Hz the model takes its waveform at, resampled from the decoded item (None = the
    run's --sample_rate);
    window_seconds, window_samples: the length of the fixed windows fed to the model, in seconds
    or in samples at the model's sample_rate (give one), the last one zero-padded, each window's
    output one frame of the feature at the hop's frame rate (None = the whole item at once);
    hop_seconds, hop_samples: the step between windows, in seconds or in samples at the model's
    sample_rate (required with a window);
    input_shape: the layout of one example after the batch axis, -1 standing for the samples, e.g.
    [-1, 1] for a model that takes [B, n, 1] (None = [B, n]);
    outputs: feature name -> model output name, the outputs to keep, stored as <name>_<feature>
    (None = output_key's, or every output: one as <name>, several as <name>_<output>)."""

    path: str = ""
    input: Literal["waveform", "logmel"] = "waveform"
    output_key: str | None = None
    name: str = "embedding"
    level: Literal["clip", "frame"] = "clip"
    fingerprint: str | None = None
    sample_rate: int | None = None
    window_seconds: float | None = None
    window_samples: int | None = None
    hop_seconds: float | None = None
    hop_samples: int | None = None
    input_shape: tuple[int, ...] | None = None
    outputs: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_windows()
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("path is required: the model file or folder, local or gs://")
        if self.input not in ("waveform", "logmel"):
            raise ValueError(f"input={self.input!r} must be 'waveform' or 'logmel'")
        if self.level not in ("clip", "frame"):
            raise ValueError(f"level={self.level!r} must be 'clip' (model returns [B, D]) or 'frame' ([B, T, D])")
        if not isinstance(self.name, str) or not self.name[:1].isalpha() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"name={self.name!r} must start with a letter and hold only letters, digits and underscores")
        if self.outputs is not None:
            pairs = self.outputs.items() if isinstance(self.outputs, Mapping) else self.outputs
            try:
                pairs = tuple(sorted((str(k), str(v)) for k, v in pairs))
            except (TypeError, ValueError):
                raise ValueError(f"outputs={self.outputs!r} must map feature names to model output names") from None
            if not pairs:
                raise ValueError("outputs: is empty; map at least one feature name to a model output, or leave it out")
            for feature, _ in pairs:
                if not feature[:1].isalpha() or not feature.replace("_", "").isalnum():
                    raise ValueError(f"outputs: feature name {feature!r} must start with a letter and hold only letters, digits and underscores")
            if self.output_key is not None:
                raise ValueError("set outputs: or output_key:, not both (outputs: {feature: model_output} keeps several)")
            object.__setattr__(self, "outputs", pairs)

    def _check_windows(self) -> None:
        if self.sample_rate is not None and (not isinstance(self.sample_rate, int) or not 1000 <= self.sample_rate <= 384000):
            raise ValueError(f"sample_rate={self.sample_rate!r} must be an integer in 1000..384000 Hz (the model's rate)")
        for a, b in (("window_seconds", "window_samples"), ("hop_seconds", "hop_samples")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        for key in ("window_seconds", "hop_seconds"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{key}={value!r} must be a positive number of seconds")
        for key in ("window_samples", "hop_samples"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{key}={value!r} must be a positive whole number of samples")
        windowed = self.window_seconds is not None or self.window_samples is not None
        hopped = self.hop_seconds is not None or self.hop_samples is not None
        if windowed and not hopped:
            raise ValueError("a window (window_seconds or window_samples) needs a hop: set hop_seconds or hop_samples")
        if hopped and not windowed:
            raise ValueError("hop_seconds/hop_samples step between windows: set window_seconds or window_samples too")
        if windowed and self.input != "waveform":
            raise ValueError("windows cut the waveform: set input: waveform, or drop window_*/hop_*")
        if windowed and self.level != "clip":
            raise ValueError("with a window, each window's output is one frame: leave level: at clip (the model's output per window)")
        if self.sample_rate is not None and self.input != "waveform":
            raise ValueError("sample_rate: resamples the waveform; the log-mel input is at the run's rate: drop sample_rate")
        if self.input_shape is not None:
            shape = tuple(self.input_shape) if isinstance(self.input_shape, (list, tuple)) else None
            if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in shape) or shape.count(-1) != 1:
                raise ValueError(
                    f"input_shape={self.input_shape!r} must list the dimensions after the batch axis with one -1 for "
                    "the samples, e.g. [-1, 1] for a model taking [B, n, 1]"
                )
            if self.input != "waveform":
                raise ValueError("input_shape: lays out the waveform; set input: waveform or drop input_shape")
            object.__setattr__(self, "input_shape", shape)


class LoadedModel(abc.ABC):
    """A model loaded by a backend: its input and output names and a batch call."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for numpy `feeds` by input name."""

    def static_length(self, name: str) -> int | None:
        """The fixed size of axis 1 of input `name`, if the model declares one."""
        dims = self.static_dims(name)
        return dims[1] if dims is not None and len(dims) > 1 else None

    def static_dims(self, name: str) -> tuple[int | None, ...] | None:
        """Input `name`'s declared shape (None for a free axis), or None if the rank is unknown."""
        return None


def first_line(exc: BaseException) -> str:
    """`Type: the first informative line of the message` (Keras opens with a generic line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception encountered when calling")] or lines
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


# --- the model's files -------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
    return "://" in path


def _files(path: str) -> list[tuple[str, str, tuple]]:
    """(relative name, full path, (size, modification time)) of every file of the model, sorted;
    a file model is one file."""
    if not _is_remote(path):
        if os.path.isfile(path):
            found = [(os.path.basename(path), path)]
        elif os.path.isdir(path):
            found = []
            for root, _, names in os.walk(path):
                for n in names:
                    full = os.path.join(root, n)
                    found.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
        else:
            return []
        return sorted((name, full, (os.stat(full).st_size, os.stat(full).st_mtime_ns)) for name, full in found)
    from apache_beam.io.filesystems import FileSystems

    base = path.rstrip("/")
    single = FileSystems.match([base])[0].metadata_list
    if single and not path.endswith("/"):
        m = single[0]
        return [(base.rsplit("/", 1)[-1], m.path, (m.size_in_bytes, m.last_updated_in_seconds))]
    below = FileSystems.match([base + "/**"])[0].metadata_list
    return sorted((m.path[len(base) + 1 :], m.path, (m.size_in_bytes, m.last_updated_in_seconds)) for m in below)


def _open(path: str):
    if not _is_remote(path):
        return open(path, "rb")
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type="uncompressed")


# (path, names, sizes, times) -> fingerprint, per process: each worker thread builds its own
# extractor, and a large model's bytes should be hashed once per process, not once per thread.
_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(path: str) -> str:
    """sha256 over the model's relative file names and contents; ConfigError if there are none."""
    try:
        files = _files(path)
    except Exception as exc:
        raise ConfigError(f"model path {path}: cannot list it ({type(exc).__name__}: {exc}); check the path and access") from None
    if not files:
        raise ConfigError(f"model path {path}: no such file or folder; set path: to a SavedModel folder or a model file")
    key = (path, tuple(files))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    digest = hashlib.sha256()
    for name, full, _ in files:
        digest.update(name.encode() + b"\0")
        with _open(full) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    _FINGERPRINTS[key] = "sha256:" + digest.hexdigest()
    return _FINGERPRINTS[key]


def local_copy(path: str, fp: str) -> str:
    """`path` itself when local; otherwise a copy of its files in a temp folder named by `fp`
    (TensorFlow, Keras and onnxruntime each read gs:// differently or not at all; Beam's
    FileSystems reads it the way the rest of the pipeline does)."""
    if not _is_remote(path):
        return path
    files = _files(path)
    single = len(files) == 1 and files[0][1].rstrip("/") == path.rstrip("/")
    name = files[0][0] if single else "model"
    root = os.path.join(tempfile.gettempdir(), "featurebeam-models", fp.split(":")[-1][:32])
    target = os.path.join(root, name)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(root), exist_ok=True)
    scratch = tempfile.mkdtemp(dir=os.path.dirname(root))
    for rel, full, _ in files:
        out = os.path.join(scratch, name) if single else os.path.join(scratch, name, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with _open(full) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    try:
        os.rename(scratch, root)  # whole folder or nothing at the final name
    except OSError:  # another thread or process won the race; its copy has the same bytes
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# --- the per-process model cache ---------------------------------------------------------------

_HANDLES: dict[tuple, Any] = {}
_HANDLES_LOCK = threading.Lock()


def shared_model(key: tuple, load: Callable[[], LoadedModel]) -> LoadedModel:
    """The model for `key`, loaded once per process through a Beam `Shared` handle."""
    from apache_beam.utils.shared import Shared

    with _HANDLES_LOCK:
        handle = _HANDLES.get(key)
        if handle is None:
            handle = _HANDLES[key] = Shared()
    return handle.acquire(load, tag=key)


# --- the extractor -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resampled(Intermediate):
    """The batch's items resampled to `sample_rate` (soxr, high quality), each from its own valid
    samples: `([B, m] float32 zero-padded, [B] lengths)`. An intermediate, so two models at one
    rate resample a batch once."""

    sample_rate: int

    def compute(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        if self.sample_rate == batch.sample_rate:
            return batch.waveforms, batch.lengths
        import soxr

        items = [
            soxr.resample(batch.waveforms[i, : int(n)], batch.sample_rate, self.sample_rate, quality="HQ").astype(np.float32, copy=False)
            for i, n in enumerate(batch.lengths)
        ]
        lengths = np.array([max(1, len(x)) for x in items], dtype=np.int64)
        out = np.zeros((len(items), int(lengths.max(initial=1))), dtype=np.float32)
        for i, x in enumerate(items):
            out[i, : len(x)] = x
        return out, lengths


# Samples fed to a windowed model per call at most (8 MiB of float32): a long item's windows run
# in chunks, so its memory is bounded by this, not by the item.
WINDOW_CHUNK_SAMPLES = 1 << 21


def _feature_name(output: str) -> str:
    """A model output's name as a feature-name suffix: letters, digits and underscores."""
    return re.sub(r"\W+", "_", output).strip("_") or "output"


class ModelExtractor(Extractor):
    """Runs a model over whole batches, or over fixed windows of each item; subclasses say how to
    load one (`load_model`).

    Unwindowed (no window_*): the batch at `sample_rate` goes to the model whole, `[B, n]` (laid
    out as `input_shape` says), and `output_key`/`outputs` pick clip-level `[B, D]` or frame-level
    `[B, T, D]` outputs. Windowed: each item at `sample_rate` is cut into windows of W samples
    every H samples (`1 + ceil((n - W) / H)` windows, at least one; the last zero-padded), the
    windows of the whole batch go to the model in chunks of at most `WINDOW_CHUNK_SAMPLES`
    samples, and output k of window j is frame j of the item's feature k: frame-level with
    `frames="any"`, `hop_length` H and `sample_rate` the model's, so its spec records the frame
    rate; any extra dimensions of the model's per-window output are the feature's shape.
    """

    backend: ClassVar[str] = "model"

    def __init__(self, config: ModelConfig | None = None, *, sample_rate: int):
        if config is None:
            raise ConfigError(f"features.{self.name}: path is required: the model file or folder, local or gs://")
        super().__init__(config, sample_rate=sample_rate)
        self._model: LoadedModel | None = None
        self._specs: tuple[OutputSpec, ...] | None = None
        self._chosen: tuple[tuple[str, str], ...] | None = None  # (feature name, model output name)
        self.rate = config.sample_rate or self.sample_rate  # the model's own sample rate
        self.window = self._samples(config.window_samples, config.window_seconds)
        self.hop = self._samples(config.hop_samples, config.hop_seconds)
        found = fingerprint(config.path)
        if config.fingerprint is not None and config.fingerprint != found:
            raise ConfigError(
                f"{self._where}: the model's files have fingerprint {found}, but the config says {config.fingerprint}; "
                "the model changed since the run was planned (or since fingerprint: was pinned): restore it, "
                "or start a new run"
            )
        self.config = dataclasses.replace(config, fingerprint=found)
        self.version = f"{type(self).version}+{found.split(':')[-1][:12]}"

    def _samples(self, samples: int | None, seconds: float | None) -> int | None:
        if samples is not None:
            return int(samples)
        return None if seconds is None else max(1, int(round(seconds * self.rate)))

    @property
    def _where(self) -> str:
        return f"features.{self.name} (path {self.config.path})"

    @property
    def windowed(self) -> bool:
        return self.window is not None

    @abc.abstractmethod
    def load_model(self, local_path: str) -> LoadedModel:
        """Load the model at a local path; raise ConfigError naming the fix when it cannot."""

    def model(self) -> LoadedModel:
        if self._model is None:
            c = self.config
            key = (self.backend, c.path, c.fingerprint, getattr(c, "signature", None))
            self._model = shared_model(key, lambda: self.load_model(local_copy(c.path, c.fingerprint)))
        return self._model

    def setup(self) -> None:
        self.model()

    # The main input is the model's one input not named `lengths`.
    def _main_input(self, model: LoadedModel) -> str:
        main = [n for n in model.inputs if n != LENGTHS_INPUT]
        if len(main) != 1:
            raise ConfigError(
                f"{self._where}: the model takes inputs {list(model.inputs)}; it must take exactly one input besides "
                f"{LENGTHS_INPUT!r} (the {self.config.input}); export a signature with one"
            )
        return main[0]

    def window_parts(self) -> tuple[FrameIntermediate, ...]:
        # The model sees the whole item either way; windows bound the log-mel input's STFT.
        return (self.config.mel(),) if self.config.input == "logmel" else ()

    def _layout(self, value: np.ndarray) -> np.ndarray:
        """`[N, n]` waveforms as the model's input: `[N, *input_shape]`."""
        shape = self.config.input_shape
        return value if shape is None else value.reshape((value.shape[0], *shape))

    def _feed(self, model: LoadedModel, value: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {self._main_input(model): self._layout(value.astype(np.float32, copy=False))}
        if LENGTHS_INPUT in model.inputs:
            feeds[LENGTHS_INPUT] = lengths.astype(np.int32)
        return feeds

    def _feeds(self, batch: Batch, model: LoadedModel) -> dict[str, np.ndarray]:
        c = self.config
        if c.input == "waveform":
            value, lengths = batch.intermediate(Resampled(self.rate))
        else:
            value = np.ascontiguousarray(batch.intermediate(c.log_mel()).transpose(0, 2, 1))
            lengths = batch.frame_counts(c.hop_length)
        return self._feed(model, value, lengths)

    def chosen(self) -> tuple[tuple[str, str], ...]:
        """(feature name, model output name) of every output kept."""
        if self._chosen is None:
            c = self.config
            known = tuple(self.model().outputs)
            if c.outputs is not None:
                chosen = tuple((f"{c.name}_{feature}", output) for feature, output in c.outputs)
            elif c.output_key is not None:
                chosen = ((c.name, c.output_key),)
            elif len(known) == 1:
                chosen = ((c.name, known[0]),)
            else:
                chosen = tuple((f"{c.name}_{_feature_name(o)}", o) for o in known)
            missing = sorted({o for _, o in chosen if o not in known})
            if missing:
                key = "outputs:" if c.outputs is not None else "output_key:"
                raise ConfigError(f"{self._where}: no output {missing[0]!r}; the model's outputs are {sorted(known)}; fix {key}")
            names = [n for n, _ in chosen]
            if len(set(names)) != len(names):
                raise ConfigError(f"{self._where}: two outputs are both stored as {names!r}; map them to other names with outputs:")
            self._chosen = chosen
        return self._chosen

    def _window_spans(self, lengths: np.ndarray) -> list[tuple[int, int, int]]:
        """(item, start, stop) of every window of every item, in order: windows of W samples every
        H samples until one reaches the item's end (at least one)."""
        w, h = self.window, self.hop
        spans = []
        for i, n in enumerate(int(x) for x in lengths):
            count = 1 + max(0, -(-(n - w) // h))
            spans.extend((i, j * h, min(j * h + w, n)) for j in range(count))
        return spans

    def _run_windows(self, batch: Batch) -> tuple[dict[str, np.ndarray], list[int]]:
        """Every chosen model output over all windows of the batch, `[N, *D]`, and each item's
        window count."""
        model = self.model()
        waves, lengths = batch.intermediate(Resampled(self.rate))
        spans = self._window_spans(lengths)
        per_call = max(1, WINDOW_CHUNK_SAMPLES // self.window)
        parts: dict[str, list[np.ndarray]] = {o: [] for _, o in self.chosen()}
        for first in range(0, len(spans), per_call):
            chunk = spans[first : first + per_call]
            value = np.zeros((len(chunk), self.window), dtype=np.float32)  # the last window's tail stays zero
            valid = np.empty(len(chunk), dtype=np.int64)
            for k, (i, start, stop) in enumerate(chunk):
                value[k, : stop - start] = waves[i, start:stop]
                valid[k] = stop - start
            out = self._call(model, self._feed(model, value, valid))
            for output in parts:
                parts[output].append(np.asarray(out[output]))
        counts = np.bincount([i for i, _, _ in spans], minlength=len(lengths)).tolist()
        return {o: np.concatenate(v) for o, v in parts.items()}, counts

    def _run(self, batch: Batch) -> dict[str, Any]:
        """Chosen model outputs by model output name: windowed, a list of per-item `[windows, *D]`
        arrays; otherwise the model's `[B, ...]` outputs (at another sample rate, frame-level ones
        as a list of per-item arrays trimmed to their centred frame counts)."""
        if self.windowed:
            values, counts = self._run_windows(batch)
            bounds = np.cumsum([0, *counts])
            return {o: [v[bounds[i] : bounds[i + 1]] for i in range(len(counts))] for o, v in values.items()}
        model = self.model()
        out = self._call(model, self._feeds(batch, model))
        return {o: out[o] for _, o in self.chosen() if o in out}

    def _call(self, model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One model call, counted as RunInference counts its calls (per instance, in the job's
        metrics: examples fed and each call's latency); outside a pipeline the counts go nowhere."""
        from apache_beam.metrics import Metrics

        start = time.perf_counter()
        out = model.run(feeds)
        namespace = f"featurebeam.model.{self.name}"
        Metrics.counter(namespace, "num_inferences").inc(len(next(iter(feeds.values()))))
        Metrics.distribution(namespace, "inference_batch_latency_micro_secs").update(int(1e6 * (time.perf_counter() - start)))
        return out

    def _centred_here(self) -> bool:
        """Whether frame-level outputs count frames as the run's other frame-level features do."""
        return self.rate == self.sample_rate

    def check(self) -> None:
        """Load the model and run it on a dummy batch of two items; every problem a config can
        fix (missing file, wrong signature, unknown output, wrong rank, too few frames, an
        input_shape or window the model does not take) is a one-line ConfigError here, before any
        worker starts."""
        if self._specs is not None:
            return
        c = self.config
        model = self.model()
        self.chosen()
        if self.windowed:
            n = math.ceil((self.window + self.hop + 1) * self.sample_rate / self.rate) + 1  # two windows, the last padded
        else:
            n = int(DUMMY_SECONDS * self.sample_rate)
            if c.input == "waveform" and c.input_shape is None:
                static = model.static_length(self._main_input(model))
                n = math.ceil(static * self.sample_rate / self.rate) if static else n
        self._check_layout(model)
        rng = np.random.default_rng(0)
        waveforms = [0.1 * rng.standard_normal(n).astype(np.float32), 0.1 * rng.standard_normal(max(1, n // 3)).astype(np.float32)]
        batch = Batch.from_waveforms(waveforms, sample_rate=self.sample_rate)
        what = f"windows of {self.window} samples at {self.rate} Hz" if self.windowed else f"{c.input} input"
        if c.input_shape is not None:
            what += f" laid out as [B, {', '.join('n' if d == -1 else str(d) for d in c.input_shape)}]"
        try:
            values = self._run_windows(batch)[0] if self.windowed else self._run(batch)
        except ConfigError:
            raise
        except Exception as exc:
            fix = "input_shape:, window_*: and the model's input shape" if self.windowed else "input:, input_shape:, the signature and the model's input shape"
            raise ConfigError(f"{self._where}: the model failed on a dummy batch of {what} ({first_line(exc)}); check {fix}") from None
        specs = []
        for feature, output in self.chosen():
            value = np.asarray(values[output])
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
                raise ConfigError(f"{self._where}: output {output!r} is {value.dtype}, not numeric; leave it out of outputs:")
            if self.windowed:
                windows = len(self._window_spans(batch.intermediate(Resampled(self.rate))[1]))
                if value.ndim < 1 or value.shape[0] != windows:
                    raise ConfigError(
                        f"{self._where}: on {windows} windows output {output!r} has shape {list(value.shape)}; a windowed "
                        "model must return one row per window ([N, ...]); check input_shape: and the output"
                    )
                specs.append(self._spec(feature, output, level="frame", shape=value.shape[1:], hop=self.hop, frames="any"))
                continue
            want = 2 if c.level == "clip" else 3
            shape = "[B, D]" if c.level == "clip" else "[B, T, D]"
            if value.ndim != want or value.shape[0] != 2:
                raise ConfigError(
                    f"{self._where}: on a batch of 2 the model returned shape {list(value.shape)}, but level: {c.level} "
                    f"needs {shape}; set level: to match the model, or pick another output_key"
                )
            if c.level == "clip":
                specs.append(self._spec(feature, output, level="clip", shape=value.shape[1:], hop=None, frames="centred"))
                continue
            frames = 1 + int(batch.intermediate(Resampled(self.rate))[1][0]) // c.hop_length
            if value.shape[1] < frames:
                raise ConfigError(
                    f"{self._where}: for {int(batch.intermediate(Resampled(self.rate))[1][0])} samples the model "
                    f"returned {value.shape[1]} frames, fewer than the {frames} (1 + n // hop_length) that hop_length: "
                    f"{c.hop_length} means; set hop_length: to the model's frame hop in samples"
                )
            specs.append(
                self._spec(feature, output, level="frame", shape=value.shape[2:], hop=c.hop_length,
                           frames="centred" if self._centred_here() else "any")
            )
        self._specs = tuple(specs)

    def _check_layout(self, model: LoadedModel) -> None:
        """The input's declared rank and window length against input_shape and window_*."""
        c = self.config
        if c.input != "waveform":
            return
        main = self._main_input(model)
        dims = model.static_dims(main)
        if dims is None:
            return
        layout = c.input_shape or (-1,)
        shown = "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + "]"
        if len(dims) != 1 + len(layout):
            raise ConfigError(
                f"{self._where}: the model's input {main!r} is {shown}, but input_shape: {list(layout)} makes "
                f"[N, {', '.join('n' if d == -1 else str(d) for d in layout)}]; set input_shape: to the model's layout "
                "after the batch axis, with -1 for the samples"
            )
        for axis, (want, have) in enumerate(zip(layout, dims[1:]), start=1):
            if want != -1 and have is not None and want != have:
                raise ConfigError(
                    f"{self._where}: input_shape: {list(layout)} gives axis {axis} size {want}, but the model's input "
                    f"{main!r} is {shown}; set input_shape: to the model's layout after the batch axis, with -1 for the samples"
                )
        length = dims[1 + layout.index(-1)]
        if self.windowed and length is not None and length != self.window:
            raise ConfigError(
                f"{self._where}: the model takes windows of {length} samples (its input {main!r} is {shown}), but the "
                f"config gives {self.window}; set window_samples: {length}"
            )

    def _spec(self, feature: str, output: str, *, level: str, shape, hop: int | None, frames: str) -> OutputSpec:
        c = self.config
        per = f"per window of {self.window} samples every {self.hop} at {self.rate} Hz" if self.windowed else f"per {level}"
        return OutputSpec(
            name=feature,
            level=level,
            shape=tuple(int(d) for d in shape),
            hop_length=hop,
            sample_rate=self.rate if level == "frame" else self.sample_rate,
            frames=frames,
            description=f"output {output!r} {per} of the {self.backend} model {c.path} ({c.fingerprint[:19]})",
        )

    def output_specs(self) -> tuple[OutputSpec, ...]:
        self.check()
        return self._specs

    def extract(self, batch: Batch) -> dict[str, Any]:
        values = self._run(batch)
        result = {}
        # Non-finite values are left as they are: the pipeline turns each such item into a
        # `feature_non_finite` dead letter and keeps the rest of the batch.
        for spec, (feature, output) in zip(self.output_specs(), self.chosen()):
            value = values[output]
            if isinstance(value, list):
                result[feature] = [np.asarray(v, dtype=np.float32) for v in value]
            elif spec.level == "frame" and spec.frames == "any":  # frames at the model's rate, centred there
                counts = 1 + batch.intermediate(Resampled(self.rate))[1] // spec.hop_length
                value = np.asarray(value, dtype=np.float32)
                result[feature] = [value[i, : int(counts[i])] for i in range(len(counts))]
            else:
                result[feature] = np.asarray(value, dtype=np.float32)
        return result
