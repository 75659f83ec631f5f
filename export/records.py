"""One layout for every export: the row columns, and how rows become TFRecords and Parquet.

Every record carries the same identifying columns (BASE_COLUMNS) and one column per feature
output. In TFRecords, frame-level outputs are `SequenceExample` feature lists (one FloatList of
the per-frame values per frame) and everything else is context; a run with only clip-level
outputs writes plain `Example`s. In Parquet, a non-scalar output is a flat `list<float>` plus a
`<name>_shape` column, so pyarrow, pandas and DuckDB read it without a custom reader.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np

from export import example_proto
from featurebeam.deadletter import printable
from featurebeam.elements import FeatureRow
from features.base import OutputSpec, as_output

# name, kind ("bytes" | "int" | "float"), description
BASE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("key", "bytes", "stable record key: the item key, plus '#<start_sample>' for segments"),
    ("item_key", "bytes", "the listed item's stable key: its path relative to the dataset's root, or the manifest's key"),
    ("uri", "bytes", "where the audio was read from"),
    ("label", "bytes", "class label, empty when the dataset has none"),
    ("split", "bytes", "train/valid/test split, empty when the dataset has none"),
    ("metadata", "bytes", "further dataset columns as a JSON object"),
    ("start_sample", "int", "first sample of this record within the item, at sample_rate"),
    ("num_samples", "int", "samples in this record, at sample_rate"),
    ("segment_index", "int", "position of this record among its item's segments (0 for whole items)"),
    ("last_segment", "int", "1 for the item's final segment (and for whole items), else 0"),
    ("silent", "int", "1 when the record's peak amplitude is below 1e-6 (digital silence), else 0"),
    ("sample_rate", "int", "Hz the audio was resampled to before extraction"),
    ("source_sample_rate", "int", "Hz of the file as decoded"),
    ("source_channels", "int", "channels of the file as decoded (mixed down to mono)"),
    ("source_duration_seconds", "float", "duration of the whole file as decoded, in seconds"),
    ("content_id", "bytes", "fingerprint of the source object (size and generation or mtime); --reuse_from matches on it"),
)
SEQUENCE_STRUCT = "##SEQUENCE##"  # tfx-bsl's name for the struct that holds SequenceExample feature lists


def base_values(row: FeatureRow) -> dict[str, Any]:
    return {
        "key": row.key,  # keys are printable from listing on (AudioItem); only the uri keeps raw bytes
        "item_key": row.item_key,
        "uri": printable(row.uri),
        "label": row.label or "",
        "split": row.split or "",
        "metadata": json.dumps(dict(row.metadata), sort_keys=True, ensure_ascii=False),
        "start_sample": int(row.start_sample),
        "num_samples": int(row.num_samples),
        "segment_index": int(row.segment_index),
        "last_segment": int(row.last_segment),
        "silent": int(row.silent),
        "sample_rate": int(row.sample_rate),
        "source_sample_rate": int(row.source_sample_rate),
        "source_channels": int(row.source_channels),
        "source_duration_seconds": float(row.source_duration_seconds),
        "content_id": row.content_id,
    }


def is_sequence(specs: Iterable[OutputSpec]) -> bool:
    """Whether records are SequenceExamples (some output is frame-level)."""
    return any(spec.level == "frame" for spec in specs)


def to_tf_record(row: FeatureRow, specs: tuple[OutputSpec, ...]) -> bytes:
    """Serialize a row as a tf.train.SequenceExample (frame-level outputs) or tf.train.Example."""
    kinds = {name: kind for name, kind, _ in BASE_COLUMNS}
    context: dict[str, example_proto.Value] = {}
    for name, value in base_values(row).items():
        if kinds[name] == "bytes":
            context[name] = value.encode("utf-8")
        elif kinds[name] == "int":
            context[name] = [value]
        else:
            context[name] = np.array([value], dtype=np.float32)
    lists: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.dtype != "float32":
            _typed_tf_values(spec, row.features[spec.name], context, lists)
            continue
        array = np.asarray(row.features[spec.name], dtype=np.float32)
        if spec.level == "clip":
            context[spec.name] = array.ravel()
        else:
            lists[spec.name] = array
    if is_sequence(specs):
        return example_proto.sequence_example(context, lists)
    return example_proto.example(context)


def event_key(spec: OutputSpec, field: str) -> str:
    """The TFRecord feature holding field `field` of every event of `spec` (one list per field)."""
    return f"{spec.name}/{field}"


def _typed_tf_values(spec: OutputSpec, value: Any, context: dict, lists: dict) -> None:
    """A non-float32 output into TFRecord features: integers and bools as Int64Lists, float64 as
    FloatLists (TensorFlow's Example has no double), strings as a BytesList; events as one list per
    field (`<name>/<field>`), all the same length. Frame-level integers are a feature list of
    Int64Lists, one per frame."""
    if spec.dtype == "events":
        for field, kind in spec.fields:
            column = [event[field] for event in value]
            if kind == "string":
                context[event_key(spec, field)] = example_proto.BytesList(v.encode("utf-8") for v in column)
            elif kind == "int64":
                context[event_key(spec, field)] = np.asarray(column, dtype=np.int64)
            else:
                context[event_key(spec, field)] = np.asarray(column, dtype=np.float32)
        return
    if spec.dtype == "string":
        context[spec.name] = example_proto.BytesList(v.encode("utf-8") for v in np.asarray(value, dtype=object).ravel())
        return
    array = np.asarray(value)
    array = array.astype(np.float32) if spec.floating else array.astype(np.int64)
    if spec.level == "clip":
        context[spec.name] = array.ravel()
    else:
        lists[spec.name] = array


def _arrow_type(spec: OutputSpec):
    import pyarrow as pa

    if spec.dtype == "string":
        return pa.string()
    if spec.dtype == "events":
        types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
        return pa.struct([pa.field(name, types[kind]) for name, kind in spec.fields])
    return pa.from_numpy_dtype(np.dtype(spec.dtype))


def arrow_schema(specs: tuple[OutputSpec, ...]):
    """The pyarrow schema of the Parquet export, with column descriptions as field metadata."""
    import pyarrow as pa

    types = {"bytes": pa.string(), "int": pa.int64(), "float": pa.float64()}
    fields = [pa.field(name, types[kind], metadata={"description": text}) for name, kind, text in BASE_COLUMNS]
    for spec in specs:
        meta = {"description": spec.description, "level": spec.level, "shape": json.dumps(list(spec.shape))}
        if spec.dtype != "float32":
            meta["dtype"] = spec.dtype
            if spec.dtype == "events":
                fields.append(pa.field(spec.name, pa.list_(_arrow_type(spec)), metadata=meta))
            elif spec.level == "clip" and spec.shape == ():
                fields.append(pa.field(spec.name, _arrow_type(spec), metadata=meta))
            else:
                fields.append(pa.field(spec.name, pa.list_(_arrow_type(spec)), metadata=meta))
                fields.append(pa.field(f"{spec.name}_shape", pa.list_(pa.int64()), metadata={"description": f"shape of {spec.name}"}))
        elif spec.level == "clip" and spec.shape == ():
            fields.append(pa.field(spec.name, pa.float32(), metadata=meta))
        else:
            fields.append(pa.field(spec.name, pa.list_(pa.float32()), metadata=meta))
            fields.append(pa.field(f"{spec.name}_shape", pa.list_(pa.int64()), metadata={"description": f"shape of {spec.name}"}))
    return pa.schema(fields)


def to_parquet_row(row: FeatureRow, specs: tuple[OutputSpec, ...]) -> dict[str, Any]:
    """A row as a dict matching `arrow_schema(specs)`."""
    out = base_values(row)
    for spec in specs:
        if spec.dtype == "events":
            out[spec.name] = [dict(event) for event in row.features[spec.name]]
            continue
        if spec.dtype != "float32":
            array = np.asarray(row.features[spec.name], dtype=object if spec.dtype == "string" else spec.dtype)
            if spec.level == "clip" and spec.shape == ():
                out[spec.name] = array.item()
            else:
                out[spec.name] = list(array.ravel()) if spec.dtype == "string" else array.ravel()
                out[f"{spec.name}_shape"] = list(array.shape)
            continue
        array = np.asarray(row.features[spec.name], dtype=np.float32)
        if spec.level == "clip" and spec.shape == ():
            out[spec.name] = float(array)
        else:
            out[spec.name] = array.ravel()
            out[f"{spec.name}_shape"] = list(array.shape)
    return out


def row_from_parquet(record: dict[str, Any], specs: tuple[OutputSpec, ...], *, reused: tuple[str, ...]) -> FeatureRow:
    """A FeatureRow rebuilt from a Parquet record (what `--reuse_from` copies forward)."""
    return FeatureRow(
        key=record["key"],
        item_key=record["item_key"],
        uri=record["uri"],
        label=record["label"] or None,
        split=record["split"] or None,
        metadata=tuple(sorted(json.loads(record["metadata"] or "{}").items())),
        start_sample=record["start_sample"],
        segment_index=record["segment_index"],
        last_segment=bool(record["last_segment"]),
        silent=bool(record["silent"]),
        num_samples=record["num_samples"],
        sample_rate=record["sample_rate"],
        source_sample_rate=record["source_sample_rate"],
        source_channels=record["source_channels"],
        source_duration_seconds=record["source_duration_seconds"],
        features=from_parquet_row(record, specs),
        content_id=record["content_id"],
        reused=reused,
    )


def from_parquet_row(record: dict[str, Any], specs: tuple[OutputSpec, ...]) -> dict[str, np.ndarray]:
    """The feature arrays of one Parquet record, reshaped (the inverse of `to_parquet_row`)."""
    out = {}
    for spec in specs:
        if spec.dtype == "events":
            out[spec.name] = as_output(spec, list(record[spec.name] or ()))
        elif spec.dtype != "float32":
            value = record[spec.name]
            if not (spec.level == "clip" and spec.shape == ()):
                value = np.asarray(list(value) if spec.dtype == "string" else value, dtype=object if spec.dtype == "string" else spec.dtype)
                value = value.reshape(record[f"{spec.name}_shape"])
            out[spec.name] = as_output(spec, value)
        elif spec.level == "clip" and spec.shape == ():
            out[spec.name] = np.float32(record[spec.name])
        else:
            out[spec.name] = np.asarray(record[spec.name], dtype=np.float32).reshape(record[f"{spec.name}_shape"])
    return out
