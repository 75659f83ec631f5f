"""The pipeline's DoFns and combiners: decode and condition, batch extraction, run statistics.

Each per-item step catches failures and sends a `DeadLetter` to the `dead` tagged output, so one
bad file never fails a bundle.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Mapping

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from datasets.base import AudioItem
from featurebeam import audio, faults
from featurebeam.deadletter import DeadLetter
from featurebeam.elements import Clip, FeatureRow
from featurebeam.errors import AudioError

DEAD = "dead"
SILENCE = 1e-6  # peak amplitude below which a clip is flagged silent
NAMESPACE = "featurebeam"
_LOG = logging.getLogger(__name__)


class DecodeFn(beam.DoFn):
    """AudioItem -> Clip(s): read bytes, decode, cut the manifest excerpt, condition, segment."""

    def __init__(
        self,
        *,
        sample_rate: int,
        segment_samples: int | None,
        extractor_ids: tuple[str, ...],
        skip_records: frozenset[str] = frozenset(),
    ):
        self.sample_rate = sample_rate
        self.skip_records = skip_records  # segments a resumed run already committed
        self.segment_samples = segment_samples
        self.extractor_ids = extractor_ids
        self.failed = Metrics.counter(NAMESPACE, "items_failed")
        self.decoded_seconds = Metrics.counter(NAMESPACE, "decoded_audio_ms")

    def process(self, item: AudioItem) -> Iterator[Any]:
        faults.point("decode")
        stage = "read"
        try:
            data = audio.read_bytes(item.uri)
            stage = "decode"
            decoded = audio.decode(data, uri=item.uri)
            del data
            stage = "condition"
            decoded = _excerpt(decoded, item)
            waveform = audio.condition(decoded, sample_rate=self.sample_rate, uri=item.uri)
        except Exception as exc:  # every failure of one item becomes its dead letter
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD, DeadLetter.from_exception(key=item.key, uri=item.uri, stage=stage, exc=exc, extractors=self.extractor_ids)
            )
            return
        self.decoded_seconds.inc(int(1000 * len(waveform) / self.sample_rate))
        segments = audio.segment(waveform, segment_samples=self.segment_samples)
        for index, (start, window) in enumerate(segments):
            key = item.key if self.segment_samples is None else f"{item.key}#{start}"
            if key in self.skip_records:
                continue
            yield Clip(
                key=key,
                item_key=item.key,
                uri=item.uri,
                label=item.label,
                split=item.split,
                metadata=item.metadata,
                start_sample=start,
                segment_index=index,
                last_segment=index == len(segments) - 1,
                silent=bool(window.size == 0 or np.abs(window).max() < SILENCE),
                waveform=window,
                sample_rate=self.sample_rate,
                source_sample_rate=decoded.sample_rate,
                source_channels=decoded.channels,
                source_duration_seconds=decoded.duration_seconds,
            )


def _excerpt(decoded: audio.Decoded, item: AudioItem) -> audio.Decoded:
    """The `offset`/`duration` excerpt a manifest row asks for (seconds), or the whole file."""
    if item.offset_seconds is None and item.duration_seconds is None:
        return decoded
    start = int(round((item.offset_seconds or 0.0) * decoded.sample_rate))
    stop = None if item.duration_seconds is None else start + int(round(item.duration_seconds * decoded.sample_rate))
    if start >= decoded.samples.shape[0]:
        raise AudioError(
            f"{item.uri}: offset {item.offset_seconds} s is past the end of the file ({decoded.duration_seconds:.3f} s)",
            stage="condition",
        )
    return audio.Decoded(samples=decoded.samples[start:stop], sample_rate=decoded.sample_rate, codec=decoded.codec)


def length_groups(clips: list[Clip], *, max_samples: int, max_ratio: float = 1.5) -> Iterator[list[Clip]]:
    """Split a batch into groups of similar length, each padded to at most `max_samples` in total.

    Sorting by length and cutting when the longest would exceed `max_ratio` times the shortest
    bounds the padding waste of a zero-padded batch to under half its size.
    """
    group: list[Clip] = []
    for clip in sorted(clips, key=lambda c: c.num_samples):
        if group and (
            clip.num_samples > max_ratio * max(1, group[0].num_samples)
            or clip.num_samples * (len(group) + 1) > max_samples
        ):
            yield group
            group = []
        group.append(clip)
    if group:
        yield group


class ExtractFn(beam.DoFn):
    """A batch of Clips -> FeatureRows, running every extractor on shared intermediates."""

    def __init__(self, *, features: Mapping[str, Mapping[str, Any]], sample_rate: int, max_batch_samples: int):
        self.features = {name: dict(values) for name, values in features.items()}
        self.sample_rate = sample_rate
        self.max_batch_samples = max_batch_samples
        self.ok = Metrics.counter(NAMESPACE, "records_ok")
        self.failed = Metrics.counter(NAMESPACE, "records_failed")
        self.seconds = Metrics.counter(NAMESPACE, "extracted_audio_ms")

    def setup(self):
        from features import registry

        self.extractors = [registry.build(name, values, sample_rate=self.sample_rate) for name, values in self.features.items()]
        for extractor in self.extractors:
            extractor.setup()
        self.specs = tuple(spec for extractor in self.extractors for spec in extractor.output_specs())
        self.extractor_ids = tuple(f"{e.name}@{e.version}" for e in self.extractors)

    def process(self, clips: list[Clip]) -> Iterator[Any]:
        for group in length_groups(list(clips), max_samples=self.max_batch_samples):
            try:
                results = self._extract(group)
            except Exception:
                if len(group) > 1:
                    _LOG.warning("a batch of %d clips failed; retrying them one by one", len(group), exc_info=True)
                results = []
                for clip in group:  # isolate the bad item(s) so the rest of the batch survives
                    try:
                        results.extend(self._extract([clip]))
                    except Exception as exc:
                        results.append(self._dead(clip, exc))
            for result in results:
                if isinstance(result, DeadLetter):
                    self.failed.inc()
                    yield beam.pvalue.TaggedOutput(DEAD, result)
                else:
                    self.ok.inc()
                    self.seconds.inc(int(1000 * result.seconds))
                    yield result

    def _dead(self, clip: Clip, exc: BaseException) -> DeadLetter:
        return DeadLetter.from_exception(key=clip.key, uri=clip.uri, stage="extract", exc=exc, extractors=self.extractor_ids)

    def _extract(self, clips: list[Clip]) -> list[FeatureRow | DeadLetter]:
        from features.base import Batch

        batch = Batch.from_waveforms([clip.waveform for clip in clips], sample_rate=self.sample_rate)
        outputs: dict[str, np.ndarray] = {}
        for extractor in self.extractors:
            outputs.update(batch.outputs(extractor))
        results: list[FeatureRow | DeadLetter] = []
        for i, clip in enumerate(clips):
            features = {}
            for spec in self.specs:
                value = outputs[spec.name][i]
                if spec.level == "frame":
                    value = value[: 1 + clip.num_samples // spec.hop_length]
                features[spec.name] = np.ascontiguousarray(value, dtype=np.float32)
            bad = [name for name, value in features.items() if not np.isfinite(value).all()]
            if bad:
                results.append(
                    self._dead(clip, AudioError(f"{clip.uri}: feature output {bad[0]!r} holds NaN or Inf", stage="extract"))
                )
                continue
            results.append(FeatureRow.of(clip, features))
        return results


def first_of_each_key(element):
    """(key, {"items": [...], "done": [...]}) -> the item with the smallest URI, unless a resumed
    run already finished it, plus dead letters for duplicate keys."""
    key, groups = element
    items = sorted(groups["items"], key=lambda it: it.uri)
    if not items or any(True for _ in groups["done"]):
        return
    yield items[0]
    for duplicate in items[1:]:
        yield beam.pvalue.TaggedOutput(
            DEAD,
            DeadLetter(
                key=key,
                uri=duplicate.uri,
                stage="list",
                error_type="DuplicateKey",
                message=f"key {key!r} is listed twice ({items[0].uri} and {duplicate.uri}); the second is skipped",
            ),
        )
