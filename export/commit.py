"""Committed shards: the unit of durable progress, and what resume and finalisation read.

Rows are written in small groups (`commit_records` rows, or what a bundle holds). For each group
the writer:
1. writes `tfrecords/part-<id>.tfrecord.gz` and `parquet/part-<id>.parquet` to hidden temporary
   names and renames them into place (a file at a final name is always complete);
2. then writes `_commits/<id>.json`, listing the group's keys and files, by temp-and-rename.

The commit record is the commit: data files without one (a worker killed between steps 1 and 2)
are orphans that finalisation deletes, so a kill -9 at any moment loses at most the group in
flight. `<id>` is a hash of the group's sorted keys, so a runner retrying a bundle with the same
elements rewrites the same files instead of adding duplicates. Dead letters are committed the
same way (`errors/part-<id>.jsonl` then `_commits/dead-<id>.json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from export import metadata
from export.records import arrow_schema, to_parquet_row, to_tf_record
from featurebeam import faults
from featurebeam.deadletter import DEAD, DeadLetter
from featurebeam.errors import OutputError
from featurebeam.elements import FeatureRow
from features.base import OutputSpec

COMMITS = "_commits"


def group_id(keys: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()
    return digest[:20]


def _write_file(final: str, data: bytes) -> None:
    folder, name = final.rsplit("/", 1)
    tmp = metadata.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    if FileSystems.exists(final):  # a retried bundle: same keys, same content
        FileSystems.delete([final])
    FileSystems.rename([tmp], [final])


def tfrecord_bytes(records: Iterable[bytes]) -> bytes:
    """TFRecord framing (length, masked CRC32C) of `records`, gzip-compressed."""
    import gzip

    from apache_beam.io.tfrecordio import _TFRecordUtil

    raw = io.BytesIO()
    for record in records:
        _TFRecordUtil.write_record(raw, record)
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def parquet_bytes(rows: list[dict[str, Any]], specs: tuple[OutputSpec, ...]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=arrow_schema(specs))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()


class _GroupCommitFn(beam.DoFn):
    """Buffers elements and commits them in groups of `commit_records`, and at bundle end."""

    def __init__(self, *, commit_records: int):
        self.commit_records = commit_records

    def start_bundle(self):
        self.pending: list = []

    def add(self, element) -> None:
        self.pending.append(element)
        if len(self.pending) >= self.commit_records:
            self.flush()

    def finish_bundle(self):
        if self.pending:
            self.flush()

    def flush(self) -> None:
        group, self.pending = self.pending, []
        self.commit(group)

    def commit(self, group: list) -> None:
        raise NotImplementedError


class CommitRowsFn(_GroupCommitFn):
    """Write FeatureRows as committed TFRecord + Parquet shards of at most `commit_records` rows.

    Each row is serialised as it arrives; a row that cannot be (an export-stage fault) leaves
    through the `dead` output instead of failing the shard.
    """

    def __init__(self, *, run_dir: str, specs: tuple[OutputSpec, ...], commit_records: int, extractor_ids: tuple[str, ...] = ()):
        super().__init__(commit_records=commit_records)
        self.run_dir = run_dir
        self.specs = specs
        self.extractor_ids = extractor_ids
        self.committed = Metrics.counter("featurebeam", "records_committed")

    def process(self, row: FeatureRow):
        try:
            encoded = (_summary(row), to_tf_record(row, self.specs), to_parquet_row(row, self.specs))
        except Exception as exc:
            yield beam.pvalue.TaggedOutput(
                DEAD,
                DeadLetter.from_exception(
                    key=row.key, uri=row.uri, stage="export", exc=exc, extractors=self.extractor_ids, item_key=row.item_key
                ),
            )
            return
        self.add(encoded)

    def commit(self, group: list[tuple[dict, bytes, dict]]) -> None:
        pending = sorted(group, key=lambda p: p[0]["key"])
        summaries = [p[0] for p in pending]
        gid = group_id(s["key"] for s in summaries)
        tfrecords = metadata.join(self.run_dir, "tfrecords", f"part-{gid}.tfrecord.gz")
        parquet = metadata.join(self.run_dir, "parquet", f"part-{gid}.parquet")
        _write_file(tfrecords, tfrecord_bytes(p[1] for p in pending))
        _write_file(parquet, parquet_bytes([p[2] for p in pending], self.specs))
        faults.point("commit")  # the worst moment to die: data files written, commit record not yet
        record = {"id": gid, "files": {"tfrecords": tfrecords, "parquet": parquet}, "rows": summaries}
        _write_file(metadata.join(self.run_dir, COMMITS, f"{gid}.json"), json.dumps(record).encode("utf-8"))
        self.committed.inc(len(summaries))


def _summary(row: FeatureRow) -> dict[str, Any]:
    """What a commit record keeps of a row: enough for resume, counts and reuse accounting."""
    return {
        "key": row.key,
        "item_key": row.item_key,
        "index": row.segment_index,
        "last": row.last_segment,
        "seconds": row.seconds,
        "label": row.label or "",
        "split": row.split or "",
        "reused": list(row.reused),
    }


class CommitDeadLettersFn(_GroupCommitFn):
    """Write DeadLetters as committed JSONL shards under errors/."""

    def __init__(self, *, run_dir: str, commit_records: int):
        super().__init__(commit_records=commit_records)
        self.run_dir = run_dir

    def process(self, dead: DeadLetter):
        self.add(dead)

    def commit(self, group: list[DeadLetter]) -> None:
        dead = sorted(group, key=lambda d: (d.key, d.stage, d.uri))
        gid = group_id(f"{d.key}\t{d.stage}\t{d.uri}" for d in dead)
        path = metadata.join(self.run_dir, "errors", f"part-{gid}.jsonl")
        _write_file(path, "".join(d.to_json() + "\n" for d in dead).encode("utf-8"))
        record = {"id": gid, "files": {"errors": path}, "dead": [dataclasses.asdict(d) for d in dead]}
        _write_file(metadata.join(self.run_dir, COMMITS, f"dead-{gid}.json"), json.dumps(record).encode("utf-8"))


@dataclasses.dataclass
class Committed:
    """What the commit records of a run folder say is durably done."""

    rows: dict[str, dict]  # record key -> row summary
    dead: dict[tuple[str, str], dict]  # (key, stage) -> dead letter
    files: dict[str, list[str]]  # kind -> committed data files

    @property
    def done_items(self) -> set[str]:
        """Item keys that need no more work: every segment committed, or failed as a whole item."""
        segments: dict[str, list[dict]] = {}
        for row in self.rows.values():
            segments.setdefault(row["item_key"], []).append(row)
        done = {
            item
            for item, rows in segments.items()
            if any(r["last"] and len(rows) == r["index"] + 1 for r in rows)
        }
        done |= {key for (key, stage) in self.dead if stage in ITEM_STAGES}
        return done

    @property
    def partial_records(self) -> set[str]:
        """Record keys committed (as rows or extraction dead letters) of items not yet done, which
        a resumed run must skip one by one."""
        done = self.done_items
        records = {key for key, row in self.rows.items() if row["item_key"] not in done}
        records |= {
            key for (key, stage), d in self.dead.items() if stage not in ITEM_STAGES and (d.get("item_key") or key) not in done
        }
        return records


ITEM_STAGES = ("list", "read", "decode", "condition")


def read_commits(run_dir: str) -> Committed:
    """Every commit record of `run_dir`, repairing overlaps so each key is committed once.

    Two commits share keys only when a runner retried a bundle whose rows were grouped
    differently the second time; the later commit (by id) then has its shards rewritten without
    the keys an earlier one holds.
    """
    found = FileSystems.match([metadata.join(run_dir, COMMITS, "*.json")])[0].metadata_list
    rows: dict[str, dict] = {}
    dead: dict[tuple[str, str], dict] = {}
    files: dict[str, list[str]] = {"tfrecords": [], "parquet": [], "errors": []}
    for path in sorted(m.path for m in found):
        record = json.loads(metadata.read_text(path))
        if "rows" in record:
            keep = [r["key"] not in rows for r in record["rows"]]
            if not any(keep):
                continue
            if not all(keep):
                record = _rewrite_without(path, record, keep)
            rows.update({r["key"]: r for r in record["rows"]})
        else:
            new = {(d["key"], d["stage"]): d for d in record["dead"]}
            dead.update({k: v for k, v in new.items() if k not in dead})
        for kind, file in record["files"].items():
            files[kind].append(file)
    return Committed(rows=rows, dead=dead, files={k: sorted(v) for k, v in files.items()})


def _rewrite_without(path: str, record: dict, keep: list[bool]) -> dict:
    """Rewrite a commit's shards keeping only rows where `keep` is true (shards hold rows in order)."""
    import pyarrow.parquet as pq
    from apache_beam.io.tfrecordio import _TFRecordUtil

    import gzip

    tf_path, pq_path = record["files"]["tfrecords"], record["files"]["parquet"]
    with FileSystems.open(tf_path, compression_type="uncompressed") as handle:
        raw = io.BytesIO(gzip.decompress(handle.read()))
    records = []
    while (value := _TFRecordUtil.read_record(raw)) is not None:
        records.append(value)
    with FileSystems.open(pq_path, compression_type="uncompressed") as handle:
        table = pq.read_table(io.BytesIO(handle.read()))
    if len(records) != len(keep) or table.num_rows != len(keep):
        raise OutputError(f"commit {path} lists {len(keep)} rows but its shards hold {len(records)} and {table.num_rows}")
    import pyarrow as pa

    _write_file(tf_path, tfrecord_bytes(r for r, k in zip(records, keep) if k))
    sink = io.BytesIO()
    pq.write_table(table.filter(pa.array(keep)), sink, compression="snappy")
    _write_file(pq_path, sink.getvalue())
    record = {**record, "rows": [r for r, k in zip(record["rows"], keep) if k]}
    _write_file(path, json.dumps(record).encode("utf-8"))
    return record


def remove_orphans(run_dir: str, committed: Committed) -> list[str]:
    """Delete data files no commit names and leftover temporaries; returns what was deleted."""
    keep = {path for paths in committed.files.values() for path in paths}
    patterns = [metadata.join(run_dir, folder, "*") for folder in ("tfrecords", "parquet", "errors", COMMITS)]
    found = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    orphans = [
        path
        for path in found
        if path.rsplit("/", 1)[1].startswith(".") or (f"/{COMMITS}/" not in path and path not in keep)
    ]
    if orphans:
        FileSystems.delete(orphans)
    return orphans
