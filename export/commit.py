"""Committed shards: the unit of durable progress, written by workers and read back by the pipeline.

Rows are serialised as they arrive, batched (at most `commit_records` rows and about
`commit_bytes` of encoded data, whichever comes first) and each batch is committed by one worker:
1. `tfrecords/part-<gid>.tfrecord.gz` (`.tfrecord` uncompressed), `parquet/part-<gid>.parquet`
   (each only when `--formats` asks for it, see export/formats.py) and the SQL table shard
   `tables/features/part-<gid>.parquet` go to hidden temporary names and are renamed into place
   (a file at a final name is always complete);
2. then `_commits/<gid>.json`, naming the files (relative to the run folder, with their sizes)
   and the batch's row summaries, by temp-and-rename.
Dead letters are committed the same way (`errors/part-<gid>.jsonl`, `tables/errors/part-<gid>.parquet`,
then `_commits/dead-<gid>.json`). `<gid>` hashes the batch's keys, so a retried bundle with the
same elements rewrites the same files.

The commit record is the commit, and each commit DoFn emits a summary of it downstream. Beam
keeps the outputs of exactly one successful attempt per element, so the emitted summaries (plus
the commits an earlier, interrupted attempt of the run left, read by `ReadCommits`) are the run's
valid commits; `RemoveOrphans` deletes every file they do not name at the end (what failed
attempts and killed workers left, and all of a run `--mode=overwrite` replaced). Nothing here is
read by the launcher.

Every step survives a kill at any point, finished by the retry of the same step (Beam retries
the bundle with the same elements) and by a later `--mode=resume`, because no file a record
names is ever changed or missing: files are replaced by one rename over them; a commit record is
written only once its shards are in place; a repaired commit (`_repair`) gets new shards under new
names before its record is replaced, and loses its old ones only after; and orphan removal
deletes records before shards, so a record it leaves behind still has all its files. The kill
points (featurebeam/faults.py) of these steps are tested in tests/export/test_commit.py and,
end to end, in tests/pipelines/test_resume.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import uuid
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from export import metadata, tfds
from export.formats import ExportFormats, frame_tfrecords, read_tfrecords
from export.records import arrow_schema, to_parquet_row, to_tf_record
from featurebeam import faults, stages
from featurebeam.deadletter import DEAD, DeadLetter
from featurebeam.elements import FeatureRow
from featurebeam.errors import OutputError
from features.base import OutputSpec

COMMITS = "_commits"
ITEM_STAGES = ("list", "read", "decode", "condition")  # a dead letter of these stages ends its whole item
DEAD_PREFIX = "dead-"
# kind -> (folder in the run, file ending); the features/errors table shards live beside the data.
# The TFRecord ending is that of gzip-compressed shards; `ending` gives the one a run's codec uses.
FOLDERS = {
    "tfrecords": ("tfrecords", ".tfrecord.gz"),
    "parquet": ("parquet", ".parquet"),
    "features_table": ("tables/features", ".parquet"),
    "errors": ("errors", ".jsonl"),
    "errors_table": ("tables/errors", ".parquet"),
}
ROW_KINDS = ("tfrecords", "parquet", "features_table")
DEAD_KINDS = ("errors", "errors_table")
DEFAULT_COMMIT_BYTES = 64 << 20


def group_id(keys: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()
    return digest[:20]


def ending(kind: str, formats: ExportFormats | None = None) -> str:
    """The file ending of shards of `kind` in a run written with `formats` (default: the defaults)."""
    if kind == "tfrecords":
        return (formats or ExportFormats()).tfrecord_ending
    return FOLDERS[kind][1]


def shard_name(kind: str, gid: str, formats: ExportFormats | None = None) -> str:
    """The path of a shard of `kind`, relative to the run folder."""
    if kind.startswith(tfds.KIND_PREFIX):
        return tfds.part_name(kind[len(tfds.KIND_PREFIX):], gid)
    return f"{FOLDERS[kind][0]}/part-{gid}{ending(kind, formats)}"


def pattern(run_dir: str, kind: str, formats: ExportFormats | None = None) -> str:
    return metadata.join(run_dir, FOLDERS[kind][0], f"part-*{ending(kind, formats)}")


def _record_path(run_dir: str, commit_id: str) -> str:
    """The commit record of `commit_id`."""
    return metadata.join(run_dir, COMMITS, f"{commit_id}.json")


def _write_file(final: str, data: bytes) -> None:
    """Write `data` to `final` through a temporary sibling renamed over it: a file at a final name
    is always complete, and one a retry writes again (same keys, same content) is never missing."""
    folder, name = final.rsplit("/", 1)
    tmp = metadata.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    _replace(tmp, final)


def _replace(source: str, target: str) -> None:
    """Rename `source` to `target`, replacing any file there in one step."""
    from apache_beam.io.filesystem import BeamIOError

    if "://" not in target:
        os.replace(source, target)  # atomic, over an existing file too
        return
    try:  # gs://, s3://: a copy, which replaces the object whole, then a delete of the source
        FileSystems.rename([source], [target])
    except BeamIOError:
        if not FileSystems.exists(target):
            raise
        # A file system whose rename will not overwrite: the one moment the target is missing.
        FileSystems.delete([target])
        FileSystems.rename([source], [target])


def _read_file(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def tfrecord_bytes(records: Iterable[bytes], formats: ExportFormats | None = None) -> bytes:
    """TFRecord framing of `records`, compressed as `formats` says (default: the default codec)."""
    return (formats or ExportFormats()).tfrecord_bytes(records)


def parquet_bytes(table, formats: ExportFormats | None = None) -> bytes:
    return (formats or ExportFormats()).parquet_bytes(table)


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


@dataclasses.dataclass(frozen=True)
class TableContext:
    """What the SQL table shards need to know about the run (constant for the whole run)."""

    run_id: str
    started: str
    extractors: tuple[dict[str, Any], ...]
    frames: bool = False
    attempt: str = ""  # this launch of the run: its commits are never read back as an earlier attempt's


def _encode(row: FeatureRow, specs: tuple[OutputSpec, ...], extractor_ids: tuple[str, ...], *, tfrecord: bool = True,
            with_tfds: bool = False):
    """FeatureRow -> (summary, TFRecord bytes or b"" when none are written, Parquet row, (TFDS
    split, Example) or None), or a dead letter if it cannot be serialised. The Parquet row is
    needed either way: the SQL table shard is built from it."""
    try:
        example = (tfds.split_of(row), tfds.to_example(row, specs)) if with_tfds else None
        return _summary(row), to_tf_record(row, specs) if tfrecord else b"", to_parquet_row(row, specs), example
    except Exception as exc:
        return DeadLetter.from_exception(
            key=row.key, uri=row.uri, stage="export", exc=exc, extractors=extractor_ids, item_key=row.item_key
        )


def groups(encoded: list, *, records: int, max_bytes: int, size=lambda element: len(element[1])) -> Iterator[list]:
    """Consecutive groups of at most `records` elements and, past the first, about `max_bytes`
    (`size` of an element: by default the length of its TFRecord bytes)."""
    group: list = []
    size_so_far = 0
    for element in encoded:
        length = size(element)
        if group and (len(group) >= records or size_so_far + length > max_bytes):
            yield group
            group, size_so_far = [], 0
        group.append(element)
        size_so_far += length
    if group:
        yield group


class _CommitRowsFn(beam.DoFn):
    """A list of FeatureRows (one extraction batch) -> one commit per group of at most
    `commit_records` rows and about `commit_bytes` of encoded data; emits each commit's summary."""

    def __init__(self, *, run_dir: str, specs: tuple[OutputSpec, ...], table: TableContext, commit_records: int,
                 commit_bytes: int, extractor_ids: tuple[str, ...] = (), formats: ExportFormats = ExportFormats()):
        self.run_dir = run_dir
        self.specs = specs
        self.table = table
        self.commit_records = commit_records
        self.commit_bytes = commit_bytes
        self.extractor_ids = extractor_ids
        self.formats = formats
        self.committed = Metrics.counter("featurebeam", "records_committed")
        # encode: rows to TFRecord bytes, Parquet rows and Arrow tables, and compressing them;
        # write: the shard files; commit: the commit record, by temp and rename.
        self.encode_us = stages.counter("encode")
        self.write_us = stages.counter("write")
        self.commit_us = stages.counter("commit")

    def setup(self):
        from export import tables

        self.schema = arrow_schema(self.specs)
        self.features_fields = tables.features_schema(list(self.table.extractors), frames=self.table.frames)
        self.features_arrow = tables.arrow_schema(self.features_fields)

    def process(self, rows: list[FeatureRow]) -> Iterator[Any]:
        encoded, dead = [], []
        tfrecord = self.formats.writes("tfrecord")
        with_tfds = self.formats.writes("tfds")
        with stages.timer(self.encode_us):
            for row in rows:
                out = _encode(row, self.specs, self.extractor_ids, tfrecord=tfrecord, with_tfds=with_tfds)
                (dead if isinstance(out, DeadLetter) else encoded).append(out)
        for letter in dead:
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        # Without TFRecords, a shard's size is estimated from its float32 feature values.
        size = (lambda element: len(element[1])) if tfrecord else (lambda element: _row_bytes(element[2]))
        for group in groups(encoded, records=self.commit_records, max_bytes=self.commit_bytes, size=size):
            yield self.commit(group)

    def commit(self, batch: list[tuple[dict, bytes, dict, Any]]) -> dict[str, Any]:
        import pyarrow as pa

        from export import tables

        start = time.perf_counter()
        pending = sorted(batch, key=lambda p: p[0]["key"])
        summaries = [p[0] for p in pending]
        gid = group_id(s["key"] for s in summaries)
        shard = pa.Table.from_pylist([p[2] for p in pending], schema=self.schema)
        features = tables.features_table(
            shard, schema=self.features_arrow, run_id=self.table.run_id, started=self.table.started,
            extractors=self.table.extractors, frames=self.table.frames,
        )
        data = {}
        if self.formats.writes("tfrecord"):
            data["tfrecords"] = self.formats.tfrecord_bytes(p[1] for p in pending)
        if self.formats.writes("parquet"):
            data["parquet"] = self.formats.parquet_bytes(shard)
        data["features_table"] = tables.table_bytes(features, self.features_fields, run_id=self.table.run_id, extractors=self.table.extractors)
        if self.formats.writes("tfds"):
            data.update(tfds.commit_parts([p[3] for p in pending]))
        self.encode_us.inc(int(1e6 * (time.perf_counter() - start)))
        record = _commit(
            self.run_dir, gid, data, entries={"rows": summaries}, attempt=self.table.attempt, formats=self.formats,
            write_us=self.write_us, commit_us=self.commit_us,
        )
        self.committed.inc(len(summaries))
        return record


