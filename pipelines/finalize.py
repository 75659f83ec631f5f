"""Finalise: turn the workers' one small summary into the run's metadata; `python -m pipelines.finalize RUN_DIR`.

The last stage of the pipeline gets one element (the run's summary, its listing fingerprint and
how many orphans were removed) and writes, in this order: `_work/summary.json`, `features.json`,
`schema.pbtxt`, the TFDS `dataset_info.json` (when the run writes a TFDS copy), the runs table and,
last, `run.json`; then, with `--bigquery_dataset`, it submits the BigQuery load jobs (by URI for a
run in a bucket, see export/bigquery.py) and records their outcome in `_work/bigquery.json`.
Everything it reads is constant in size: `_work/plan.json` (what the launcher resolved) and the
summary. So a templated or detached Dataflow job finishes its own run, loads included, and
`python -m pipelines.finalize RUN_DIR` redoes this step alone, from what the pipeline left in
`_work/`, without resubmitting anything. Safe to repeat: every file is written by temp-and-rename
with the same content, and a load skips every table that already holds the run's rows. Inside
the pipeline the load jobs get ids derived from the run and this attempt, so a retry of the step
while a load job it submitted is still running waits for that job rather than loading twice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, Sequence

import apache_beam as beam

from export import commit, formats, metadata, tables, tfds
from export import statistics as export_statistics
from export.schema import build_schema, to_pbtxt
from featurebeam import faults
from featurebeam.errors import FeaturebeamError, OutputError
from features.base import OutputSpec

WORK = "_work"  # run-folder scratch: the plan, the workers' summary
PLAN_JSON = "plan.json"
SUMMARY_JSON = "summary.json"
BIGQUERY_JSON = "bigquery.json"  # what the final step's BigQuery load did (or why it was refused)
_LOG = logging.getLogger("featurebeam")


def spec_from_json(value: dict[str, Any]) -> OutputSpec:
    return OutputSpec.from_json(value)


def _output(run_dir: str, kind: str, files: dict[str, dict[str, int]], export: formats.ExportFormats) -> dict[str, Any]:
    """run.json's entry of one output kind. A format `--formats` left out keeps its entry, with
    0 files: every reader that lists the pattern finds nothing, and `run["export"]["formats"]`
    says it was not written (export.formats.require turns that into the error naming the fix)."""
    totals = files.get(kind, {"files": 0, "bytes": 0})
    return {"pattern": commit.pattern(run_dir, kind, export), "files": totals["files"], "bytes": totals["bytes"]}


def build_run(plan: dict[str, Any], summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run.json, features.json) from the launcher's plan and the workers' summary."""
    run_dir = plan["run_dir"]
    specs = plan["specs"]
    listing = summary["listing"]
    labels = sorted(label for label in summary["label_counts"] if label)
    features_json = {
        "record_type": "SequenceExample" if any(s["level"] == "frame" for s in specs) else "Example",
        "sample_rate": plan["config"]["sample_rate"],
        "extractors": plan["extractors"],
        "outputs": specs,
        "labels": labels,
    }
    export = formats.ExportFormats.from_json(plan.get("export"))
    finished = summary["finished"]
    wall = datetime.datetime.fromisoformat(finished) - datetime.datetime.fromisoformat(plan["attempt_started"])
    run = {
        "run_id": plan["run_id"],
        "started": plan["started"],
        "finished": finished,
        "wall_seconds": round(wall.total_seconds(), 3),
        "featurebeam_version": plan["featurebeam_version"],
        "git_commit": plan["git_commit"],
        "config": plan["config"],
        "config_hash": plan["config_hash"],
        "extractors": plan["extractors"],
        "dataset": {**plan["dataset"], "fingerprint": listing["fingerprint"], "listed": listing["listed"]},
        "counts": {
            # Rows the listing could not turn into items (a manifest row without a uri, an
            # unlistable prefix) count as listed and failed, so the failure ratio sees them.
            "listed": listing["listed"] + summary["list_failed"],
            "ok": summary["ok"],
            "failed": summary["failed"],
            "partial": summary["partial"],
            "records": summary["records"],
        },
        "failures": {
            "failed": summary["failures"]["failed_records"],
            "by_stage": summary["failures"]["by_stage"],
            "reasons": summary["failures"]["reasons"],
        },
        "labels": labels,
        "label_counts": summary["label_counts"],
        "split_counts": summary["split_counts"],
        "audio_seconds": summary["audio_seconds"],
        "outputs": {
            "run_dir": run_dir,
            "tfrecords": _output(run_dir, "tfrecords", summary["files"], export),
            "parquet": _output(run_dir, "parquet", summary["files"], export),
            "errors": _output(run_dir, "errors", summary["files"], export),
            "features_json": metadata.join(run_dir, metadata.FEATURES_JSON),
            "schema": metadata.join(run_dir, metadata.SCHEMA_PBTXT),
            "tables": metadata.join(run_dir, tables.TABLES_DIR),
            # The TensorFlow Datasets copy (tfds in --formats): tfds.builder_from_directory(run_dir).
            "tfds": metadata.join(run_dir, tfds.DATASET_INFO) if summary.get("tfds") is not None else None,
        },
        # Which exports were written and their codecs (export/formats.py).
        "export": export.describe(),
        "reuse": None
        if plan["reuse"] is None
        else {
            **plan["reuse"],
            "records_fully_reused": summary["records_fully_reused"],
            "records_partly_reused": summary["records_partly_reused"],
        },
        "beam": plan["beam"],
        # Feature statistics (statistics/statistics.pb) of every record of the run, earlier attempts
        # included; for a run extracted with --statistics=off, why there are none.
        "statistics": summary.get("statistics") if plan.get("statistics", "on") == "on" else dict(export_statistics.OFF),
        # Seconds per stage (featurebeam/stages.py) of this attempt, from the job's Beam counters;
        # added by the launcher once the job is done (None until then, or when the runner has no metrics).
        "stage_seconds": summary.get("stage_seconds"),
    }
    return run, features_json


