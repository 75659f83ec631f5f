"""Load a finished run's tables into BigQuery: `features`, `runs` and `errors` in one dataset.

`load_run` (and `python -m export.bigquery RUN_DIR --bigquery_dataset=project.dataset`) takes the
Parquet shards of `<run>/tables/<table>/` (written by the pipeline's workers, see `export.tables`) and:

1. reads the dataset's existing tables and decides, for all three before touching any, whether
   the run fits: a new extractor adds a STRUCT column (allowed); a column whose type changed, or
   an extractor whose output shapes changed under the same version, raises `SchemaError` naming
   the column, the old and new types or shapes and the fix, and leaves every table as it was;
2. creates missing tables with their explicit schemas (features and errors partitioned by
   `run_date`, clustered by `run_id`), or adds the new columns;
3. runs ONE load job per table (errors, features, then runs), each appending all the run's shards
   of that table: for a run in a bucket, `load_table_from_uri` on the shards' `gs://` wildcard
   (BigQuery reads them where they are; nothing passes through this process); for a local run,
   the shards are aligned to the table's columns into one temporary file and uploaded,
   so a run's rows appear in a table all at once or not at all. The runs row goes last: a run
   listed in `runs` has its features and errors loaded. A table that already holds rows of this
   run_id is skipped, so repeating the load (or the whole finalisation) adds nothing.

Why client load jobs and not Beam's `WriteToBigQuery(method=FILE_LOADS)`:
- the rows exist already, as the run's committed Parquet; loading the summarised file as it is
  keeps the local DuckDB tables and the BigQuery tables byte-for-byte the same rows;
- FILE_LOADS writes from inside the pipeline, per bundle and possibly over several load jobs
  (and temp tables plus copy jobs for large outputs), so a retried or re-run pipeline appends
  again; it has no notion of "this run is already loaded", and a failure can leave part of a run
  visible. One job per table after the pipeline has finished gives all-or-nothing and a cheap
  idempotency check;
- schema evolution must be decided once, for the three tables, before anything is written;
  FILE_LOADS' `schema_update_options` would add columns but cannot refuse a shape change;
- it is the same code on every runner: the pipeline's final step (pipelines/finalize.py) submits
  the load jobs once run.json is written (constant work for a run in a bucket: three URI load
  jobs), so a templated or detached Dataflow job loads too, and `python -m export.bigquery` loads
  an existing run later;
- the local emulator (bqemulator) supports exactly this path: resumable uploads of load jobs,
  `ALTER TABLE ADD COLUMN` and table patches. It does not support multipart uploads
  (`load_table_from_json`), and its tables.patch updates the catalog without altering storage,
  which is why a column is added with DDL and then described with `update_table` (both are
  ordinary BigQuery operations; DDL cannot set nested descriptions, `update_table` can).

Output shapes (n_mels, n_mfcc) are invisible in ARRAY<FLOAT64>, so the features table's
description ends with a JSON record of every extractor version loaded and its output shapes,
and a run is compared against it.

A retry of the final step (a worker lost mid-load, Dataflow retrying the bundle) must not load
twice either, and the row check alone cannot see a load job that is still running. So the final
step passes a `job_key` (its run folder and attempt): each table's load job then gets an id made
from it, BigQuery refuses a second job with an existing id (409), and the retry waits for the
first job instead; if that job failed, the next id in a fixed sequence is used.

Every statement it runs (the ALTERs that add columns, the row counts and the runs check) goes
through `featurebeam.billing.run_query`: a dry run first, then the job with `maximum_bytes_billed`
(`--max_bytes_billed`, default 10 GiB), like every other query featurebeam runs.

Known limit: two finalisations of the same run at the same moment from different attempts (or
without a job_key, as `python -m export.bigquery` runs) could both find the table empty and both
load; BigQuery has no transaction spanning a check and a load job.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from google.cloud.bigquery import SchemaField

from export import metadata, tables
from featurebeam import billing, cloud
from featurebeam.errors import ConfigError, FeaturebeamError, OutputError, SchemaError

if TYPE_CHECKING:
    from google.cloud import bigquery

SIGNATURE_MARKER = "featurebeam-schema: "
_LOG = logging.getLogger(__name__)
LOAD_ORDER = (tables.ERRORS, tables.FEATURES, tables.RUNS)  # runs last: its row says the run is complete

_CANONICAL = {"FLOAT": "FLOAT64", "INTEGER": "INT64", "BOOLEAN": "BOOL", "STRUCT": "RECORD"}


def parse_dataset(value: str) -> tuple[str, str]:
    """`project.dataset` -> (project, dataset). A domain-scoped project may hold dots and a colon."""
    project, _, dataset = (value or "").rpartition(".")
    if not project or not dataset or not dataset.replace("_", "").isalnum():
        raise ConfigError(
            f"--bigquery_dataset={value!r} must be 'project.dataset' (dataset: letters, digits, underscores), "
            "e.g. --bigquery_dataset=my-project.audio_features"
        )
    return project, dataset


# --- types -------------------------------------------------------------------------------------


def _kind(field: SchemaField) -> str:
    return _CANONICAL.get(field.field_type, field.field_type)


def type_text(field: SchemaField) -> str:
    """GoogleSQL type of a field: FLOAT64, ARRAY<FLOAT64>, STRUCT<`a` FLOAT64, ...>."""
    if _kind(field) == "RECORD":
        base = "STRUCT<" + ", ".join(f"`{f.name}` {type_text(f)}" for f in field.fields) + ">"
    else:
        base = _kind(field)
    return f"ARRAY<{base}>" if field.mode == "REPEATED" else base


def _first_difference(old: SchemaField, new: SchemaField, path: str) -> tuple[str, str, str] | None:
    """(column path, old type, new type) of the deepest difference, or None when types are equal."""
    if type_text(old) == type_text(new):
        return None
    if _kind(old) == _kind(new) == "RECORD" and old.mode == new.mode:
        old_fields = {f.name: f for f in old.fields}
        new_fields = {f.name: f for f in new.fields}
        for name in list(new_fields) + [n for n in old_fields if n not in new_fields]:
            if name not in old_fields:
                return f"{path}.{name}", "(absent)", type_text(new_fields[name])
            if name not in new_fields:
                return f"{path}.{name}", type_text(old_fields[name]), "(absent)"
            found = _first_difference(old_fields[name], new_fields[name], f"{path}.{name}")
            if found:
                return found
        return path, type_text(old), type_text(new)  # same fields in another order
    return path, type_text(old), type_text(new)


# --- the schema record in the table description ------------------------------------------------


def read_signatures(description: str | None) -> dict[str, dict[str, Any]]:
    """`{extractor: {version: {output: {level, shape}}}}` recorded in a table's description."""
    if not description or SIGNATURE_MARKER not in description:
        return {}
    try:
        return json.loads(description.rsplit(SIGNATURE_MARKER, 1)[1])["extractors"]
    except (ValueError, KeyError, TypeError):
        return {}


