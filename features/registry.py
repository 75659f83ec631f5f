"""The extractor registry: built-ins register by decorator, third parties by entry point.

Third-party packages declare extractors in the `featurebeam.extractors` entry-point group; each
entry point names an `Extractor` subclass (or a module that registers one on import). Every
extractor's source distribution (name and version) is remembered, so run.json records which
package computed a feature and a broken plug-in's error names the package to fix or uninstall.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Mapping

from featurebeam.errors import ConfigError, FeatureError
from features.base import Extractor, make_config

ENTRY_POINT_GROUP = "featurebeam.extractors"
INSTANCE_KEY = "extractor"  # features: {NAME: {extractor: CLASS, ...}} names an instance of CLASS
BUILTIN_MODULES = ("logmel", "mfcc", "spectral", "chroma", "onset", "summary")
# Built-ins that need a model file (no default config); their modules import no ML framework.
MODEL_MODULES = ("tf_model", "onnx_model")

_REGISTRY: dict[str, type[Extractor]] = {}
_SOURCES: dict[str, dict[str, str]] = {}  # extractor name -> {"name": distribution, "version": ...}
_loaded = False


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_extractor(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator: add an extractor under `cls.name`; a second definition of a name raises."""
    for attr in ("name", "version", "config_type"):
        if not hasattr(cls, attr):
            raise FeatureError(f"extractor class {_where(cls)} must set {attr!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and _where(existing) != _where(cls):
        raise FeatureError(
            f"extractor name {cls.name!r} is registered twice: by {_where(existing)} and by "
            f"{_where(cls)}; rename one of them"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _builtin_source() -> dict[str, str]:
    try:
        version = importlib.metadata.version("featurebeam")
    except importlib.metadata.PackageNotFoundError:
        from featurebeam import __version__ as version
    return {"name": "featurebeam", "version": version}


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in (*BUILTIN_MODULES, *MODEL_MODULES):
        importlib.import_module(f"features.{module}")
    builtin = _builtin_source()
    for name in _REGISTRY:
        _SOURCES.setdefault(name, builtin)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)
        source = {"name": dist.name, "version": dist.version} if dist is not None else {"name": "unknown", "version": ""}
        package = f"package {source['name']} {source['version']}".rstrip()
        before = set(_REGISTRY)
        try:
            obj = entry_point.load()
            if inspect.isclass(obj) and issubclass(obj, Extractor) and _REGISTRY.get(obj.name) is not obj:
                register_extractor(obj)
        except Exception as exc:  # a broken plug-in must name itself, not hide behind a traceback
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise FeatureError(
                f"entry point {entry_point.name!r} ({entry_point.value}) of {package} in group {ENTRY_POINT_GROUP!r} "
                f"failed to load: {type(exc).__name__}: {detail}; fix or uninstall {source['name']}"
            ) from exc
        for name in set(_REGISTRY) - before:
            _SOURCES[name] = source


def source(name: str) -> dict[str, str]:
    """The distribution that provides extractor `name`: `{"name": ..., "version": ...}`."""
    get(name)
    return dict(_SOURCES.get(name) or {"name": _REGISTRY[name].__module__.split(".")[0], "version": ""})


def available() -> list[str]:
    """Names of every registered extractor, sorted."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> type[Extractor]:
    """The extractor class registered as `name`."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FeatureError(
            f"unknown feature {name!r}; available features are {', '.join(available())} "
            f"(third-party extractors register through the {ENTRY_POINT_GROUP!r} entry-point group)"
        ) from None


def resolve_feature(name: str, values: Mapping[str, Any] | None = None) -> tuple[str, str | None, dict[str, Any]]:
    """What one entry of a run's features is: `(instance name, extractor name, config values)`.

    The one place that reads a feature entry's kind. The key is the instance name (its outputs
    are prefixed by it), except for `--features=FILE.py:NAME` / `MODULE:NAME`, a plain function
    named after itself. The extractor name is None for a plain function (`function:` in the
    values, see features/function.py); otherwise the key names a registered extractor.
    """
    from features import function

    values = dict(values or {})
    if function.is_function_spec(name):
        values.setdefault(function.FUNCTION_KEY, name)
        return name.rpartition(":")[2], None, values
    if function.FUNCTION_KEY in values:
        return name, None, values
    return name, name, values


def build(name: str, values: Mapping[str, Any] | None = None, *, sample_rate: int, where: str = "") -> Extractor:
    """Instantiate extractor `name` with config `values` (a mapping of its config's fields) and
    run its launch-time `check` (a model extractor loads its model and tries a dummy batch), so
    what a config can get wrong fails here, as a ConfigError, not on a worker.

    A plain function (`FILE.py:NAME`, or a `function:` key in the values) becomes a
    `features.function.FunctionExtractor` named by `resolve_feature`."""
    instance, kind, values = resolve_feature(name, values)
    if kind is None:
        from features import function

        return function.build(instance, values, sample_rate=sample_rate, where=where or f"features.{instance}")
    cls = get(name)
    config = make_config(cls.config_type, values, where=where or f"features.{name}")
    extractor = cls(config, sample_rate=sample_rate)
    extractor.check()
    return extractor