def _row_bytes(parquet_row: dict[str, Any]) -> int:
    """About the encoded size of a row: 4 bytes per feature value (the columns that are arrays)."""
    return sum(4 * len(v) for v in parquet_row.values() if hasattr(v, "__len__") and not isinstance(v, (str, bytes)))


class _CommitDeadFn(beam.DoFn):
    def __init__(self, *, run_dir: str, table: TableContext):
        self.run_dir = run_dir
        self.table = table
        self.write_us = stages.counter("write")
        self.commit_us = stages.counter("commit")

    def process(self, batch: list[DeadLetter]) -> Iterator[dict]:
        from export import tables

        dead = sorted(batch, key=lambda d: (d.key, d.stage, d.uri))
        gid = group_id(f"{d.key}\t{d.stage}\t{d.uri}" for d in dead)
        as_dicts = [dataclasses.asdict(d) for d in dead]
        data = {
            "errors": "".join(d.to_json() + "\n" for d in dead).encode("utf-8"),
            "errors_table": tables.errors_table_bytes(as_dicts, run_id=self.table.run_id, started=self.table.started),
        }
        yield _commit(self.run_dir, DEAD_PREFIX + gid, data, entries={"dead": as_dicts}, attempt=self.table.attempt,
                      write_us=self.write_us, commit_us=self.commit_us)


