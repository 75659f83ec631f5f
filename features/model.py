"""What `tf_model` and `onnx_model` share: the config, the model's fingerprint, the per-process
model cache and the launch-time check.

A model extractor feeds a batch to a learned model and stores one of its outputs as a feature.
The model is loaded once per worker process and shared by every thread (Beam's
`apache_beam.utils.shared.Shared`, the way RunInference shares models); a module-level handle
per model is what makes the sharing work, because extractors are built inside each DoFn's setup,
so a `Shared()` made per extractor would be a new key per thread.

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
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, ClassVar, Literal

import numpy as np

from featurebeam.errors import ConfigError
from features.base import Batch, Extractor, FrameIntermediate, OutputSpec
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
    output_key: the model output to keep when it has several (None = its only one);
    name: the feature name the output is stored under;
    level: "clip" (the model returns [B, D]) or "frame" ([B, T, D] with T >= 1 + n // hop_length);
    hop_length: samples between frames, of the log-mel input and of frame-level outputs;
    fingerprint: sha256 of the model's files, filled in at launch (set it to insist on exactly
    that model)."""

    path: str = ""
    input: Literal["waveform", "logmel"] = "waveform"
    output_key: str | None = None
    name: str = "embedding"
    level: Literal["clip", "frame"] = "clip"
    fingerprint: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("path is required: the model file or folder, local or gs://")
        if self.input not in ("waveform", "logmel"):
            raise ValueError(f"input={self.input!r} must be 'waveform' or 'logmel'")
        if self.level not in ("clip", "frame"):
            raise ValueError(f"level={self.level!r} must be 'clip' (model returns [B, D]) or 'frame' ([B, T, D])")
        if not isinstance(self.name, str) or not self.name[:1].isalpha() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"name={self.name!r} must start with a letter and hold only letters, digits and underscores")


class LoadedModel(abc.ABC):
    """A model loaded by a backend: its input and output names and a batch call."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for numpy `feeds` by input name."""

    def static_length(self, name: str) -> int | None:
        """The fixed size of axis 1 of input `name`, if the model declares one."""
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


class ModelExtractor(Extractor):
    """Runs a model over whole batches; subclasses say how to load one (`load_model`)."""

    backend: ClassVar[str] = "model"

    def __init__(self, config: ModelConfig | None = None, *, sample_rate: int):
        if config is None:
            raise ConfigError(f"features.{self.name}: path is required: the model file or folder, local or gs://")
        super().__init__(config, sample_rate=sample_rate)
        self._model: LoadedModel | None = None
        self._spec: OutputSpec | None = None
        self._where = f"features.{self.name} (path {config.path})"
        found = fingerprint(config.path)
        if config.fingerprint is not None and config.fingerprint != found:
            raise ConfigError(
                f"{self._where}: the model's files have fingerprint {found}, but the config says {config.fingerprint}; "
                "the model changed since the run was planned (or since fingerprint: was pinned): restore it, "
                "or start a new run"
            )
        self.config = dataclasses.replace(config, fingerprint=found)
        self.version = f"{type(self).version}+{found.split(':')[-1][:12]}"

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

    def _feeds(self, batch: Batch, model: LoadedModel) -> dict[str, np.ndarray]:
        c = self.config
        if c.input == "waveform":
            value, lengths = batch.waveforms, batch.lengths
        else:
            value = np.ascontiguousarray(batch.intermediate(c.log_mel()).transpose(0, 2, 1))
            lengths = batch.frame_counts(c.hop_length)
        feeds = {self._main_input(model): value.astype(np.float32, copy=False)}
        if LENGTHS_INPUT in model.inputs:
            feeds[LENGTHS_INPUT] = lengths.astype(np.int32)
        return feeds

    def _select(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        if c.output_key is None:
            if len(outputs) != 1:
                raise ConfigError(
                    f"{self._where}: the model has outputs {sorted(outputs)}; set output_key: to the one to keep"
                )
            return next(iter(outputs.values()))
        if c.output_key not in outputs:
            raise ConfigError(f"{self._where}: no output {c.output_key!r}; the model's outputs are {sorted(outputs)}; fix output_key:")
        return outputs[c.output_key]

    def check(self) -> None:
        """Load the model and run it on a dummy batch of two items; every problem a config can
        fix (missing file, wrong signature, unknown output, wrong rank, too few frames) is a
        one-line ConfigError here, before any worker starts."""
        if self._spec is not None:
            return
        c = self.config
        model = self.model()
        n = int(DUMMY_SECONDS * self.sample_rate)
        if c.input == "waveform":
            n = model.static_length(self._main_input(model)) or n
        rng = np.random.default_rng(0)
        waveforms = [0.1 * rng.standard_normal(n).astype(np.float32), 0.1 * rng.standard_normal(max(1, n // 2)).astype(np.float32)]
        batch = Batch.from_waveforms(waveforms, sample_rate=self.sample_rate)
        try:
            value = np.asarray(self._select(model.run(self._feeds(batch, model))))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"{self._where}: the model failed on a dummy batch of {c.input} input "
                f"({first_line(exc)}); check input:, the signature and the model's input shape"
            ) from None
        want = 2 if c.level == "clip" else 3
        shape = "[B, D]" if c.level == "clip" else "[B, T, D]"
        if value.ndim != want or value.shape[0] != 2:
            raise ConfigError(
                f"{self._where}: on a batch of 2 the model returned shape {list(value.shape)}, but level: {c.level} "
                f"needs {shape}; set level: to match the model, or pick another output_key"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ConfigError(f"{self._where}: the output is {value.dtype}, not floating point; pick another output_key")
        if c.level == "frame":
            frames = 1 + n // c.hop_length
            if value.shape[1] < frames:
                raise ConfigError(
                    f"{self._where}: for {n} samples the model returned {value.shape[1]} frames, fewer than the "
                    f"{frames} (1 + n // hop_length) that hop_length: {c.hop_length} means; set hop_length: to the "
                    "model's frame hop in samples"
                )
        self._spec = OutputSpec(
            name=c.name,
            level=c.level,
            shape=tuple(int(d) for d in value.shape[2 if c.level == "frame" else 1 :]),
            hop_length=c.hop_length if c.level == "frame" else None,
            sample_rate=self.sample_rate,
            description=f"{c.level}-level output of the {self.backend} model {c.path} ({c.fingerprint[:19]})",
        )

    def output_specs(self) -> tuple[OutputSpec, ...]:
        self.check()
        return (self._spec,)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        model = self.model()
        value = np.asarray(self._select(model.run(self._feeds(batch, model))), dtype=np.float32)
        # Non-finite values are left as they are: the pipeline turns each such item into a
        # `feature_non_finite` dead letter and keeps the rest of the batch.
        return {self.config.name: value}
