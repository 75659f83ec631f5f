"""TensorFlow Datasets layout for a run: `tfds.builder_from_directory(RUN_DIR)` opens it.

TFDS cannot read the run's own TFRecords: it reads uncompressed files (they are gzip by default), as
`tf.train.Example`s (they are SequenceExamples for frame-level outputs), one set of files per
split, named `<name>-<split>.tfrecord-<i>-of-<n>` with every shard's length in
`dataset_info.json`. So a run made with `tfds` in `--formats` carries a TFDS copy of its records
under `tfds/`, written by workers like every other shard:

1. each commit (export/commit.py) also writes its rows as Examples (a frame-level output is one
   flat FloatList, as TFDS's `Tensor(shape=(None, *shape))` expects), one part per split present,
   `tfds/_parts/<split>/part-<gid>.tfrecord`, named in the commit record like its other shards. So
   retried bundles, resumes, overlap repair and orphan removal treat the parts like any shard, and
   every key is in exactly one part of its split. (A repaired commit's parts have new names, like
   its other shards: the numbering takes each part's path from its record.)
2. `NameShards`, after the last commit, numbers each split's parts (sorted by commit id, so the
   same parts always get the same numbers), writes the numbering to `tfds/_plan-<split>.json`
   and renames the parts to TFDS's names on workers; the final step writes `dataset_info.json`
   at the run folder's root (features, splits, shard lengths, a file template into `tfds/`).
3. A resumed run first moves any part an interrupted numbering had renamed back to its commit's
   name (`RestoreParts`), so the commit records hold again before anything reads them, then
   deletes that numbering. Every move is safe to repeat (`_move`), so a kill at any point of
   the numbering or of the moves back is finished by the retry of the step and by the next
   resume.

Records without a split go to `train`. `label` is the label text (TFDS `Text`): the vocabulary
is known only when every worker is done, after the records are written.

`python -m export.tfds RUN_DIR` writes the same layout for a finished run made without `tfds` in
`--formats` (a separate pipeline over its Parquet shards).
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np

from export import example_proto, metadata
from export.formats import frame_tfrecords
from export.records import BASE_COLUMNS, base_values
from featurebeam.elements import FeatureRow
from featurebeam.errors import OutputError
from features.base import OutputSpec

TFDS_DIR = "tfds"
PARTS = "_parts"
PLAN = "_plan.json"
DATASET_INFO = "dataset_info.json"
VERSION = "1.0.0"
DEFAULT_SPLIT = "train"
FILE_TEMPLATE = f"{TFDS_DIR}/{{DATASET}}-{{SPLIT}}.{{FILEFORMAT}}-{{SHARD_X_OF_Y}}"
KIND_PREFIX = "tfds/"  # commit-record file kinds `tfds/<split>`
PLAN_PREFIX = "_plan-"
_PART = re.compile(r"^(?P<id>[0-9a-f]+)-(?P<count>\d+)\.tfrecord$")


def split_name(split: str | None) -> str:
    """The TFDS split of a dataset split: `train` when there is none, word characters only."""
    split = split or DEFAULT_SPLIT
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):  # TFDS split names are \w+
        split = re.sub(r"\W", "_", split)
    return split


def split_of(row: FeatureRow) -> str:
    """The TFDS split of a record."""
    return split_name(row.split)


def part_name(split: str, gid: str) -> str:
    """A commit's part of `split`, relative to the run folder."""
    return f"{TFDS_DIR}/{PARTS}/{split}/part-{gid}.tfrecord"


def parts_pattern(run_dir: str) -> str:
    return metadata.join(run_dir, TFDS_DIR, PARTS, "*", "*")


def shard_name(dataset: str, split: str, index: int, count: int) -> str:
    """A TFDS shard's path relative to the run folder."""
    digits = max(5, len(str(count)))
    return f"{TFDS_DIR}/{dataset}-{split}.tfrecord-{index:0{digits}d}-of-{count:0{digits}d}"


def shard_path(run_dir: str, dataset: str, split: str, index: int, count: int) -> str:
    return metadata.join(run_dir, shard_name(dataset, split, index, count))


def named_paths(splits: Sequence[dict[str, Any]], *, dataset: str) -> list[str]:
    """The files a run's TFDS numbering keeps under `tfds/` (relative to the run folder): every
    split's shards and its numbering file. `splits` is what `NameShards` emits."""
    paths = []
    for split in splits:
        count = len(split["shard_lengths"])
        paths.append(f"{TFDS_DIR}/{PLAN_PREFIX}{split['name']}.json")
        paths.extend(shard_name(dataset, split["name"], i, count) for i in range(count))
    return paths