def _commit(run_dir: str, commit_id: str, data: dict[str, bytes], *, entries: dict[str, list], attempt: str = "",
            formats: ExportFormats | None = None, write_us=None, commit_us=None) -> dict[str, Any]:
    """Write the shards of `data` (kind -> bytes), then the commit record; `write_us` and
    `commit_us` are the stage counters the two steps' time goes to."""
    gid = commit_id.removeprefix(DEAD_PREFIX)
    files = {}
    with stages.timer(write_us):
        for kind, payload in data.items():
            name = shard_name(kind, gid, formats)
            _write_file(metadata.join(run_dir, name), payload)
            files[kind] = {"path": name, "bytes": len(payload)}
            faults.point("commit_shard")
    faults.point("commit")  # the worst moment to die: data files written, commit record not yet
    record = {"id": commit_id, "attempt": attempt, "files": files, **entries}
    with stages.timer(commit_us):
        _write_file(_record_path(run_dir, commit_id), _record_bytes(record))
    faults.point("commit_record")  # committed, but the bundle not done: its retry writes it all again
    return record


def _record_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode("utf-8")


class CommitRows(beam.PTransform):
    """Lists of FeatureRows -> committed shards; returns `{"commits": commit summaries, "dead": export dead letters}`."""

    def __init__(self, *, run_dir: str, specs: tuple[OutputSpec, ...], table: TableContext, commit_records: int,
                 commit_bytes: int = DEFAULT_COMMIT_BYTES, extractor_ids: tuple[str, ...] = (),
                 formats: ExportFormats = ExportFormats()):
        super().__init__()
        self.fn = _CommitRowsFn(run_dir=run_dir, specs=specs, table=table, commit_records=commit_records,
                                commit_bytes=commit_bytes, extractor_ids=extractor_ids, formats=formats)

    def expand(self, row_lists):
        from pipelines import portable

        out = row_lists | "Commit" >> portable.ParDoWithOutputs(self.fn, DEAD, main="commits")
        return {"commits": out["commits"], "dead": out[DEAD]}


