"""The run's analysis tables, `features`, `runs` and `errors`, as Parquet shards in `<run>/tables/<name>/`.

These are the tables SQL sees, locally (DuckDB over `tables/*/part-*.parquet`, see `export.query`) and in
BigQuery (`export.bigquery` loads these very files). Their schemas are written once, here, as
BigQuery `SchemaField`s with descriptions; the Arrow schemas of the Parquet files are derived from
them, so a column has the same name and type in both places (FLOAT64 is DOUBLE, ARRAY<FLOAT64> is
DOUBLE[], STRUCT is STRUCT, TIMESTAMP is TIMESTAMPTZ in DuckDB).

- `features`: one row per record. The identifying columns, then one STRUCT per extractor named
  after it: for each frame-level output `<out>_mean` and `<out>_std` over the record's frames
  (FLOAT64 for per-frame scalars, else ARRAY<FLOAT64> flattened row-major), clip-level outputs as
  they are. With `frames=True` a `<extractor>_frames` STRUCT also holds every frame of each
  frame-level output, flattened `[frames, *shape]` row-major. Each shard is computed by the worker
  that commits the matching Parquet shard, from the same rows (frames trimmed to each record).
- `runs`: one row, run.json in typed columns plus the raw JSON.
- `errors`: the run's dead letters, one shard per committed errors shard.

Every file carries its BigQuery schema and the extractors' versions and output shapes in its
Parquet metadata, so a loader never needs the code that wrote it.
"""

from __future__ import annotations

import datetime
import io
import json
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from google.cloud.bigquery import SchemaField

from export import formats, metadata
from export.records import BASE_COLUMNS
from featurebeam.errors import OutputError

TABLES_DIR = "tables"
FEATURES, RUNS, ERRORS = "features", "runs", "errors"
TABLE_NAMES = (FEATURES, RUNS, ERRORS)
FRAMES_SUFFIX = "_frames"

# Parquet key-value metadata written into every table file.
META_SCHEMA = b"featurebeam.bigquery_schema"  # [SchemaField.to_api_repr(), ...]
META_SIGNATURE = b"featurebeam.extractors"  # {extractor: {"version": v, "outputs": {out: {level, shape}}}}
META_RUN_ID = b"featurebeam.run_id"

TABLE_DESCRIPTIONS = {
    FEATURES: "featurebeam features: one row per record (clip or segment) and run, with one STRUCT "
    "per extractor holding its per-record summary (mean/std over frames of frame-level outputs, "
    "clip-level outputs as computed).",
    RUNS: "featurebeam runs: one row per extraction run, run.json in typed columns plus the raw JSON.",
    ERRORS: "featurebeam errors: the dead-letter records of each run (items or segments that failed).",
}


def _field(name: str, kind: str, description: str, *, mode: str = "NULLABLE", fields: Sequence[SchemaField] = ()) -> SchemaField:
    return SchemaField(name, kind, mode=mode, description=description, fields=tuple(fields))


def _json(description: str) -> str:
    return f"{description} (a JSON string)"


_RECORD_DESCRIPTIONS = dict((name, text) for name, _, text in BASE_COLUMNS)

FEATURES_BASE: tuple[SchemaField, ...] = (
    _field("key", "STRING", _RECORD_DESCRIPTIONS["key"], mode="REQUIRED"),
    _field("item_key", "STRING", _RECORD_DESCRIPTIONS["item_key"], mode="REQUIRED"),
    _field("uri", "STRING", _RECORD_DESCRIPTIONS["uri"]),
    _field("run_id", "STRING", "the run that computed this row (runs.run_id)", mode="REQUIRED"),
    _field("run_date", "DATE", "UTC date the run started; the partitioning column", mode="REQUIRED"),
    _field("label", "STRING", _RECORD_DESCRIPTIONS["label"]),
    _field("split", "STRING", _RECORD_DESCRIPTIONS["split"]),
    _field("metadata", "STRING", _json("further dataset columns of the item")),
    _field("start_sample", "INT64", _RECORD_DESCRIPTIONS["start_sample"]),
    _field("num_samples", "INT64", _RECORD_DESCRIPTIONS["num_samples"]),
    _field("segment_index", "INT64", "position of this record among its item's segments (0 for whole items)"),
    _field("silent", "BOOL", "true when the record's peak amplitude is below 1e-6 (digital silence)"),
    _field("sample_rate", "INT64", _RECORD_DESCRIPTIONS["sample_rate"]),
    _field("source_sample_rate", "INT64", _RECORD_DESCRIPTIONS["source_sample_rate"]),
    _field("source_channels", "INT64", _RECORD_DESCRIPTIONS["source_channels"]),
    _field("source_duration_seconds", "FLOAT64", _RECORD_DESCRIPTIONS["source_duration_seconds"]),
    _field("content_id", "STRING", "fingerprint of the source object (size and generation or mtime)"),
)

