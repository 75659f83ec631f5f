"""Plain Python functions as extractors: `--features=my_algos.py:loudness`, no package needed.

A function named `FILE.py:NAME` (a file path) or `MODULE:NAME` (an importable module) is called
once per item as `fn(waveform=[n] float32, sample_rate=Hz, **its config keyword arguments)`; a
function whose parameters include `waveforms` takes a batch instead:
`fn(waveforms=[B, n] float32 zero-padded, lengths=[B] int, sample_rate=Hz, ...)` returning, per
output, a sequence of B per-item values. It returns one value (the output is named after the
extractor instance) or a dict of values (outputs `<instance>_<key>`, as `spectral` names its outputs).

Output specs are inferred at launch by running the function on two test signals of different
lengths (`infer_specs`): a NumPy array whose first axis grows as `1 + n // hop` for one hop is a
frame-level output at that hop; one whose first axis grows otherwise, and any Python list, is a
variable-length clip-level output (shape `(-1, ...)`); other arrays and numbers keep their shape
and dtype; strings are `dtype="string"`, lists of dicts are `dtype="events"`. A config can declare outputs instead (`outputs:`), which the test signal then
checks.

Code reaches remote workers by value: a module loaded from a file path (or from anywhere outside
the installed packages) is registered with cloudpickle's `register_pickle_by_value`, and the loaded
functions travel inside the pickled `ExtractFn` (`loaded_functions`), so a worker needs neither the
file nor the launcher's working directory. The extractor's version is a content hash of the source
file, so an edited function is another extractor for `--reuse_from` and `--mode=resume`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
import traceback
from typing import Any, Callable, Mapping

import numpy as np

from featurebeam.errors import ConfigError, FeatureError
from features.base import Batch, Extractor, OutputSpec, as_output

FUNCTION_KEY = "function"  # the config key that makes a feature a plain function
OUTPUTS_KEY = "outputs"  # optional declared outputs of a function
VERSION_KEY = "function_version"  # set by the launcher in the resolved config; checked on workers
# Seconds of the two launch-time test signals: two lengths tell frame-level outputs (whose frame
# count follows the length by the hop) from fixed-size and variable-length ones.
TEST_SECONDS = (1.0, 1.5)
_EVENT_DTYPES = ("float64", "int64", "string")

# spec text -> (function, source file or "", sha256 of its bytes): what this process loaded or was
# given by the launcher (install), so a worker never needs the file.
_LOADED: dict[str, tuple[Callable, str, str]] = {}


def is_function_spec(name: str) -> bool:
    """Whether a --features entry names a function (`FILE.py:NAME`, `MODULE:NAME`), not an extractor."""
    return ":" in name


@dataclasses.dataclass(frozen=True)
class FunctionConfig:
    """A plain function as an extractor.

    function: `FILE.py:NAME` (a path, relative to the working directory) or `MODULE:NAME`.
    kwargs: keyword arguments passed to every call, as (key, value) pairs (the config's other keys).
    outputs: declared outputs, as (key, settings) pairs; settings are OutputSpec fields
      (level, shape, dtype, hop_length, fields). Empty: inferred on a test signal.
    """

    function: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    outputs: tuple[tuple[str, Any], ...] = ()


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple((str(k), _freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _plain(pairs: tuple) -> dict[str, Any]:
    """Frozen (key, value) pairs back to nested dicts."""
    return {key: _plain(value) if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value) and value else value for key, value in pairs}


def _thaw(value: Any) -> Any:
    """The frozen config values as plain Python (tuples of pairs stay tuples: callers read them)."""
    return list(value) if isinstance(value, tuple) else value


def _installed(path: str) -> bool:
    """Whether `path` lies in the interpreter's installed packages (so workers import it too)."""
    path = os.path.realpath(path)
    roots = {os.path.realpath(p) for key in ("purelib", "platlib", "stdlib") if (p := sysconfig.get_paths().get(key))}
    return any(path.startswith(root + os.sep) for root in roots)


def load(spec: str) -> tuple[Callable, str, str]:
    """(function, source file, sha256 of the file) for `FILE.py:NAME` or `MODULE:NAME`, loading it
    once per process; a ConfigError names what failed and the fix."""
    if spec in _LOADED:
        return _LOADED[spec]
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr.isidentifier():
        raise ConfigError(f"--features {spec}: name a function as FILE.py:NAME or MODULE:NAME, e.g. my_algos.py:loudness")
    try:
        import cloudpickle

        if module_part.endswith(".py") or os.sep in module_part:
            path = os.path.abspath(module_part)
            if not os.path.isfile(path):
                raise ConfigError(f"--features {spec}: no such file {path}; pass the path of the .py file that defines {attr}")
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
            # A name no worker can import, so cloudpickle sends the module's code by value.
            module_name = f"featurebeam_function_{stem}_{digest[:12]}"
            module = sys.modules.get(module_name)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            cloudpickle.register_pickle_by_value(module)
        else:
            module = importlib.import_module(module_part)
            path = getattr(module, "__file__", None) or ""
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if path else ""
            if path and not _installed(path):  # a module beside the launcher, not on the workers
                cloudpickle.register_pickle_by_value(module)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--features {spec}: cannot import it: {_one_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--features {spec}: {module_part} defines no function {attr!r}")
    _LOADED[spec] = (fn, path, digest)
    return _LOADED[spec]


def install(packed: bytes) -> None:
    """Make the functions the launcher packed (`loaded_functions`) known to this worker process."""
    import cloudpickle

    for spec, value in cloudpickle.loads(packed).items():
        _LOADED.setdefault(spec, value)


def loaded_functions(features: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The functions the features of a run name, pickled by value with cloudpickle, to ship to the
    workers inside the DoFn. Bytes, not function objects: a runner that ships DoFns with plain
    pickle (Dask pickles its task graph with `pickle` first) would otherwise pickle them by
    reference, to a module no worker can import."""
    import cloudpickle

    loaded = {values[FUNCTION_KEY]: load(values[FUNCTION_KEY]) for values in features.values() if FUNCTION_KEY in values}
    return cloudpickle.dumps(loaded) if loaded else b""


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException, source: str, fn: Callable | None = None) -> str:
    """`file:line` of the innermost frame of `exc` in the function's own source file. On a worker
    the code was unpickled by value, so its frames carry the code's own file name (cloudpickle
    may give `<dynamic-code>`), not the path: they are matched by that and named by the source."""
    frames = traceback.extract_tb(exc.__traceback__)
    names = {os.path.realpath(source)} if source else set()
    code = getattr(fn, "__code__", None)
    if code is not None:
        names.add(code.co_filename)
    inside = [f for f in frames if f.filename in names or os.path.realpath(f.filename) in names]
    if inside and source:
        return f"{os.path.basename(source)}:{inside[-1].lineno}"
    frame = (inside or frames or [None])[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame else os.path.basename(source) or "?"


def test_signal(length: int, *, sample_rate: int) -> np.ndarray:
    """A fixed test signal of `length` samples: a 440 Hz tone in quiet noise with a louder middle, float32."""
    t = np.arange(length) / sample_rate
    rng = np.random.default_rng(0)
    envelope = np.where((t > 0.3) & (t < 0.7), 1.0, 0.2)
    return (0.3 * envelope * np.sin(2 * np.pi * 440.0 * t) + 0.01 * rng.standard_normal(length)).astype(np.float32)


def _pick_hop(lengths: tuple[int, ...], counts: tuple[int, ...], *, sample_rate: int) -> int | None:
    """A hop h with `1 + n // h == count` for every test length, preferring powers of two, then
    divisors of the sample rate; None if there is none."""
    if any(c < 2 for c in counts):
        return None
    low = max(n // c + 1 for n, c in zip(lengths, counts))  # n // h <= c - 1  <=>  h > n / c
    high = min(n // (c - 1) for n, c in zip(lengths, counts))  # n // h >= c - 1  <=>  h <= n / (c - 1)
    candidates = [h for h in range(max(low, 1), high + 1) if all(1 + n // h == c for n, c in zip(lengths, counts))]
    if not candidates:
        return None
    powers = [h for h in candidates if h & (h - 1) == 0]
    divisors = [h for h in candidates if sample_rate % h == 0]
    return (powers or divisors or candidates)[0]


def _kind(value: Any, *, where: str) -> tuple[str, tuple[int, ...], tuple[tuple[str, str], ...]]:
    """(dtype, shape, event fields) of one returned value; ConfigError for what no export can hold."""
    if isinstance(value, str):
        return "string", (), ()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        fields: dict[str, str] = {}
        for record in value:
            for key, field in record.items():
                kind = "string" if isinstance(field, str) else "int64" if isinstance(field, (bool, int, np.integer, np.bool_)) else "float64"
                if not isinstance(field, (str, bool, int, float, np.integer, np.floating, np.bool_)):
                    raise ConfigError(f"{where}: event field {key!r} is a {type(field).__name__}; event fields must be numbers or strings")
                fields[str(key)] = "float64" if fields.get(str(key)) == "float64" and kind == "int64" else kind
        return "events", (-1,), tuple(fields.items())  # in the order the records name them
    if isinstance(value, (list, tuple)) and not value:
        return "empty", (-1,), ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "string", (-1,), ()
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise ConfigError(f"{where}: returned a {type(value).__name__} that is not an array ({_one_line(exc)})") from None
    if array.dtype.kind not in "biuf":
        raise ConfigError(
            f"{where}: returned a {type(value).__name__} of dtype {array.dtype}; return numbers, arrays of a "
            "numeric dtype, strings, or lists of dicts (events)"
        )
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if isinstance(value, (list, tuple)):  # a Python list is variable length; an array's shape is its own
        return array.dtype.name, (-1, *array.shape[1:]), ()
    return array.dtype.name, array.shape, ()


def _outputs_of(result: Any, *, name: str) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return {f"{name}_{key}": value for key, value in result.items()}
    return {name: result}


def infer_specs(fn: Callable, call: Callable[[np.ndarray], Any], *, name: str, sample_rate: int, where: str) -> tuple[OutputSpec, ...]:
    """Output specs from running `call(waveform)` on two test signals (see the module docstring)."""
    lengths = tuple(int(s * sample_rate) for s in TEST_SECONDS)
    runs = []
    for n in lengths:
        try:
            runs.append(_outputs_of(call(test_signal(n, sample_rate=sample_rate)), name=name))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{where}: failed on the launch-time test signal at {_where(exc, inspect.getsourcefile(fn) or '', fn)}: {_one_line(exc)}") from None
    if set(runs[0]) != set(runs[1]):
        raise ConfigError(f"{where}: returned outputs {sorted(runs[0])}, then {sorted(runs[1])}; return the same keys for every input")
    specs = []
    for out in runs[0]:
        kinds = [_kind(run[out], where=f"{where} output {out!r}") for run in runs]
        if all(kind[0] == "empty" for kind in kinds):
            raise ConfigError(
                f"{where}: output {out!r} was an empty list on both test signals, so its type is unknown; declare it "
                f"in the config, e.g. outputs: {{{out[len(name) + 1:] or name}: {{dtype: events, fields: {{time: float64}}}}}}"
            )
        kinds = [kind if kind[0] != "empty" else next(k for k in kinds if k[0] != "empty") for kind in kinds]
        (dtype, shape, fields), (dtype2, shape2, fields2) = kinds
        if dtype != dtype2 or len(shape) != len(shape2) or shape[1:] != shape2[1:]:
            raise ConfigError(
                f"{where}: output {out!r} was {dtype} {list(shape)}, then {dtype2} {list(shape2)}; only the first axis may change with the length"
            )
        if dtype == "events":
            specs.append(OutputSpec(name=out, level="clip", shape=(-1,), dtype="events", fields=tuple({**dict(fields2), **dict(fields)}.items())))
        elif shape[:1] == (-1,):
            specs.append(OutputSpec(name=out, level="clip", shape=shape, dtype=dtype))
        elif not shape or shape[0] == shape2[0]:
            specs.append(OutputSpec(name=out, level="clip", shape=shape, dtype=dtype))
        elif dtype != "string" and (hop := _pick_hop(lengths, (shape[0], shape2[0]), sample_rate=sample_rate)):
            specs.append(OutputSpec(name=out, level="frame", shape=shape[1:], dtype=dtype, hop_length=hop, sample_rate=sample_rate))
        else:
            specs.append(OutputSpec(name=out, level="clip", shape=(-1, *shape[1:]), dtype=dtype))
    return tuple(specs)


def declared_specs(outputs: Mapping[str, Any], *, name: str, sample_rate: int, where: str) -> tuple[OutputSpec, ...]:
    """Output specs from a config's `outputs:` (key -> OutputSpec settings; the key `""` or the
    instance name itself names a single-value output)."""
    specs = []
    allowed = {"level", "shape", "dtype", "hop_length", "fields", "description"}
    for key, settings in outputs.items():
        settings = dict(settings or {})
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ConfigError(f"{where}: outputs.{key}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(allowed))}")
        out = name if key in ("", name) else f"{name}_{key}"
        settings.setdefault("level", "clip")
        settings["shape"] = tuple(settings.get("shape") or ())
        settings["fields"] = tuple(tuple(pair) for pair in (dict(settings.get("fields") or {})).items())
        if settings["level"] == "frame":
            settings["sample_rate"] = sample_rate
        if settings.get("dtype") == "events":
            settings["shape"] = (-1,)
        try:
            specs.append(OutputSpec(name=out, **settings))
        except (FeatureError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: outputs.{key}: {exc}") from None
    return tuple(specs)


class FunctionExtractor(Extractor):
    """A plain function run as an extractor (see the module docstring). Not registered: `registry.build`
    makes one for a `FILE.py:NAME` or `MODULE:NAME` feature or a config with a `function:` key."""

    name = "function"
    version = ""
    config_type = FunctionConfig
    description = "a plain Python function"

    def __init__(self, config: FunctionConfig, *, sample_rate: int, name: str, where: str = ""):
        super().__init__(config, sample_rate=sample_rate)
        self.name = name  # the instance name: the function's, or the config key
        self.where = where or f"features.{name}"
        self.fn, self.source, digest = load(config.function)
        self.version = f"sha256:{digest[:16]}" if digest else "unversioned"
        parameters = inspect.signature(self.fn).parameters
        self.takes_batch = "waveforms" in parameters
        self.kwargs = {key: _thaw(value) for key, value in config.kwargs}
        self.label = f"function {config.function}"
        if config.outputs:
            self.specs = declared_specs(
                {k: dict(v) for k, v in config.outputs}, name=name, sample_rate=sample_rate, where=self.where
            )
        else:
            self.specs = infer_specs(self.fn, self._call_one, name=name, sample_rate=sample_rate, where=f"{self.where} ({self.label})")

    def describe(self) -> dict[str, Any]:
        """As `Extractor.describe`, with the function, its source file's name and content hash."""
        return {
            "name": self.name,
            "version": self.version,
            "package": {"name": "function", "version": self.version},
            "config": dataclasses.asdict(self.config),
            "outputs": [spec.to_json() for spec in self.output_specs()],
            "function": {"spec": self.config.function, "file": os.path.basename(self.source), "version": self.version},
        }

    def config_values(self) -> dict[str, Any]:
        """The feature's config as the workers rebuild it: `function`, its version (so an edited
        file is another config for --mode=resume) and keyword arguments."""
        values = {FUNCTION_KEY: self.config.function, VERSION_KEY: self.version, **self.kwargs}
        if self.config.outputs:
            values[OUTPUTS_KEY] = _plain(self.config.outputs)
        return values

    def check(self) -> None:
        """Run once on the test signal and convert every output by its spec, so a function whose
        outputs cannot be exported (or that disagrees with its declared outputs) stops the launch."""
        values = _outputs_of(self._call_one(test_signal(int(TEST_SECONDS[0] * self.sample_rate), sample_rate=self.sample_rate)), name=self.name)
        specs = {spec.name: spec for spec in self.specs}
        if set(values) != set(specs):
            raise ConfigError(f"{self.where} ({self.label}): returned outputs {sorted(values)}, its outputs are {sorted(specs)}")
        for out, value in values.items():
            try:
                as_output(specs[out], value)
            except (FeatureError, TypeError, ValueError) as exc:
                raise ConfigError(f"{self.where} ({self.label}): output {out!r} cannot be exported: {exc}") from None

    def output_specs(self) -> tuple[OutputSpec, ...]:
        return self.specs

    def _call_one(self, waveform: np.ndarray) -> Any:
        if self.takes_batch:
            result = self.fn(waveforms=waveform[None, :], lengths=np.array([len(waveform)]), sample_rate=self.sample_rate, **self.kwargs)
            if isinstance(result, Mapping):
                return {key: value[0] for key, value in result.items()}
            return result[0]
        return self.fn(waveform=waveform, sample_rate=self.sample_rate, **self.kwargs)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        """Per-item values, as object arrays `[B]` (`ExtractFn` converts each by its spec)."""
        size = len(batch)
        try:
            if self.takes_batch:
                result = self.fn(waveforms=batch.waveforms, lengths=batch.lengths, sample_rate=self.sample_rate, **self.kwargs)
                per_output = _outputs_of(result, name=self.name)
                items = [{out: values[i] for out, values in per_output.items()} for i in range(size)]
            else:
                items = [
                    _outputs_of(self.fn(waveform=batch.waveforms[i, : int(batch.lengths[i])], sample_rate=self.sample_rate, **self.kwargs), name=self.name)
                    for i in range(size)
                ]
        except Exception as exc:
            raise FeatureError(f"function {self.config.function} raised at {_where(exc, self.source, self.fn)}: {_one_line(exc)}") from exc
        outputs = {}
        for spec in self.specs:
            column = np.empty(size, dtype=object)
            for i, item in enumerate(items):
                if spec.name not in item:
                    raise FeatureError(f"function {self.config.function} returned no output {spec.name!r} (it returned {sorted(item)})")
                column[i] = item[spec.name]
            outputs[spec.name] = column
        return outputs


def build(name: str, values: Mapping[str, Any], *, sample_rate: int, where: str) -> FunctionExtractor:
    """A FunctionExtractor named `name` from config values: `function` and its keyword arguments."""
    values = dict(values)
    spec = values.pop(FUNCTION_KEY)
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: function must be FILE.py:NAME or MODULE:NAME, got {spec!r}")
    outputs = values.pop(OUTPUTS_KEY, None) or {}
    if not isinstance(outputs, Mapping):
        raise ConfigError(f"{where}: outputs must map output keys to their settings, e.g. 'outputs: {{count: {{dtype: int64}}}}'")
    expected_version = values.pop(VERSION_KEY, None)
    config = FunctionConfig(function=spec, kwargs=_freeze(values), outputs=_freeze(outputs))
    extractor = FunctionExtractor(config, sample_rate=sample_rate, name=name, where=where)
    if expected_version is not None and expected_version != extractor.version:
        raise ConfigError(
            f"{where}: function {spec} is version {extractor.version} here, but the run was planned with "
            f"{expected_version}; run the same code everywhere"
        )
    extractor.check()
    return extractor