def to_example(row: FeatureRow, specs: Sequence[OutputSpec]) -> bytes:
    """A record as the serialized `tf.train.Example` TFDS parses with `features_dict(specs)`."""
    kinds = {name: kind for name, kind, _ in BASE_COLUMNS}
    values: dict[str, example_proto.Value] = {}
    for name, value in base_values(row).items():
        if kinds[name] == "bytes":
            values[name] = value.encode("utf-8")
        elif kinds[name] == "int":
            values[name] = [value]
        else:
            values[name] = np.array([value], dtype=np.float32)
    for spec in specs:
        values[spec.name] = np.asarray(row.features[spec.name], dtype=np.float32).ravel()
    return example_proto.example(values)


def commit_parts(rows: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    """(split, Example) pairs of one commit, in its row order -> `{kind: part bytes}`, one per split."""
    by_split: dict[str, list[bytes]] = collections.defaultdict(list)
    for split, example in rows:
        by_split[split].append(example)
    return {KIND_PREFIX + split: frame_tfrecords(examples) for split, examples in sorted(by_split.items())}


def _move(source: str, target: str, fix: str = "rerun it with --mode=overwrite") -> int:
    """Rename `source` to `target`, safe to repeat (a repeat finds only the target); 1 if moved.
    fix: what the error says to do when both are missing."""
    from apache_beam.io.filesystems import FileSystems

    from featurebeam import faults

    if FileSystems.exists(source):
        if FileSystems.exists(target):  # a copy-then-delete rename interrupted halfway
            FileSystems.delete([target])
        FileSystems.rename([source], [target])
        faults.point("tfds_rename")
        return 1
    if not FileSystems.exists(target):
        raise OutputError(f"TFDS part {source} and its shard {target} are both missing; {fix}")
    return 0


def _plan_split(element, run_dir: str, dataset: str, attempt: str) -> dict[str, Any]:
    """(split, [(commit id, records, bytes, part path)]) -> that split's numbering, also written to
    `tfds/_plan-<split>.json` (before any part is renamed: a resume moves them back by it)."""
    from featurebeam import faults

    split, parts = element
    parts = sorted(parts)
    # Relative to the run folder, like the commit records: a run folder copied or moved elsewhere
    # and resumed there moves its own parts back.
    moves = [{"source": path, "target": shard_name(dataset, split, i, len(parts))} for i, (_, _, _, path) in enumerate(parts)]
    plan = {"split": split, "attempt": attempt, "moves": moves}
    metadata.write_json(metadata.join(run_dir, TFDS_DIR, f"{PLAN_PREFIX}{split}.json"), plan)
    faults.point("tfds_plan")  # numbered, nothing renamed yet
    return {
        "split": {"name": split, "shard_lengths": [n for _, n, _, _ in parts], "num_bytes": sum(b for _, _, b, _ in parts)},
        "moves": [(_at(run_dir, m["source"]), _at(run_dir, m["target"])) for m in moves],
    }


def _at(run_dir: str, path: str) -> str:
    """A numbering's path in `run_dir` (numberings written before they were relative hold full paths)."""
    return path if path.startswith("/") or "://" in path else metadata.join(run_dir, path)


def _parts_of(record: dict[str, Any]) -> Iterator[tuple[str, tuple[str, int, int, str]]]:
    """A commit record -> (split, (commit id, records, bytes, path)) for each of its TFDS parts
    (the path the record names: `part_name`, or a repaired commit's new name)."""
    for kind, entry in record.get("files", {}).items():
        if kind.startswith(KIND_PREFIX):
            split = kind[len(KIND_PREFIX):]
            records = sum(1 for row in record["rows"] if split_name(row["split"]) == split)
            yield split, (record["id"], records, entry["bytes"], entry["path"])


class _ListSplits(beam.CombineFn):
    def create_accumulator(self):
        return []

    def add_input(self, acc, split):
        acc.append(split)
        return acc

    def merge_accumulators(self, accumulators):
        return [s for acc in accumulators for s in acc]

    def extract_output(self, acc):
        return sorted(acc, key=lambda s: s["name"])


class NameShards(beam.PTransform):
    """Valid commit records (a PCollection, or a tuple of them) -> one element: the splits TFDS's
    dataset_info.json lists, once every part has its TFDS name (see the module doc). Applied
    after the last commit."""

    def __init__(self, *, run_dir: str, dataset: str, attempt: str):
        super().__init__()
        self._run_dir, self._dataset, self._attempt = run_dir, dataset, attempt

    def expand(self, commits):
        from pipelines.combine import CombineToOne, JoinSingletons

        # Several sets of commit records (a tuple) give their parts, not their records, to one Flatten.
        sets = tuple(commits) if isinstance(commits, (tuple, list)) else (commits,)
        parts = [pcoll | f"Parts{i}" >> beam.FlatMap(_parts_of) for i, pcoll in enumerate(sets)]
        plans = (
            (parts | "AllParts" >> beam.Flatten() if len(parts) > 1 else parts[0])
            | "BySplit" >> beam.GroupByKey()
            | "Number" >> beam.Map(_plan_split, self._run_dir, self._dataset, self._attempt)
        )
        renamed = (
            plans
            | "Moves" >> beam.FlatMap(lambda plan: plan["moves"])
            | "Spread" >> beam.Reshuffle()
            | "Rename" >> beam.MapTuple(_move)
            | "CountRenamed" >> CombineToOne(beam.transforms.core.CallableWrapperCombineFn(sum))
        )
        splits = plans | "Splits" >> beam.Map(lambda plan: plan["split"]) | "ListSplits" >> CombineToOne(_ListSplits())
        return {"splits": splits, "renamed": renamed} | "AfterRenames" >> JoinSingletons() | "Value" >> beam.Map(lambda j: j["splits"])


class RestoreParts(beam.PTransform):
    """pbegin -> one element once every part an earlier attempt's interrupted numbering renamed
    is back at its commit's name and those numbering files are gone (nothing to do for a new run).

    Numberings of `attempt` (this launch) are left alone: a runner may compute this step again
    late in the job (Dask recomputes what it did not keep), after this attempt's own renames.
    So are those of attempts not in `earlier` (this run's earlier attempts; None: all of them),
    such as a numbering of a run `--mode=overwrite` replaced: its commits are not valid, so
    `commit.RemoveOrphans` deletes its shards and its numbering file, if the new numbering has
    not replaced them.
    """

    def __init__(self, run_dir: str, *, attempt: str, earlier: Sequence[str] | None = None):
        super().__init__()
        self._run_dir = run_dir
        self._pattern = metadata.join(run_dir, TFDS_DIR, f"{PLAN_PREFIX}*.json")
        self._attempt = attempt
        self._earlier = None if earlier is None else frozenset(earlier)

    def expand(self, pbegin):
        from pipelines.combine import CombineToOne

        attempt, attempts, run_dir = self._attempt, self._earlier, self._run_dir

        def earlier(path: str) -> list[tuple[str, dict]]:
            plan = metadata.read_json(path)
            if plan.get("attempt") == attempt or (attempts is not None and plan.get("attempt") not in attempts):
                return []
            return [(path, plan)]

        plans = (
            pbegin
            | "Plans" >> beam.Create([self._pattern])
            | "Match" >> beam.ParDo(metadata.MatchFn())
            | "Spread" >> beam.Reshuffle()
            | "Earlier" >> beam.FlatMap(earlier)
        )
        restored = (
            plans
            | "Moves" >> beam.FlatMap(lambda found: [(_at(run_dir, m["target"]), _at(run_dir, m["source"])) for m in found[1]["moves"]])
            | "SpreadMoves" >> beam.Reshuffle()
            | "MoveBack" >> beam.MapTuple(_move)
            | "CountRestored" >> CombineToOne(beam.transforms.core.CallableWrapperCombineFn(sum))
        )
        deleted = (
            {"restored": restored | "Key" >> beam.Map(lambda n: ("run", n)), "plans": plans | "KeyPlans" >> beam.Map(lambda f: ("run", f[0]))}
            | "AfterRestoring" >> beam.CoGroupByKey()
            | "PlanPaths" >> beam.FlatMap(lambda element: element[1]["plans"])
            | "DeletePlans" >> beam.Map(_delete)
        )
        return deleted | "Done" >> CombineToOne(beam.transforms.core.CallableWrapperCombineFn(sum))


def _delete(path: str) -> int:
    """Delete a numbering whose parts are all back; one already gone (a retry) is no error."""
    from featurebeam import faults

    faults.point("tfds_restored")  # every part back at its commit's name, the numbering not yet deleted
    metadata.delete_present([path])
    return 1


class _WriteShardsFn(beam.DoFn):
    def __init__(self, run_dir: str, specs: tuple[OutputSpec, ...], records_per_shard: int):
        self._run_dir, self._specs, self._per_shard = run_dir, specs, records_per_shard

    def start_bundle(self):
        self._buffers: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)

    def process(self, row: FeatureRow):
        split = split_of(row)
        buffer = self._buffers[split]
        buffer.append((row.key, to_example(row, self._specs)))
        if len(buffer) >= self._per_shard:
            self._flush(split)

    def finish_bundle(self):
        for split in list(self._buffers):
            self._flush(split)

    def _flush(self, split: str) -> None:
        from export.commit import group_id

        buffer = sorted(self._buffers.pop(split, []))
        if not buffer:
            return
        name = f"{group_id(k for k, _ in buffer)}-{len(buffer)}.tfrecord"
        final = metadata.join(self._run_dir, TFDS_DIR, PARTS, split, name)
        metadata.write_atomic(final, frame_tfrecords([record for _, record in buffer]))


