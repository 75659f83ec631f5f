"""`python -m pipelines.extract`: list -> read+decode -> condition -> batch -> extract -> export.

Project flags are parsed here; every other flag goes to Beam's `PipelineOptions`, so `--runner`,
`--direct_num_workers`, `--project`, `--temp_location` and the rest work as Beam users expect.
Without `--runner` the pipeline runs on Beam's in-process FnApiRunner (what DirectRunner uses
for batch pipelines, without its attempt to download the Prism binary).

The run goes to `<output>/<dataset>/<run_id>/`: `tfrecords/`, `parquet/`, `errors/`,
`features.json`, `schema.pbtxt` and, last, `run.json`.
"""

from __future__ import annotations

import argparse
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
from datasets.base import AudioItem, FingerprintFn
from export import metadata
from export.records import arrow_schema, to_parquet_row, to_tf_record
from export.schema import build_schema, to_pbtxt
from featurebeam import config as run_config
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import ConfigError, FeaturebeamError, OutputError
from features import registry
from features.base import Extractor, OutputSpec
from pipelines import transforms

DEFAULT_RUNNER = "FnApiRunner"
WORK = "_work"  # run-folder scratch for statistics; removed once run.json is written
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
        "--mode", choices=("new", "overwrite"), default="new", help="new refuses an existing run folder; overwrite replaces it"
    )
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

    @property
    def extractor_ids(self) -> tuple[str, ...]:
        return tuple(f"{e.name}@{e.version}" for e in self.extractors)

    def path(self, *parts: str) -> str:
        return metadata.join(self.run_dir, *parts)


def plan(argv: Sequence[str]) -> Plan:
    """Parse flags and config, resolve the dataset and extractors, and prepare the run folder."""
    args, beam_flags = _parser().parse_known_args(list(argv))
    _check_beam_flags(beam_flags)
    if not any(f == "--runner" or f.startswith("--runner=") for f in beam_flags):
        beam_flags = [f"--runner={DEFAULT_RUNNER}", *beam_flags]
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
    output = args.output if "://" in args.output else os.path.abspath(args.output)
    run_dir = metadata.join(output, dataset.name, run_id)
    _prepare_run_dir(run_dir, mode=args.mode)
    return Plan(
        dataset=dataset,
        config=dataclasses.replace(config, features=resolved["features"]),
        extractors=extractors,
        specs=specs,
        run_id=run_id,
        run_dir=run_dir,
        output=output,
        options=options,
        config_hash=config_hash,
        started=now.isoformat(),
    )


def _exists(path: str) -> bool:
    if "://" not in path:
        return os.path.exists(path)
    return bool(FileSystems.match([metadata.join(path, "**")], limits=[1])[0].metadata_list)


def _prepare_run_dir(run_dir: str, *, mode: str) -> None:
    if _exists(run_dir):
        if mode == "new":
            raise OutputError(
                f"run folder {run_dir} already exists; pass a new --run_id, or --mode=overwrite to replace it"
            )
        FileSystems.delete([run_dir])
    try:
        metadata.write_json(metadata.join(run_dir, WORK, "launcher.json"), {"pid": os.getpid()})
    except Exception as exc:
        raise OutputError(f"cannot write to {run_dir}: {type(exc).__name__}: {exc}; pass a writable --output") from None


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
    # Grouping by key drops duplicate keys (so every key is exported once) and redistributes the
    # listing across workers before the expensive decode.
    unique = (
        items
        | "ByKey" >> beam.Map(lambda it: (it.key, it))
        | "GroupKeys" >> beam.GroupByKey()
        | "Dedupe" >> beam.FlatMap(transforms.first_of_each_key).with_outputs(transforms.DEAD, main="items")
    )
    decoded = unique.items | "Decode" >> beam.ParDo(
        transforms.DecodeFn(
            sample_rate=config.sample_rate, segment_samples=config.segment_samples, extractor_ids=plan.extractor_ids
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
    specs = plan.specs
    (
        rows
        | "ToTFExample" >> beam.Map(to_tf_record, specs)
        | "WriteTFRecords" >> beam.io.WriteToTFRecord(
            plan.path("tfrecords", "part"),
            file_name_suffix=".tfrecord.gz",
            num_shards=config.tfrecord_shards,
            compression_type=beam.io.filesystem.CompressionTypes.GZIP,
        )
    )
    (
        rows
        | "ToParquetRow" >> beam.Map(to_parquet_row, specs)
        | "WriteParquet" >> beam.io.WriteToParquet(
            plan.path("parquet", "part"),
            schema=arrow_schema(specs),
            file_name_suffix=".parquet",
            num_shards=config.parquet_shards,
            codec="snappy",
        )
    )
    dead = (listing_dead, unique[transforms.DEAD], decoded[transforms.DEAD], extracted[transforms.DEAD]) | "AllDead" >> beam.Flatten()
    (
        dead
        | "DeadToJson" >> beam.Map(DeadLetter.to_json)
        | "WriteErrors" >> beam.io.WriteToText(plan.path("errors", "dead_letters"), file_name_suffix=".jsonl")
    )
    _write_stat(items | "Fingerprint" >> beam.CombineGlobally(FingerprintFn()), plan, "listing")
    _write_stat(rows | "RowStats" >> beam.CombineGlobally(transforms.RowStatsFn()), plan, "rows")
    _write_stat(dead | "DeadStats" >> beam.CombineGlobally(transforms.DeadLetterStatsFn()), plan, "dead")
    return {"rows": rows, "dead": dead}


def _write_stat(pcoll, plan: Plan, name: str) -> None:
    (
        pcoll
        | f"{name}ToJson" >> beam.Map(json.dumps, sort_keys=True)
        | f"Write{name}" >> beam.io.WriteToText(plan.path(WORK, name), file_name_suffix=".json", shard_name_template="", num_shards=1)
    )


def _list_outputs(plan: Plan, folder: str) -> list[str]:
    found = FileSystems.match([plan.path(folder, "*")])[0].metadata_list
    return sorted(m.path for m in found)


def finalize(plan: Plan, *, finished: datetime.datetime, wall_seconds: float) -> dict[str, Any]:
    """Write features.json, schema.pbtxt and, last, run.json; return run.json's content."""
    stats = {name: metadata.read_json(plan.path(WORK, f"{name}.json")) for name in ("listing", "rows", "dead")}
    extractors = [e.describe() for e in plan.extractors]
    features_json = {
        "record_type": "SequenceExample" if any(s.level == "frame" for s in plan.specs) else "Example",
        "sample_rate": plan.config.sample_rate,
        "extractors": extractors,
        "outputs": [spec.to_json() for spec in plan.specs],
        "labels": sorted(label for label in stats["rows"]["labels"] if label),
    }
    metadata.write_json(plan.path(metadata.FEATURES_JSON), features_json)
    metadata.write_atomic(plan.path(metadata.SCHEMA_PBTXT), to_pbtxt(build_schema(plan.specs)))
    all_options = plan.options.get_all_options(drop_default=True)
    listed = stats["listing"]["listed"]
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
        "dataset": {**plan.dataset.describe(), "fingerprint": stats["listing"]["fingerprint"], "listed": listed},
        "counts": {
            "listed": listed,
            "ok": stats["rows"]["items_ok"],
            "failed": stats["dead"]["failed"],
            "records": stats["rows"]["records"],
        },
        "failures": stats["dead"],
        "labels": features_json["labels"],
        "label_counts": stats["rows"]["labels"],
        "split_counts": stats["rows"]["splits"],
        "audio_seconds": stats["rows"]["audio_seconds"],
        "outputs": {
            "run_dir": plan.run_dir,
            "tfrecords": _list_outputs(plan, "tfrecords"),
            "parquet": _list_outputs(plan, "parquet"),
            "errors": _list_outputs(plan, "errors"),
            "features_json": plan.path(metadata.FEATURES_JSON),
            "schema": plan.path(metadata.SCHEMA_PBTXT),
        },
        "beam": {
            "runner": plan.options.view_as(StandardOptions).runner,
            "version": beam.__version__,
            "options": {k: v for k, v in all_options.items() if k != "runner"},
        },
    }
    metadata.write_json(plan.path(metadata.RUN_JSON), run)
    FileSystems.delete([plan.path(WORK)])
    return run


def run(argv: Sequence[str], *, pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run an extraction end to end and return run.json's content.

    pipeline: an unstarted pipeline to build into (tests pass a TestPipeline); by default one is
    made from the Beam flags in `argv`.
    """
    clock = time.monotonic()
    the_plan = plan(argv)
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
