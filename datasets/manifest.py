"""Manifest datasets: CSV or JSONL files (local or on any Beam file system) naming audio items.

Columns: `uri` (required; relative paths resolve against the manifest's folder), and optional
`key`, `label`, `split`, `offset` and `duration` (seconds). Any other column is kept as item
metadata. A row without a usable `uri` becomes a dead-letter record (keyed
`<manifest file name>:<line>`), not a failed run, and so does a row pointing outside the
manifest's own bucket (remote) or folder (local) and the `--allowed_uri_prefixes` (reason
`uri_not_allowed`, see datasets/allowlist.py).

Keys. A `key` column is the key, as given. Without one, the key is the uri relative to the
manifest's folder, as `ManifestDataset.row_key` says: a relative uri as written (normalised,
`./a/../b.wav` -> `b.wav`), an absolute uri or path under the manifest's folder relative to it, and
any other uri (another bucket, a local path elsewhere) is its own key, unchanged. So a manifest
copied together with its audio keeps its keys; audio listed by absolute uris elsewhere keeps them
only while it stays there (give a `key` column to move it). Those keys keep their scheme or
leading '/' (rather than dropping it, as a shorter key would), so they never equal a key relative
to the folder, and two different files never share a key.

Reading is split into byte ranges of `range_bytes` (planned on a worker from the file's size,
then reshuffled), each read by its own task: a range owns the lines that start inside it, so it
skips to the first line boundary at or after its start and reads past its end only to finish
its last line. A CSV header is read once per range (one short read at byte 0). A row's fields
may not contain line breaks (one line is one row).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from datasets.allowlist import own_prefix, parse_prefixes
from datasets.base import AudioItem, Dataset
from featurebeam import stages
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError
from featurebeam.retry import call_with_retries

KNOWN_COLUMNS = ("uri", "key", "label", "split", "offset", "duration")
RANGE_BYTES = 16 << 20  # bytes per reading task: about 100,000 rows of a typical manifest


class ManifestDataset(Dataset):
    """Items listed in a CSV (with a header row) or JSONL manifest at `uri`.

    allowed_uri_prefixes: buckets or folders rows may point at besides the manifest's own bucket
      (or, for a local manifest, its folder); `--allowed_uri_prefixes` adds to them.
    """

    range_bytes = RANGE_BYTES

    def __init__(
        self, *, uri: str, name: str | None = None, format: str | None = None, allowed_uri_prefixes: Iterable[str] = ()
    ):
        self.uri = uri
        self.allowed_uri_prefixes = parse_prefixes(allowed_uri_prefixes)
        lower = uri.lower()
        self.format = format or ("jsonl" if lower.endswith((".jsonl", ".json", ".ndjson")) else "csv")
        if self.format not in ("csv", "jsonl"):
            raise DatasetError(f"manifest format must be 'csv' or 'jsonl', not {self.format!r} ({uri})")
        self.base = posixpath.dirname(uri)
        self.name = name or posixpath.splitext(posixpath.basename(uri))[0]
        self.header: list[str] | None = None

    def prepare(self) -> None:
        if not FileSystems.exists(self.uri):
            raise DatasetError(f"manifest {self.uri} does not exist; pass the path of a .csv or .jsonl file")
        if self.format == "csv":
            with FileSystems.open(self.uri) as handle:
                first = handle.readline().decode("utf-8-sig")
            self.header = next(csv.reader([first]), [])
            if "uri" not in self.header:
                raise DatasetError(
                    f"manifest {self.uri} has no 'uri' column (found {', '.join(self.header) or 'nothing'}); "
                    "the first row must be a header naming at least 'uri'"
                )

    def own_uri_prefix(self) -> str:
        """A remote manifest's bucket, or a local manifest's own folder."""
        return own_prefix(self.uri)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "format": self.format, "allowed_uri_prefixes": list(self.allow_list.prefixes)}

    def identity(self) -> dict[str, Any]:
        # Where the manifest lies (and so its own folder among the allowed prefixes) is left out.
        return {
            **super().identity(), "uri": posixpath.basename(self.uri), "allowed_uri_prefixes": list(self.allowed_uri_prefixes)
        }

    @staticmethod
    def _is_relative(uri: str) -> bool:
        return "://" not in uri and not posixpath.isabs(uri)

    def resolve(self, uri: str) -> str:
        if not self._is_relative(uri):
            return uri
        return posixpath.join(self.base, uri)

    def row_key(self, uri: str) -> str:
        """The key of a row without a `key` column, from its `uri` as written (see the module's
        docstring): relative to the manifest's folder when it lies there, else the uri itself."""
        if self._is_relative(uri):
            return posixpath.normpath(uri)
        base = self.base
        if "://" not in base or base.startswith("file://"):  # local: compare normalised absolute paths
            if "://" in uri and not uri.startswith("file://"):
                return uri
            path = posixpath.normpath(os.path.abspath(uri.removeprefix("file://")))
            folder = posixpath.normpath(os.path.abspath(base.removeprefix("file://")))
        else:
            path, folder = uri, base
        head = folder.rstrip("/") + "/"
        return path[len(head):] if path.startswith(head) and len(path) > len(head) else uri

    def read_header(self, handle) -> list[str]:
        first = handle.readline().decode("utf-8-sig")
        return next(csv.reader([first]), [])

    def parse(self, line: str | bytes):
        """Turn one manifest line into an AudioItem, or a DeadLetter saying what is wrong."""
        if not line.strip():
            return
        try:
            if isinstance(line, bytes):
                line = line.decode("utf-8")
            line = line.rstrip("\r\n")
            if self.format == "jsonl":
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSONL row must be an object, got {type(row).__name__}")
            else:
                values = next(csv.reader(io.StringIO(line)))
                if len(values) != len(self.header):
                    raise ValueError(f"row has {len(values)} fields, the header has {len(self.header)}")
                row = dict(zip(self.header, values))
            uri = str(row.get("uri") or "").strip()
            if not uri:
                raise ValueError("row has no 'uri'")
            key = str(row.get("key") or self.row_key(uri))
            uri = self.resolve(uri)
            if not self.allow_list.allows(uri):
                yield self.allow_list.refusal(key=key, uri=uri, source=f"manifest {self.uri}")
                return
            extras = tuple(sorted((str(k), str(v)) for k, v in row.items() if k not in KNOWN_COLUMNS and v is not None))
            offset = float(row["offset"]) if row.get("offset") not in (None, "") else None
            duration = float(row["duration"]) if row.get("duration") not in (None, "") else None
            yield AudioItem(
                key=key,
                uri=uri,
                label=str(row["label"]) if row.get("label") not in (None, "") else None,
                split=str(row["split"]) if row.get("split") not in (None, "") else None,
                metadata=extras,
                offset_seconds=offset,
                duration_seconds=duration,
            )
        except (ValueError, TypeError, KeyError) as exc:
            if isinstance(line, bytes):
                line = line.decode("utf-8", "backslashreplace")
            yield DeadLetter(
                key=f"{posixpath.basename(self.uri)}:{line[:200]}",  # keyed like its rows: not by where the manifest lies
                uri=self.uri,
                stage="list",
                error_type=type(exc).__name__,
                message=f"bad manifest row in {self.uri}: {exc}: {line[:200]!r}",
            )

    def listing(self) -> beam.PTransform:
        return _ReadManifest(self)


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """Lines of the manifest that start in [start, end)."""

    start: int
    end: int


