"""`summary`: clip-level mean and standard deviation of other extractors' frame-level outputs.

For every frame-level output `<out>` of each extractor named in `of`, emits `summary_<out>_mean`
and `summary_<out>_std` with the output's per-frame shape, over the item's valid frames only
(padding frames past `Batch.frame_counts` are masked out). The summarised extractors run through
`Batch.outputs`, so when the pipeline also emits them at the same config nothing is computed twice.
A long item is summarised in windows when every summarised extractor can be (the statistics run
over the item's assembled frame-level outputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from featurebeam.errors import ConfigError
from features.base import Batch, Extractor, FrameIntermediate, OutputSpec
from features.registry import available, build, register_extractor

FrozenConfigs = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def _freeze_value(value: Any) -> Any:
    if isinstance(value, Mapping):  # a model's outputs: {feature: model output}
        return tuple(sorted((str(k), _freeze_value(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_value(v) for v in value)
    return value


def _freeze_configs(configs: Any) -> FrozenConfigs:
    """`{name: {key: value}}` (or the pairs `describe()` writes out) as sorted nested tuples,
    so the config stays hashable and two spellings of one mapping compare equal."""
    pairs = configs.items() if isinstance(configs, Mapping) else configs
    frozen = []
    for entry in pairs:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"configs must map extractor names to their config values, got entry {entry!r}")
        name, values = entry
        items = values.items() if isinstance(values, Mapping) else values
        try:
            frozen_values = tuple(sorted((str(k), _freeze_value(v)) for k, v in items))
        except (TypeError, ValueError):
            raise ValueError(f"configs[{name!r}] must be a mapping of config keys to values, got {values!r}") from None
        frozen.append((name, frozen_values))
    return tuple(sorted(frozen))


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
    """of: names of the extractors to summarise (each with its default config unless `configs`
    says otherwise); configs: optional `{extractor name: {config key: value}}` for those
    extractors, stored as sorted tuples so the config stays hashable. Give the same values the
    run uses for that extractor, or summary computes a second, differently configured copy."""

    of: tuple[str, ...] = ("logmel",)
    configs: FrozenConfigs = ()

    def __post_init__(self):
        of = (self.of,) if isinstance(self.of, str) else tuple(self.of)
        if not of:
            raise ValueError("of must name at least one extractor")
        if len(set(of)) != len(of):
            raise ValueError(f"of names an extractor twice: {list(of)}")
        object.__setattr__(self, "of", of)
        configs = _freeze_configs(self.configs)
        stray = sorted(name for name, _ in configs if name not in of)
        if stray:
            raise ValueError(f"configs given for {stray}, which of={list(of)} does not name")
        object.__setattr__(self, "configs", configs)


@register_extractor
class Summary(Extractor):
    name = "summary"
    version = "1"
    config_type = SummaryConfig
    description = "per-clip mean and standard deviation of frame-level features over valid frames"

    def __init__(self, config: SummaryConfig | None = None, *, sample_rate: int):
        super().__init__(config, sample_rate=sample_rate)
        c = self.config
        known = available()
        for name in c.of:
            if name == self.name:
                raise ConfigError("features.summary: 'of' cannot name 'summary' itself")
            if name not in known:
                raise ConfigError(
                    f"features.summary: 'of' names unknown feature {name!r}; available features are "
                    f"{', '.join(n for n in known if n != self.name)}"
                )
        values = dict(c.configs)
        self.sources: tuple[Extractor, ...] = tuple(
            build(name, dict(values.get(name, ())), sample_rate=sample_rate, where=f"features.summary.configs.{name}")
            for name in c.of
        )
        for source in self.sources:
            if not any(spec.level == "frame" for spec in source.output_specs()):
                raise ConfigError(
                    f"features.summary: {source.name!r} has no frame-level output to summarise; "
                    "remove it from 'of'"
                )

    def setup(self) -> None:
        for source in self.sources:
            source.setup()

    def _frame_specs(self) -> list[tuple[Extractor, OutputSpec]]:
        return [(source, spec) for source in self.sources for spec in source.output_specs() if spec.level == "frame"]

    def output_specs(self) -> tuple[OutputSpec, ...]:
        specs = []
        for source, spec in self._frame_specs():
            for statistic, word in (("mean", "mean"), ("std", "standard deviation")):
                specs.append(
                    OutputSpec(
                        name=f"summary_{spec.name}_{statistic}",
                        level="clip",
                        shape=spec.shape,
                        sample_rate=self.sample_rate,
                        description=f"{word} of {spec.name} over the clip's frames",
                    )
                )
        return tuple(specs)

    def window_parts(self) -> tuple[FrameIntermediate, ...] | None:
        parts = [source.window_parts() for source in self.sources]
        return None if any(p is None for p in parts) else tuple(part for p in parts for part in p)

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        result = {}
        for source, spec in self._frame_specs():
            values = batch.outputs(source)[spec.name]  # [B, T, *shape]
            if isinstance(values, (list, tuple)):  # frames="any": each item's own frames (a windowed model's)
                items = [np.asarray(v, dtype=np.float64) for v in values]
                result[f"summary_{spec.name}_mean"] = np.stack([v.mean(axis=0) for v in items]).astype(np.float32)
                result[f"summary_{spec.name}_std"] = np.stack([v.std(axis=0) for v in items]).astype(np.float32)
                continue
            mask = batch.frame_mask(spec.hop_length, values.shape[1])
            mask = mask.reshape(mask.shape + (1,) * len(spec.shape))
            count = np.maximum(batch.frame_counts(spec.hop_length), 1).reshape((-1,) + (1,) * len(spec.shape))
            # float64 sums: a long clip adds up tens of thousands of frames.
            valid = np.where(mask, values.astype(np.float64), 0.0)  # where, not *, in case padding is inf
            mean = valid.sum(axis=1) / count
            spread = np.where(mask, valid - mean[:, None], 0.0)
            std = np.sqrt((spread * spread).sum(axis=1) / count)
            result[f"summary_{spec.name}_mean"] = mean.astype(np.float32)
            result[f"summary_{spec.name}_std"] = std.astype(np.float32)
        return result