def write_run(plan: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Write features.json, schema.pbtxt, the runs table and, last, run.json; returns run.json's content."""
    run_dir = plan["run_dir"]
    run, features_json = build_run(plan, summary)
    if "://" not in run_dir:  # an empty errors/ says "no failures" better than a missing one
        os.makedirs(metadata.join(run_dir, "errors"), exist_ok=True)
    metadata.write_json(metadata.join(run_dir, metadata.FEATURES_JSON), features_json)
    faults.point("finalize")
    metadata.write_atomic(metadata.join(run_dir, metadata.SCHEMA_PBTXT), to_pbtxt(build_schema([spec_from_json(s) for s in plan["specs"]])))
    if summary.get("tfds") is not None:
        tfds.write_dataset_info(run_dir, run=run, specs=[spec_from_json(s) for s in plan["specs"]], splits=summary["tfds"])
    run_json = json.dumps(run, indent=2, sort_keys=True, default=str) + "\n"
    metadata.write_atomic(tables.runs_file(run_dir), tables.runs_table_bytes(run, run_json=run_json, run_dir=run_dir))
    metadata.write_atomic(metadata.join(run_dir, metadata.RUN_JSON), run_json)  # last: the run is complete
    return run


class _FinalizeFn(beam.DoFn):
    def __init__(self, plan: dict[str, Any]):
        self.plan = plan

    def process(self, joined: dict[str, Any]):
        summary = {
            **joined["summary"],
            "listing": joined["listing"],
            "orphans_removed": joined["orphans"] or 0,
            "statistics": joined.get("statistics"),
            "tfds": joined.get("tfds"),  # the TFDS splits and their shard lengths, when the run writes a copy
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        if summary["orphans_removed"]:
            _LOG.warning(
                "removed %d files no commit of this run names (left by interrupted workers, or by the run "
                "--mode=overwrite replaced)", summary["orphans_removed"],
            )
        metadata.write_json(metadata.join(self.plan["run_dir"], WORK, SUMMARY_JSON), summary)
        run = write_run(self.plan, summary)
        # A retry of this step (same attempt) derives the same load job ids: see load_bigquery.
        load_bigquery(self.plan, job_key=f"{self.plan['run_dir']}|{attempt(self.plan)}")
        yield run["run_id"]


class Finalize(beam.PTransform):
    """The joined `{summary, listing, orphans}` element -> the run's metadata files (see module doc)."""

    def __init__(self, plan: dict[str, Any]):
        super().__init__()
        self.plan = plan

    def expand(self, joined):
        return joined | "Write" >> beam.ParDo(_FinalizeFn(self.plan))


def attempt(plan: dict[str, Any]) -> str:
    """The launch of the run that `plan` (a `_work/plan.json`) describes, as its commits are stamped."""
    return f"{plan.get('attempt_started') or plan['started']}/{plan['config_hash']}"


def load_bigquery(plan: dict[str, Any], *, job_key: str | None = None) -> dict[str, Any] | None:
    """Load the finished run into `plan["bigquery_dataset"]` (nothing without one), after run.json.

    Loads only what BigQuery lacks (export.bigquery.load_run), so a retry or a resume adds no
    rows. job_key: the pipeline's final step passes its run folder and attempt, from which every
    load job gets a fixed id, so a retried step whose load job is still running waits for that
    job instead of submitting a second one; without it (`python -m pipelines.finalize`) the ids
    are new each time. The outcome, or the refusal, goes to `_work/bigquery.json` with this
    attempt, where the launcher finds why a waited-for job failed. Returns load_run's report.
    """
    dataset = plan.get("bigquery_dataset")
    if not dataset:
        return None
    from export import bigquery

    run_dir = plan["run_dir"]
    record: dict[str, Any] = {"attempt": attempt(plan), "dataset": dataset}
    path = metadata.join(run_dir, WORK, BIGQUERY_JSON)
    try:
        report = bigquery.load_run(run_dir, dataset=dataset, job_key=job_key, max_bytes_billed=plan.get("max_bytes_billed"))
    except FeaturebeamError as exc:
        metadata.write_json(path, {**record, "error": str(exc), "error_type": type(exc).__name__})
        raise
    metadata.write_json(path, {**record, "tables": report})
    return report


def bigquery_refusal(run_dir: str, *, attempt_stamp: str) -> FeaturebeamError | None:
    """The error the final step's BigQuery load of this attempt recorded, as the exception it was
    (SchemaError, OutputError, ...), or None. Lets a launcher whose job failed in that step say
    why in one line rather than with the runner's traceback."""
    from featurebeam import errors

    try:
        record = metadata.read_json(metadata.join(run_dir, WORK, BIGQUERY_JSON))
    except Exception:
        return None
    if record.get("attempt") != attempt_stamp or not record.get("error"):
        return None
    kind = getattr(errors, str(record.get("error_type")), None)
    if not (isinstance(kind, type) and issubclass(kind, FeaturebeamError)):
        kind = OutputError
    return kind(record["error"])


def add_stage_seconds(run_dir: str, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Record a finished job's per-stage seconds: in `_work/summary.json` (so `python -m
    pipelines.finalize` keeps them), then in the two files that hold run.json's content, the runs
    table and, last, run.json. Constant work; returns run.json's new content."""
    plan = metadata.read_json(metadata.join(run_dir, WORK, PLAN_JSON))
    summary_path = metadata.join(run_dir, WORK, SUMMARY_JSON)
    summary = {**metadata.read_json(summary_path), "stage_seconds": dict(stage_seconds)}
    metadata.write_json(summary_path, summary)
    run, _ = build_run(plan, summary)
    run_json = json.dumps(run, indent=2, sort_keys=True, default=str) + "\n"
    metadata.write_atomic(tables.runs_file(run_dir), tables.runs_table_bytes(run, run_json=run_json, run_dir=run_dir))
    metadata.write_atomic(metadata.join(run_dir, metadata.RUN_JSON), run_json)
    return run


def finalize(run_dir: str) -> dict[str, Any]:
    """Redo the final step of a run from `_work/plan.json` and `_work/summary.json`, its BigQuery load
    (`--bigquery_dataset`) included."""
    run_dir = run_dir.rstrip("/") if "://" in run_dir else os.path.abspath(run_dir)
    try:
        plan = metadata.read_json(metadata.join(run_dir, WORK, PLAN_JSON))
    except Exception:
        raise OutputError(f"{run_dir} has no {WORK}/{PLAN_JSON}: it is not a featurebeam run folder") from None
    try:
        summary = metadata.read_json(metadata.join(run_dir, WORK, SUMMARY_JSON))
    except Exception:
        raise OutputError(
            f"{run_dir} has no {WORK}/{SUMMARY_JSON}: its pipeline did not reach the final step; finish it with "
            f"python -m pipelines.extract ... --mode=resume --run_id={run_dir.rsplit('/', 1)[-1]}"
        ) from None
    if plan["run_dir"].rstrip("/") != run_dir:  # a run folder copied or moved elsewhere
        plan = {**plan, "run_dir": run_dir}
    run = write_run(plan, summary)
    load_bigquery(plan)
    return run


def summary_text(run: dict[str, Any]) -> str:
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
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finalize",
        description="Rewrite a run's features.json, schema.pbtxt, runs table and run.json from what its pipeline "
        "left in _work/, and load it into BigQuery if the run asked for that (no pipeline is run; safe to repeat).",
    )
    parser.add_argument("run_dir", help="the run folder, <output>/<dataset>/<run_id>, local or gs://")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run = finalize(args.run_dir)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
