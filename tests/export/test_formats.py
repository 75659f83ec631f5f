"""export/formats.py: flag parsing, one-line errors, and a write-then-read round trip per codec."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export import formats
from featurebeam.errors import ConfigError, OutputError


def test_defaults_are_both_formats_with_the_measured_codecs():
    chosen = formats.parse()
    assert chosen.formats == ("tfrecord", "parquet")
    assert chosen.describe() == {"formats": ["tfrecord", "parquet"], "tfrecord_compression": "none", "parquet_compression": "zstd:1"}
    assert chosen.tfrecord_ending == ".tfrecord" and chosen.tf_compression_type == ""


def test_formats_are_kept_in_canonical_order_and_round_trip_through_json():
    chosen = formats.parse(formats="Parquet, tfrecord", tfrecord_compression="none", parquet_compression="gzip:9")
    assert chosen.formats == ("tfrecord", "parquet")
    assert chosen.tfrecord_ending == ".tfrecord" and chosen.tf_compression_type == ""
    assert formats.ExportFormats.from_json(chosen.describe()) == chosen
    assert formats.parse(formats="parquet").formats == ("parquet",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": "tfrecord,csv"}, "unknown format 'csv'; choose from tfrecord,parquet,tfds"),
        ({"formats": ","}, "--formats is empty"),
        ({"tfrecord_compression": "zstd"}, "--tfrecord_compression='zstd': unknown codec 'zstd'; choose one of none, gzip[:level]"),
        ({"tfrecord_compression": "gzip:0"}, "gzip levels are 1..9, got '0'"),
        ({"parquet_compression": "snappy:3"}, "snappy takes no level; pass --parquet_compression=snappy"),
        ({"parquet_compression": "zstd:x"}, "zstd levels are 1..22, got 'x'"),
    ],
)
def test_bad_flags_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as info:
        formats.parse(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_run_json_without_export_is_an_older_run_with_both_formats():
    assert formats.of_run({}).describe() == formats.LEGACY


def test_require_names_the_missing_format_and_the_fix():
    run = {"export": formats.parse(formats="parquet").describe()}
    with pytest.raises(OutputError) as info:
        formats.require(run, formats.TFRECORD, run_dir="runs/x/y", what="the TFRecord loader")
    message = str(info.value)
    assert "run runs/x/y has no TFRecords" in message and "--formats=parquet" in message
    assert message.endswith("rerun it with --formats=tfrecord,parquet") and "\n" not in message
    assert formats.require(run, formats.PARQUET, run_dir="runs/x/y", what="x").writes("parquet")


@pytest.mark.parametrize("codec", ["none", "gzip", "gzip:1", "gzip:9"])
def test_tfrecord_bytes_round_trip(codec):
    chosen = formats.parse(tfrecord_compression=codec)
    records = [b"first", b"", b"x" * 10_000]
    data = chosen.tfrecord_bytes(records)
    assert (data[:2] == b"\x1f\x8b") == (codec != "none")
    assert formats.read_tfrecords(data) == records
    assert chosen.tfrecord_bytes(records) == data  # deterministic: a retried commit rewrites the same bytes


@pytest.mark.parametrize("codec, parquet_name", [
    ("none", "UNCOMPRESSED"), ("snappy", "SNAPPY"), ("lz4", "LZ4"), ("gzip:6", "GZIP"), ("zstd", "ZSTD"), ("zstd:9", "ZSTD"),
])
def test_parquet_bytes_round_trip_with_the_codec_and_no_dictionary_for_features(codec, parquet_name):
    table = pa.table({
        "key": pa.array(["a", "b", "c"]),
        "logmel": pa.array([[0.5, 1.5], [2.5], []], type=pa.list_(pa.float32())),
        "logmel_shape": pa.array([[1, 2], [1, 1], [0, 2]], type=pa.list_(pa.int64())),
    })
    data = formats.parse(parquet_compression=codec).parquet_bytes(table)
    assert pq.read_table(io.BytesIO(data)).equals(table)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in columns.values()} == {parquet_name}
    assert "RLE_DICTIONARY" not in columns["logmel.list.element"].encodings
    assert "RLE_DICTIONARY" in columns["key"].encodings
