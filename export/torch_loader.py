"""PyTorch reader: a run folder in, a `torch.utils.data.IterableDataset` of dicts out.

It reads the run's Parquet shards with pyarrow (no TensorFlow), so a PyTorch training job needs
only `pip install 'featurebeam[torch]'`, or not even featurebeam: the shards are plain Parquet whose
frame-level columns are flattened `[frames, *shape]` values beside a `<name>_shape` column, and this
module is what undoes that. Label ids come from the sorted label vocabulary in `features.json`, as
in `export.load_tfrecords`, so both readers give a record the same id.

Work is split by reading unit, a (shard, row group) pair: each DataLoader worker of each
distributed rank reads every N-th unit. A run with fewer units than readers (the 60-clip sample
is one shard of one row group) is split by row instead: every reader scans all units and keeps
every N-th row, so readers never see the same record twice. Shuffling (`shuffle=` buffer size)
reorders units with a generator seeded by (seed, epoch), identical on every reader, then passes
rows through a buffer drawn by each reader's own seeded generator: the global `torch`, `numpy`
and `random` states are never read or changed.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from export import formats, metadata
from featurebeam.errors import OutputError

LENGTH_SUFFIX = "_length"
SHAPE_SUFFIX = "_shape"
LABEL_MODES = ("index", "name")


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of `load_torch` items into a batch.

    A frame-level feature (one with a `<name>_length` entry) is zero-padded along its first axis to
    the longest item: `[batch, max_frames, *shape]`, with `<name>_length` a `[batch]` int64 tensor of
    true frame counts. Clip-level features stack to `[batch, *shape]`; integer labels become a
    `[batch]` int64 tensor; strings (keys, label names) stay lists.
    """
    if not batch:
        raise ValueError("collate needs at least one item")
    out: dict[str, Any] = {}
    first = batch[0]
    for name, value in first.items():
        values = [item[name] for item in batch]
        if isinstance(value, torch.Tensor):
            if f"{name}{LENGTH_SUFFIX}" in first:
                longest = max(v.shape[0] for v in values)
                padded = value.new_zeros((len(values), longest, *value.shape[1:]))
                for i, v in enumerate(values):
                    padded[i, : v.shape[0]] = v
                out[name] = padded
            else:
                out[name] = torch.stack(values)
        elif isinstance(value, (int, np.integer)):
            out[name] = torch.tensor(values, dtype=torch.int64)
        else:
            out[name] = list(values)
    return out


class RunDataset(IterableDataset):
    """The records of one run, as `{"key", "label", <feature>..., <frame feature>_length...}` dicts.

    Build it with `export.load_torch`. Use `collate` (also `RunDataset.collate`) as the DataLoader's
    `collate_fn`, and call `set_epoch(n)` before each epoch for a new shuffle order, as with
    `DistributedSampler`.
    """

    collate = staticmethod(collate)

    def __init__(
        self,
        *,
        run_dir: str,
        files: list[str],
        features: list[str],
        frame_features: set[str],
        shapes: dict[str, list[int]],
        vocabulary: list[str],
        split: str | None,
        label: str,
        shuffle: int | None,
        seed: int,
        rank: int | None,
        world_size: int | None,
    ):
        super().__init__()
        self.run_dir, self.files, self.features = run_dir, files, features
        self.frame_features, self.shapes, self.vocabulary = frame_features, shapes, vocabulary
        self.split, self.label, self.shuffle, self.seed = split, label, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle order of the next iterations (the same on every worker and rank for one epoch)."""
        self.epoch = int(epoch)

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over distributed ranks x DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            initialized = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
            world = world if world is not None else (dist.get_world_size() if initialized else 1)
        if not 0 <= rank < world:
            raise OutputError(f"load_torch: rank {rank} is outside world_size {world}")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _units(self) -> list[tuple[str, int]]:
        """Every (shard, row group) of the run, in file order."""
        import pyarrow.parquet as pq

        units = []
        for path in self.files:
            with _open(path) as f:
                units += [(path, group) for group in range(pq.ParquetFile(f).num_row_groups)]
        return units

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, readers = self._reader()
        units = self._units()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        by_unit = len(units) >= readers
        mine = units[index::readers] if by_unit else units
        rows = self._rows(mine, stride=1 if by_unit else readers, offset=0 if by_unit else index)
        if self.shuffle:
            rows = _buffered(rows, self.shuffle, np.random.default_rng([self.seed, self.epoch, index]))
        return rows

    def _rows(self, units: list[tuple[str, int]], *, stride: int, offset: int) -> Iterator[dict[str, Any]]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        columns = ["key", "label", "split"] + [c for name in self.features for c in (name, name + SHAPE_SUFFIX)]
        ids = {label: i for i, label in enumerate(self.vocabulary)}
        seen = 0  # rows before filtering, so the row split does not depend on the split filter
        for path, group in units:
            with _open(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=columns)
            positions = np.arange(seen, seen + table.num_rows)
            seen += table.num_rows
            keep = positions % stride == offset
            if self.split is not None:
                keep &= pc.equal(table.column("split"), self.split).to_numpy(zero_copy_only=False)
            table = table.filter(keep)
            if not table.num_rows:
                continue
            keys, labels = table.column("key").to_pylist(), table.column("label").to_pylist()
            values = {name: _flat(table.column(name)) for name in self.features}
            shapes = {name: table.column(name + SHAPE_SUFFIX).to_pylist() for name in self.features}
            for row in range(table.num_rows):
                item: dict[str, Any] = {"key": keys[row]}
                if self.label == "index":
                    item["label"] = ids.get(labels[row], -1) if labels[row] else -1
                else:
                    item["label"] = labels[row] or ""
                for name in self.features:
                    flat, offsets = values[name]
                    array = flat[offsets[row] : offsets[row + 1]].reshape(shapes[name][row])
                    item[name] = torch.from_numpy(array.copy())
                    if name in self.frame_features:
                        item[name + LENGTH_SUFFIX] = int(array.shape[0])
                yield item


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values, row offsets) of a list<float> column: row i is values[offsets[i]:offsets[i+1]]."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False), offsets


def _buffered(rows: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle through a buffer of `size` rows: each incoming row replaces a random buffered one."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = row
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


def _open(path: str):
    """A binary file object for a local or remote (gs://, ...) shard."""
    if "://" not in path:
        return open(path, "rb")
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path)


