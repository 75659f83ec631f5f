"""Turning `--dataset=...` into a Dataset: a config name, a path or glob, or a URI.

Named datasets are YAML files in `configs/datasets/<name>.yaml` with a `type` key naming an
adapter and the adapter's constructor arguments as the other keys; they are checked on load and
errors name the file, the key and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import yaml

from datasets.base import Dataset
from featurebeam.errors import ConfigError, DatasetError

# type name -> "module:Class"; imported lazily so optional cloud clients load only when used.
ADAPTERS = {
    "sample": "datasets.sample:SampleDataset",
    "files": "datasets.files:FilesDataset",
    "local": "datasets.files:FilesDataset",
    "manifest": "datasets.manifest:ManifestDataset",
    "gcs": "datasets.gcs:GcsDataset",
    "bigquery": "datasets.bigquery:BigQueryDataset",
}
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def config_dirs() -> list[Path]:
    """Where named dataset configs are looked up: $FEATUREBEAM_DATASETS_DIR, ./configs/datasets, the repo's."""
    dirs = [Path(p) for p in os.environ.get("FEATUREBEAM_DATASETS_DIR", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "configs" / "datasets", REPO_CONFIGS]
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def named() -> dict[str, Path]:
    """Every named dataset config, name -> file (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in reversed(config_dirs()):
        for path in sorted(d.glob("*.yaml")):
            found[path.stem] = path
    return found


def adapter(type_name: str, *, where: str) -> type[Dataset]:
    try:
        module, cls = ADAPTERS[type_name].split(":")
    except KeyError:
        raise ConfigError(f"{where}: unknown dataset type {type_name!r}; use one of {', '.join(sorted(ADAPTERS))}") from None
    return getattr(importlib.import_module(module), cls)


def from_config(values: dict[str, Any], *, name: str, where: str) -> Dataset:
    """Build a dataset from a config mapping (`type` plus the adapter's arguments)."""
    if not isinstance(values, dict) or "type" not in values:
        raise ConfigError(f"{where}: a dataset config is a mapping with a 'type' key ({', '.join(sorted(ADAPTERS))})")
    values = dict(values)
    values.pop("description", None)
    cls = adapter(values.pop("type"), where=where)
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(p for p in params if p not in ("self",) and params[p].kind == inspect.Parameter.KEYWORD_ONLY)
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} for a {cls.__name__}; valid keys are {', '.join(allowed)}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in values and p != "name"]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r} for a {cls.__name__}")
    values.setdefault("name", name)
    try:
        return cls(**values)
    except (TypeError, ValueError, DatasetError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_named(name: str, path: Path) -> Dataset:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_config(values, name=name, where=str(path))


def resolve(spec: str, *, max_bytes_billed: int | str | None = None, allowed_uri_prefixes=None) -> Dataset:
    """The dataset `spec` names: a config name, a manifest, a directory/file/glob, or a URI.

    max_bytes_billed: `--max_bytes_billed`, the ceiling on any BigQuery query the dataset runs.
    allowed_uri_prefixes: `--allowed_uri_prefixes` (`gs://a/,gs://b/` or a list), further prefixes
      that URIs from manifest or catalogue rows may point at (datasets/allowlist.py).
    """
    dataset = _resolve(spec)
    dataset.restrict(max_bytes_billed=max_bytes_billed, allowed_uri_prefixes=allowed_uri_prefixes)
    return dataset


def _resolve(spec: str) -> Dataset:
    if not spec:
        raise ConfigError("--dataset is required: a name from configs/datasets, a directory, a glob or a URI")
    configs = named()
    if spec in configs:
        return load_named(spec, configs[spec])
    if spec.startswith("bq://"):
        return adapter("bigquery", where="--dataset").from_uri(spec)
    if spec.lower().endswith(MANIFEST_SUFFIXES):
        return adapter("manifest", where="--dataset")(uri=spec)
    if spec.startswith("gs://"):
        return adapter("gcs", where="--dataset")(uri=spec)
    if "://" in spec and not spec.startswith("file://"):
        return adapter("files", where="--dataset")(uri=spec)
    from datasets.files import FilesDataset, has_glob

    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if os.path.exists(path) or has_glob(path):
        return FilesDataset(uri=spec)
    raise DatasetError(
        f"unknown dataset {spec!r}: not a name in configs/datasets ({', '.join(sorted(configs)) or 'none'}) "
        "and no such path; pass a dataset name, a directory, a glob, a .csv/.jsonl manifest, or a gs:// or bq:// URI"
    )