class CommitDeadLetters(beam.PTransform):
    """DeadLetters -> committed errors shards of at most `commit_records`; returns the commit summaries."""

    def __init__(self, *, run_dir: str, table: TableContext, commit_records: int):
        super().__init__()
        self.run_dir, self.table, self.commit_records = run_dir, table, commit_records

    def expand(self, dead):
        from pipelines import portable

        return (
            dead
            | "Batch" >> portable.BatchBySize(max_size=self.commit_records, size_fn=lambda d: 1, key_fn=lambda d: d.key, shards=4)
            | "Commit" >> beam.ParDo(_CommitDeadFn(run_dir=self.run_dir, table=self.table))
        )


# --- reading what an earlier run committed -------------------------------------------------------


def claims(record: dict[str, Any]) -> list[str]:
    """What a commit record commits: record keys of rows, `dead\\t<key>\\t<stage>` of dead letters."""
    if "rows" in record:
        return [r["key"] for r in record["rows"]]
    return [f"dead\t{d['key']}\t{d['stage']}" for d in record["dead"]]


def _losers(element: tuple[str, Iterable[str]]) -> Iterator[tuple[str, str]]:
    """(claim, commit ids) -> (commit id, claim) for every commit but the first that holds it."""
    claim, ids = element
    for commit_id in sorted(set(ids))[1:]:
        yield commit_id, claim


class _RepairFn(beam.DoFn):
    """(id, {record, drop}) -> the record, with its shards rewritten without the dropped claims.

    Two commits of one run share keys only when a runner retried a bundle that batched rows
    differently and the run was interrupted before its orphans were removed; the commit with the
    larger id then loses the shared keys (or disappears when it keeps none). The commit that
    holds a claim first never loses it, so repairs done in any order, or some of them redone
    after a kill, end in the same set of commits.
    """

    def __init__(self, run_dir: str, formats: ExportFormats | None = None):
        self.run_dir = run_dir
        self.formats = formats

    def process(self, element) -> Iterator[dict]:
        _, groups = element
        records, drop = list(groups["record"]), set(groups["drop"])
        if not records:
            return
        record = records[0]
        if not drop:
            yield record
            return
        repaired = _repair(self.run_dir, record, drop, self.formats)
        if repaired is not None:
            yield repaired


def _repair(run_dir: str, record: dict[str, Any], drop: set[str], formats: ExportFormats | None = None) -> dict[str, Any] | None:
    """`record` without the claims in `drop`: new shards under new names, then the record replaced
    by one naming them, then the old shards deleted. Returns the new record, or None for a commit
    that keeps nothing (its record is deleted, then its shards).

    Safe to call again on the same input from whatever a killed call left: the record on disk, not
    `record` (what `ReadCommits` read, perhaps before an earlier try of this call), says how far
    it got. Until the record is replaced, it and the old shards it names are intact (new shards
    already written are orphans, written again); once it is replaced, only deleting the old
    shards is left.
    """
    path = _record_path(run_dir, record["id"])
    current = json.loads(_read_file(path)) if FileSystems.exists(path) else None
    if current is None:  # an earlier try deleted the record of a commit that keeps nothing
        _delete_shards(run_dir, record, keep=None)
        return None
    keep = [claim not in drop for claim in claims(current)]
    if not any(keep):
        metadata.delete_present([path])  # the record first: its shards are then orphans
        faults.point("repair_drop")
        _delete_shards(run_dir, record, keep=None)
        _delete_shards(run_dir, current, keep=None)
        return None
    repaired = current if all(keep) else _rewrite(run_dir, current, keep, formats)
    _delete_shards(run_dir, record, keep=repaired)  # `record` is `current`, or an earlier version of it
    _delete_shards(run_dir, current, keep=repaired)
    return repaired