def describe(name: str, signatures: dict[str, dict[str, Any]]) -> str:
    if not signatures:
        return tables.TABLE_DESCRIPTIONS[name]
    record = json.dumps({"extractors": signatures}, sort_keys=True, separators=(",", ":"))
    return f"{tables.TABLE_DESCRIPTIONS[name]}\n\n{SIGNATURE_MARKER}{record}"


def _outputs_text(outputs: dict[str, Any], names: Sequence[str]) -> str:
    return ", ".join(
        f"{n} {outputs[n]['level']} {tables._shape_text(outputs[n]['shape'])}" if n in outputs else f"{n} (absent)"
        for n in names
    )


# --- planning ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TablePlan:
    name: str
    table_id: str
    files: list[str]  # the run's Parquet shards of this table
    pattern: str  # their file pattern (what a URI load reads)
    fields: tuple[SchemaField, ...]  # the run's columns
    existing: "bigquery.Table | None"
    added: list[SchemaField]
    description: str

    @property
    def changes_description(self) -> bool:
        return self.existing is not None and (self.existing.description or "") != self.description


def check(
    *,
    table_id: str,
    name: str,
    existing: "bigquery.Table | None",
    fields: Sequence[SchemaField],
    run_signature: dict[str, Any],
    run_id: str,
    dataset: str,
) -> tuple[list[SchemaField], str]:
    """Columns the table must gain for this run, and the table's new description.

    Raises SchemaError when a column's type, or an extractor's outputs under the same version,
    differ from what the table holds.
    """
    owners = {}
    for extractor, spec in run_signature.items():
        owners[extractor] = owners[extractor + tables.FRAMES_SUFFIX] = f"{extractor}@{spec['version']}"
    signatures = read_signatures(existing.description if existing is not None else None)
    project, _, ds = dataset.rpartition(".")
    new_table = f"--bigquery_dataset={project}.{ds}_v2 (or another new dataset)"
    added: list[SchemaField] = []
    current = {f.name: f for f in existing.schema} if existing is not None else {}
    for field in fields:
        if field.name not in current:
            if existing is not None and field.mode == "REQUIRED":
                raise SchemaError(
                    f"cannot load run {run_id} into {table_id}: it needs a new REQUIRED column {field.name} "
                    f"({type_text(field)}), which BigQuery cannot add to a table with rows. Fix: load into a new "
                    f"table with {new_table}. The table was not changed."
                )
            added.append(field)
            continue
        diff = _first_difference(current[field.name], field, field.name)
        if diff:
            column, old, new = diff
            owner = f" (extractor {owners[field.name]})" if field.name in owners else ""
            bump = (
                f"; if {field.name.removesuffix(tables.FRAMES_SUFFIX)}'s outputs changed because its code did, bump "
                "its version too, so runs of the old and new code stay apart"
                if owner
                else ""
            )
            raise SchemaError(
                f"cannot load run {run_id} into {table_id}: column {column} is {old} in the table but {new} in "
                f"this run{owner}. BigQuery cannot change a column's type in place. Fix: load this run into a "
                f"new table with {new_table}{bump}. The table was not changed."
            )
    merged = {k: dict(v) for k, v in signatures.items()}
    for extractor, spec in run_signature.items():
        known = signatures.get(extractor, {}).get(spec["version"])
        if known is not None and known != spec["outputs"]:
            names = sorted(set(known) | set(spec["outputs"]))
            changed = [n for n in names if known.get(n) != spec["outputs"].get(n)]
            raise SchemaError(
                f"cannot load run {run_id} into {table_id}: column {extractor} holds {extractor}@{spec['version']} "
                f"outputs {_outputs_text(known, changed)}, but this run's {extractor}@{spec['version']} has "
                f"{_outputs_text(spec['outputs'], changed)}. The column type "
                f"({type_text(current[extractor]) if extractor in current else 'unchanged'}) hides the change, "
                "but values of both shapes would mix in one column under one version. Fix: load this run into a "
                f"new table with {new_table}, or, if {extractor}'s code changed, bump its version (the class "
                "attribute `version`) so the two stay apart. The table was not changed."
            )
        merged.setdefault(extractor, {})[spec["version"]] = spec["outputs"]
    return added, describe(name, merged if name == tables.FEATURES else {})


