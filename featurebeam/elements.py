"""The elements that flow through the pipeline between listing and export."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass
class Clip:
    """A conditioned mono waveform: a whole item, or one segment of it.

    key: `<item key>` for whole items, `<item key>#<start_sample>` for segments (start in samples
    at `sample_rate`). segment_index / last_segment: position among the item's segments (0 / True
    for whole items). silent: the clip's peak is below 1e-6 (kept, but flagged). waveform: `[n]` float32 at `sample_rate` Hz. source_*: the file as decoded,
    before mixdown and resampling.
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
    waveform: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_duration_seconds: float
    content_id: str = ""
    reused: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # output name -> a previous run's value

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


@dataclasses.dataclass
class FeatureRow:
    """A clip's features: output name -> array (frame-level `[frames, *shape]`, clip-level `shape`)."""

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
    num_samples: int
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_duration_seconds: float
    features: Mapping[str, np.ndarray]
    content_id: str = ""
    reused: tuple[str, ...] = ()  # extractors whose outputs came from a previous run

    @classmethod
    def of(cls, clip: Clip, features: Mapping[str, np.ndarray], *, reused: tuple[str, ...] = ()) -> "FeatureRow":
        return cls(
            content_id=clip.content_id,
            reused=reused,
            key=clip.key,
            item_key=clip.item_key,
            uri=clip.uri,
            label=clip.label,
            split=clip.split,
            metadata=clip.metadata,
            start_sample=clip.start_sample,
            segment_index=clip.segment_index,
            last_segment=clip.last_segment,
            silent=clip.silent,
            num_samples=clip.num_samples,
            sample_rate=clip.sample_rate,
            source_sample_rate=clip.source_sample_rate,
            source_channels=clip.source_channels,
            source_duration_seconds=clip.source_duration_seconds,
            features=features,
        )

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate
