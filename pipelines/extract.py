"""`python -m pipelines.extract`: list -> read+decode -> condition -> batch -> extract -> export.

Project flags are parsed here; every other flag goes to Beam's `PipelineOptions`, so `--runner`,
`--direct_num_workers`, `--project`, `--temp_location` and the rest work as Beam users expect.
Without `--runner` the pipeline runs on Beam's in-process FnApiRunner (what DirectRunner uses
for batch pipelines, without its attempt to download the Prism binary).

The run goes to `<output>/<dataset>/<run_id>/`: `tfrecords/` and `parquet/` (those `--formats`
names, see export/formats.py), `errors/` and the SQL table shards under `tables/` (committed by
workers as they are written, see export/commit.py),
then `features.json`, `schema.pbtxt`, `tables/runs/` and, last, `run.json`, written by the
pipeline's own final step (pipelines/finalize.py). `_commits/` and `_work/` hold what
`--mode=resume` and `python -m pipelines.finalize` need.

The launcher does constant work: it resolves flags, config, extractors and dataset, prepares the
run folder, builds and submits the graph, and afterwards reads run.json to print the summary. The
pipeline's final step loads BigQuery (`--bigquery_dataset`). `--flex_template` writes a Dataflow
Flex Template spec instead of running (pipelines/template.py): there the launcher runs at each
launch, which decides its own run id; a classic `--template_location` is refused.
Everything that grows with the dataset (listing, selecting what a resumed run still lacks,
decoding, extraction, commits, counts, orphan removal, and deleting the files of a run that
`--mode=overwrite` replaces) runs in the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import os
import shlex
import sys
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before any import of it

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import featurebeam
from datasets import Dataset, resolve
from datasets.base import KEYS, FingerprintFn, decode_item, encode_item
from export import bigquery, commit, formats, metadata, tables, tfds
from export.formats import ExportFormats
from featurebeam import config as run_config
from featurebeam import billing, redact, stages
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import ConfigError, FeaturebeamError, OutputError
from features import function, registry
from features.base import Extractor, OutputSpec
from export import statistics as export_statistics
from pipelines import portable, progress, remote, reuse, runners, transforms
from pipelines.combine import CombineToOne, JoinSingletons
from pipelines.finalize import BIGQUERY_JSON, PLAN_JSON, SUMMARY_JSON, WORK, Finalize, bigquery_refusal, summary_text
from pipelines.finalize import add_stage_seconds as finalize_stage_seconds
from pipelines.finalize import load_bigquery as finalize_load_bigquery
from pipelines.summary import SummariseRun

# Selected items are spread over shards and each shard is cut into batches of ITEMS_PER_BATCH
# before decoding. Shards set the parallelism after that grouping, and every batch is at least
# one commit, so there are SHARDS_PER_SLOT per worker slot the runner has (runners.worker_slots),
# enough to balance the load, and one shard for a single slot, which has no load to balance and
# whose decoder then works ahead through whole batches (DecodeFn.process). More shards make more,
# smaller batches, and a decoder idles at every batch's end: 8 a slot made 16 one-file batches of
# the 16 long recordings, and two worker threads took 11.0 s where 2 a slot took 10.4. A fixed 256 cut 600
# clips into 232 batches of 2 or 3 on one worker, and per-commit costs then made up a third of
# the run (benchmarks/compare.py). A batch's items are all sent ahead to the decoder child
# (transforms.PREFETCH_ITEMS), which decodes them while the worker extracts and commits the
# batch's earlier clips (at most transforms.BATCH_CLIPS at a time): 256 items to a batch keep
# the child busy where 32 left it idle at every batch's end (3,000 clips: 15.0 -> 12.4 s).
SHARDS_PER_SLOT = 2
MAX_ITEM_SHARDS = 4096
ITEMS_PER_BATCH = 256
# Exit codes of `python -m pipelines.extract` (README, "Exit codes"): 0 done; 2 a usage or
# configuration error, found before any work; 3 more items failed than --max_failure_ratio allows
# (everything is written); 4 the job failed or ended without run.json (the message names the
# resume command).
EXIT_USAGE = 2
EXIT_FAILURE_BUDGET = 3
EXIT_JOB_FAILED = 4
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
        "skipping committed items; overwrite replaces the run in it (the pipeline deletes the old run's files)",
    )
    parser.add_argument(
        "--reuse_from", help="a previous run folder: reuse its outputs of every extractor whose version and config are unchanged"
    )
    parser.add_argument(
        "--item_shards",
        type=int,
        help=f"groups the selected items are spread over before decoding (default {SHARDS_PER_SLOT} per worker slot the runner "
        "options give: --direct_num_workers, --max_num_workers x machine cores, --dask_npartitions; 1 for one slot)",
    )
    parser.add_argument("--commit_records", type=int, default=64, help="records per committed shard (the unit a crash can lose)")
    parser.add_argument(
        "--commit_mb", type=float, default=64, help="MiB of encoded records above which a shard is committed early (bounds worker memory)"
    )
    parser.add_argument(
        "--formats", help="comma-separated exports to write: tfrecord, parquet (default both; the SQL tables are always written)"
    )
    parser.add_argument(
        "--tfrecord_compression",
        help=f"TFRecord codec: none or gzip[:level 1-9] (default {formats.DEFAULT_TFRECORD}; none writes .tfrecord, gzip .tfrecord.gz)",
    )
    parser.add_argument(
        "--parquet_compression", help=f"Parquet codec: snappy, zstd[:level], gzip[:level], lz4 or none (default {formats.DEFAULT_PARQUET})"
    )
    parser.add_argument(
        "--bigquery_dataset",
        help="project.dataset: the pipeline's final step also loads the run's features, runs and errors tables into BigQuery",
    )
    parser.add_argument("--bigquery_frames", action="store_true", help="put every frame of frame-level outputs in the SQL tables too (large)")
    parser.add_argument("--no_report", action="store_true", help="do not write report.html at the end of a local run")
    parser.add_argument(
        "--statistics",
        choices=("on", "off"),
        default="on",
        help="off skips the feature statistics step (statistics/statistics.pb; as costly as the DSP on short clips): "
        "run.json says so, the report and compare say they are absent; `python -m export.statistics RUN_DIR` computes them later",
    )
    parser.add_argument(
        "--flex_template",
        help="gs://.../featurebeam.json: instead of running, write a Dataflow Flex Template spec that launches these flags "
        "(needs --sdk_container_image, the image built from the Dockerfile); each launch decides its own run id",
    )
    progress.add_argument(parser)
    parser.add_argument("--max_bytes_billed", help="ceiling on bytes billed per BigQuery query (bytes, or 500MB, 10GiB; default 10GiB)")
    parser.add_argument(
        "--allowed_uri_prefixes", help="comma-separated buckets or folders (gs://a/,gs://b/) manifest and catalogue rows may point at"
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
    attempt_started: str = ""  # this launch (differs from `started` for a resumed run)
    # The earlier launches of this run, whose commits a resume keeps (`_work/plan.json`'s
    # `attempts`): none for a new or overwritten run; None for a run folder from before attempts
    # were recorded, whose every commit counts.
    earlier_attempts: tuple[str, ...] | None = ()
    commit_records: int = 64
    commit_bytes: int = commit.DEFAULT_COMMIT_BYTES
    item_shards: int = 1  # as for one worker slot
    isolate_decoder: bool = True
    complete: bool = False  # resume of a run whose run.json exists: nothing to do
    reuse: reuse.ReusePlan | None = None
    bigquery_dataset: str | None = None
    bigquery_frames: bool = False
    max_bytes_billed: int | None = None  # --max_bytes_billed, for the BigQuery load (None: the default)
    progress: str = "auto"
    report: bool = True
    statistics: bool = True  # --statistics=off: no statistics step
    formats: ExportFormats = ExportFormats()  # --formats and the codecs
    argv: tuple[str, ...] = ()  # the flags as given, for the command that resumes the run

    @property
    def extractor_ids(self) -> tuple[str, ...]:
        return tuple(f"{e.name}@{e.version}" for e in self.extractors)

    def path(self, *parts: str) -> str:
        return metadata.join(self.run_dir, *parts)


def plan(argv: Sequence[str], *, flex_launch: bool = False) -> Plan:
    """Parse flags and config, resolve the dataset and extractors, and prepare the run folder.

    The run id and this attempt's stamp are decided here, when the job is launched. flex_launch:
    called by a Flex Template's launch (pipelines/template.py), the one caller that may pass
    `--template_location` (where Dataflow's launcher wants the job written).
    """
    the_plan, mode = resolve_plan(argv, flex_launch=flex_launch)
    if mode == "resume":
        return _resume(the_plan)
    _prepare_run_dir(the_plan, mode=mode)
    return the_plan


CLASSIC_TEMPLATE = (
    "--template_location builds a classic Dataflow template, whose run id and attempt would be fixed when it is "
    "built, so every launch would write into one run folder; build a Flex Template instead, which runs the launcher "
    "at each launch: --flex_template=gs://BUCKET/templates/featurebeam.json --sdk_container_image=IMAGE "
    "(README: Templates)"
)


def resolve_plan(argv: Sequence[str], *, flex_launch: bool = False) -> tuple[Plan, str]:
    """The Plan and `--mode` for `argv`, with every flag, the config, the extractors and the dataset
    checked, but nothing written: no run folder is made or read (`plan` does that)."""
    args, beam_flags = _parser().parse_known_args(list(argv))
    beam_flags = runners.resolve_runner_flags(beam_flags)  # default runner, --runner=DaskRunner
    _check_beam_flags(beam_flags)
    options = runners.pipeline_options(beam_flags)
    if runners.template_location(options) and not flex_launch:
        raise ConfigError(CLASSIC_TEMPLATE)

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
    output = args.output if "://" in args.output else os.path.abspath(args.output)
    reuse_from = None
    if args.reuse_from:
        reuse_from = args.reuse_from if "://" in args.reuse_from else os.path.abspath(args.reuse_from)
    dataset = resolve(args.dataset, max_bytes_billed=args.max_bytes_billed, allowed_uri_prefixes=args.allowed_uri_prefixes)
    # Before anything slow (loading models, checking the dataset, building a package), refuse the
    # local paths the workers cannot reach; the sample set is staged where they can.
    workers = remote.workers_of(options)
    needed = remote.job_paths(
        output=args.output, output_given=any(a == "--output" or a.startswith("--output=") for a in argv),
        dataset=dataset, dataset_spec=args.dataset, reuse_from=args.reuse_from, features=config.features,
        config_where=where,
    )
    dataset = remote.check_reach(workers=workers, paths=needed, dataset=dataset, output=output)
    source = remote.package_source(workers=workers, options=options)  # built once the rest is checked
    extractors = [
        registry.build_instance(name, values, sample_rate=config.sample_rate, where=f"{where}: features.{name}")
        for name, values in config.features.items()
    ]
    specs = tuple(spec for extractor in extractors for spec in extractor.output_specs())
    names = [spec.name for spec in specs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"two extractors both produce the output {clash[0]!r}; drop one of them from --features")

    chosen = formats.parse(
        formats=args.formats, tfrecord_compression=args.tfrecord_compression, parquet_compression=args.parquet_compression
    )
    typed = [spec.name for spec in specs if spec.dtype != "float32"]
    if typed and chosen.writes(formats.TFDS):
        raise ConfigError(
            f"--formats=tfds holds float32 outputs only, and {typed[0]!r} is {next(s.dtype for s in specs if s.name == typed[0])}; "
            "drop tfds from --formats (TFRecord, Parquet and the SQL tables hold every output type)"
        )
    dataset.prepare()
    resolved = {
        **config.to_json(),
        # Extractors' full configs (defaults filled in), not just the keys the user set.
        # A named instance (features: {pitch: {extractor: onnx_model, ...}}) keeps its extractor key.
        "features": {e.name: registry.instance_values(e) for e in extractors},
        # Where the dataset lies is not part of it: a copy mounted elsewhere resumes the same run.
        "dataset": dataset.identity(),
        # Which exports and codecs: they change the run's files, so a resume must use the same.
        "export": chosen.describe(),
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
    if args.commit_mb <= 0:
        raise ConfigError(f"--commit_mb must be positive, got {args.commit_mb}")
    if args.item_shards is not None and args.item_shards <= 0:
        raise ConfigError(f"--item_shards must be positive, got {args.item_shards}")
    if source is not None:
        package = remote.package_for_workers(source)
        beam_flags = [*beam_flags, f"--extra_package={package}"]
        options = runners.pipeline_options(beam_flags)
        print(f"featurebeam: no {remote.CODE_FLAGS}: the workers get {package.name}, built from {source}", file=sys.stderr)
    slots = runners.worker_slots(options)
    item_shards = args.item_shards or (1 if slots == 1 else min(MAX_ITEM_SHARDS, SHARDS_PER_SLOT * slots))
    if args.bigquery_dataset:
        bigquery.parse_dataset(args.bigquery_dataset)
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
        attempt_started=now.isoformat(),
        commit_records=args.commit_records,
        commit_bytes=int(args.commit_mb * (1 << 20)),
        item_shards=item_shards,
        isolate_decoder=not args.decode_in_process,
        bigquery_dataset=args.bigquery_dataset,
        bigquery_frames=args.bigquery_frames,
        max_bytes_billed=billing.parse_bytes(args.max_bytes_billed),
        progress=args.progress,
        report=not args.no_report,
        statistics=args.statistics == "on",
        formats=chosen,
        argv=tuple(argv),
    )
    if reuse_from:
        the_plan = dataclasses.replace(the_plan, reuse=reuse.plan_reuse(reuse_from, extractors=extractors, config=config))
    return the_plan, args.mode


def _exists(path: str) -> bool:
    if "://" not in path:
        return os.path.exists(path)
    return bool(FileSystems.match([metadata.join(path, "**")], limits=[1])[0].metadata_list)


def _retire_run(run_dir: str) -> None:
    """Make an existing run folder's run no longer a run, for `--mode=overwrite`: delete its
    metadata files, a constant number of known paths (run.json first, so the folder no longer
    looks complete; then `_work/summary.json`, so `python -m pipelines.finalize` cannot finish the
    old run with the new plan). Nothing is listed: the old run's shards, commit records, dead
    letters, table shards, TFDS files and progress files are deleted by the new run's pipeline,
    on workers, because its `_work/plan.json` does not name their attempts (see `plan_record`).
    """
    from export import report

    paths = [
        metadata.RUN_JSON,
        f"{WORK}/{SUMMARY_JSON}",
        f"{WORK}/{BIGQUERY_JSON}",
        metadata.FEATURES_JSON,
        metadata.SCHEMA_PBTXT,
        tfds.DATASET_INFO,
        report.REPORT_HTML,
        f"{export_statistics.STATISTICS_DIR}/{export_statistics.STATISTICS_FILE}",
    ]
    try:
        metadata.delete_present([*(metadata.join(run_dir, path) for path in paths), tables.runs_file(run_dir)])
    except Exception as exc:
        raise OutputError(
            f"cannot replace the run in {run_dir}: {type(exc).__name__}: {exc}; check that --output is writable, "
            "or pass a new --run_id"
        ) from None


def plan_record(plan: Plan) -> dict[str, Any]:
    """What the final step needs from the launcher, as JSON: `_work/plan.json`.

    Constant in size; the pipeline's Finalise step gets the same dict, and
    `python -m pipelines.finalize` reads it back.
    """
    all_options = plan.options.get_all_options(drop_default=True)
    record = {
        "config_hash": plan.config_hash,
        "started": plan.started,
        "attempt_started": plan.attempt_started or plan.started,
        # The launches of this run, oldest first: commits stamped with any other attempt (those of
        # a run --mode=overwrite replaced) are not part of it. None: not recorded (an older run).
        "attempts": None if plan.earlier_attempts is None else [*plan.earlier_attempts, _attempt(plan)],
        "run_id": plan.run_id,
        "run_dir": plan.run_dir,
        "featurebeam_version": featurebeam.__version__,
        "git_commit": metadata.git_commit(),
        "config": plan.config.to_json(),
        "extractors": [e.describe() for e in plan.extractors],
        "dataset": plan.dataset.describe(),
        "specs": [spec.to_json() for spec in plan.specs],
        "reuse": None if plan.reuse is None else plan.reuse.describe(),
        "beam": {
            "runner": plan.options.view_as(StandardOptions).runner,
            "version": beam.__version__,
            # Options that hold credentials or tokens are redacted; identities are kept.
            "options": redact.redact_options({k: v for k, v in all_options.items() if k != "runner"}),
        },
        "bigquery_dataset": plan.bigquery_dataset,  # the final step loads the run there
        "bigquery_frames": plan.bigquery_frames,
        "max_bytes_billed": plan.max_bytes_billed,  # caps the final step's BigQuery statements
        "export": plan.formats.describe(),
        "statistics": "on" if plan.statistics else "off",
    }
    return json.loads(json.dumps(record, sort_keys=True, default=str))  # what plan.json will read back


def _write_plan(plan: Plan) -> None:
    try:
        metadata.write_json(plan.path(WORK, PLAN_JSON), plan_record(plan))
    except Exception as exc:
        raise OutputError(f"cannot write to {plan.run_dir}: {type(exc).__name__}: {exc}; pass a writable --output") from None


def _prepare_run_dir(plan: Plan, *, mode: str) -> None:
    run_dir = plan.run_dir
    if _exists(run_dir):
        if mode == "new":
            raise OutputError(
                f"run folder {run_dir} already exists; pass a new --run_id, --mode=resume to continue it, "
                "or --mode=overwrite to replace it"
            )
        _retire_run(run_dir)
    _write_plan(plan)


def _resume(plan: Plan) -> Plan:
    """Continue an interrupted run: same config; the pipeline skips what its commits hold."""
    if not _exists(plan.run_dir):
        raise OutputError(f"no run folder {plan.run_dir} to resume; check --output and --run_id, or use --mode=new")
    if FileSystems.exists(plan.path(metadata.RUN_JSON)):
        return dataclasses.replace(plan, complete=True)
    try:
        started = metadata.read_json(plan.path(WORK, PLAN_JSON))
    except Exception:
        raise OutputError(
            f"{plan.run_dir} has no {WORK}/{PLAN_JSON}, so it is not a featurebeam run that can be resumed; "
            "use --mode=overwrite to start it again"
        ) from None
    if started.get("dataset", {}).get("keys") != KEYS:
        raise ConfigError(
            f"run {plan.run_id} in {plan.run_dir} has absolute-path keys from an earlier featurebeam, which this one "
            "does not match; start it again with --mode=overwrite (or a new --run_id)"
        )
    if started["config_hash"] != plan.config_hash:
        raise ConfigError(
            f"run {plan.run_id} was started with config {started['config_hash']}, these flags give "
            f"{plan.config_hash}; resume with the same --dataset, --features, --config, audio flags, --formats "
            "and compression flags, or start a new run"
        )
    attempts = started.get("attempts")
    resumed = dataclasses.replace(
        plan, started=started["started"], earlier_attempts=None if attempts is None else tuple(attempts)
    )
    _write_plan(resumed)
    return resumed


def _dead_claim(record: dict[str, Any]):
    for dead in record.get("dead", ()):
        yield (dead["key"], dead["stage"]), True


def _first_new(element) -> list[DeadLetter]:
    """One dead letter per (key, stage), and none for what an earlier attempt already committed."""
    _, groups = element
    if any(True for _ in groups["committed"]):
        return []
    new = sorted(groups["new"], key=lambda d: (d.uri, d.reason, d.message))
    return new[:1]


def build(pipeline: beam.Pipeline, plan: Plan) -> dict[str, beam.PCollection]:
    """Add the extraction graph to `pipeline`, through its final step; returns some of its PCollections:
    `rows` (lists of FeatureRows, one per extraction batch), `dead` (DeadLetters, one per key and
    stage), `commits` (the valid commit records, as a tuple of PCollections: an earlier attempt's, this
    attempt's rows', its dead letters'), `summary` and `finalized` (the run id, once run.json is written)."""
    config = plan.config
    # The listing's parts (a files adapter's levels) stay apart up to the grouping by key, so each
    # part's items go from the stage that lists them straight into the shuffle.
    listed = pipeline | "List" >> plan.dataset.listing_parts()
    split = [
        part | f"SplitListing{number or ''}" >> portable.Partition(lambda e, n: 1 if isinstance(e, DeadLetter) else 0, 2)
        for number, part in enumerate(listed)
    ]
    items = tuple(items for items, _ in split)
    listing_dead = tuple(dead for _, dead in split)
    if config.limit:
        items = (items | "ListedItems" >> beam.Flatten() | "Limit" >> portable.SmallestByKey(config.limit, key=lambda it: it.key),)
    # What an interrupted attempt of this run committed (nothing for a new run), read by workers;
    # first, TFDS parts an interrupted final step had renamed go back to their commits' names.
    with_tfds = plan.formats.writes(formats.TFDS)
    # Only this run's earlier attempts count: a run --mode=overwrite replaced is not read (and its
    # files, named by no valid commit, are removed at the end).
    restored = (
        pipeline | "RestoreTfdsParts" >> tfds.RestoreParts(plan.run_dir, attempt=_attempt(plan), earlier=plan.earlier_attempts)
        if with_tfds
        else None
    )
    previous = pipeline | "ReadCommits" >> commit.ReadCommits(
        plan.run_dir, attempt=_attempt(plan), earlier=plan.earlier_attempts, formats=plan.formats, after=restored
    )
    # One grouping by key drops duplicate keys (so every key is exported once), skips what a
    # resumed run finished, and joins a previous run's records for --reuse_from.
    groups = {
        "items": tuple(
            part
            | f"TallyListed{number or ''}" >> progress.Tally(_progress_dir(plan), "listed")
            | f"ByKey{number or ''}" >> beam.Map(lambda it: (it.key, it))
            for number, part in enumerate(items)
        ),
        "done": previous | "DoneFacts" >> beam.FlatMap(commit.item_facts),
    }
    if plan.reuse is not None:
        groups["previous"] = pipeline | "PreviousRecords" >> reuse.PreviousRecords(plan.reuse)
    buckets = groups | "GroupKeys" >> portable.GroupEncoded({"items": (encode_item, decode_item)}, per_bucket=True)
    unique = (
        buckets
        | "EachKey" >> beam.FlatMap(lambda bucket: bucket)
        | "SelectItems" >> portable.ParDoWithOutputs(reuse.SelectItemFn(plan.reuse), transforms.DEAD, main="items")
    )
    # The listing's fingerprint, a bucket of listed items at a time (every listed item, duplicate
    # keys too, as the listing gave them): the items are grouped here anyway, so only one small
    # accumulator per bucket crosses a shuffle.
    listing = buckets | "Fingerprint" >> CombineToOne(FingerprintFn(), inputs=_listed_items)
    batch_samples = int(config.batch_seconds * config.sample_rate)
    # Items, not decoded clips, are batched (one small shuffle that also spreads the work), and
    # each worker cuts its items' clips into extraction batches of at most --batch_seconds.
    decoded = (
        unique["items"]
        | "BatchItems" >> portable.BatchBySize(
            max_size=ITEMS_PER_BATCH, size_fn=lambda work: 1, key_fn=lambda work: work[0].key, shards=plan.item_shards,
            encoded=(reuse.encode_work, reuse.decode_work),
        )
        # A shard's batches are cut one after another in one task; spread them before the heavy
        # steps, so one shard's work (--item_shards=1, or a shard of long recordings) runs on every
        # worker: Dataflow can then give its batches to other workers, and featurebeam's
        # DaskRunner deals them over its workers (Beam's own DaskRunner ignores a Reshuffle).
        | "SpreadBatches" >> beam.Reshuffle()
        | "Decode" >> portable.ParDoWithOutputs(
            transforms.DecodeBatchFn(
                transforms.DecodeFn(
                    sample_rate=config.sample_rate,
                    segment_samples=config.segment_samples,
                    extractor_ids=plan.extractor_ids,
                    max_item_seconds=config.item_seconds_limit,
                    # An item shorter than the coarsest hop would be described by a single frame of padding.
                    min_samples=max(
                        [s.hop_length for s in plan.specs if s.level == "frame" and s.frames == "centred"], default=1
                    ),
                    isolate=plan.isolate_decoder,
                ),
                max_batch_samples=batch_samples,
            ),
            transforms.DEAD,
            main="clips",
        )
    )
    extracted = decoded["clips"] | "Extract" >> portable.ParDoWithOutputs(
        transforms.ExtractFn(
            features=config.features, sample_rate=config.sample_rate, max_batch_samples=batch_samples,
            functions=function.loaded_functions(config.features),
        ),
        transforms.DEAD,
        main="rows",
    )
    rows = extracted["rows"]  # lists of FeatureRows: one per extraction batch, and rows copied forward
    # Statistics describe every record of the run: this attempt's and, for a resumed run, those
    # earlier attempts committed (read back from their Parquet shards by workers). Each extraction
    # batch and each earlier commit is folded into one accumulator where it is: rows never cross a
    # shuffle.
    # --statistics=off leaves the step out of the graph; Finalize then records why there are none.
    statistics = None
    if plan.statistics:
        statistics = (rows, previous) | "Statistics" >> export_statistics.ComputeStatistics(
            specs=plan.specs,
            run_dir=plan.run_dir,
            rows_of=(_batch_rows, functools.partial(commit.committed_rows, run_dir=plan.run_dir, specs=plan.specs)),
        )
    record = plan_record(plan)
    table = commit.TableContext(
        run_id=plan.run_id, started=plan.started, extractors=tuple(record["extractors"]), frames=plan.bigquery_frames,
        attempt=_attempt(plan),
    )
    committed = rows | "CommitRows" >> commit.CommitRows(
        run_dir=plan.run_dir,
        specs=plan.specs,
        table=table,
        commit_records=plan.commit_records,
        commit_bytes=plan.commit_bytes,
        extractor_ids=plan.extractor_ids,
        formats=plan.formats,
    )
    dead = (
        *listing_dead,
        unique[transforms.DEAD],
        decoded[transforms.DEAD],
        extracted[transforms.DEAD],
        committed["dead"],
    ) | "AllDead" >> beam.Flatten()
    new_dead = (
        {
            "new": dead | "DeadByKey" >> beam.Map(lambda d: ((d.key, d.stage), d)),
            "committed": previous | "CommittedDead" >> beam.FlatMap(_dead_claim),
        }
        | "GroupDead" >> beam.CoGroupByKey()
        | "OnePerKeyStage" >> beam.FlatMap(_first_new)
    )
    dead_commits = new_dead | "CommitDead" >> commit.CommitDeadLetters(
        run_dir=plan.run_dir, table=table, commit_records=plan.commit_records
    )
    pdir = _progress_dir(plan)
    # The run's valid commits, in three sets that are never flattened: FnApiRunner would hold every
    # record of the flatten in the launcher. Each consumer takes what it needs from each set.
    commits = (
        previous,
        committed["commits"] | "TallyDone" >> progress.Tally(pdir, "done"),
        dead_commits | "TallyFailed" >> progress.Tally(pdir, "failed"),
    )
    summary = commits | "Summarise" >> SummariseRun(n_extractors=len(plan.extractors))
    # Every file this run keeps in its shard folders, `_commits/` and `tfds/`; the rest goes once
    # the last of them is written (the summary needs every commit; the TFDS shards are renamed).
    named = [records | f"NamedFiles{i}" >> beam.FlatMap(commit.named_paths) for i, records in enumerate(commits)]
    written = summary
    if with_tfds:
        tfds_name = tfds.dataset_name(plan.dataset.name)
        tfds_splits = commits | "NameTfdsShards" >> tfds.NameShards(run_dir=plan.run_dir, dataset=tfds_name, attempt=_attempt(plan))
        named.append(tfds_splits | "TfdsFiles" >> beam.FlatMap(tfds.named_paths, dataset=tfds_name))
        written = {"summary": summary, "tfds": tfds_splits} | "AfterTfds" >> JoinSingletons()
    removed = (
        (
            tuple(named) | "RemoveOrphans" >> commit.RemoveOrphans(plan.run_dir, after=written),
            summary | "RemoveStaleProgress" >> progress.RemoveStale(plan.run_dir, keep=_progress_dir(plan)),
        )
        | "AllRemoved" >> beam.Flatten()
        | "CountRemoved" >> CombineToOne(beam.transforms.core.CallableWrapperCombineFn(sum))
    )
    singletons = {"summary": summary, "listing": listing, "orphans": removed}
    if statistics is not None:
        singletons["statistics"] = statistics
    if with_tfds:
        singletons["tfds"] = tfds_splits
    finalized = (
        singletons
        | "JoinSummaries" >> JoinSingletons()
        | "Finalize" >> Finalize(record)
    )
    return {"rows": rows, "dead": new_dead, "commits": commits, "summary": summary, "finalized": finalized}


def _batch_rows(rows: list) -> list:
    return rows


def _listed_items(bucket: portable.Bucket):
    return bucket.values("items")


def _attempt(plan: Plan) -> str:
    """This launch of the run (a resumed run is a new attempt): stamped on every commit it writes."""
    return f"{plan.attempt_started}/{plan.config_hash}"


def _progress_dir(plan: Plan) -> str | None:
    """Where workers leave progress totals, or None when nobody watches (Dataflow has its own page)."""
    if plan.progress == "none" or "Dataflow" in str(plan.options.view_as(StandardOptions).runner):
        return None
    return progress.attempt_dir(plan.run_dir, _attempt(plan))


def run(argv: Sequence[str], *, pipeline: beam.Pipeline | None = None) -> dict[str, Any] | None:
    """Run an extraction end to end and return run.json's content.

    pipeline: an unstarted pipeline to build into (tests pass a TestPipeline); by default one is
    made from the Beam flags in `argv`. The pipeline writes run.json itself, and its final step
    loads BigQuery when asked; after the job the launcher reads only run.json. With
    `--flex_template` this writes a Flex Template spec instead (pipelines/template.py); for a
    `--dry_run` nothing runs. Both return None.
    """
    args, _ = _parser().parse_known_args(list(argv))
    if args.flex_template:
        from pipelines import template

        print(template.build(argv))
        return None
    runners.cache_dofn_specs()
    the_plan = plan(argv)
    return execute(the_plan, graph(the_plan, pipeline=pipeline))


def resume_command(the_plan: Plan) -> str:
    """The command that continues the run of `the_plan`: its flags, with --mode=resume and its --run_id."""
    kept, skip = [], False
    for arg in the_plan.argv:
        if skip:
            skip = False
            continue
        name, equals, _ = arg.partition("=")
        if name in ("--mode", "--run_id"):
            skip = not equals  # "--mode resume": the value is the next argument
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "pipelines.extract", *kept, "--mode=resume", f"--run_id={the_plan.run_id}"])


def graph(the_plan: Plan, *, pipeline: beam.Pipeline | None = None) -> beam.Pipeline | None:
    """The job of `the_plan`, built into `pipeline` (default: a new one from the plan's Beam
    options) and not yet run; None for a complete run, which has nothing to do."""
    if the_plan.complete:
        return None
    p = pipeline if pipeline is not None else beam.Pipeline(options=the_plan.options)
    build(p, the_plan)
    return p


def execute(the_plan: Plan, p: beam.Pipeline | None) -> dict[str, Any] | None:
    """Submit the job `p` of `the_plan` (from `graph`) and wait for it; read run.json, and load
    BigQuery when asked. Raises OutputError when the job ends without writing run.json."""
    if p is None:
        _LOG.warning("run %s is already complete; nothing to resume", the_plan.run_dir)
        # No job runs, so no final step loads: the launcher does (loading only what BigQuery lacks).
        finalize_load_bigquery(plan_record(the_plan))
        return metadata.read_json(the_plan.path(metadata.RUN_JSON))
    if runners.job_only(the_plan.options):
        p.run()
        print(runners.job_only_message(the_plan.options, run_dir=the_plan.run_dir))
        return None
    jobs = []

    def submit():
        jobs.append(p.run())
        return jobs[-1]

    try:
        state = progress.watch(submit, progress_dir=_progress_dir(the_plan), mode=the_plan.progress, options=the_plan.options)
    except Exception:
        # A job whose final step's BigQuery load was refused (a schema change, another run with this
        # id): say why in the one line the load recorded, not with the runner's traceback.
        refused = bigquery_refusal(the_plan.run_dir, attempt_stamp=_attempt(the_plan))
        if refused is not None:
            raise refused from None
        raise
    try:
        result = metadata.read_json(the_plan.path(metadata.RUN_JSON))
    except Exception:
        ended = "" if the_plan.complete else f" (state {state})"
        raise OutputError(
            f"the job ended{ended} without writing {the_plan.path(metadata.RUN_JSON)}, so the run is incomplete; "
            f"resume it with: {resume_command(the_plan)}"
        ) from None
    # The job's own counters exist only once it is done, after its final step wrote run.json (and
    # loaded BigQuery, whose runs row therefore has no stage_seconds): the launcher adds them
    # (constant size) and rewrites the metadata the same way.
    seconds = stages.from_result(jobs[-1])
    if seconds:
        result = finalize_stage_seconds(the_plan.run_dir, seconds)
    return result


@dataclasses.dataclass
class Launched:
    """A job a launch submitted and did not wait for (`launch`)."""

    plan: Plan
    result: Any  # the runner's PipelineResult; None when the run was already complete


def launch(argv: Sequence[str]) -> Launched:
    """Plan a run (its run id and attempt decided now), build its graph and submit it without waiting.

    What a Flex Template's launcher runs at each launch (pipelines/template.py): it must exit once
    the job is submitted, or written to `--template_location` for Dataflow's launcher to submit.
    The job's own final step writes run.json and loads BigQuery. A `--mode=resume` of a complete
    run submits nothing and only loads BigQuery when asked (constant work).
    """
    runners.cache_dofn_specs()
    the_plan = plan(argv, flex_launch=True)
    if the_plan.complete:
        _LOG.warning("run %s is already complete; nothing to resume", the_plan.run_dir)
        finalize_load_bigquery(plan_record(the_plan))
        return Launched(plan=the_plan, result=None)
    p = beam.Pipeline(options=the_plan.options)
    build(p, the_plan)
    result = p.run()
    if runners.job_only(the_plan.options):
        print(runners.job_only_message(the_plan.options, run_dir=the_plan.run_dir))
    else:
        print(f"job submitted for run {the_plan.run_dir} (run.json appears when its Finalise step has run)")
    return Launched(plan=the_plan, result=result)


def summary(run: dict[str, Any]) -> str:
    return summary_text(run)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (EXIT_USAGE, EXIT_FAILURE_BUDGET, EXIT_JOB_FAILED)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redact.scrub_logs()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args, _ = _parser().parse_known_args(argv_list)
        if args.flex_template:  # writes the template spec; nothing runs
            from pipelines import template

            print(template.build(argv_list))
            return 0
        runners.cache_dofn_specs()
        the_plan = plan(argv_list)
        job = graph(the_plan)
    except FeaturebeamError as exc:  # nothing has run yet
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = execute(the_plan, job)
    except Exception as exc:  # the job failed, ended incomplete, or its BigQuery load failed
        message = (str(exc).strip().splitlines() or [""])[0][:2000]
        if not isinstance(exc, FeaturebeamError):  # unexpected: its traceback, above the one-line summary
            _LOG.error("the job failed", exc_info=exc)
            message = f"the job failed: {type(exc).__name__}: {message}"
        if "resume it with: " not in message:
            message += f"; once the cause is fixed, resume the run with: {resume_command(the_plan)}"
        print(f"featurebeam: error: {message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if result is None:  # a template or dry run: nothing ran here
        return 0
    print(summary(result))
    if "--no_report" not in argv_list and "://" not in result["outputs"]["run_dir"]:
        from export import report

        try:
            print(f"  report:    {report.write_report(result['outputs']['run_dir'])}")
        except Exception as exc:  # a report must never fail a finished run
            print(f"featurebeam: warning: no report.html ({type(exc).__name__}: {exc})", file=sys.stderr)
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