class _PlanRangesFn(beam.DoFn):
    """manifest URI -> its ByteRanges (one stat on a worker; nothing per row)."""

    def __init__(self, range_bytes: int):
        self.range_bytes = range_bytes

    def process(self, uri: str) -> Iterator[ByteRange]:
        size = call_with_retries(
            lambda: FileSystems.match([uri], limits=[1])[0].metadata_list[0].size_in_bytes, what=f"stat {uri}"
        )
        for start in range(0, max(size, 1), self.range_bytes):
            yield ByteRange(start, min(start + self.range_bytes, size))


class _ReadRangeFn(beam.DoFn):
    """ByteRange -> AudioItem | DeadLetter for every line starting inside it, streamed."""

    def __init__(self, dataset: ManifestDataset):
        self.dataset = dataset
        self.ranges = Metrics.counter("featurebeam", "manifest_ranges")
        self.list_us = stages.counter("list")

    def process(self, byte_range: ByteRange):
        return stages.timed(self._read(byte_range), self.list_us)

    def _read(self, byte_range: ByteRange):
        self.ranges.inc()
        dataset = self.dataset

        def open_at(start: int):
            handle = FileSystems.open(dataset.uri, compression_type=CompressionTypes.UNCOMPRESSED)
            if dataset.format == "csv" and dataset.header is None:  # prepare() did not run here
                dataset.header = dataset.read_header(handle)
                handle.seek(0)
            if start > 0:
                # The line holding byte start - 1 belongs to the previous range; skip to its end.
                handle.seek(start - 1)
                handle.readline()
            elif dataset.format == "csv":
                handle.readline()  # the header row is not an item
            return handle

        handle = call_with_retries(lambda: open_at(byte_range.start), what=f"read {dataset.uri}")
        with handle:
            position = handle.tell()
            first = position == 0  # only a JSONL file's first line can start with a BOM
            while position < byte_range.end:
                line = handle.readline()
                if not line:
                    break
                position += len(line)
                if first and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                first = False
                yield from dataset.parse(line)


class _ReadManifest(beam.PTransform):
    def __init__(self, dataset: ManifestDataset):
        super().__init__()
        self.dataset = dataset

    def expand(self, pbegin):
        return (
            pbegin
            | "Manifest" >> beam.Create([self.dataset.uri])
            | "PlanRanges" >> beam.ParDo(_PlanRangesFn(self.dataset.range_bytes))
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRanges" >> beam.ParDo(_ReadRangeFn(self.dataset))
        )
