"""extract.build's graph rewritten with pipelines/portable.py, so it runs on Beam's DaskRunner.

Test scaffolding until the lead ports these substitutions into pipelines/extract.py; then the
Dask tests call extract.run directly and this file goes. Same DoFns, same order; each change is
marked with what it replaces:

  Partition("SplitListing")            -> portable.Partition
  Top.Of(limit) | FlatMap ("Limit")    -> portable.SmallestByKey
  ParDo(...).with_outputs(...)         -> portable.ParDoWithOutputs (SelectItems, Decode, Extract, CommitRows)
  BatchElements("Batch")               -> portable.BatchBySize (by a stable hash of the clip key)
  WriteToText(listing.json)            -> portable.WriteJson
  three unconnected sinks              -> portable.AfterAll(...) as the last step
"""

from __future__ import annotations

import datetime
import time

import apache_beam as beam

from datasets.base import FingerprintFn
from export import commit, metadata
from featurebeam.deadletter import DeadLetter
from pipelines import extract, portable, reuse, transforms


def build(pipeline: beam.Pipeline, plan: extract.Plan) -> beam.PCollection:
    config = plan.config
    listed = pipeline | "List" >> plan.dataset.listing()
    items, listing_dead = listed | "SplitListing" >> portable.Partition(lambda e, n: 1 if isinstance(e, DeadLetter) else 0, 2)
    if config.limit:
        items = items | "Limit" >> portable.SmallestByKey(config.limit, key=lambda it: it.key)
    groups = {
        "items": items | "ByKey" >> beam.Map(lambda it: (it.key, it)),
        "done": pipeline | "DoneItems" >> beam.Create(sorted((key, True) for key in plan.done_items)),
    }
    if plan.reuse is not None:
        groups["previous"] = reuse.previous_records(pipeline, plan.reuse)
    unique = (
        groups
        | "GroupKeys" >> beam.CoGroupByKey()
        # Only the outputs something reads: an unread selection would be a step the last one does not need.
        | "SelectItems" >> portable.ParDoWithOutputs(
            reuse.SelectItemFn(plan.reuse), transforms.DEAD, *([reuse.REUSED] if plan.reuse else []), main="items"
        )
    )
    decoded = unique["items"] | "Decode" >> portable.ParDoWithOutputs(
        transforms.DecodeFn(
            sample_rate=config.sample_rate,
            segment_samples=config.segment_samples,
            extractor_ids=plan.extractor_ids,
            max_item_seconds=config.item_seconds_limit,
            min_samples=max([spec.hop_length for spec in plan.specs if spec.level == "frame"], default=1),
            isolate=plan.isolate_decoder,
            skip_records=plan.done_records,
        ),
        transforms.DEAD,
        main="clips",
    )
    batch_samples = int(config.batch_seconds * config.sample_rate)
    extracted = (
        decoded["clips"]
        | "Batch" >> portable.BatchBySize(max_size=batch_samples, size_fn=lambda clip: clip.num_samples, key_fn=lambda clip: clip.key)
        | "Extract" >> portable.ParDoWithOutputs(
            transforms.ExtractFn(features=config.features, sample_rate=config.sample_rate, max_batch_samples=batch_samples),
            transforms.DEAD,
            main="rows",
        )
    )
    rows = extracted["rows"]
    if plan.reuse is not None:
        rows = (rows, unique[reuse.REUSED]) | "AllRows" >> beam.Flatten()
    committed = rows | "CommitRows" >> portable.ParDoWithOutputs(
        commit.CommitRowsFn(run_dir=plan.run_dir, specs=plan.specs, commit_records=plan.commit_records, extractor_ids=plan.extractor_ids),
        transforms.DEAD,
        main="done",
    )
    dead = (
        listing_dead,
        unique[transforms.DEAD],
        decoded[transforms.DEAD],
        extracted[transforms.DEAD],
        committed[transforms.DEAD],
    ) | "AllDead" >> beam.Flatten()
    dead_done = dead | "CommitDead" >> beam.ParDo(commit.CommitDeadLettersFn(run_dir=plan.run_dir, commit_records=plan.commit_records))
    listing = (
        items
        | "Fingerprint" >> beam.CombineGlobally(FingerprintFn())
        | "WriteListing" >> portable.WriteJson(plan.path(extract.WORK, "listing.json"))
    )
    return (committed["done"], dead_done, listing) | "AllWritten" >> portable.AfterAll()


def run(argv: list[str]) -> dict:
    """extract.run with this graph: plan, build, run, wait (closing a Dask client), finalise."""
    clock = time.monotonic()
    plan = extract.plan(argv)
    p = beam.Pipeline(options=plan.options)
    build(p, plan)
    dangling = portable.dangling_transforms(p)
    if dangling:
        raise AssertionError(f"steps the last one does not depend on: {dangling}")
    result = p.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
    return extract.finalize(plan, finished=datetime.datetime.now(datetime.timezone.utc), wall_seconds=time.monotonic() - clock)