# --- named instances: the run config's `features:` entries ---------------------------------------


def instance_class(name: str, values: Mapping[str, Any] | None, *, where: str = "") -> type[Extractor]:
    """The extractor class of the config entry `features: {name: values}`: the one `values`'
    `extractor:` key names, else the one registered as `name`. ConfigError when there is none."""
    where = where or f"features.{name}"
    kind = (values or {}).get(INSTANCE_KEY) or name
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: {INSTANCE_KEY}: {kind!r} must be an extractor name, e.g. tf_model")
    _load()
    if kind not in _REGISTRY:
        told = f"{INSTANCE_KEY}: {kind}; available extractors are" if kind != name else f"feature {name!r}; available features are"
        raise ConfigError(
            f"{where}: unknown {told} {', '.join(available())} "
            f"(set {INSTANCE_KEY}: to one of them to name an instance {name!r})"
        )
    return _REGISTRY[kind]


def build_instance(name: str, values: Mapping[str, Any] | None = None, *, sample_rate: int, where: str = "") -> Extractor:
    """The extractor the run config's entry `features: {name: values}` describes, checked.

    `name` is the instance's name. With no `extractor:` key it names the registered extractor
    (`features: {tf_model: {...}}`), as before. With one, it is the user's name for an instance
    of that extractor (`features: {pitch: {extractor: onnx_model, ...}, tags: {extractor:
    tf_model, ...}}`), so a run can hold several of one kind: the instance's `name` is then
    `name` (run.json, plan.json, dead letters and --reuse_from know it by it, and its
    `describe()` records `extractor:`), and its outputs are prefixed by it: an extractor whose
    config has a `name` field (a model's) gets it as that field's default, and any other output
    has the class's name prefix replaced by the instance's (`logmel` -> `mel128`,
    `spectral_centroid` -> `timbre_centroid`) or, lacking one, `name_` put before it.
    Every config entry of a run goes through here (the launcher, the workers, the path check).
    """
    if resolve_feature(name, values)[1] is None:  # a plain function (features/function.py)
        return build(name, values, sample_rate=sample_rate, where=where)
    values = dict(values or {})
    where = where or f"features.{name}"
    cls = instance_class(name, values, where=where)
    values.pop(INSTANCE_KEY, None)
    if cls.name == name:
        return build(name, values, sample_rate=sample_rate, where=where)
    if not name[:1].isalpha() or not name.replace("_", "").isalnum():
        raise ConfigError(f"{where}: the instance name {name!r} must start with a letter and hold only letters, digits and underscores")
    import dataclasses

    named = "name" in {f.name for f in dataclasses.fields(cls.config_type)}
    if named:
        values.setdefault("name", name)
    inner = cls(make_config(cls.config_type, values, where=where), sample_rate=sample_rate)
    if named:
        inner.name = name  # shadows the class attribute, so the launch check's messages name the instance
    inner.check()
    if all(spec.name == name or spec.name.startswith(name + "_") for spec in inner.output_specs()):
        inner.name = name
        return inner
    if named:
        del inner.name
    return Renamed(name, inner)


def instance_values(extractor: Extractor) -> dict[str, Any]:
    """The full config of a built instance as the run config's `features:` entry that rebuilds it
    (what plan.json carries to the workers): its config's fields, plus `extractor:` for a named
    instance of another extractor; for a plain function, its `function:` entry."""
    if hasattr(extractor, "config_values"):  # a plain function: its `function:` entry
        return extractor.config_values()
    import dataclasses

    values = dataclasses.asdict(extractor.config)
    kind = type(extractor).name if not isinstance(extractor, Renamed) else extractor.inner_type.name
    return values if kind == extractor.name else {INSTANCE_KEY: kind, **values}


def _renamed(output: str, *, kind: str, name: str) -> str:
    if output == kind:
        return name
    if output.startswith(kind + "_"):
        return name + output[len(kind) :]
    return f"{name}_{output}"


class Renamed(Extractor):
    """An instance of an extractor whose outputs do not carry the instance's name: the same
    computation (shared through `Batch.outputs`), the outputs renamed."""

    def __init__(self, name: str, inner: Extractor):
        self.name = name
        self.inner = inner
        self.inner_type = type(inner)
        self.version = inner.version
        self.config_type = inner.config_type
        self.description = inner.description
        self.config = inner.config
        self.sample_rate = inner.sample_rate
        kind = self.inner_type.name
        self._names = {spec.name: _renamed(spec.name, kind=kind, name=name) for spec in inner.output_specs()}

    def setup(self) -> None:
        self.inner.setup()

    def output_specs(self):
        import dataclasses

        return tuple(dataclasses.replace(spec, name=self._names[spec.name]) for spec in self.inner.output_specs())

    def window_parts(self):
        return self.inner.window_parts()

    def extract(self, batch):
        return {self._names[k]: v for k, v in batch.outputs(self.inner).items()}

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "name": self.name, INSTANCE_KEY: self.inner_type.name, "outputs": [
            spec.to_json() for spec in self.output_specs()
        ]}
