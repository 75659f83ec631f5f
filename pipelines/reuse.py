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

from datasets.base import AudioItem, content_id
from export import metadata
from export.records import BASE_COLUMNS, row_from_parquet
from featurebeam.config import RunConfig
from featurebeam.deadletter import DEAD, DeadLetter
from featurebeam.errors import ConfigError, OutputError
from features.base import Extractor, OutputSpec

REUSED = "reused"


@dataclasses.dataclass(frozen=True)
class ReusePlan:
    """What can be taken from the previous run `run_dir`."""

    run_dir: str
    run_id: str
    extractors: tuple[str, ...]  # names of reusable extractors
    specs: tuple[OutputSpec, ...]  # their outputs
    parquet: tuple[str, ...]  # the previous run's committed Parquet shards
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
        parquet=tuple(previous["outputs"]["parquet"]),
        complete=len(reusable) == len(extractors),
    )


def previous_records(pipeline: beam.Pipeline, plan: ReusePlan) -> beam.PCollection:
    """(item_key, Parquet record) of the previous run, only the columns that can be reused."""
    return (
        pipeline
        | "PreviousShards" >> beam.Create(list(plan.parquet))
        | "ReadPrevious" >> beam.io.ReadAllFromParquet(columns=plan.columns)
        | "PreviousByItem" >> beam.Map(lambda record: (record["item_key"], record))
    )


def _complete(records: list[dict]) -> bool:
    last = [r for r in records if r["last_segment"]]
    return len(last) == 1 and len(records) == last[0]["segment_index"] + 1


class SelectItemFn(beam.DoFn):
    """(key, {items, done, previous}) -> what to decode, what to copy forward, what to drop.

    Keeps one item per key (duplicates become dead letters), skips items a resumed run already
    finished, stamps each item's content_id, and with a ReusePlan either copies every record of an
    unchanged item forward (no decode at all, to the `reused` output) or hands the decoder the
    reusable outputs per record key. Main output: `(AudioItem, {record key: {output: array}})`.
    """

    def __init__(self, reuse: ReusePlan | None):
        self.reuse = reuse
        self.copied = Metrics.counter("featurebeam", "items_copied_forward")

    def process(self, element) -> Iterator[Any]:
        key, groups = element
        items = sorted(groups["items"], key=lambda it: it.uri)
        if not items or any(True for _ in groups["done"]):
            return
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
        item: AudioItem = dataclasses.replace(items[0], content_id=content_id(items[0]))
        previous = list(groups.get("previous", ()))
        if self.reuse is None or not previous or not item.content_id:
            yield item, {}
            return
        if not _complete(previous) or any(r["content_id"] != item.content_id for r in previous):
            yield item, {}
            return
        if self.reuse.complete:
            self.copied.inc()
            for record in previous:
                row = row_from_parquet(record, self.reuse.specs, reused=self.reuse.extractors)
                # Labels, splits and metadata come from today's listing, features from the previous run.
                yield beam.pvalue.TaggedOutput(
                    REUSED,
                    dataclasses.replace(row, uri=item.uri, label=item.label, split=item.split, metadata=item.metadata),
                )
            return
        from export.records import from_parquet_row

        yield item, {r["key"]: from_parquet_row(r, self.reuse.specs) for r in previous}
