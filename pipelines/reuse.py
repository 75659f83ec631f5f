"""`--reuse_from=RUN`: carry forward a previous run's features where nothing that made them changed.

A record's outputs of extractor E are reused when the previous run computed E with the same name,
version and config, at the same sample rate and segmentation, and the record's source object has
the same `content_id`. So changing one extractor's parameter recomputes exactly that extractor;
an item whose every extractor is reusable is not even decoded.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from datasets.base import KEYS, AudioItem, content_id, decode_item, encode_item, stat_content_id
from export import formats, metadata
from export.records import BASE_COLUMNS, row_from_parquet
from featurebeam.config import RunConfig
from featurebeam.deadletter import DEAD, DeadLetter
from featurebeam.errors import ConfigError, OutputError
from features.base import Extractor, OutputSpec
from pipelines import portable



@dataclasses.dataclass(frozen=True)
class ReusePlan:
    """What can be taken from the previous run `run_dir`."""

    run_dir: str
    run_id: str
    extractors: tuple[str, ...]  # names of reusable extractors
    specs: tuple[OutputSpec, ...]  # their outputs
    parquet: str  # file pattern of the previous run's Parquet shards
    complete: bool  # every extractor of this run is reusable

    @property
    def columns(self) -> list[str]:
        names = [name for name, _, _ in BASE_COLUMNS]
        for spec in self.specs:
            names.append(spec.name)
            if not (spec.level == "clip" and spec.shape == ()):
                names.append(f"{spec.name}_shape")
        return names

    def describe(self) -> dict[str, Any]:
        return {"from": self.run_dir, "run_id": self.run_id, "extractors": list(self.extractors)}


def plan_reuse(run_dir: str, *, extractors: list[Extractor], config: RunConfig) -> ReusePlan:
    """Decide which extractors' outputs `run_dir` can provide; refuse when none can."""
    path = metadata.join(run_dir, metadata.RUN_JSON)
    try:
        previous = metadata.read_json(path)
    except Exception:
        raise OutputError(
            f"--reuse_from {run_dir}: no readable run.json there; pass a finished run folder <output>/<dataset>/<run_id>"
        ) from None
    if previous.get("dataset", {}).get("keys") != KEYS:  # its keys could match none of this run's
        raise ConfigError(
            f"--reuse_from {run_dir}: that run has absolute-path keys from an earlier featurebeam; "
            "rerun it or drop --reuse_from"
        )
    # Records are read back from the Parquet export (columns by name, no TensorFlow on workers).
    formats.require(
        previous, formats.PARQUET, run_dir=run_dir, what="--reuse_from",
        fix="drop --reuse_from, or reuse a run written with --formats=tfrecord,parquet or --formats=parquet",
    )
    for key in ("sample_rate", "segment_seconds"):
        if previous["config"].get(key) != getattr(config, key):
            raise ConfigError(
                f"--reuse_from {run_dir}: that run used {key}={previous['config'].get(key)}, this one "
                f"{getattr(config, key)}, so no record can be reused; drop --reuse_from or use the same {key}"
            )
    before = {e["name"]: e for e in previous["extractors"]}
    reusable = [
        e
        for e in extractors
        if e.name in before
        and before[e.name]["version"] == e.version
        and before[e.name].get("extractor") == e.describe().get("extractor")  # a named instance's class
        and before[e.name]["config"] == json.loads(json.dumps(dataclasses.asdict(e.config)))
    ]
    if not reusable:
        raise ConfigError(
            f"--reuse_from {run_dir}: none of {', '.join(e.name for e in extractors)} was computed there with the "
            "same version and config; drop --reuse_from"
        )
    return ReusePlan(
        run_dir=run_dir,
        run_id=previous["run_id"],
        extractors=tuple(e.name for e in reusable),
        specs=tuple(spec for e in reusable for spec in e.output_specs()),
        # A finished run holds only committed shards (finalisation removed the rest), so the
        # folder's pattern names them whether its run.json lists files (older runs) or patterns.
        parquet=metadata.join(run_dir, "parquet", "part-*.parquet"),
        complete=len(reusable) == len(extractors),
    )


class _ReadRecordsFn(beam.DoFn):
    """Parquet shard path -> (item_key, record) for each row, features as NumPy views of Arrow buffers.

    Reads batch by batch and only the reusable columns; list columns are sliced from their flat
    value buffer by offsets, so no feature value becomes a Python float on the way.
    """

    def __init__(self, columns: list[str], batch_rows: int = 1024):
        self.columns = columns
        self.batch_rows = batch_rows

    def process(self, path: str) -> Iterator[tuple[str, dict]]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path, compression_type="uncompressed") as handle:
            shard = pq.ParquetFile(handle)
            for batch in shard.iter_batches(batch_size=self.batch_rows, columns=self.columns):
                columns = {}
                for name, column in zip(batch.schema.names, batch.columns):
                    if pa.types.is_list(column.type) and pa.types.is_floating(column.type.value_type):
                        offsets = column.offsets.to_numpy()
                        values = column.values.to_numpy(zero_copy_only=False)
                        columns[name] = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
                    elif pa.types.is_floating(column.type):  # float32 scalars as before; float64 ones kept whole
                        columns[name] = list(np.asarray(column.to_numpy(zero_copy_only=False), dtype=column.type.to_pandas_dtype()))
                    else:
                        columns[name] = column.to_pylist()
                for i in range(batch.num_rows):
                    record = {name: values[i] for name, values in columns.items()}
                    yield record["item_key"], record


