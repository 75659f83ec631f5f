"""`python -m pipelines.extract`: list -> read+decode -> condition -> batch -> extract -> export.

Project flags are parsed here; every other flag goes to Beam's `PipelineOptions`, so `--runner`,
`--direct_num_workers`, `--project`, `--temp_location` and the rest work as Beam users expect.
Without `--runner` the pipeline runs on Beam's in-process FnApiRunner (what DirectRunner uses
for batch pipelines, without its attempt to download the Prism binary).

The run goes to `<output>/<dataset>/<run_id>/`: `tfrecords/`, `parquet/` and `errors/` (shards
committed as they are written, see export/commit.py), `features.json`, `schema.pbtxt`,
`tables/` and, last, `run.json`; `_commits/` and `_work/` hold what `--mode=resume` needs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before any import of it

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import featurebeam
from datasets import Dataset, resolve
from datasets.base import FingerprintFn
from export import bigquery, commit, metadata, tables
from export.schema import build_schema, to_pbtxt
from featurebeam import config as run_config
from featurebeam import faults
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import ConfigError, FeaturebeamError, OutputError
from features import registry
from features.base import Extractor, OutputSpec
from pipelines import reuse, runners, transforms

DEFAULT_RUNNER = "FnApiRunner"
WORK = "_work"  # run-folder scratch: the plan (config hash) and listing statistics
EXIT_USAGE = 2
EXIT_FAILURE_BUDGET = 3
_LOG = logging.getLogger("featurebeam")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.extract",
        description="Extract audio features with Apache Beam. Any Beam pipeline option (--runner, "
        "--direct_num_workers, --project, --temp_location, ...) is passed through to Beam.",
        allow_abbrev=False,
    )
    parser.add_argument("--dataset", required=True, help="a name in configs/datasets, a directory, glob, manifest, gs:// or bq:// URI")
    parser.add_argument("--features", help="comma-separated extractor names (default: the config's, else logmel,mfcc,spectral)")
    parser.add_argument("--output", default="runs", help="root folder of runs, local or gs:// (default: runs)")
    parser.add_argument("--config", help="a feature-set YAML, e.g. configs/features/default.yaml")
    parser.add_argument("--run_id", help="name of the run folder (default: UTC time plus config hash)")
    parser.add_argument("--sample_rate", type=int, help="Hz to resample every item to (default 16000)")
    parser.add_argument("--segment_seconds", type=float, help="cut items into windows of this many seconds")
    parser.add_argument("--limit", type=int, help="process only the first N listed items (by key)")
    parser.add_argument("--batch_seconds", type=float, help="seconds of audio per extraction batch (default 240)")
    parser.add_argument("--max_failure_ratio", type=float, help="failed/listed above which the run exits non-zero (default 0.05)")
    parser.add_argument(
        "--max_item_seconds", type=float, help="longer items become dead letters (default 4 h when segmenting, else 1 h)"
    )
    parser.add_argument(
        "--decode_in_process",
        action="store_true",
        help="decode in the worker process instead of a crash-isolated child (faster start, no segfault guard)",
    )
    parser.add_argument(
        "--mode",
        choices=("new", "resume", "overwrite"),
        default="new",
        help="new refuses an existing run folder; resume continues an interrupted run (same --run_id and flags), "
        "skipping committed items; overwrite deletes the folder first",
    )
    parser.add_argument(
        "--reuse_from", help="a previous run folder: reuse its outputs of every extractor whose version and config are unchanged"
    )
    parser.add_argument("--commit_records", type=int, default=64, help="records per committed shard (the unit a crash can lose)")
    parser.add_argument("--bigquery_dataset", help="project.dataset: also load the run's features, runs and errors tables into BigQuery")
    parser.add_argument("--bigquery_frames", action="store_true", help="put every frame of frame-level outputs in the SQL tables too (large)")
    return parser


def _check_beam_flags(flags: Sequence[str]) -> None:
    """Reject flags that neither featurebeam nor any Beam options class knows (Beam only warns)."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(flags))
    if unknown:
        raise ConfigError(
            f"unknown flag {unknown[0]!r}; see 'python -m pipelines.extract --help' for featurebeam's flags "
            "(Beam pipeline options are accepted too)"
        )


