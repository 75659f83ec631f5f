"""The pipeline's per-item DoFns: streaming decode and conditioning, and batch extraction.

Each per-item step catches failures and sends a `DeadLetter` to the `dead` tagged output, so one
bad file never fails a bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from datasets.base import AudioItem
from featurebeam import faults, stages
from featurebeam.deadletter import DEAD, DeadLetter
from featurebeam.elements import Clip, FeatureRow
from featurebeam.errors import AudioError, FeatureError
from features.base import as_output, shape_matches

NAMESPACE = "featurebeam"
# Items whose decoding is requested ahead of the one being read (see DecodeFn.process): a whole
# item batch (extract.ITEMS_PER_BATCH); the decoded audio held ahead is bounded by bytes
# (isolation.READ_AHEAD_BYTES).
PREFETCH_ITEMS = 256
# Clips per extraction batch at most (besides --batch_seconds): a batch of many short clips is cut
# so that its extraction and commit run while the decoder child decodes the items after it.
BATCH_CLIPS = 64


@dataclasses.dataclass(frozen=True)
class CopiedRows:
    """Rows copied forward whole from a previous run (--reuse_from): they leave decoding beside
    the Clip batches and pass through extraction unchanged, so every row of the run comes out of
    one step (a Flatten of two row streams would be held whole in FnApiRunner's launcher)."""

    rows: tuple[FeatureRow, ...]


_LOG = logging.getLogger(__name__)


class DecodeFn(beam.DoFn):
    """(AudioItem, reusable outputs by record key, record keys to skip) -> Clip(s): stream, decode, condition and
    segment, with bounded memory.

    Decoding runs in a long-lived child process (`IsolatedDecoder`) unless `isolate` is off, so a
    native crash in a decoder becomes this item's dead letter instead of killing the worker.
    A failure found after some segments were emitted (a truncated FLAC, NaN late in a file)
    keeps those segments and adds the item's dead letter: the good audio is not thrown away.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        segment_samples: int | None,
        extractor_ids: tuple[str, ...],
        max_item_seconds: float | None,
        min_samples: int = 1,
        isolate: bool = True,
    ):
        self.sample_rate = sample_rate
        self.segment_samples = segment_samples
        self.extractor_ids = extractor_ids
        self.max_item_seconds = max_item_seconds
        self.min_samples = min_samples  # shorter items have no full frame to describe (reason too_short)
        self.isolate = isolate
        self.failed = Metrics.counter(NAMESPACE, "items_failed")
        self.decoded_ms = Metrics.counter(NAMESPACE, "decoded_audio_ms")
        self.decode_us = stages.counter("decode")  # read + decode + resample, child round trip

    def setup(self):
        from featurebeam.isolation import IsolatedDecoder

        self.decoder = IsolatedDecoder(max_ahead=PREFETCH_ITEMS) if self.isolate else None

    def teardown(self):
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()

    def request(self, item: AudioItem) -> tuple[str, dict[str, Any]]:
        """What the decoder is asked for this item: (uri, keyword arguments of the stream)."""
        return item.uri, self._kwargs(item)

    def _kwargs(self, item: AudioItem) -> dict[str, Any]:
        return dict(
            sample_rate=self.sample_rate,
            segment_samples=self.segment_samples,
            offset_seconds=item.offset_seconds,
            duration_seconds=item.duration_seconds,
            max_seconds=self.max_item_seconds,
            min_samples=self.min_samples,
        )

    def _stream(self, item: AudioItem):
        from featurebeam.decoding import stream_conditioned

        if self.decoder is None:
            return stream_conditioned(item.uri, **self._kwargs(item))
        return self.decoder.stream(item.uri, **self._kwargs(item))

    def process(self, element: tuple[AudioItem, dict, frozenset], upcoming: Sequence[tuple] = ()) -> Iterator[Any]:
        """upcoming: the `request`s of the items this worker decodes next, in order. They go to the
        decoder child (`IsolatedDecoder.prefetch`) once this item's first output arrives, so the
        child decodes them while this process reads this item and runs the extractors and
        commits: the child is not idle between items, and no item waits for a wake-up round trip."""
        from featurebeam.decoding import SourceInfo

        item, reused, skip = element  # skip: segments an interrupted attempt of this run committed
        faults.point("decode")
        info = None
        try:
            for event in stages.timed(iter(self._stream(item)), self.decode_us):
                if isinstance(event, SourceInfo):
                    info = event
                    if upcoming and self.decoder is not None:
                        self.decoder.prefetch(upcoming)
                    continue
                self.decoded_ms.inc(int(1000 * len(event.samples) / self.sample_rate))
                key = item.key if self.segment_samples is None else f"{item.key}#{event.start}"
                if key in skip:
                    continue
                yield Clip(
                    key=key,
                    item_key=item.key,
                    uri=item.uri,
                    label=item.label,
                    split=item.split,
                    metadata=item.metadata,
                    start_sample=event.start,
                    segment_index=event.start // self.segment_samples if self.segment_samples else 0,
                    last_segment=event.last,
                    silent=event.silent,
                    waveform=event.samples,
                    sample_rate=self.sample_rate,
                    source_sample_rate=info.sample_rate,
                    source_channels=info.channels,
                    source_duration_seconds=float(info.duration_seconds or 0.0),
                    content_id=item.content_id,
                    reused=reused.get(key, {}),
                )
        except Exception as exc:  # every failure of one item becomes its dead letter
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD,
                DeadLetter.from_exception(key=item.key, uri=item.uri, stage="decode", exc=exc, extractors=self.extractor_ids),
            )


class DecodeBatchFn(beam.DoFn):
    """A batch of selected items -> lists of Clips of at most `max_batch_samples` (whole clips)
    and `BATCH_CLIPS` clips,
    rows copied forward from a previous run (one `CopiedRows` per batch), and dead letters.

    Items are batched before decoding, not clips after it, so decoded audio never crosses a
    shuffle, and every output leaves from process() (Beam's DaskRunner drops what finish_bundle
    emits). A clip longer than the limit is a batch of its own.
    """

    def __init__(self, decode: DecodeFn, *, max_batch_samples: int):
        self.decode = decode
        self.max_batch_samples = max_batch_samples

    def setup(self):
        self.decode.setup()

    def teardown(self):
        self.decode.teardown()

    def process(self, works: list[tuple]) -> Iterator[Any]:
        batch: list[Clip] = []
        samples = 0
        copied: list[FeatureRow] = []
        to_decode = [self.decode.request(work[0]) for work in works if not work[3]]  # made once: compared by identity
        decoded = 0
        for item, reused, skip, copy in works:
            if copy:
                copied.extend(copy)
                continue
            decoded += 1
            for out in self.decode.process((item, reused, skip), to_decode[decoded : decoded + PREFETCH_ITEMS]):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield out
                    continue
                if batch and (samples + out.num_samples > self.max_batch_samples or len(batch) >= BATCH_CLIPS):
                    yield batch
                    batch, samples = [], 0
                batch.append(out)
                samples += out.num_samples
        if batch:
            yield batch
        if copied:
            yield CopiedRows(tuple(copied))


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
    """A batch of Clips -> FeatureRows, running every extractor on shared intermediates.

    A clip longer than `max_batch_samples` (an unsegmented long item is a batch of its own) is
    extracted in windows of `max_batch_samples`, so `--batch_seconds` bounds its STFT and every
    intermediate too (`features.base`: extractors that declare no window parts still see it whole).
    """

    def __init__(
        self, *, features: Mapping[str, Mapping[str, Any]], sample_rate: int, max_batch_samples: int,
        functions: bytes = b"",
    ):
        self.features = {name: dict(values) for name, values in features.items()}
        # Plain functions the launcher loaded, pickled by value (features/function.loaded_functions).
        self.functions = functions
        self.sample_rate = sample_rate
        self.max_batch_samples = max_batch_samples
        self.ok = Metrics.counter(NAMESPACE, "records_ok")
        self.failed = Metrics.counter(NAMESPACE, "records_failed")
        self.seconds = Metrics.counter(NAMESPACE, "extracted_audio_ms")
        self.extract_us = stages.counter("dsp")  # batching, extractors, row checks

    def setup(self):
        from featurebeam import worker
        from featurebeam.threads import single_threaded_blas
        from features import registry

        single_threaded_blas()  # the same bytes in every worker process, whatever its BLAS threads
        if self.functions:
            from features import function

            function.install(self.functions)
        self.extractors = [
            registry.build_instance(name, values, sample_rate=self.sample_rate) for name, values in self.features.items()
        ]
        for extractor in self.extractors:
            extractor.setup()
        worker.prepare()  # heap reuse for batch-sized arrays; startup objects out of the collector's walks
        self.outputs_of = {e.name: e.output_specs() for e in self.extractors}
        self.specs = tuple(spec for extractor in self.extractors for spec in extractor.output_specs())
        self.extractor_ids = tuple(f"{e.name}@{e.version}" for e in self.extractors)

    def process(self, clips: list[Clip] | CopiedRows) -> Iterator[Any]:
        """A batch of Clips -> one list of the FeatureRows that succeeded (and dead letters);
        `CopiedRows` -> their rows, as they are."""
        if isinstance(clips, CopiedRows):
            yield list(clips.rows)
            return
        rows: list[FeatureRow] = []
        for group in length_groups(list(clips), max_samples=self.max_batch_samples):
            start = time.perf_counter()
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
            self.extract_us.inc(int(1e6 * (time.perf_counter() - start)))
            for result in results:
                if isinstance(result, DeadLetter):
                    self.failed.inc()
                    yield beam.pvalue.TaggedOutput(DEAD, result)
                else:
                    self.ok.inc()
                    self.seconds.inc(int(1000 * result.seconds))
                    rows.append(result)
        if rows:
            yield rows

    def _dead(self, clip: Clip, exc: BaseException) -> DeadLetter:
        return DeadLetter.from_exception(
            key=clip.key, uri=clip.uri, stage="extract", exc=exc, extractors=self.extractor_ids, item_key=clip.item_key
        )

    def _extract(self, clips: list[Clip]) -> list[FeatureRow | DeadLetter]:
        from features.base import Batch

        def reusable(clip: Clip, extractor) -> bool:
            return all(spec.name in clip.reused for spec in self.outputs_of[extractor.name])

        batch = Batch.from_waveforms(
            [clip.waveform for clip in clips], sample_rate=self.sample_rate, window_samples=self.max_batch_samples
        )
        needed = [e for e in self.extractors if not all(reusable(clip, e) for clip in clips)]  # compute only what is missing
        batch.prepare(needed)  # a windowed item: every extractor's parts in one pass over the windows
        outputs: dict[str, np.ndarray] = {}
        for extractor in needed:
            outputs.update(batch.outputs(extractor))
        results: list[FeatureRow | DeadLetter] = []
        for i, clip in enumerate(clips):
            features, reused = {}, []
            for extractor in self.extractors:
                from_before = reusable(clip, extractor)
                if from_before:
                    reused.append(extractor.name)
                for spec in self.outputs_of[extractor.name]:
                    value = clip.reused[spec.name] if from_before else outputs[spec.name][i]
                    if spec.level == "frame" and spec.frames == "centred":
                        value = value[: 1 + clip.num_samples // spec.hop_length]
                    try:  # a copy: keeps shape () scalars, frees the batch
                        features[spec.name] = as_output(spec, value)
                    except FeatureError as exc:
                        raise AudioError(f"{clip.uri}: {exc}", stage="extract", reason="feature_type") from None
            try:
                self._validate(clip, features)
            except AudioError as exc:
                results.append(self._dead(clip, exc))
                continue
            results.append(FeatureRow.of(clip, features, reused=tuple(reused)))
        return results

    def _validate(self, clip: Clip, features: dict[str, np.ndarray]) -> None:
        """Each output has its spec's shape and only finite values, or the record is dead-lettered."""
        for spec in self.specs:
            value = features[spec.name]
            if spec.dtype == "events":
                continue  # as_output checked each record against the declared fields
            if spec.level != "frame":
                frames = None
            elif spec.frames == "centred":
                frames = 1 + clip.num_samples // spec.hop_length
            else:  # the extractor's own frame count (a windowed model: one frame per window)
                frames = value.shape[0] if value.ndim else -1
            if not shape_matches(spec, value.shape, frames=frames):
                expected = spec.shape if spec.level == "clip" else (frames, *spec.shape)
                raise AudioError(
                    f"{clip.uri}: feature output {spec.name!r} has shape {value.shape}, its spec says {expected}",
                    stage="extract",
                    reason="feature_shape",
                )
            if spec.floating and not np.isfinite(value).all():
                raise AudioError(
                    f"{clip.uri}: feature output {spec.name!r} holds NaN or Inf", stage="extract", reason="feature_non_finite"
                )