RUNS_SCHEMA: tuple[SchemaField, ...] = (
    _field("run_id", "STRING", "run folder name, unique per dataset", mode="REQUIRED"),
    _field("run_date", "DATE", "UTC date the run started (features.run_date)", mode="REQUIRED"),
    _field("started", "TIMESTAMP", "when the run was planned"),
    _field("finished", "TIMESTAMP", "when run.json was written"),
    _field("wall_seconds", "FLOAT64", "wall time of the run, in seconds"),
    _field("featurebeam_version", "STRING", "featurebeam package version"),
    _field("git_commit", "STRING", "commit of the featurebeam checkout, '-dirty' with local changes"),
    _field("config_hash", "STRING", "hash of the resolved config (features, audio, dataset)"),
    _field("config", "STRING", _json("the resolved run config")),
    _field("sample_rate", "INT64", "Hz every item was resampled to"),
    _field("segment_seconds", "FLOAT64", "window length items were cut into, NULL for whole items"),
    _field(
        "dataset",
        "RECORD",
        "the dataset the run read",
        fields=(
            _field("name", "STRING", "dataset name"),
            _field("type", "STRING", "dataset adapter class"),
            _field("uri", "STRING", "where the dataset was listed from"),
            _field("version", "STRING", "dataset version, if it has one"),
            _field("fingerprint", "STRING", "hash of the listing (URIs, sizes, keys)"),
            _field("spec", "STRING", _json("the adapter's full description")),
        ),
    ),
    _field("listed", "INT64", "items listed"),
    _field("ok", "INT64", "items with every record extracted"),
    _field("failed", "INT64", "items or segments that became dead letters"),
    _field("partial", "INT64", "items with some segments written and some failed"),
    _field("records", "INT64", "rows written (records: clips or segments)"),
    _field("audio_seconds", "FLOAT64", "seconds of audio in the written records"),
    _field(
        "extractors",
        "RECORD",
        "extractor specs of the run",
        mode="REPEATED",
        fields=(
            _field("name", "STRING", "extractor name (features.<name> column)"),
            _field("version", "STRING", "extractor version"),
            _field("config", "STRING", _json("extractor config, defaults filled in")),
            _field(
                "outputs",
                "RECORD",
                "the extractor's outputs",
                mode="REPEATED",
                fields=(
                    _field("name", "STRING", "output name"),
                    _field("level", "STRING", "frame or clip"),
                    _field("shape", "INT64", "per-frame (frame level) or per-record (clip level) shape", mode="REPEATED"),
                    _field("frame_rate", "FLOAT64", "frames per second, for frame-level outputs"),
                    _field("description", "STRING", "what the output holds, with units"),
                ),
            ),
        ),
    ),
    _field("labels", "STRING", "sorted label vocabulary", mode="REPEATED"),
    _field(
        "label_counts",
        "RECORD",
        "records per label",
        mode="REPEATED",
        fields=(_field("label", "STRING", "label"), _field("records", "INT64", "records with this label")),
    ),
    _field(
        "split_counts",
        "RECORD",
        "records per split",
        mode="REPEATED",
        fields=(_field("split", "STRING", "split"), _field("records", "INT64", "records in this split")),
    ),
    _field(
        "failure_reasons",
        "RECORD",
        "dead letters grouped by '<stage>: <reason>', most frequent first",
        mode="REPEATED",
        fields=(
            _field("reason", "STRING", "'<stage>: <reason code>'"),
            _field("occurrences", "INT64", "dead letters with this reason"),
            _field("example", "STRING", "one message with this reason"),
        ),
    ),
    _field(
        "outputs",
        "RECORD",
        "where the run's files are",
        fields=(
            _field("run_dir", "STRING", "the run folder"),
            _field("tfrecords", "STRING", "file pattern of the TFRecord shards", mode="REPEATED"),
            _field("parquet", "STRING", "file pattern of the Parquet shards", mode="REPEATED"),
            _field("errors", "STRING", "file pattern of the dead-letter JSONL shards", mode="REPEATED"),
            _field("features_json", "STRING", "features.json"),
            _field("schema", "STRING", "schema.pbtxt"),
            _field("tables", "STRING", "folder of the features/runs/errors Parquet tables"),
        ),
    ),
    _field("reuse", "STRING", _json("what --reuse_from carried forward from an earlier run, NULL without it")),
    _field("runner", "STRING", "Beam runner"),
    _field("beam_version", "STRING", "Apache Beam version"),
    _field("beam_options", "STRING", _json("Beam pipeline options set for the run")),
    _field("run_json", "STRING", _json("run.json as written")),
)

