"""The elements that flow through the pipeline between listing and export."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(kw_only=True)
class RecordInfo:
    """What identifies one record (a whole item or one segment) and where its audio came from.

    key: `<item key>` for whole items, `<item key>#<start_sample>` for segments (start in samples
    at `sample_rate`). segment_index / last_segment: position among the item's segments (0 / True
    for whole items). silent: the peak is below 1e-6 (kept, but flagged). source_*: the file as
    decoded, before mixdown and resampling. content_id: the source object's fingerprint
    (`datasets.base.content_id`).
    """

    key: str
    item_key: str
    uri: str
    label: str | None
    split: str | None
    metadata: tuple[tuple[str, str], ...]
    start_sample: int
    segment_index: int
    last_segment: bool
    silent: bool
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_duration_seconds: float
    content_id: str = ""


@dataclasses.dataclass(kw_only=True)
class Clip(RecordInfo):
    """A conditioned mono waveform: `[n]` float32 at `sample_rate` Hz, with any outputs a
    previous run can provide for it (`reused`: output name -> value)."""

    waveform: np.ndarray
    reused: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


@dataclasses.dataclass(kw_only=True)
class FeatureRow(RecordInfo):
    """A record's features: output name -> array (frame-level `[frames, *shape]`, clip-level
    `shape`); `reused` names the extractors whose outputs came from a previous run."""

    num_samples: int
    features: Mapping[str, np.ndarray]
    reused: tuple[str, ...] = ()

    @classmethod
    def of(cls, clip: Clip, features: Mapping[str, np.ndarray], *, reused: tuple[str, ...] = ()) -> "FeatureRow":
        info = {field.name: getattr(clip, field.name) for field in dataclasses.fields(RecordInfo)}
        return cls(**info, num_samples=clip.num_samples, features=features, reused=reused)

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate
