"""The run configuration: defaults, then a `--config` YAML, then flags; resolved, checked and hashed.

The resolved config is what run.json records and what its `config_hash` covers, so two runs
with the same hash computed the same features from the same listing parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from featurebeam.errors import ConfigError

DEFAULT_FEATURES = ("logmel", "mfcc", "spectral")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes.

    sample_rate: Hz every item is resampled to. segment_seconds: window length for fixed-length
    segmentation (None keeps whole items). features: extractor name -> its config values (only
    the keys the user set; extractors fill in defaults). batch_seconds: audio seconds per
    extraction batch (bounds worker memory). limit: keep only the first N listed items (by key).
    max_failure_ratio: failed/listed above which the run ends non-zero after writing everything
    it has. max_item_seconds: longest item accepted (longer ones become dead letters, reason
    too_long); None means 4 hours when segmenting (decoding streams, so memory stays bounded)
    and 1 hour otherwise (a whole item is held in memory at sample_rate).
    """

    sample_rate: int = 16000
    segment_seconds: float | None = None
    features: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: {name: {} for name in DEFAULT_FEATURES}
    )
    batch_seconds: float = 240.0
    limit: int | None = None
    max_failure_ratio: float = 0.05
    max_item_seconds: float | None = None

    def __post_init__(self):
        where = "config"
        if not isinstance(self.sample_rate, int) or not 1000 <= self.sample_rate <= 384000:
            raise ConfigError(f"{where}: sample_rate must be an integer in 1000..384000 Hz, got {self.sample_rate!r}")
        if self.segment_seconds is not None and not (isinstance(self.segment_seconds, (int, float)) and self.segment_seconds > 0):
            raise ConfigError(f"{where}: segment_seconds must be a positive number of seconds or null, got {self.segment_seconds!r}")
        if not isinstance(self.features, Mapping) or not self.features:
            raise ConfigError(f"{where}: features must name at least one extractor, e.g. --features=logmel")
        if not (isinstance(self.batch_seconds, (int, float)) and self.batch_seconds > 0):
            raise ConfigError(f"{where}: batch_seconds must be positive, got {self.batch_seconds!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ConfigError(f"{where}: limit must be a positive integer, got {self.limit!r}")
        if self.max_item_seconds is not None and not (isinstance(self.max_item_seconds, (int, float)) and self.max_item_seconds > 0):
            raise ConfigError(f"{where}: max_item_seconds must be a positive number of seconds, got {self.max_item_seconds!r}")
        if not (isinstance(self.max_failure_ratio, (int, float)) and 0 <= self.max_failure_ratio <= 1):
            raise ConfigError(f"{where}: max_failure_ratio must be between 0 and 1, got {self.max_failure_ratio!r}")

    @property
    def item_seconds_limit(self) -> float:
        if self.max_item_seconds is not None:
            return float(self.max_item_seconds)
        return 4 * 3600.0 if self.segment_seconds else 3600.0

    @property
    def segment_samples(self) -> int | None:
        return int(round(self.segment_seconds * self.sample_rate)) if self.segment_seconds else None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["features"] = {name: dict(values) for name, values in self.features.items()}
        return out


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def _read_config(path: str) -> str:
    """The config file's text: a local file, or a URI (gs://...) read through Beam's file systems,
    which a launcher with no local copy (a Flex Template's) can read."""
    missing = f"--config {path}: no such file; pass a YAML file such as configs/features/default.yaml"
    if "://" not in path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(missing)
        return p.read_text()
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read().decode("utf-8")
    except Exception as exc:
        if not FileSystems.exists(path):
            raise ConfigError(missing) from None
        raise ConfigError(f"--config {path}: cannot read it: {type(exc).__name__}: {exc}") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a feature-set config file, checking its top-level keys."""
    text = _read_config(path)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {', '.join(sorted(FIELDS))}")
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(FIELDS))}")
    features = values.get("features")
    if features is not None:
        if isinstance(features, list):
            features = {name: {} for name in features}
        if not isinstance(features, dict) or not all(isinstance(v, dict) or v is None for v in features.values()):
            raise ConfigError(f"{path}: features must map extractor names to their settings, e.g. 'logmel: {{n_mels: 64}}'")
        values["features"] = {name: dict(v or {}) for name, v in features.items()}
    return values


def resolve(*, config_file: str | None, overrides: Mapping[str, Any], feature_names: list[str] | None) -> RunConfig:
    """Defaults < config file < flags. `feature_names` (from --features) selects extractors;
    settings for them come from the config file when it has any."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    if feature_names is not None:
        configured = values.get("features") or {}
        values["features"] = {name: dict(configured.get(name, {})) for name in feature_names}
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"config: {exc}") from None


def canonical_hash(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