class WriteTfdsShards(beam.PTransform):
    """`PCollection[FeatureRow]` -> nothing: the run's records as TFDS Example shards under
    `<run_dir>/tfds/_parts/`, which `write_metadata` turns into a TFDS dataset."""

    def __init__(self, *, run_dir: str, specs: Sequence[OutputSpec], records_per_shard: int = 1024):
        super().__init__()
        if records_per_shard <= 0:
            raise OutputError(f"records_per_shard must be positive, got {records_per_shard}")
        self._fn = _WriteShardsFn(run_dir, tuple(specs), records_per_shard)

    def expand(self, rows):
        return rows | "WriteTfdsShards" >> beam.ParDo(self._fn)


def features_dict(specs: Sequence[OutputSpec]):
    """The `tfds.features.FeaturesDict` of the run's TFDS records."""
    import tensorflow_datasets as tfds

    kinds = {"bytes": None, "int": np.int64, "float": np.float32}
    spec: dict[str, Any] = {}
    for name, kind, text in BASE_COLUMNS:
        spec[name] = tfds.features.Text(doc=text) if kinds[kind] is None else tfds.features.Scalar(dtype=kinds[kind], doc=text)
    for output in specs:
        shape = ((None,) if output.level == "frame" else ()) + tuple(output.shape)
        spec[output.name] = tfds.features.Tensor(shape=shape, dtype=np.float32, doc=output.description)
    return tfds.features.FeaturesDict(spec)