def load_torch(
    run_dir: str,
    *,
    features: Sequence[str] | None = None,
    split: str | None = None,
    label: str = "index",
    shuffle: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> RunDataset:
    """A `torch.utils.data.IterableDataset` over a run's Parquet shards.

    run_dir: `<output>/<dataset>/<run_id>` (local path, or any Beam file system such as gs://).
    features: output names to read (default: every feature output). A frame-level feature comes as
      a float32 `[frames, *shape]` tensor with `<name>_length` (its frame count); a clip-level one
      as `shape`.
    split: keep only records of this split (`train`, `test`, ...).
    label: "index" (int, into the run's sorted label vocabulary, -1 for unlabelled records) or
      "name" (the label string).
    shuffle: buffer size in records (None = no shuffling: file order); units are shuffled too.
    seed: seeds the shuffle; `dataset.set_epoch(n)` changes the order per epoch.
    rank, world_size: this process's place among distributed ranks (default: from an initialised
      `torch.distributed`, else a single process).

    Use `DataLoader(ds, batch_size=16, collate_fn=ds.collate, num_workers=...)`.
    """
    if label not in LABEL_MODES:
        raise OutputError(f"load_torch: label must be one of {', '.join(LABEL_MODES)}, got {label!r}")
    if shuffle is not None and shuffle < 0:
        raise OutputError(f"load_torch: shuffle is a buffer size >= 0, got {shuffle}")
    run_json = metadata.join(run_dir, metadata.RUN_JSON)
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(run_json):
        raise OutputError(f"{run_dir} has no run.json: it is not a finished featurebeam run (pass <output>/<dataset>/<run_id>)")
    from export import commit

    written = formats.require(metadata.read_json(run_json), formats.PARQUET, run_dir=run_dir, what="load_torch")
    files = metadata.matching(commit.pattern(run_dir, "parquet", written))
    if not files:
        raise OutputError(f"{run_dir}/parquet holds no shards (the run exported nothing)")
    features_json = metadata.read_json(metadata.join(run_dir, metadata.FEATURES_JSON))
    outputs = {o["name"]: o for o in features_json["outputs"]}
    wanted = list(features) if features is not None else list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise OutputError(f"feature {unknown[0]!r} is not in run {run_dir}; it has {', '.join(outputs)}")
    return RunDataset(
        run_dir=run_dir,
        files=files,
        features=wanted,
        frame_features={name for name in wanted if outputs[name]["level"] == "frame"},
        shapes={name: list(outputs[name]["shape"]) for name in wanted},
        vocabulary=list(features_json["labels"]),
        split=split,
        label=label,
        shuffle=shuffle or None,
        seed=int(seed),
        rank=rank,
        world_size=world_size,
    )