class PreviousRecords(beam.PTransform):
    """(item_key, Parquet record) of the previous run, only the columns that can be reused."""

    def __init__(self, plan: ReusePlan):
        super().__init__()
        self.plan = plan

    def expand(self, pbegin):
        return (
            pbegin
            | "Pattern" >> beam.Create([self.plan.parquet])
            | "Match" >> beam.ParDo(metadata.MatchFn())
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadRecordsFn(self.plan.columns))
        )


def _complete(records: list[dict]) -> bool:
    last = [r for r in records if r["last_segment"]]
    return len(last) == 1 and len(records) == last[0]["segment_index"] + 1


_PLAIN_WORK, _PICKLED_WORK = b"\x00", b"\x01"


def encode_work(work: tuple[AudioItem, dict, Any, tuple]) -> bytes:
    """What SelectItemFn gives, as the bytes BatchItems shuffles: an item with nothing to reuse,
    skip or copy (every item of a new run) as its `encode_item` bytes (about half its pickle);
    anything else pickled."""
    item, reusable, skip, rows = work
    if not reusable and not skip and not rows:
        return _PLAIN_WORK + encode_item(item)
    return _PICKLED_WORK + portable.encode(work)


def decode_work(data: bytes) -> tuple[AudioItem, dict, Any, tuple]:
    if data[:1] == _PLAIN_WORK:
        return decode_item(data[1:]), {}, (), ()
    return portable.decode(data[1:])


class SelectItemFn(beam.DoFn):
    """(key, {items, done, previous}) -> what to decode, what to copy forward, what to drop.

    Keeps one item per key (duplicates become dead letters), skips items an interrupted earlier
    attempt of this run finished (`done`: its committed facts, `export.commit.item_facts`) and
    the records it committed of unfinished ones, and with a ReusePlan either copies every record
    of an unchanged item forward (no decode at all) or hands the decoder
    the reusable outputs per record key. Main output: `(AudioItem, {record key: {output: array}},
    record keys to skip, rows copied forward)`; the copied rows, when there are any, replace decoding.
    """

    def __init__(self, reuse: ReusePlan | None):
        self.reuse = reuse
        self.copied = Metrics.counter("featurebeam", "items_copied_forward")

    def process(self, element) -> Iterator[Any]:
        from export.commit import remaining

        key, groups = element
        items = sorted(groups["items"], key=lambda it: it.uri)
        if not items:
            return
        finished, skip = remaining(list(groups["done"]))
        if finished:
            return
        skip = skip or ()  # an empty frozenset pickles to ~20 bytes, and crosses the next shuffle
        for duplicate in items[1:]:
            yield beam.pvalue.TaggedOutput(
                DEAD,
                DeadLetter(
                    key=key,
                    item_key=key,
                    uri=duplicate.uri,
                    stage="list",
                    error_type="DuplicateKey",
                    reason="duplicate_key",
                    message=f"key {key!r} is listed twice ({items[0].uri} and {duplicate.uri}); the second is skipped",
                ),
            )
        item: AudioItem = items[0]
        if not item.content_id:
            item = dataclasses.replace(item, content_id=content_id(item))  # from the listing: no request
        previous = list(groups.get("previous", ()))
        if self.reuse is None or not previous:
            yield item, {}, skip, ()
            return
        if not item.content_id:  # the listing did not say size and version: ask the store once
            item = dataclasses.replace(item, content_id=stat_content_id(item))
        if not item.content_id or not _complete(previous) or any(r["content_id"] != item.content_id for r in previous):
            yield item, {}, skip, ()
            return
        if self.reuse.complete:
            self.copied.inc()
            rows = []
            for record in previous:
                if record["key"] in skip:  # committed by an interrupted attempt of this run
                    continue
                row = row_from_parquet(record, self.reuse.specs, reused=self.reuse.extractors)
                # Labels, splits and metadata come from today's listing, features from the previous run.
                rows.append(dataclasses.replace(row, uri=item.uri, label=item.label, split=item.split, metadata=item.metadata))
            yield item, {}, skip, tuple(rows)
            return
        from export.records import from_parquet_row

        yield item, {r["key"]: from_parquet_row(r, self.reuse.specs) for r in previous}, skip, ()