ERRORS_SCHEMA: tuple[SchemaField, ...] = (
    _field("run_id", "STRING", "the run (runs.run_id)", mode="REQUIRED"),
    _field("run_date", "DATE", "UTC date the run started; the partitioning column", mode="REQUIRED"),
    _field("key", "STRING", "the failed item's key, or the record key for a failed segment"),
    _field("uri", "STRING", "where the item was read from"),
    _field("stage", "STRING", "list, read, decode, condition, extract or export"),
    _field("reason", "STRING", "short stable reason code (empty, undecodable, non_finite, ...)"),
    _field("error_type", "STRING", "exception class name"),
    _field("message", "STRING", "the error message, naming the item and the reason"),
    _field("extractors", "STRING", "'name@version' of the run's extractors", mode="REPEATED"),
)

# How BigQuery lays the tables out (used when export.bigquery creates them).
PARTITION_FIELD = {FEATURES: "run_date", ERRORS: "run_date"}
CLUSTERING = {FEATURES: ["run_id", "key"], RUNS: ["run_id"], ERRORS: ["run_id", "stage"]}


# --- schema -> Arrow ---------------------------------------------------------------------------

_ARROW_TYPES = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "INTEGER": pa.int64(),
    "FLOAT64": pa.float64(),
    "FLOAT": pa.float64(),
    "BOOL": pa.bool_(),
    "BOOLEAN": pa.bool_(),
    "DATE": pa.date32(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}


def arrow_field(field: SchemaField) -> pa.Field:
    """The Arrow field of a BigQuery field: REPEATED is a list, RECORD a struct, REQUIRED non-null."""
    if field.field_type in ("RECORD", "STRUCT"):
        kind = pa.struct([arrow_field(f) for f in field.fields])
    elif field.field_type in _ARROW_TYPES:
        kind = _ARROW_TYPES[field.field_type]
    else:
        raise OutputError(f"column {field.name}: BigQuery type {field.field_type} has no Arrow mapping in export/tables.py")
    if field.mode == "REPEATED":
        kind = pa.list_(kind)
    meta = {"description": field.description} if field.description else None
    return pa.field(field.name, kind, nullable=field.mode != "REQUIRED", metadata=meta)


def arrow_schema(fields: Sequence[SchemaField]) -> pa.Schema:
    return pa.schema([arrow_field(f) for f in fields])


# --- features schema from the run's extractors -------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "scalar" if not shape else "[" + ", ".join(str(n) for n in shape) + "]"


def _value_field(name: str, shape: Sequence[int], description: str) -> SchemaField:
    if shape:
        flat = f" (shape {_shape_text(shape)}" + (", flattened row-major)" if len(shape) > 1 else ")")
        return _field(name, "FLOAT64", description + flat, mode="REPEATED")
    return _field(name, "FLOAT64", description)


_BIGQUERY_TYPES = {"string": "STRING", "int64": "INT64", "float64": "FLOAT64"}


def _typed_field(out: dict[str, Any], text: str) -> SchemaField:
    """The column of a clip-level output that is not float32: its own type (INT64, BOOL, FLOAT64,
    STRING), REPEATED when it has dimensions (variable-length ones too, flattened row-major), and
    events as a REPEATED RECORD of their fields."""
    dtype, shape = out["dtype"], tuple(out["shape"])
    if dtype == "events":
        fields = [_field(f, _BIGQUERY_TYPES[kind], f"event field {f}") for f, kind in out["fields"]]
        return _field(out["name"], "RECORD", text + " (one entry per event)", mode="REPEATED", fields=fields)
    if dtype == "string":
        kind = "STRING"
    elif dtype == "bool":
        kind = "BOOL"
    else:
        kind = "FLOAT64" if np.dtype(dtype).kind == "f" else "INT64"
    if shape:
        flat = f" (shape {_shape_text(shape)}" + (", flattened row-major)" if len(shape) > 1 else ")")
        return _field(out["name"], kind, text + flat, mode="REPEATED")
    return _field(out["name"], kind, text)


