"""Manifest datasets: CSV or JSONL files (local or on any Beam file system) naming audio items.

Columns: `uri` (required; relative paths resolve against the manifest's folder), and optional
`key`, `label`, `split`, `offset` and `duration` (seconds). Any other column is kept as item
metadata. A row without a usable `uri` becomes a dead-letter record, not a failed run.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from datasets.base import AudioItem, Dataset
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError

KNOWN_COLUMNS = ("uri", "key", "label", "split", "offset", "duration")


class ManifestDataset(Dataset):
    """Items listed in a CSV (with a header row) or JSONL manifest at `uri`."""

    def __init__(self, *, uri: str, name: str | None = None, format: str | None = None):
        self.uri = uri
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

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "format": self.format}

    def resolve(self, uri: str) -> str:
        if "://" in uri or posixpath.isabs(uri):
            return uri
        return posixpath.join(self.base, uri)

    def parse(self, line: str):
        """Turn one manifest line into an AudioItem, or a DeadLetter saying what is wrong."""
        if not line.strip():
            return
        try:
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
            uri = self.resolve(uri)
            extras = tuple(sorted((str(k), str(v)) for k, v in row.items() if k not in KNOWN_COLUMNS and v is not None))
            offset = float(row["offset"]) if row.get("offset") not in (None, "") else None
            duration = float(row["duration"]) if row.get("duration") not in (None, "") else None
            yield AudioItem(
                key=str(row.get("key") or uri),
                uri=uri,
                label=str(row["label"]) if row.get("label") not in (None, "") else None,
                split=str(row["split"]) if row.get("split") not in (None, "") else None,
                metadata=extras,
                offset_seconds=offset,
                duration_seconds=duration,
            )
        except (ValueError, TypeError, KeyError) as exc:
            yield DeadLetter(
                key=f"{self.uri}:{line[:200]}",
                uri=self.uri,
                stage="list",
                error_type=type(exc).__name__,
                message=f"bad manifest row in {self.uri}: {exc}: {line[:200]!r}",
            )

    def listing(self) -> beam.PTransform:
        return _ReadManifest(self)


class _ReadManifest(beam.PTransform):
    def __init__(self, dataset: ManifestDataset):
        super().__init__()
        self.dataset = dataset

    def expand(self, pbegin):
        skip = 1 if self.dataset.format == "csv" else 0
        return (
            pbegin
            # Create + ReadAll rather than ReadFromText: Beam's DaskRunner cannot translate a Read.
            | "Manifest" >> beam.Create([self.dataset.uri])
            | "ReadLines" >> beam.io.ReadAllFromText(skip_header_lines=skip)
            | "Parse" >> beam.FlatMap(self.dataset.parse)
        )