def plan(run_dir: str, *, dataset: str, client: "bigquery.Client") -> list[TablePlan]:
    """Read the run's table files and the dataset's tables; raise SchemaError if anything does not fit."""
    from google.api_core.exceptions import NotFound

    run = metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON))
    files = tables.files(run_dir)
    patterns = tables.paths(run_dir)
    plans = []
    for name in tables.TABLE_NAMES:
        if files[name]:
            fields, run_signature = tables.read_schema(files[name][0])
        else:  # no shard (no dead letters, or nothing exported): the schema the table would have
            fields, run_signature = tables.table_schema(run, name), tables.signature(run.get("extractors", []))
        table_id = f"{dataset}.{name}"
        try:
            existing = client.get_table(table_id)
        except NotFound:
            existing = None
        added, description = check(
            table_id=table_id,
            name=name,
            existing=existing,
            fields=fields,
            run_signature=run_signature if name == tables.FEATURES else {},
            run_id=run["run_id"],
            dataset=dataset,
        )
        plans.append(TablePlan(name, table_id, files[name], patterns[name], fields, existing, added, description))
    return plans


# --- applying ----------------------------------------------------------------------------------


def _create(client: "bigquery.Client", plan_: TablePlan) -> None:
    from google.cloud import bigquery

    table = bigquery.Table(plan_.table_id, schema=list(plan_.fields))
    table.description = plan_.description
    if plan_.name in tables.PARTITION_FIELD:
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field=tables.PARTITION_FIELD[plan_.name]
        )
    table.clustering_fields = tables.CLUSTERING[plan_.name]
    client.create_table(table, exists_ok=True)


def _query(client: "bigquery.Client", sql: str, *, limit: int, what: str, params: Sequence[Any] = ()):
    """Run one statement: a dry run, then the job with `maximum_bytes_billed=limit`; its result rows."""
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(query_parameters=list(params))
    return billing.run_query(client, sql, config, limit=limit, what=what, report=_LOG.info).result()