def extractor_fields(extractor: dict[str, Any], *, frames: bool = False) -> list[SchemaField]:
    """The features-table columns of one extractor (an entry of run.json's `extractors`)."""
    name = extractor["name"]
    summary: list[SchemaField] = []
    framewise: list[SchemaField] = []
    for out in extractor["outputs"]:
        shape, text = tuple(out["shape"]), out.get("description") or out["name"]
        if out["level"] != "frame" and out.get("dtype", "float32") != "float32":
            summary.append(_typed_field(out, text))
        elif out["level"] == "frame":
            summary.append(_value_field(f"{out['name']}_mean", shape, f"mean over the record's frames of: {text}"))
            summary.append(_value_field(f"{out['name']}_std", shape, f"standard deviation (ddof=0) over the record's frames of: {text}"))
            framewise.append(
                _field(
                    out["name"],
                    "FLOAT64",
                    f"every frame of: {text}; [frames, {_shape_text(shape)}] flattened row-major",
                    mode="REPEATED",
                )
            )
        else:
            summary.append(_value_field(out["name"], shape, text))
    fields = [_field(name, "RECORD", f"per-record summary of the {name} extractor's outputs", fields=summary)]
    if frames and framewise:
        fields.append(_field(name + FRAMES_SUFFIX, "RECORD", f"frame-level outputs of the {name} extractor", fields=framewise))
    return fields


def signature(extractors: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Each extractor's version and output levels and shapes: what a column's type cannot show."""
    return {
        e["name"]: {
            "version": str(e["version"]),
            "outputs": {o["name"]: _signature_of(o) for o in e["outputs"]},
        }
        for e in extractors
    }


def _signature_of(out: dict[str, Any]) -> dict[str, Any]:
    """An output's level and shape, and its dtype (and event fields) when it is not float32."""
    entry = {"level": out["level"], "shape": list(out["shape"])}
    if out.get("dtype", "float32") != "float32":
        entry["dtype"] = out["dtype"]
        if out.get("fields"):
            entry["fields"] = [list(pair) for pair in out["fields"]]
    return entry


def features_schema(extractors: Sequence[dict[str, Any]], *, frames: bool = False) -> tuple[SchemaField, ...]:
    fields = list(FEATURES_BASE)
    for extractor in extractors:
        fields.extend(extractor_fields(extractor, frames=frames))
    names = [f.name for f in fields]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise OutputError(
            f"extractor column {clash[0]!r} clashes with another column of the features table; "
            "rename the extractor (its name becomes a column)"
        )
    return tuple(fields)


# --- rows --------------------------------------------------------------------------------------


def _timestamp(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def run_date(run: dict[str, Any]) -> datetime.date:
    return _timestamp(run["started"]).date()


def _fixed_lists(values: np.ndarray, *, width: int, valid: np.ndarray) -> pa.Array:
    """`values [n, width]` as a list<double> array, null where `valid` is false."""
    n = values.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float64()), mask=pa.array(~valid))