def _delete_shards(run_dir: str, record: dict[str, Any], *, keep: dict[str, Any] | None) -> None:
    """Delete the shards `record` names, but those `keep` (a record, or None) names; any already
    gone (an earlier try deleted them) is no error."""
    kept = set() if keep is None else {entry["path"] for entry in keep["files"].values()}
    for entry in record["files"].values():
        if entry["path"] not in kept and metadata.delete_present([metadata.join(run_dir, entry["path"])]):
            faults.point("rewrite_delete")


def _tagged(path: str, tag: str) -> str:
    """A shard's path with `tag` after its commit's id: `parquet/part-<gid>.parquet` or
    `parquet/part-<gid>-<old tag>.parquet` -> `parquet/part-<gid>-<tag>.parquet`."""
    folder, name = path.rsplit("/", 1)
    stem, _, suffix = name.partition(".")
    return f"{folder}/{'-'.join(stem.split('-')[:2])}-{tag}.{suffix}"


def _rewrite(run_dir: str, record: dict[str, Any], keep: list[bool], formats: ExportFormats | None = None) -> dict[str, Any]:
    """Write a commit's shards again, keeping only the entries where `keep` is true (shards hold
    them in order), compressed with the run's codecs (`formats`; a resumed run has the same ones,
    the config hash covers them), then replace its record by one naming them; returns that record.

    The new shards are named after the commit and the claims it keeps (`_tagged`), never after
    what the record names now, so the record's files stay intact until it is replaced; a retry
    writes the same names with the same bytes. The old shards are left to the caller.
    """
    formats = formats or ExportFormats()
    import pyarrow as pa
    import pyarrow.parquet as pq

    tag = group_id(claim for claim, k in zip(claims(record), keep) if k)[:12]
    mask = pa.array(keep)
    files = {}
    for kind, entry in record["files"].items():
        path = metadata.join(run_dir, entry["path"])
        data = _read_file(path)
        if kind == "tfrecords":
            values = read_tfrecords(data)
            if len(values) != len(keep):
                raise OutputError(f"commit {record['id']} lists {len(keep)} rows but {path} holds {len(values)}")
            data = formats.tfrecord_bytes(v for v, k in zip(values, keep) if k)
        elif kind.startswith(tfds.KIND_PREFIX):  # the part holds the commit's rows of one split, in order
            split = kind[len(tfds.KIND_PREFIX):]
            mine = [k for row, k in zip(record["rows"], keep) if tfds.split_name(row["split"]) == split]
            values = read_tfrecords(data)
            if len(values) != len(mine):
                raise OutputError(f"commit {record['id']} lists {len(mine)} {split} rows but {path} holds {len(values)}")
            if not any(mine):  # no part for this split any more
                continue
            data = frame_tfrecords(v for v, k in zip(values, mine) if k)
        elif kind == "errors":
            lines = data.decode("utf-8").splitlines(keepends=True)
            data = "".join(line for line, k in zip(lines, keep) if k).encode("utf-8")
        else:
            table = pq.read_table(io.BytesIO(data))
            if table.num_rows != len(keep):
                raise OutputError(f"commit {record['id']} lists {len(keep)} entries but {path} holds {table.num_rows}")
            if kind == "parquet":
                data = formats.parquet_bytes(table.filter(mask))
            else:  # a table shard keeps its own codec and schema metadata
                sink = io.BytesIO()
                pq.write_table(table.filter(mask), sink, compression="zstd")
                data = sink.getvalue()
        name = _tagged(entry["path"], tag)
        _write_file(metadata.join(run_dir, name), data)
        files[kind] = {"path": name, "bytes": len(data)}
    faults.point("rewrite_shards")  # new shards written, the record still names the old ones
    entries = "rows" if "rows" in record else "dead"
    record = {**record, "files": files, entries: [e for e, k in zip(record[entries], keep) if k]}
    _write_file(_record_path(run_dir, record["id"]), _record_bytes(record))
    faults.point("rewrite_record")  # the record names the new shards; the old ones are not deleted yet
    return record


