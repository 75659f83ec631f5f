"""Which exports a run writes, and how they are compressed: `--formats`, `--tfrecord_compression`,
`--parquet_compression`.

A run writes TFRecords (`tfrecords/`) and Parquet (`parquet/`) by default; `--formats` keeps a
subset, and `tfds` adds a TensorFlow Datasets copy (`tfds/`, `dataset_info.json`; export/tfds.py). The SQL table shards (`tables/`) and dead letters are always written: they are built from
the rows in memory, not from either export. The choice and the codecs are recorded in run.json
(`export`) and are part of the config hash (they change the bytes of the run), and readers use
`of_run` and `require` so a run without the format they need fails with one line naming the fix.

Codecs were chosen by measurement (benchmarks/compression.py, on log-mel 64 + MFCC 20 frames of
recording-like clips): float32 features barely compress, so the defaults are the cheap ends that
still take what there is. TFRecords: none (1.06 of the raw feature bytes, 0.012 CPU s per MB).
gzip level 1 gets 0.91 for 5x the CPU (0.061 s per MB), which is about as much as decoding and
DSP spend on the audio behind a MB of log-mel + MFCC frames: in a whole run on 16 minutes of
recordings it made the encode stage 1.36 s instead of 0.30 s of a 6.6 CPU-second run
(benchmarks/compare.py's stage counters), to save 14 % of the bytes; `gzip[:level]` stays a flag
for runs that pay more for storage than for CPU. Parquet: zstd level 1 (0.87; snappy and lz4
save nothing on these values, at about the same CPU).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from typing import Any, Iterable, Mapping

from featurebeam.errors import ConfigError, OutputError

TFRECORD = "tfrecord"
PARQUET = "parquet"
TFDS = "tfds"  # a TensorFlow Datasets copy (export/tfds.py): off by default, it doubles the run's bytes
FORMATS = (TFRECORD, PARQUET)  # the default
ALL_FORMATS = (TFRECORD, PARQUET, TFDS)
KINDS = {TFRECORD: "tfrecords", PARQUET: "parquet"}  # format -> output kind (folder) in the run
TFRECORD_CODECS = {"none": None, "gzip": range(1, 10)}  # codec -> accepted levels (None: no level)
PARQUET_CODECS = {"none": None, "snappy": None, "lz4": None, "gzip": range(1, 10), "zstd": range(1, 23)}
# What a run.json without an `export` entry (written before these flags existed) used.
LEGACY = {"formats": list(FORMATS), "tfrecord_compression": "gzip:6", "parquet_compression": "snappy"}


@dataclasses.dataclass(frozen=True)
class Compression:
    """A codec and, for the codecs that have one, a level (None: the codec's default)."""

    codec: str
    level: int | None = None

    def __str__(self) -> str:
        return self.codec if self.level is None else f"{self.codec}:{self.level}"

    @classmethod
    def parse(cls, text: str, *, flag: str, codecs: Mapping[str, range | None]) -> "Compression":
        """`codec` or `codec:level`, e.g. `gzip:1`, `zstd:3`, `snappy`, `none`."""
        name, _, level_text = str(text).strip().lower().partition(":")
        choices = ", ".join(f"{c}[:level]" if levels else c for c, levels in codecs.items())
        if name not in codecs:
            raise ConfigError(f"{flag}={text!r}: unknown codec {name!r}; choose one of {choices}")
        levels = codecs[name]
        if not level_text:
            return cls(name)
        if levels is None:
            raise ConfigError(f"{flag}={text!r}: {name} takes no level; pass {flag}={name}")
        try:
            level = int(level_text)
        except ValueError:
            level = None
        if level not in levels:
            raise ConfigError(f"{flag}={text!r}: {name} levels are {levels.start}..{levels.stop - 1}, got {level_text!r}")
        return cls(name, level)


DEFAULT_TFRECORD = Compression("none")
DEFAULT_PARQUET = Compression("zstd", 1)


@dataclasses.dataclass(frozen=True)
class ExportFormats:
    """What the commit step writes: the formats (a subset of FORMATS, in FORMATS order) and their codecs."""

    formats: tuple[str, ...] = FORMATS
    tfrecord: Compression = DEFAULT_TFRECORD
    parquet: Compression = DEFAULT_PARQUET

    def writes(self, fmt: str) -> bool:
        return fmt in self.formats

    @property
    def tfrecord_ending(self) -> str:
        """File ending of TFRecord shards: `.tfrecord.gz` when gzip-compressed, else `.tfrecord`."""
        return ".tfrecord.gz" if self.tfrecord.codec == "gzip" else ".tfrecord"

    @property
    def tf_compression_type(self) -> str:
        """`compression_type` for `tf.data.TFRecordDataset`."""
        return "GZIP" if self.tfrecord.codec == "gzip" else ""

    def describe(self) -> dict[str, Any]:
        """run.json's `export` entry (and what the config hash covers)."""
        return {
            "formats": list(self.formats),
            "tfrecord_compression": str(self.tfrecord),
            "parquet_compression": str(self.parquet),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> "ExportFormats":
        value = value or LEGACY
        return parse(
            formats=",".join(value["formats"]),
            tfrecord_compression=value["tfrecord_compression"],
            parquet_compression=value["parquet_compression"],
        )

    # --- bytes ------------------------------------------------------------------------------

    def tfrecord_bytes(self, records: Iterable[bytes]) -> bytes:
        """TFRecord framing (length, masked CRC32C) of `records`, compressed with this run's codec."""
        raw = frame_tfrecords(records)
        if self.tfrecord.codec == "gzip":
            # mtime=0: the same records give the same bytes, so a retried commit rewrites identically.
            return gzip.compress(raw, compresslevel=self.tfrecord.level or 6, mtime=0)
        return raw

    def parquet_bytes(self, table) -> bytes:
        """A Parquet file of `table` with this run's codec; dictionary encoding only for the columns
        that are not float32 feature values (keys, labels, shapes)."""
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        codec = self.parquet.codec
        pq.write_table(
            table, sink, compression="NONE" if codec == "none" else codec, compression_level=self.parquet.level,
            use_dictionary=dictionary_columns(table.schema),
        )
        return sink.getvalue()


def dictionary_columns(schema) -> list[str]:
    """The columns worth dictionary-encoding: all but float32 values and lists of them.

    Feature values hardly repeat, so a dictionary page fills up (1 MiB), the writer falls back to
    plain encoding, and the file holds the dictionary and its indices besides: dictionary-encoded
    feature columns made Parquet shards 37 % larger than the raw floats and 8x slower to write
    (benchmarks/compression.py).
    """
    import pyarrow as pa

    def is_features(t) -> bool:
        return pa.types.is_float32(t) or (pa.types.is_list(t) and pa.types.is_float32(t.value_type))

    return [field.name for field in schema if not is_features(field.type)]


def frame_tfrecords(records: Iterable[bytes]) -> bytes:
    """Uncompressed TFRecord framing (length, masked CRC32C) of `records`."""
    from apache_beam.io.tfrecordio import _TFRecordUtil

    raw = io.BytesIO()
    for record in records:
        _TFRecordUtil.write_record(raw, record)
    return raw.getvalue()


def read_tfrecords(data: bytes) -> list[bytes]:
    """The records of one TFRecord shard's bytes, gzip-compressed or not (told apart by gzip's magic)."""
    from apache_beam.io.tfrecordio import _TFRecordUtil

    raw = io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    records = []
    while (value := _TFRecordUtil.read_record(raw)) is not None:
        records.append(value)
    return records


def parse(*, formats: str | None = None, tfrecord_compression: str | None = None, parquet_compression: str | None = None) -> ExportFormats:
    """The three flags as an ExportFormats; None takes the default. Raises ConfigError in one line."""
    chosen = FORMATS
    if formats is not None:
        names = [n.strip().lower() for n in formats.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL_FORMATS]
        if unknown:
            raise ConfigError(
                f"--formats={formats}: unknown format {unknown[0]!r}; choose from {','.join(ALL_FORMATS)} "
                f"(default {','.join(FORMATS)})"
            )
        if not names:
            raise ConfigError(f"--formats is empty; pass {','.join(FORMATS)} or one of {','.join(ALL_FORMATS)}")
        chosen = tuple(f for f in ALL_FORMATS if f in names)
    return ExportFormats(
        formats=chosen,
        tfrecord=DEFAULT_TFRECORD if tfrecord_compression is None
        else Compression.parse(tfrecord_compression, flag="--tfrecord_compression", codecs=TFRECORD_CODECS),
        parquet=DEFAULT_PARQUET if parquet_compression is None
        else Compression.parse(parquet_compression, flag="--parquet_compression", codecs=PARQUET_CODECS),
    )


def of_run(run: Mapping[str, Any]) -> ExportFormats:
    """The formats and codecs a finished run used (from its run.json content)."""
    return ExportFormats.from_json(run.get("export"))


def require(run: Mapping[str, Any], fmt: str, *, run_dir: str, what: str, fix: str | None = None) -> ExportFormats:
    """This run's ExportFormats, or an OutputError naming the fix when it did not write `fmt`.

    what: the reader that needs it, for the message (e.g. "the TFRecord loader"); fix: what to
    do instead (default: rerun the extraction with both formats).
    """
    found = of_run(run)
    if not found.writes(fmt):
        label = {TFRECORD: "TFRecords", PARQUET: "Parquet shards", TFDS: "TFDS copy"}[fmt]
        raise OutputError(
            f"run {run_dir} has no {label} ({what} needs them; it was written with --formats={','.join(found.formats)}); "
            + (fix or f"rerun it with --formats={','.join(FORMATS)}")
        )
    return found