def _frame_stats(column: pa.ChunkedArray, *, shape: Sequence[int], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over frames of each row of a flat list<float> column of `[frames, *shape]` values.

    Returns `(mean [n, width], std [n, width], valid [n])` in float64; a row without frames is invalid.
    One pass over all values with `np.add.reduceat`, not a loop over rows.
    """
    width = int(np.prod(shape)) if shape else 1
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = np.asarray(array.value_lengths().fill_null(0), dtype=np.int64)
    if np.any(lengths % width):
        row = int(np.flatnonzero(lengths % width)[0])
        raise OutputError(f"Parquet column {name}: row {row} holds {lengths[row]} values, not a multiple of its frame size {width}")
    values = np.asarray(array.flatten().cast(pa.float64()), dtype=np.float64).reshape(-1, width)
    frames = lengths // width
    valid = frames > 0
    starts = np.concatenate([[0], np.cumsum(frames)[:-1]])[valid]
    mean = np.full((len(frames), width), np.nan)
    std = np.full((len(frames), width), np.nan)
    if valid.any():
        counts = frames[valid][:, None]
        mean[valid] = np.add.reduceat(values, starts, axis=0) / counts
        centred = values - np.repeat(mean[valid], frames[valid], axis=0)
        std[valid] = np.sqrt(np.add.reduceat(centred * centred, starts, axis=0) / counts)
    return mean, std, valid


def features_table(
    shard: pa.Table,
    *,
    schema: pa.Schema,
    run_id: str,
    started: str,
    extractors: Sequence[dict[str, Any]],
    frames: bool = False,
) -> pa.Table:
    """The features-table rows of one committed Parquet shard (computed by the worker that wrote it)."""
    n = shard.num_rows
    columns: dict[str, pa.Array] = {
        "run_id": pa.array([run_id] * n, type=pa.string()),
        "run_date": pa.array([_timestamp(started).date()] * n, type=pa.date32()),
        "silent": pa.array(np.asarray(shard["silent"]) != 0),
    }
    for field in FEATURES_BASE:
        if field.name in columns:
            continue
        if field.name in shard.column_names:
            columns[field.name] = shard[field.name].cast(_ARROW_TYPES[field.field_type]).combine_chunks()
        else:  # a shard written before the column existed
            columns[field.name] = pa.nulls(n, type=_ARROW_TYPES[field.field_type])
    for extractor in extractors:
        summary: dict[str, pa.Array] = {}
        framewise: dict[str, pa.Array] = {}
        kind = schema.field(extractor["name"]).type
        for out in extractor["outputs"]:
            name, shape = out["name"], tuple(out["shape"])
            if out["level"] != "frame" and out.get("dtype", "float32") != "float32":
                summary[name] = shard[name].cast(kind.field(name).type).combine_chunks()
            elif out["level"] == "frame":
                mean, std, valid = _frame_stats(shard[name], shape=shape, name=name)
                for stat, values in (("mean", mean), ("std", std)):
                    if shape:
                        summary[f"{name}_{stat}"] = _fixed_lists(values, width=values.shape[1], valid=valid)
                    else:
                        summary[f"{name}_{stat}"] = pa.array(values[:, 0], mask=~valid, type=pa.float64())
                if frames:  # the per-frame columns are written only for --bigquery_frames
                    framewise[name] = shard[name].cast(pa.list_(pa.float64())).combine_chunks()
            elif shape:
                summary[name] = shard[name].cast(pa.list_(pa.float64())).combine_chunks()
            else:
                summary[name] = shard[name].cast(pa.float64()).combine_chunks()
        kind = schema.field(extractor["name"]).type
        columns[extractor["name"]] = pa.StructArray.from_arrays([summary[f.name] for f in kind], fields=list(kind))
        if frames and framewise:
            kind = schema.field(extractor["name"] + FRAMES_SUFFIX).type
            columns[extractor["name"] + FRAMES_SUFFIX] = pa.StructArray.from_arrays(
                [framewise[f.name] for f in kind], fields=list(kind)
            )
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _patterns(entry: Any) -> list[str]:
    """run.json's `{"pattern": ..., "files": n, "bytes": b}` (or an older run's list of files) as patterns."""
    if isinstance(entry, dict):
        return [entry["pattern"]]
    return list(entry or [])


def runs_row(run: dict[str, Any], *, run_json: str, tables_dir: str) -> dict[str, Any]:
    """run.json as one row of the runs table."""
    dataset = run.get("dataset", {})
    config = run.get("config", {})
    counts = run.get("counts", {})
    outputs = run.get("outputs", {})
    beam = run.get("beam", {})
    return {
        "run_id": run["run_id"],
        "run_date": run_date(run),
        "started": _timestamp(run.get("started")),
        "finished": _timestamp(run.get("finished")),
        "wall_seconds": run.get("wall_seconds"),
        "featurebeam_version": run.get("featurebeam_version"),
        "git_commit": run.get("git_commit"),
        "config_hash": run.get("config_hash"),
        "config": json.dumps(config, sort_keys=True),
        "sample_rate": config.get("sample_rate"),
        "segment_seconds": config.get("segment_seconds"),
        "dataset": {
            "name": dataset.get("name"),
            "type": dataset.get("type"),
            "uri": dataset.get("uri"),
            "version": None if dataset.get("version") is None else str(dataset["version"]),
            "fingerprint": dataset.get("fingerprint"),
            "spec": json.dumps(dataset, sort_keys=True),
        },
        "listed": counts.get("listed"),
        "ok": counts.get("ok"),
        "failed": counts.get("failed"),
        "partial": counts.get("partial"),
        "records": counts.get("records"),
        "audio_seconds": run.get("audio_seconds"),
        "extractors": [
            {
                "name": e["name"],
                "version": str(e["version"]),
                "config": json.dumps(e.get("config", {}), sort_keys=True),
                "outputs": [
                    {
                        "name": o["name"],
                        "level": o["level"],
                        "shape": list(o["shape"]),
                        "frame_rate": o.get("frame_rate"),
                        "description": o.get("description"),
                    }
                    for o in e["outputs"]
                ],
            }
            for e in run.get("extractors", [])
        ],
        "labels": list(run.get("labels", [])),
        "label_counts": [{"label": k, "records": v} for k, v in run.get("label_counts", {}).items()],
        "split_counts": [{"split": k, "records": v} for k, v in run.get("split_counts", {}).items()],
        "failure_reasons": [
            {"reason": r["reason"], "occurrences": r["count"], "example": r.get("example")}
            for r in run.get("failures", {}).get("reasons", [])
        ],
        "outputs": {
            "run_dir": outputs.get("run_dir"),
            "tfrecords": _patterns(outputs.get("tfrecords")),
            "parquet": _patterns(outputs.get("parquet")),
            "errors": _patterns(outputs.get("errors")),
            "features_json": outputs.get("features_json"),
            "schema": outputs.get("schema"),
            "tables": tables_dir,
        },
        "reuse": None if run.get("reuse") is None else json.dumps(run["reuse"], sort_keys=True, default=str),
        "runner": beam.get("runner"),
        "beam_version": beam.get("version"),
        "beam_options": json.dumps(beam.get("options", {}), sort_keys=True, default=str),
        "run_json": run_json,
    }


def error_rows(dead_letters: Iterable[dict[str, Any]], *, run_id: str, started: str) -> Iterator[dict[str, Any]]:
    """Dead letters (as dicts) as rows of the errors table."""
    date = _timestamp(started).date()
    for dead in dead_letters:
        yield {
            "run_id": run_id,
            "run_date": date,
            "key": dead.get("key"),
            "uri": dead.get("uri"),
            "stage": dead.get("stage"),
            "reason": dead.get("reason") or dead.get("error_type"),
            "error_type": dead.get("error_type"),
            "message": dead.get("message"),
            "extractors": list(dead.get("extractors", [])),
        }


# --- writing -----------------------------------------------------------------------------------
#
# Each table is a folder of Parquet shards: workers write `features/part-<gid>.parquet` and
# `errors/part-<gid>.parquet` beside the commits they summarise (export/commit.py), and the
# final step writes `runs/part-00000.parquet`. Nothing reads the run's shards to build them.


def folder(run_dir: str, name: str) -> str:
    return metadata.join(run_dir, TABLES_DIR, name)


def paths(run_dir: str) -> dict[str, str]:
    """`{table name: file pattern of its Parquet shards}` for a run folder."""
    return {name: metadata.join(folder(run_dir, name), "part-*.parquet") for name in TABLE_NAMES}


def files(run_dir: str) -> dict[str, list[str]]:
    """`{table name: its Parquet shard files}` (listing the run's tables/ folder)."""
    return {name: metadata.matching(pattern) for name, pattern in paths(run_dir).items()}


def runs_file(run_dir: str) -> str:
    return metadata.join(folder(run_dir, RUNS), "part-00000.parquet")


def _meta(schema: Sequence[SchemaField], *, run_id: str, extractors: Sequence[dict[str, Any]]) -> dict[bytes, bytes]:
    return {
        META_SCHEMA: json.dumps([f.to_api_repr() for f in schema]).encode("utf-8"),
        META_SIGNATURE: json.dumps(signature(extractors), sort_keys=True).encode("utf-8"),
        META_RUN_ID: run_id.encode("utf-8"),
    }


def table_bytes(table: pa.Table, fields: Sequence[SchemaField], *, run_id: str, extractors: Sequence[dict[str, Any]] = ()) -> bytes:
    """One table shard as Parquet bytes, carrying its BigQuery schema and extractor signature."""
    schema = table.schema.with_metadata({**(table.schema.metadata or {}), **_meta(fields, run_id=run_id, extractors=extractors)})
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(schema.metadata), sink, compression="zstd")
    return sink.getvalue()