@dataclasses.dataclass
class Plan:
    """Everything the launcher resolved before building the pipeline."""

    dataset: Dataset
    config: run_config.RunConfig
    extractors: list[Extractor]
    specs: tuple[OutputSpec, ...]
    run_id: str
    run_dir: str
    output: str
    options: PipelineOptions
    config_hash: str
    started: str
    commit_records: int = 64
    isolate_decoder: bool = True
    done_items: frozenset[str] = frozenset()
    done_records: frozenset[str] = frozenset()
    complete: bool = False  # resume of a run whose run.json exists: nothing to do
    reuse: reuse.ReusePlan | None = None
    bigquery_dataset: str | None = None
    bigquery_frames: bool = False

    @property
    def extractor_ids(self) -> tuple[str, ...]:
        return tuple(f"{e.name}@{e.version}" for e in self.extractors)

    def path(self, *parts: str) -> str:
        return metadata.join(self.run_dir, *parts)


def plan(argv: Sequence[str]) -> Plan:
    """Parse flags and config, resolve the dataset and extractors, and prepare the run folder."""
    args, beam_flags = _parser().parse_known_args(list(argv))
    beam_flags = runners.resolve_runner_flags(beam_flags)  # default runner, --runner=DaskRunner
    _check_beam_flags(beam_flags)
    options = PipelineOptions(beam_flags)

    feature_names = [n.strip() for n in args.features.split(",") if n.strip()] if args.features is not None else None
    if feature_names is not None and not feature_names:
        raise ConfigError("--features is empty; name at least one extractor, e.g. --features=logmel")
    overrides = {
        "sample_rate": args.sample_rate,
        "segment_seconds": args.segment_seconds,
        "limit": args.limit,
        "batch_seconds": args.batch_seconds,
        "max_failure_ratio": args.max_failure_ratio,
        "max_item_seconds": args.max_item_seconds,
    }
    config = run_config.resolve(config_file=args.config, overrides=overrides, feature_names=feature_names)
    where = args.config or "--features"
    extractors = [
        registry.build(name, values, sample_rate=config.sample_rate, where=f"{where}: features.{name}")
        for name, values in config.features.items()
    ]
    specs = tuple(spec for extractor in extractors for spec in extractor.output_specs())
    names = [spec.name for spec in specs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"two extractors both produce the output {clash[0]!r}; drop one of them from --features")

    dataset = resolve(args.dataset)
    dataset.prepare()
    resolved = {
        **config.to_json(),
        # Extractors' full configs (defaults filled in), not just the keys the user set.
        "features": {e.name: dataclasses.asdict(e.config) for e in extractors},
        "dataset": dataset.describe(),
    }
    config_hash = run_config.canonical_hash(resolved)
    now = datetime.datetime.now(datetime.timezone.utc)
    run_id = args.run_id or f"{now:%Y%m%dT%H%M%SZ}-{config_hash.split(':')[1][:8]}"
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ConfigError(f"--run_id {run_id!r} must be a plain folder name (no '/', not starting with '.')")
    if args.mode == "resume" and not args.run_id:
        raise ConfigError("--mode=resume needs the --run_id of the run to continue")
    if args.commit_records <= 0:
        raise ConfigError(f"--commit_records must be positive, got {args.commit_records}")
    if args.bigquery_dataset:
        bigquery.parse_dataset(args.bigquery_dataset)
    output = args.output if "://" in args.output else os.path.abspath(args.output)
    the_plan = Plan(
        dataset=dataset,
        config=dataclasses.replace(config, features=resolved["features"]),
        extractors=extractors,
        specs=specs,
        run_id=run_id,
        run_dir=metadata.join(output, dataset.name, run_id),
        output=output,
        options=options,
        config_hash=config_hash,
        started=now.isoformat(),
        commit_records=args.commit_records,
        isolate_decoder=not args.decode_in_process,
        bigquery_dataset=args.bigquery_dataset,
        bigquery_frames=args.bigquery_frames,
    )
    if args.reuse_from:
        reuse_from = args.reuse_from if "://" in args.reuse_from else os.path.abspath(args.reuse_from)
        the_plan = dataclasses.replace(the_plan, reuse=reuse.plan_reuse(reuse_from, extractors=extractors, config=config))
    if args.mode == "resume":
        return _resume(the_plan)
    _prepare_run_dir(the_plan, mode=args.mode)
    return the_plan


def _exists(path: str) -> bool:
    if "://" not in path:
        return os.path.exists(path)
    return bool(FileSystems.match([metadata.join(path, "**")], limits=[1])[0].metadata_list)