def dataset_name(name: str | None) -> str:
    """The TFDS name of a featurebeam dataset (lower-case word characters, starting with a letter)."""
    name = re.sub(r"[^a-z0-9_]", "_", str(name or "featurebeam").lower())
    return name if name[:1].isalpha() else f"fb_{name}"


def _dataset_name(run: dict) -> str:
    return dataset_name(run.get("dataset", {}).get("name"))


def _plan_renames(run_dir: str, dataset: str) -> dict[str, Any]:
    """Plan of renames: per split, the sorted parts, their final names and lengths."""
    from apache_beam.io.filesystems import FileSystems

    parts = FileSystems.match([metadata.join(run_dir, TFDS_DIR, PARTS, "*", "*.tfrecord")])[0].metadata_list
    by_split: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for m in parts:
        split = m.path.rstrip("/").split("/")[-2]
        match = _PART.match(m.path.rsplit("/", 1)[-1])
        if match:
            by_split[split].append((m.path, int(match["count"])))
    plan: dict[str, Any] = {}
    for split, files in sorted(by_split.items()):
        files.sort()
        n = len(files)
        digits = max(5, len(str(n)))
        plan[split] = [
            {
                "source": path,
                "target": metadata.join(run_dir, TFDS_DIR, f"{dataset}-{split}.tfrecord-{i:0{digits}d}-of-{n:0{digits}d}"),
                "records": count,
            }
            for i, (path, count) in enumerate(files)
        ]
    return plan