def errors_table_bytes(dead_letters: Sequence[dict[str, Any]], *, run_id: str, started: str) -> bytes:
    schema = arrow_schema(ERRORS_SCHEMA)
    table = pa.Table.from_pylist(list(error_rows(dead_letters, run_id=run_id, started=started)), schema=schema)
    return table_bytes(table, ERRORS_SCHEMA, run_id=run_id)


def runs_table_bytes(run: dict[str, Any], *, run_json: str, run_dir: str) -> bytes:
    schema = arrow_schema(RUNS_SCHEMA)
    row = runs_row(run, run_json=run_json, tables_dir=metadata.join(run_dir, TABLES_DIR))
    return table_bytes(pa.Table.from_pylist([row], schema=schema), RUNS_SCHEMA, run_id=run["run_id"], extractors=run.get("extractors", []))


def _read_parquet(path: str) -> pa.Table:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return pq.read_table(io.BytesIO(handle.read()))


def rebuild(run_dir: str, *, frames: bool = False) -> dict[str, str]:
    """Rewrite the features and errors table shards of a finished run from its data shards.

    A repair tool (`python -m export.bigquery --rebuild`, or `frames=True` to add every frame of
    frame-level outputs), not part of a run: it reads every Parquet and errors shard in this
    process. The runs table is rewritten from run.json as it is.
    """
    from export import commit

    run_json = metadata.join(run_dir, metadata.RUN_JSON)
    if not FileSystems.exists(run_json):
        raise OutputError(f"{run_dir} has no run.json, so it is not a finished run; finish it first (--mode=resume)")
    run = metadata.read_json(run_json)
    formats.require(run, formats.PARQUET, run_dir=run_dir, what="rebuilding the features table",
                    fix="its tables/features/ shards were written by the run itself; rerun with --formats=tfrecord,parquet to rebuild them")
    extractors = run["extractors"]
    fields = features_schema(extractors, frames=frames)
    schema = arrow_schema(fields)
    for path in metadata.matching(commit.pattern(run_dir, "parquet")):
        gid = path.rsplit("/", 1)[1].removeprefix("part-").split(".", 1)[0]
        table = features_table(_read_parquet(path), schema=schema, run_id=run["run_id"], started=run["started"],
                               extractors=extractors, frames=frames)
        commit._write_file(metadata.join(run_dir, commit.shard_name("features_table", gid)),
                           table_bytes(table, fields, run_id=run["run_id"], extractors=extractors))
    for path in metadata.matching(commit.pattern(run_dir, "errors")):
        gid = path.rsplit("/", 1)[1].removeprefix("part-").split(".", 1)[0]
        dead = [json.loads(line) for line in metadata.read_text(path).splitlines() if line.strip()]
        commit._write_file(metadata.join(run_dir, commit.shard_name("errors_table", gid)),
                           errors_table_bytes(dead, run_id=run["run_id"], started=run["started"]))
    metadata.write_atomic(runs_file(run_dir), runs_table_bytes(run, run_json=metadata.read_text(run_json), run_dir=run_dir))
    return paths(run_dir)


def read_schema(path: str) -> tuple[tuple[SchemaField, ...], dict[str, Any]]:
    """The BigQuery schema and extractor signature stored in a table file's Parquet metadata."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        meta = pq.read_schema(handle).metadata or {}  # reads the footer only
    if META_SCHEMA not in meta:
        raise OutputError(f"{path} carries no featurebeam schema; rebuild the tables with python -m export.bigquery --rebuild")
    fields = tuple(SchemaField.from_api_repr(f) for f in json.loads(meta[META_SCHEMA]))
    return fields, json.loads(meta.get(META_SIGNATURE, b"{}"))


def table_schema(run: dict[str, Any], name: str, *, frames: bool = False) -> tuple[SchemaField, ...]:
    """The schema a table of `run` has when it holds no shard to read it from."""
    if name == FEATURES:
        return features_schema(run.get("extractors", []), frames=frames)
    return RUNS_SCHEMA if name == RUNS else ERRORS_SCHEMA