def _prepare_run_dir(plan: Plan, *, mode: str) -> None:
    run_dir = plan.run_dir
    if _exists(run_dir):
        if mode == "new":
            raise OutputError(
                f"run folder {run_dir} already exists; pass a new --run_id, --mode=resume to continue it, "
                "or --mode=overwrite to replace it"
            )
        FileSystems.delete([run_dir])
    try:
        metadata.write_json(plan.path(WORK, "plan.json"), {"config_hash": plan.config_hash, "started": plan.started})
    except Exception as exc:
        raise OutputError(f"cannot write to {run_dir}: {type(exc).__name__}: {exc}; pass a writable --output") from None


def _resume(plan: Plan) -> Plan:
    """Continue an interrupted run: same config, skipping every committed item and segment."""
    if not _exists(plan.run_dir):
        raise OutputError(f"no run folder {plan.run_dir} to resume; check --output and --run_id, or use --mode=new")
    if FileSystems.exists(plan.path(metadata.RUN_JSON)):
        return dataclasses.replace(plan, complete=True)
    try:
        started = metadata.read_json(plan.path(WORK, "plan.json"))
    except Exception:
        raise OutputError(
            f"{plan.run_dir} has no {WORK}/plan.json, so it is not a featurebeam run that can be resumed; "
            "use --mode=overwrite to start it again"
        ) from None
    if started["config_hash"] != plan.config_hash:
        raise ConfigError(
            f"run {plan.run_id} was started with config {started['config_hash']}, these flags give "
            f"{plan.config_hash}; resume with the same --dataset, --features, --config and audio flags, "
            "or start a new run"
        )
    committed = commit.read_commits(plan.run_dir)
    done_items = frozenset(committed.done_items)
    return dataclasses.replace(
        plan, started=started["started"], done_items=done_items, done_records=frozenset(committed.partial_records)
    )


def build(pipeline: beam.Pipeline, plan: Plan) -> dict[str, beam.PCollection]:
    """Add the extraction graph to `pipeline`; returns its `rows` and `dead` PCollections."""
    config = plan.config
    listed = pipeline | "List" >> plan.dataset.listing()
    split = listed | "SplitListing" >> beam.Partition(lambda e, n: 1 if isinstance(e, DeadLetter) else 0, 2)
    items, listing_dead = split[0], split[1]
    if config.limit:
        items = (
            items
            | "Limit" >> beam.combiners.Top.Of(config.limit, key=lambda it: it.key, reverse=True)
            | "Unlimit" >> beam.FlatMap(lambda batch: batch)
        )
    # One grouping by key drops duplicate keys (so every key is exported once), skips items a
    # resumed run finished, joins a previous run's records for --reuse_from, and redistributes the
    # listing across workers before the expensive decode.
    groups = {
        "items": items | "ByKey" >> beam.Map(lambda it: (it.key, it)),
        "done": pipeline | "DoneItems" >> beam.Create(sorted((key, True) for key in plan.done_items)),
    }
    if plan.reuse is not None:
        groups["previous"] = reuse.previous_records(pipeline, plan.reuse)
    unique = (
        groups
        | "GroupKeys" >> beam.CoGroupByKey()
        | "SelectItems" >> beam.ParDo(reuse.SelectItemFn(plan.reuse)).with_outputs(
            transforms.DEAD, reuse.REUSED, main="items"
        )
    )
    decoded = unique.items | "Decode" >> beam.ParDo(
        transforms.DecodeFn(
            sample_rate=config.sample_rate,
            segment_samples=config.segment_samples,
            extractor_ids=plan.extractor_ids,
            max_item_seconds=config.item_seconds_limit,
            # An item shorter than the coarsest hop would be described by a single frame of padding.
            min_samples=max([spec.hop_length for spec in plan.specs if spec.level == "frame"], default=1),
            isolate=plan.isolate_decoder,
            skip_records=plan.done_records,
        )
    ).with_outputs(transforms.DEAD, main="clips")
    batch_samples = int(config.batch_seconds * config.sample_rate)
    extracted = (
        decoded.clips
        | "Batch" >> beam.BatchElements(
            min_batch_size=1,
            max_batch_size=batch_samples,
            element_size_fn=lambda clip: max(1, clip.num_samples),
        )
        | "Extract" >> beam.ParDo(
            transforms.ExtractFn(features=config.features, sample_rate=config.sample_rate, max_batch_samples=batch_samples)
        ).with_outputs(transforms.DEAD, main="rows")
    )
    rows = extracted.rows
    if plan.reuse is not None:
        rows = (rows, unique[reuse.REUSED]) | "AllRows" >> beam.Flatten()
    committed = rows | "CommitRows" >> beam.ParDo(
        commit.CommitRowsFn(
            run_dir=plan.run_dir, specs=plan.specs, commit_records=plan.commit_records, extractor_ids=plan.extractor_ids
        )
    ).with_outputs(transforms.DEAD, main="done")
    dead = (
        listing_dead,
        unique[transforms.DEAD],
        decoded[transforms.DEAD],
        extracted[transforms.DEAD],
        committed[transforms.DEAD],
    ) | "AllDead" >> beam.Flatten()
    dead | "CommitDead" >> beam.ParDo(commit.CommitDeadLettersFn(run_dir=plan.run_dir, commit_records=plan.commit_records))
    _write_stat(items | "Fingerprint" >> beam.CombineGlobally(FingerprintFn()), plan, "listing")
    return {"rows": rows, "dead": dead}


