"""The extractor registry: built-ins register by decorator, third parties by entry point.

Third-party packages declare extractors in the `featurebeam.extractors` entry-point group; each
entry point names an `Extractor` subclass (or a module that registers one on import).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Mapping

from featurebeam.errors import FeatureError
from features.base import Extractor, make_config

ENTRY_POINT_GROUP = "featurebeam.extractors"
BUILTIN_MODULES = ("logmel", "mfcc", "spectral", "chroma", "onset", "summary")

_REGISTRY: dict[str, type[Extractor]] = {}
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


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(f"features.{module}")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry_point.load()
        except Exception as exc:  # a broken plug-in must name itself, not break every run
            raise FeatureError(
                f"entry point {entry_point.name!r} ({entry_point.value}) in group {ENTRY_POINT_GROUP!r} "
                f"failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if inspect.isclass(obj) and issubclass(obj, Extractor) and _REGISTRY.get(obj.name) is not obj:
            register_extractor(obj)


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


def build(name: str, values: Mapping[str, Any] | None = None, *, sample_rate: int, where: str = "") -> Extractor:
    """Instantiate extractor `name` with config `values` (a mapping of its config's fields)."""
    cls = get(name)
    config = make_config(cls.config_type, values, where=where or f"features.{name}")
    return cls(config, sample_rate=sample_rate)
