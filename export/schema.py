"""The run's record schema as a tensorflow-metadata `Schema`, and TF parse specs derived from it.

Frame-level features sit in a STRUCT feature named `##SEQUENCE##`, tfx-bsl's convention for
SequenceExample feature lists, so TFX tools read the schema as they would their own. The schema
also carries tensor representations (its default `tensor_representation_group`), which tfx-bsl's
TensorFlow reader and tf.Transform require for SequenceExamples: a dense tensor of the feature's
shape for every context feature, and for every frame-level output a ragged tensor
`[batch, frames, values]` (each frame's prod(shape) values; `.to_tensor()` pads it dense).
"""

from __future__ import annotations

from typing import Any

from export.records import BASE_COLUMNS, SEQUENCE_STRUCT, event_key, is_sequence
from features.base import OutputSpec


def build_schema(specs: tuple[OutputSpec, ...]):
    """A `tensorflow_metadata.proto.v0.schema_pb2.Schema` describing the TFRecords."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema()
    types = {"bytes": schema_pb2.BYTES, "int": schema_pb2.INT, "float": schema_pb2.FLOAT}
    for name, kind, text in BASE_COLUMNS:
        feature = schema.feature.add(name=name, type=types[kind])
        feature.annotation.comment.append(text)
        feature.shape.SetInParent()  # a scalar: shape with no dims
        feature.presence.min_fraction = 1.0
    sequence = None
    if is_sequence(specs):
        sequence = schema.feature.add(name=SEQUENCE_STRUCT, type=schema_pb2.STRUCT)
        sequence.annotation.comment.append("frame-level features (SequenceExample feature lists)")
    for spec in specs:
        parent = sequence.struct_domain if spec.level == "frame" else schema
        if spec.dtype == "events":  # one variable-length list per field, all of the same length
            for field, kind in spec.fields:
                feature = parent.feature.add(name=event_key(spec, field), type=types[_EVENT_KINDS[kind]])
                feature.annotation.comment.append(f"field {field} of each event of {spec.name}: {spec.description}".rstrip(": "))
                feature.value_count.min = 0
            continue
        feature = parent.feature.add(name=spec.name, type=types[_kind(spec)])
        feature.annotation.comment.append(spec.description)
        if spec.variable:  # no shape: a variable-length list (parsed ragged)
            feature.value_count.min = 0
            feature.presence.min_fraction = 1.0
            continue
        feature.shape.SetInParent()
        for size in spec.shape:
            feature.shape.dim.add(size=size)
        feature.presence.min_fraction = 1.0
        if spec.level == "frame":
            feature.annotation.extra_metadata.add().Pack(_frame_rate_note(spec))
    _add_tensor_representations(schema, specs)
    return schema


_EVENT_KINDS = {"string": "bytes", "int64": "int", "float64": "float"}


def _kind(spec: OutputSpec) -> str:
    """The TFRecord list type of an output: "bytes", "int" or "float"."""
    if spec.dtype == "string":
        return "bytes"
    return "int" if spec.integral else "float"


def _add_tensor_representations(schema, specs: tuple[OutputSpec, ...]) -> None:
    group = schema.tensor_representation_group[""].tensor_representation
    for feature in schema.feature:
        if feature.name == SEQUENCE_STRUCT:
            continue
        if not feature.HasField("shape"):  # variable length: a ragged [batch, values] tensor
            group[feature.name].ragged_tensor.feature_path.step.append(feature.name)
            continue
        dense = group[feature.name].dense_tensor
        dense.column_name = feature.name
        dense.shape.CopyFrom(feature.shape)
    for spec in specs:
        if spec.level != "frame":
            continue
        ragged = group[spec.name].ragged_tensor
        # No partition: each frame is one FloatList of prod(shape) values, so the tensor is
        # [batch, frames, values]; a uniform_row_length partition would only add a dimension of 1
        # ([batch, frames, 1, values]), as tf.io.RaggedFeature partitions the values within a frame.
        ragged.feature_path.step.extend([SEQUENCE_STRUCT, spec.name])


def _frame_rate_note(spec: OutputSpec):
    from google.protobuf import struct_pb2

    note = struct_pb2.Struct()
    note.update({"frame_rate": spec.frame_rate, "hop_length": spec.hop_length, "sample_rate": spec.sample_rate})
    return note


def to_pbtxt(schema) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(schema)


def from_pbtxt(text: str):
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    return text_format.Parse(text, schema_pb2.Schema())


def parse_specs(schema) -> tuple[dict[str, Any], dict[str, Any]]:
    """(context spec, sequence spec) for `tf.io.parse_sequence_example` / `parse_example`.

    The sequence spec is empty for Example records.
    """
    import tensorflow as tf
    from tensorflow_metadata.proto.v0 import schema_pb2

    dtypes = {schema_pb2.BYTES: tf.string, schema_pb2.INT: tf.int64, schema_pb2.FLOAT: tf.float32}
    context, sequence = {}, {}
    for feature in schema.feature:
        if feature.type == schema_pb2.STRUCT:
            for inner in feature.struct_domain.feature:
                shape = [dim.size for dim in inner.shape.dim]
                sequence[inner.name] = tf.io.FixedLenSequenceFeature(shape if shape else [1], dtypes[inner.type])
            continue
        if not feature.HasField("shape"):  # variable length (and each field of events)
            context[feature.name] = tf.io.RaggedFeature(dtypes[feature.type], row_splits_dtype=tf.int64)
            continue
        shape = [dim.size for dim in feature.shape.dim]
        context[feature.name] = tf.io.FixedLenFeature(shape, dtypes[feature.type])
    return context, sequence