def _write_stat(pcoll, plan: Plan, name: str) -> None:
    (
        pcoll
        | f"{name}ToJson" >> beam.Map(json.dumps, sort_keys=True)
        | f"Write{name}" >> beam.io.WriteToText(plan.path(WORK, name), file_name_suffix=".json", shard_name_template="", num_shards=1)
    )


def _failure_summary(dead: list[dict]) -> dict[str, Any]:
    by_stage: collections.Counter = collections.Counter(d["stage"] for d in dead)
    by_reason: collections.Counter = collections.Counter(f"{d['stage']}: {d.get('reason') or d['error_type']}" for d in dead)
    examples: dict[str, str] = {}
    for d in sorted(dead, key=lambda d: d["key"]):
        examples.setdefault(f"{d['stage']}: {d.get('reason') or d['error_type']}", d["message"])
    return {
        "failed": len(dead),
        "by_stage": dict(sorted(by_stage.items())),
        "reasons": [{"reason": r, "count": n, "example": examples[r]} for r, n in by_reason.most_common()],
    }


def finalize(plan: Plan, *, finished: datetime.datetime, wall_seconds: float) -> dict[str, Any]:
    """Write features.json, schema.pbtxt and, last, run.json from the committed shards.

    Safe to repeat: it reads only commit records, removes orphaned shards and rewrites the same
    metadata, so a crash during finalisation is mended by running it again (--mode=resume).
    """
    committed = commit.read_commits(plan.run_dir)
    orphans = commit.remove_orphans(plan.run_dir, committed)
    if "://" not in plan.run_dir:  # an empty errors/ says "no failures" better than a missing one
        os.makedirs(plan.path("errors"), exist_ok=True)
    if orphans:
        _LOG.warning("removed %d uncommitted shard files left by interrupted workers", len(orphans))
    listing = metadata.read_json(plan.path(WORK, "listing.json"))
    rows = list(committed.rows.values())
    dead = list(committed.dead.values())
    ok_items = {r["item_key"] for r in rows}
    failed_items = {d.get("item_key") or d["key"] for d in dead}
    labels = collections.Counter(r["label"] for r in rows)
    splits = collections.Counter(r["split"] for r in rows)
    extractors = [e.describe() for e in plan.extractors]
    features_json = {
        "record_type": "SequenceExample" if any(s.level == "frame" for s in plan.specs) else "Example",
        "sample_rate": plan.config.sample_rate,
        "extractors": extractors,
        "outputs": [spec.to_json() for spec in plan.specs],
        "labels": sorted(label for label in labels if label),
    }
    metadata.write_json(plan.path(metadata.FEATURES_JSON), features_json)
    faults.point("finalize")
    metadata.write_atomic(plan.path(metadata.SCHEMA_PBTXT), to_pbtxt(build_schema(plan.specs)))
    all_options = plan.options.get_all_options(drop_default=True)
    run = {
        "run_id": plan.run_id,
        "started": plan.started,
        "finished": finished.isoformat(),
        "wall_seconds": round(wall_seconds, 3),
        "featurebeam_version": featurebeam.__version__,
        "git_commit": metadata.git_commit(),
        "config": plan.config.to_json(),
        "config_hash": plan.config_hash,
        "extractors": extractors,
        "dataset": {**plan.dataset.describe(), "fingerprint": listing["fingerprint"], "listed": listing["listed"]},
        "counts": {
            # Rows the listing could not turn into items (a manifest row without a uri, an
            # unlistable prefix) count as listed and failed, so the failure ratio sees them.
            "listed": listing["listed"] + sum(1 for d in dead if d["stage"] == "list" and d.get("reason") != "duplicate_key"),
            "ok": len(ok_items),
            "failed": len(failed_items),
            "partial": len(ok_items & failed_items),
            "records": len(rows),
        },
        "failures": _failure_summary(dead),
        "labels": features_json["labels"],
        "label_counts": dict(sorted(labels.items())),
        "split_counts": dict(sorted(splits.items())),
        "audio_seconds": round(sum(r["seconds"] for r in rows), 6),
        "outputs": {
            "run_dir": plan.run_dir,
            "tfrecords": committed.files["tfrecords"],
            "parquet": committed.files["parquet"],
            "errors": committed.files["errors"],
            "features_json": plan.path(metadata.FEATURES_JSON),
            "schema": plan.path(metadata.SCHEMA_PBTXT),
        },
        "reuse": None
        if plan.reuse is None
        else {
            **plan.reuse.describe(),
            "records_fully_reused": sum(1 for r in rows if len(r.get("reused", ())) == len(plan.extractors)),
            "records_partly_reused": sum(1 for r in rows if 0 < len(r.get("reused", ())) < len(plan.extractors)),
        },
        "beam": {
            "runner": plan.options.view_as(StandardOptions).runner,
            "version": beam.__version__,
            "options": {k: v for k, v in all_options.items() if k != "runner"},
        },
    }
    run["outputs"]["tables"] = metadata.join(plan.run_dir, tables.TABLES_DIR)
    tables.write(run, run_dir=plan.run_dir, frames=plan.bigquery_frames)  # before run.json, which stays last
    metadata.write_json(plan.path(metadata.RUN_JSON), run)
    if plan.bigquery_dataset:
        bigquery.load_run(plan.run_dir, dataset=plan.bigquery_dataset)
    return run