def _extend(client: "bigquery.Client", plan_: TablePlan, *, limit: int) -> None:
    """Add the plan's new columns (DDL, one statement per column), then set descriptions."""
    for field in plan_.added:
        sql = f"ALTER TABLE `{plan_.table_id}` ADD COLUMN IF NOT EXISTS `{field.name}` {type_text(field)}"
        _query(client, sql, limit=limit, what=f"adding column {field.name} to {plan_.table_id}")
    table = client.get_table(plan_.table_id)
    schema = list(table.schema)
    names = [f.name for f in schema]
    for field in plan_.added:  # BigQuery lists the DDL's column already (without descriptions)
        if field.name in names:
            schema[names.index(field.name)] = field
        else:
            schema.append(field)
    table.schema = schema
    table.description = plan_.description
    client.update_table(table, ["schema", "description"])


def _rows_of_run(client: "bigquery.Client", plan_: TablePlan, run: dict[str, Any], *, limit: int) -> int:
    from google.cloud import bigquery

    params = [bigquery.ScalarQueryParameter("run_id", "STRING", run["run_id"])]
    where = "run_id = @run_id"
    if plan_.name in tables.PARTITION_FIELD:  # prune to the run's partition
        params.append(bigquery.ScalarQueryParameter("run_date", "DATE", tables.run_date(run)))
        where += f" AND {tables.PARTITION_FIELD[plan_.name]} = @run_date"
    sql = f"SELECT COUNT(*) AS n FROM `{plan_.table_id}` WHERE {where}"
    rows = list(_query(client, sql, params=params, limit=limit, what=f"the count of run {run['run_id']} in {plan_.table_id}"))
    return int(rows[0]["n"])


def _same_run(client: "bigquery.Client", table_id: str, run: dict[str, Any], *, limit: int) -> None:
    """Refuse when the runs table holds another run under this run_id (run ids are per dataset)."""
    from google.cloud import bigquery

    sql = f"SELECT started, config_hash, dataset.name AS dataset FROM `{table_id}` WHERE run_id = @run_id"
    params = [bigquery.ScalarQueryParameter("run_id", "STRING", run["run_id"])]
    for row in _query(client, sql, params=params, limit=limit, what=f"the lookup of run {run['run_id']} in {table_id}"):
        loaded = (row["started"], row["config_hash"], row["dataset"])
        this = (tables._timestamp(run.get("started")), run.get("config_hash"), run["dataset"].get("name"))
        if loaded != this:
            raise OutputError(
                f"{table_id} already holds another run with id {run['run_id']!r} (dataset {row['dataset']}, started "
                f"{row['started']:%Y-%m-%d %H:%M:%S}, config {row['config_hash']}); this run (dataset {this[2]}, started "
                f"{this[0]:%Y-%m-%d %H:%M:%S}, config {this[1]}) cannot be told apart from it. Nothing was loaded; "
                "rerun the extraction with a unique --run_id, or load into another dataset"
            )


def _aligned_file(paths: Sequence[str], target: pa.Schema) -> tuple[Any, int]:
    """An open temporary file holding the rows of every shard in `paths`, in `target`'s column
    order and types, and its row count.

    Columns the table has beyond a shard's (from other runs' extractors) are added as NULLs,
    batch by batch, because the emulator inserts Parquet columns by position.
    """
    handle = tempfile.TemporaryFile(suffix=".parquet")
    writer = pq.ParquetWriter(handle, target, compression="zstd")
    rows = 0
    try:
        for path in paths:
            with FileSystems.open(path, compression_type="uncompressed") as source:
                parquet = pq.ParquetFile(source)
                for batch in parquet.iter_batches(batch_size=4096):
                    columns = []
                    for field in target:
                        if field.name in batch.schema.names:
                            columns.append(batch.column(field.name).cast(field.type))
                        else:
                            columns.append(pa.nulls(batch.num_rows, type=field.type))
                    writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=target))
                    rows += batch.num_rows
    finally:
        writer.close()
    handle.seek(0)
    return handle, rows


def _job_config():
    from google.cloud import bigquery

    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        create_disposition=bigquery.CreateDisposition.CREATE_NEVER,
    )
    # Without list inference BigQuery reads a Parquet list as a RECORD of `list.element`.
    config.parquet_options = bigquery.ParquetOptions()
    config.parquet_options.enable_list_inference = True
    return config


MAX_JOB_IDS = 8  # fixed load job ids tried per table before giving up: one per failed earlier job