def is_earlier(record: dict[str, Any], *, attempt: str, earlier: frozenset[str] | None) -> bool:
    """Whether a commit record is an earlier attempt's of this run (see `ReadCommits`)."""
    stamped = record.get("attempt")
    if attempt and stamped == attempt:
        return False
    return earlier is None or stamped in earlier


class ReadCommits(beam.PTransform):
    """The commit records earlier attempts left in `run_dir` (a resumed run's progress), overlaps
    repaired.

    Read by the pipeline, listed and parsed on workers and joined by key downstream; empty for a
    new run. The stages that write depend on a grouping that consumes this output, so it is
    normally read before this attempt writes anything; records of `attempt` (this launch) are
    skipped all the same, because a runner that loses a worker may recompute this read later
    (Dask does), when this attempt's own commits are already there.

    earlier: the attempts of this run before this launch (`_work/plan.json`'s `attempts`); records
    of any other attempt, such as those of a run `--mode=overwrite` replaced, are not read, so
    they are not valid and `RemoveOrphans` deletes their files. None (a run folder from before
    attempts were recorded): every attempt but `attempt`.
    """

    def __init__(self, run_dir: str, *, attempt: str = "", earlier: Sequence[str] | None = None,
                 formats: ExportFormats | None = None, after: beam.PCollection | None = None):
        super().__init__()
        self.run_dir = run_dir
        self.attempt = attempt
        self.earlier = None if earlier is None else frozenset(earlier)
        self.formats = formats
        self.after = after  # a one-element PCollection that must exist before the commits are read

    def expand(self, pbegin):
        pattern = metadata.join(self.run_dir, COMMITS, "*.json")
        if self.after is None:
            patterns = pbegin | "Pattern" >> beam.Create([pattern])
        else:
            patterns = self.after | "Pattern" >> beam.FlatMap(lambda _: [pattern])
        records = (
            patterns
            | "Match" >> beam.ParDo(metadata.MatchFn())
            | "Spread" >> beam.Reshuffle()
            | "Parse" >> beam.Map(lambda path: json.loads(_read_file(path)))
            | "EarlierAttempts" >> beam.Filter(is_earlier, attempt=self.attempt, earlier=self.earlier)
        )
        losers = (
            records
            | "Claims" >> beam.FlatMap(lambda r: ((claim, r["id"]) for claim in claims(r)))
            | "ByClaim" >> beam.GroupByKey()
            | "Losers" >> beam.FlatMap(_losers)
        )
        return (
            {"record": records | "ById" >> beam.Map(lambda r: (r["id"], r)), "drop": losers}
            | "JoinDrops" >> beam.CoGroupByKey()
            | "Repair" >> beam.ParDo(_RepairFn(self.run_dir, self.formats))
        )


def committed_rows(record: dict[str, Any], run_dir: str, specs: tuple[OutputSpec, ...]) -> Iterator[FeatureRow]:
    """The FeatureRows an earlier attempt's commit holds, read back from its Parquet shard (what
    a resumed run's feature statistics need besides the rows it computes itself). A run written
    without Parquet (`--formats=tfrecord`) yields none: its statistics then cover the last attempt."""
    import pyarrow.parquet as pq

    from export.records import row_from_parquet

    entry = record.get("files", {}).get("parquet")
    if entry is None:  # a dead-letter commit, or no Parquet written
        return
    table = pq.read_table(io.BytesIO(_read_file(metadata.join(run_dir, entry["path"]))))
    for values in table.to_pylist():
        yield row_from_parquet(values, specs, reused=())


def item_facts(record: dict[str, Any]) -> Iterator[tuple[str, tuple]]:
    """(item key, fact) for every entry of a commit: what selection needs to skip finished work."""
    for row in record.get("rows", ()):
        yield row["item_key"], ("row", row["key"], row["index"], row["last"])
    for dead in record.get("dead", ()):
        yield dead.get("item_key") or dead["key"], ("dead", dead["key"], dead["stage"])


def remaining(facts: Sequence[tuple]) -> tuple[bool, frozenset[str]]:
    """From an item's committed facts: (is the item finished, record keys already committed)."""
    rows = [f for f in facts if f[0] == "row"]
    if any(f[0] == "dead" and f[2] in ITEM_STAGES for f in facts):
        return True, frozenset()
    if any(last and len(rows) == index + 1 for _, _, index, last in rows):
        return True, frozenset()
    return False, frozenset(f[1] for f in facts)