def run(argv: Sequence[str], *, pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run an extraction end to end and return run.json's content.

    pipeline: an unstarted pipeline to build into (tests pass a TestPipeline); by default one is
    made from the Beam flags in `argv`.
    """
    clock = time.monotonic()
    the_plan = plan(argv)
    if the_plan.complete:
        _LOG.warning("run %s is already complete; nothing to resume", the_plan.run_dir)
        if the_plan.bigquery_dataset:  # loads only what BigQuery lacks
            bigquery.load_run(the_plan.run_dir, dataset=the_plan.bigquery_dataset)
        return metadata.read_json(the_plan.path(metadata.RUN_JSON))
    p = pipeline if pipeline is not None else beam.Pipeline(options=the_plan.options)
    build(p, the_plan)
    p.run().wait_until_finish()
    return finalize(the_plan, finished=datetime.datetime.now(datetime.timezone.utc), wall_seconds=time.monotonic() - clock)


def summary(run: dict[str, Any]) -> str:
    counts = run["counts"]
    lines = [
        f"run written to {run['outputs']['run_dir']}",
        f"  items:     {counts['listed']} listed, {counts['ok']} ok, {counts['failed']} failed"
        + (f" (see {run['outputs']['run_dir']}/errors/)" if counts["failed"] else ""),
        f"  records:   {counts['records']}",
        f"  audio:     {run['audio_seconds'] / 3600:.4f} h ({run['audio_seconds']:.1f} s)",
        f"  features:  {', '.join(e['name'] + '@' + e['version'] for e in run['extractors'])}",
        f"  wall time: {run['wall_seconds']:.1f} s",
    ]
    for reason in run["failures"]["reasons"][:5]:
        lines.append(f"  failure:   {reason['count']} x {reason['reason']} (e.g. {reason['example'][:160]})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(sys.argv[1:] if argv is None else argv)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary(result))
    listed = max(1, result["counts"]["listed"])
    ratio = result["counts"]["failed"] / listed
    if ratio > result["config"]["max_failure_ratio"]:
        print(
            f"featurebeam: error: {result['counts']['failed']} of {result['counts']['listed']} items failed "
            f"({ratio:.1%}), above --max_failure_ratio={result['config']['max_failure_ratio']}; "
            f"the dead letters are in {result['outputs']['run_dir']}/errors/",
            file=sys.stderr,
        )
        return EXIT_FAILURE_BUDGET
    return 0


if __name__ == "__main__":
    sys.exit(main())