def job_ids(*, table: str, dataset: str, job_key: str) -> list[str]:
    """The fixed load job ids for `table` of the run and attempt `job_key`, in the order they are
    tried: the first, then one more for each earlier job with that id that failed."""
    digest = hashlib.sha256(f"{dataset}|{table}|{job_key}".encode()).hexdigest()[:40]
    first = f"featurebeam_{table}_{digest}"
    return [first] + [f"{first}_{n}" for n in range(1, MAX_JOB_IDS)]


def _submit(client: "bigquery.Client", plan_: TablePlan, *, job_id: str | None, upload=None):
    """Start this table's load job: by URI for a run in a bucket, else an upload of `upload`."""
    ids = {"job_id": job_id} if job_id else {"job_id_prefix": f"featurebeam_{plan_.name}_"}
    if upload is None:
        # BigQuery reads the workers' shards in the bucket; Parquet columns match by name, and
        # the table's other runs' extractor columns stay NULL for this run's rows.
        return client.load_table_from_uri(plan_.pattern, plan_.table_id, job_config=_job_config(), **ids)
    upload.seek(0)
    # No size: the client uses a resumable upload (chunked, retried per chunk).
    return client.load_table_from_file(upload, plan_.table_id, job_config=_job_config(), **ids)


def _run_job(client: "bigquery.Client", plan_: TablePlan, *, job_key: str | None, upload=None) -> int | None:
    """Run the table's load job to its end; its output rows (None when BigQuery does not say)."""
    from google.api_core.exceptions import Conflict, GoogleAPICallError

    if job_key is None:
        job = _submit(client, plan_, job_id=None, upload=upload)
        job.result()
        return job.output_rows
    dataset = plan_.table_id.rsplit(".", 1)[0]
    for job_id in job_ids(table=plan_.name, dataset=dataset, job_key=job_key):
        try:
            job = _submit(client, plan_, job_id=job_id, upload=upload)
        except Conflict:  # an earlier try of this step submitted it: wait for that one
            job = client.get_job(job_id)
            try:
                job.result()
            except GoogleAPICallError:
                continue  # it failed, so it loaded nothing: the next id loads
            return job.output_rows
        job.result()
        return job.output_rows
    raise OutputError(
        f"{MAX_JOB_IDS} load jobs of {plan_.table_id} for this attempt failed; see them in BigQuery's job history "
        f"(ids {job_ids(table=plan_.name, dataset=dataset, job_key=job_key)[0]}*)"
    )


def _load(client: "bigquery.Client", plan_: TablePlan, *, job_key: str | None = None) -> int:
    if not plan_.files:
        return 0
    if plan_.pattern.startswith("gs://"):
        return int(_run_job(client, plan_, job_key=job_key) or 0)
    table = client.get_table(plan_.table_id)
    handle, rows = _aligned_file(plan_.files, tables.arrow_schema(table.schema))
    try:
        if rows:
            _run_job(client, plan_, job_key=job_key, upload=handle)
    finally:
        handle.close()
    return rows