# --- removing what no valid commit names -----------------------------------------------------------


def named_paths(record: dict[str, Any]) -> list[str]:
    """The files a commit record names, relative to the run folder: its shards and itself."""
    return [*(entry["path"] for entry in record.get("files", {}).values()), f"{COMMITS}/{record['id']}.json"]


def _relative(run_dir: str, path: str) -> str:
    return path[len(run_dir.rstrip("/")) + 1 :]


class _DeleteFn(beam.DoFn):
    def __init__(self):
        self.removed = Metrics.counter("featurebeam", "orphan_files_removed")

    def process(self, element) -> Iterator[int]:
        _, groups = element
        if any(True for _ in groups["valid"]):
            return
        found = sorted(set(groups["found"]))  # one path may match two patterns
        if not found:
            return
        removed = 0
        for path in found:  # one by one: a retry finds some gone, which is no error
            removed += metadata.delete_present([path])
            faults.point("orphan_delete")
        self.removed.inc(removed)
        yield removed


class RemoveOrphans(beam.PTransform):
    """Delete every file in the run's shard folders, `_commits/` and `tfds/` that this run does not
    name: what failed attempts and killed workers left, leftover temporaries, and everything of a
    run that `--mode=overwrite` replaced (its commits are not valid, see `ReadCommits`).

    Applied to the paths (a PCollection, or a tuple of them), relative to the run folder, of every
    file the run keeps there (`named_paths` of each valid commit, plus the TFDS shards and
    numberings when it writes a TFDS copy); `after` is a PCollection whose one element exists
    only once every such file is written (the run's summary, and the TFDS renames), so the
    folders are listed, on workers, after the last write. Matching is by path, not by commit id: a
    replaced run's commit and a new one may share an id (the same keys batched alike) yet not the
    same files (other `--formats` or codecs). Returns the number of files removed per path (sum
    them for the total).

    Orphan records go first, and the shard folders are listed only once all of them are gone: a
    record this step has not deleted yet, found by a resume after a kill (it may stamp an earlier
    attempt of the run, one whose retried bundle was not kept), then still has all its shards.
    """

    def __init__(self, run_dir: str, *, after: beam.PCollection):
        super().__init__()
        self.run_dir = run_dir
        self.after = after

    def expand(self, named):
        from pipelines.combine import CombineToOne

        parts = tuple(named) if isinstance(named, (tuple, list)) else (named,)
        records = self._remove("Records", parts, [COMMITS], after=self.after)
        records_gone = records | "RecordsRemoved" >> CombineToOne(beam.transforms.core.CallableWrapperCombineFn(sum))
        folders = sorted({folder for folder, _ in FOLDERS.values()} | {tfds.TFDS_DIR})
        shards = self._remove("Shards", parts, folders, after=records_gone, extra=[tfds.parts_pattern(self.run_dir)])
        return (records, shards) | "AllRemoved" >> beam.Flatten()

    def _remove(self, name: str, parts: tuple, folders: list[str], *, after, extra: Sequence[str] = ()):
        """Delete what the run does not name in `folders` (and `extra` patterns), once `after` exists."""
        from pipelines import portable

        run_dir = self.run_dir
        patterns = [metadata.join(run_dir, folder, "*") for folder in folders] + list(extra)
        mine = tuple(f"{folder}/" for folder in folders)
        found = (
            after
            | f"{name}Patterns" >> beam.FlatMap(lambda _: patterns)
            | f"{name}Match" >> beam.ParDo(metadata.MatchFn())
            | f"{name}ByPath" >> beam.Map(lambda path: (_relative(run_dir, path), path))
        )
        valid = tuple(
            part | f"{name}Valid{i or ''}" >> beam.FlatMap(lambda path: [(path, True)] if path.startswith(mine) else [])
            for i, part in enumerate(parts)
        )
        # Joined as packed bytes, one shuffle key per bucket of paths: FnApiRunner holds a
        # grouping's input in the launcher, and a run has a few files per commit.
        return (
            {"valid": valid, "found": found}
            | f"{name}Join" >> portable.GroupEncoded({"valid": (lambda _: b"", lambda _: True), "found": (_utf8, _from_utf8)})
            | f"{name}Delete" >> beam.ParDo(_DeleteFn())
        )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _from_utf8(data: bytes) -> str:
    return data.decode("utf-8")