def write_metadata(run_dir: str, *, run: dict, features_json: dict) -> str:
    """Turn the TFDS parts into a TFDS dataset and write `<run_dir>/dataset_info.json`; returns its path.

    run: run.json's content (only `dataset.name`, `run_id` and `config_hash` are read);
    features_json: features.json's content (its `outputs`). Safe to call again.
    """
    from apache_beam.io.filesystems import FileSystems

    from export.statistics import specs_of

    dataset = _dataset_name(run)
    plan_path = metadata.join(run_dir, TFDS_DIR, PLAN)
    if FileSystems.exists(plan_path):  # an earlier call was interrupted, or finished: keep its numbering
        plan = metadata.read_json(plan_path)
    else:
        plan = _plan_renames(run_dir, dataset)
        if not plan:
            raise OutputError(
                f"{run_dir}/{TFDS_DIR}/{PARTS} holds no TFDS shards: add WriteTfdsShards to the pipeline, "
                f"or write them from the Parquet shards with 'python -m export.tfds {run_dir}'"
            )
        metadata.write_json(plan_path, plan)
    fix = f"delete {plan_path} and {run_dir}/{TFDS_DIR} and write the shards again"
    for entries in plan.values():
        for entry in entries:
            _move(entry["source"], entry["target"], fix)
    parts_dir = metadata.join(run_dir, TFDS_DIR, PARTS)
    if "://" not in run_dir and FileSystems.exists(parts_dir):  # only empty split folders are left
        FileSystems.delete([parts_dir])

    splits = []
    for split, entries in sorted(plan.items()):
        sizes = FileSystems.match([e["target"] for e in entries])
        splits.append({
            "name": split,
            "shard_lengths": [e["records"] for e in entries],
            "num_bytes": sum(m.metadata_list[0].size_in_bytes for m in sizes),
        })
    return write_dataset_info(run_dir, run=run, specs=specs_of(features_json), splits=splits)


def write_dataset_info(run_dir: str, *, run: dict, specs: Sequence[OutputSpec], splits: Sequence[dict[str, Any]]) -> str:
    """Write `<run_dir>/dataset_info.json` for shards already at their TFDS names; returns its path.

    splits: `{"name", "shard_lengths", "num_bytes"}` per split (what `NameShards` emits).
    """
    from google.protobuf import json_format
    from tensorflow_datasets.core.proto import dataset_info_pb2

    dataset = _dataset_name(run)
    info = dataset_info_pb2.DatasetInfo(
        name=dataset,
        version=VERSION,
        description=f"featurebeam run {run.get('run_id')} of dataset {run.get('dataset', {}).get('name')} "
        f"(config {run.get('config_hash')}); see run.json and features.json beside this file.",
        file_format="tfrecord",
    )
    info.features.CopyFrom(features_dict(specs).to_proto())
    for split in splits:
        info.splits.add(
            name=split["name"], shard_lengths=split["shard_lengths"], num_bytes=split["num_bytes"], filepath_template=FILE_TEMPLATE
        )
    frame_vectors = [s.name for s in specs if s.level == "frame" and s.shape]
    if frame_vectors:
        feature = "logmel" if "logmel" in frame_vectors else frame_vectors[0]
        info.supervised_keys.tuple.items.add().feature_key = feature
        info.supervised_keys.tuple.items.add().feature_key = "label"
    path = metadata.join(run_dir, DATASET_INFO)
    metadata.write_atomic(path, json_format.MessageToJson(info, sort_keys=True))
    return path


def export_for_run(run_dir: str, *, records_per_shard: int = 1024, beam_args: Sequence[str] = ()) -> str:
    """Write a finished run's TFDS copy from its Parquet shards (for runs made before the pipeline
    wrote one), then its metadata; returns dataset_info.json's path."""
    import glob

    from apache_beam.options.pipeline_options import PipelineOptions

    from export import records
    from export.statistics import specs_of

    from export import formats

    run = metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON))
    formats.require(run, formats.PARQUET, run_dir=run_dir, what="the TFDS export")
    features_json = metadata.read_json(metadata.join(run_dir, metadata.FEATURES_JSON))
    specs = specs_of(features_json)
    pattern = metadata.join(run_dir, "parquet", "part-*.parquet")
    if "://" not in run_dir and not glob.glob(pattern):
        raise OutputError(f"{run_dir}/parquet holds no part-*.parquet shards; pass a finished featurebeam run folder")
    with beam.Pipeline(options=PipelineOptions(list(beam_args) or ["--runner=FnApiRunner"])) as p:
        (
            p
            | "Read" >> beam.io.ReadFromParquet(pattern)
            | "Rows" >> beam.Map(lambda r: records.row_from_parquet(r, specs, reused=()))
            | "Tfds" >> WriteTfdsShards(run_dir=run_dir, specs=specs, records_per_shard=records_per_shard)
        )
    return write_metadata(run_dir, run=run, features_json=features_json)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    from featurebeam.errors import FeaturebeamError

    parser = argparse.ArgumentParser(prog="python -m export.tfds", description="Write a finished run's TensorFlow Datasets copy.")
    parser.add_argument("run_dir")
    parser.add_argument("--records_per_shard", type=int, default=1024)
    args, beam_args = parser.parse_known_args(argv)
    try:
        path = export_for_run(args.run_dir, records_per_shard=args.records_per_shard, beam_args=beam_args)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(f"TFDS metadata written to {path}; open it with tfds.builder_from_directory({args.run_dir!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