def load_run(
    run_dir: str,
    *,
    dataset: str,
    client: "bigquery.Client | None" = None,
    location: str | None = None,
    rebuild: bool = False,
    frames: bool = False,
    job_key: str | None = None,
    max_bytes_billed: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Load a finished run's features, runs and errors tables into `dataset` ("project.dataset").

    run_dir: the run folder (local or gs://), holding run.json. client: a BigQuery client (default:
    `featurebeam.cloud.bigquery_client`, which honours BIGQUERY_EMULATOR_HOST). location: where
    to create the dataset if it is missing. rebuild / frames: (re)write `<run>/tables/` first,
    with frame-level arrays when `frames`; missing tables are always built. job_key: names the
    load jobs (see `job_ids`) so that repeating this call with the same key, while an earlier
    call's job still runs, waits for that job; None gives new job ids each time. max_bytes_billed:
    the ceiling on each statement's billed bytes (`--max_bytes_billed`; None: the default 10 GiB).

    Returns `{table: {"action": "loaded" | "skipped" | "empty", "rows": n, "seconds": s,
    "columns_added": [...]}}`. Raises SchemaError, before changing any table, when the run does
    not fit the existing tables.
    """
    project, name = parse_dataset(dataset)
    limit = billing.parse_bytes(max_bytes_billed)
    run_dir = run_dir.rstrip("/")
    run_json = metadata.join(run_dir, metadata.RUN_JSON)
    if not FileSystems.exists(run_json):
        raise OutputError(f"{run_dir} has no run.json, so it is not a finished run; finish it first (--mode=resume)")
    if rebuild or frames or not tables.files(run_dir)[tables.RUNS]:
        tables.rebuild(run_dir, frames=frames)
    run = metadata.read_json(run_json)
    dataset = f"{project}.{name}"
    try:
        client = client or cloud.bigquery_client(project=project, location=location)
        return _load_run(run_dir, run, dataset=dataset, client=client, job_key=job_key, limit=limit)
    except SchemaError as exc:
        raise SchemaError(f"{exc} The run itself is complete in {run_dir}.") from None
    except FeaturebeamError:
        raise
    except Exception as exc:  # credentials, network, API errors: say what to do, in one line
        from google.api_core.exceptions import GoogleAPICallError
        from google.auth.exceptions import GoogleAuthError

        if not isinstance(exc, (GoogleAPICallError, GoogleAuthError, OSError)):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise OutputError(
            f"loading run {run['run_id']} into BigQuery dataset {dataset} failed: {type(exc).__name__}: {first}. "
            f"The run itself is complete in {run_dir}; fix the cause (credentials, or BIGQUERY_EMULATOR_HOST for "
            f"the emulator) and retry with: python -m export.bigquery {run_dir} --bigquery_dataset={dataset}"
        ) from exc


def _load_run(
    run_dir: str, run: dict[str, Any], *, dataset: str, client: "bigquery.Client", limit: int, job_key: str | None = None
) -> dict[str, dict[str, Any]]:
    plans = plan(run_dir, dataset=dataset, client=client)  # raises before any change
    runs_plan = next(p for p in plans if p.name == tables.RUNS)
    if runs_plan.existing is not None:
        _same_run(client, runs_plan.table_id, run, limit=limit)
    client.create_dataset(dataset, exists_ok=True)
    for p in plans:
        if p.existing is None:
            _create(client, p)
        elif p.added or p.changes_description:
            _extend(client, p, limit=limit)

    report: dict[str, dict[str, Any]] = {}
    by_name = {p.name: p for p in plans}
    for table in LOAD_ORDER:
        p = by_name[table]
        clock = time.monotonic()
        entry: dict[str, Any] = {
            "table": p.table_id,
            "created": p.existing is None,
            "columns_added": [f.name for f in p.added] if p.existing is not None else [],
        }
        existing = _rows_of_run(client, p, run, limit=limit) if p.existing is not None else 0
        if existing:
            entry.update(action="skipped", rows=existing)
        else:
            rows = _load(client, p, job_key=job_key)
            entry.update(action="loaded" if rows else "empty", rows=rows)
        entry["seconds"] = round(time.monotonic() - clock, 3)
        report[table] = entry
    return report


def summary(report: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name in LOAD_ORDER:
        entry = report[name]
        added = f", added columns {', '.join(entry['columns_added'])}" if entry["columns_added"] else ""
        added += ", table created" if entry["created"] else ""
        what = {"loaded": "loaded", "skipped": "already loaded, skipped", "empty": "nothing to load"}[entry["action"]]
        lines.append(f"  {entry['table']}: {what} ({entry['rows']} rows, {entry['seconds']:.2f} s{added})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.bigquery",
        description="Load a finished run's features, runs and errors tables into BigQuery (idempotent).",
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", help="a run folder holding run.json, local or gs://")
    parser.add_argument("--bigquery_dataset", required=True, help="project.dataset to load into (created if missing)")
    parser.add_argument("--bigquery_frames", action="store_true", help="rebuild the tables with frame-level arrays first")
    parser.add_argument("--rebuild", action="store_true", help="rewrite <run>/tables/ from the run's shards first")
    parser.add_argument("--location", help="location for a new dataset, e.g. US or EU")
    parser.add_argument("--max_bytes_billed", help="ceiling on bytes billed per BigQuery query (bytes, or 500MB, 10GiB; default 10GiB)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = args.run_dir if "://" in args.run_dir else os.path.abspath(args.run_dir)
    try:
        report = load_run(
            run_dir,
            dataset=args.bigquery_dataset,
            location=args.location,
            rebuild=args.rebuild or args.bigquery_frames,
            frames=args.bigquery_frames,
            max_bytes_billed=billing.parse_bytes(args.max_bytes_billed),
        )
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(f"run {run_dir} in BigQuery dataset {args.bigquery_dataset}:")
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
