"""`export.load_torch` on the session's sample run: a tiny torch model trained through it beats
chance, DataLoader workers and distributed ranks partition the records, shuffling is seeded and
leaves the global random states alone, and items match what the TFRecord loader reads."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the [torch] extra: pip install 'featurebeam[torch]'")

import export  # noqa: E402
from datasets.sample import CLASSES  # noqa: E402
from featurebeam.errors import OutputError  # noqa: E402

pytestmark = pytest.mark.slow


def _keys(dataset, **loader) -> list[str]:
    return [k for batch in torch.utils.data.DataLoader(dataset, collate_fn=dataset.collate, **loader) for k in batch["key"]]


def test_a_tiny_torch_model_trained_through_load_torch_beats_chance(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    torch.manual_seed(0)

    def batches(split, **kw):
        ds = export.load_torch(run_dir, features=["logmel"], split=split, **kw)
        return torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=ds.collate), ds

    class Pool(torch.nn.Module):
        """Mean and std of each mel band over an item's true frames (padding masked out)."""

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Linear(128, 32), torch.nn.ReLU(), torch.nn.Linear(32, len(CLASSES)))

        def forward(self, logmel, lengths):
            mask = (torch.arange(logmel.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
            n = lengths[:, None].float()
            x = (logmel / 40.0 + 2.0) * mask
            mean = x.sum(1) / n
            std = ((x - mean[:, None]) ** 2 * mask).sum(1).div(n).sqrt()
            return self.head(torch.cat([mean, std], dim=1))

    model = Pool()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train, train_ds = batches("train", shuffle=64, seed=0)
    for epoch in range(30):
        train_ds.set_epoch(epoch)
        for batch in train:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch["logmel"], batch["logmel_length"]), batch["label"])
            loss.backward()
            optimizer.step()
    test, _ = batches("test")
    correct = total = 0
    with torch.no_grad():
        for batch in test:
            predicted = model(batch["logmel"], batch["logmel_length"]).argmax(1)
            correct += int((predicted == batch["label"]).sum())
            total += len(batch["key"])
    assert total == sample_run["split_counts"]["test"]
    assert correct / total > 2.0 / len(CLASSES)  # chance is 1 / 5


def test_items_and_padded_batches_match_the_tfrecord_loader(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    wanted = ["logmel", "spectral_centroid", "summary_logmel_mean"]
    ds = export.load_torch(run_dir, features=wanted)
    items = {item["key"]: item for item in ds}
    assert len(items) == sum(sample_run["split_counts"].values())
    tf_items = export.load_tfrecords(run_dir, features=wanted, batch_size=None)
    for x, y in tf_items.take(6):
        item = items[x["key"].numpy().decode()]
        assert item["label"] == int(y)
        np.testing.assert_array_equal(item["logmel"].numpy(), x["logmel"].numpy())
        np.testing.assert_array_equal(item["spectral_centroid"].numpy(), x["spectral_centroid"].numpy())  # [frames]
        np.testing.assert_array_equal(item["summary_logmel_mean"].numpy(), x["summary_logmel_mean"].numpy())
        assert item["logmel_length"] == int(x["logmel_frames"]) and "summary_logmel_mean_length" not in item
    # collate pads frame features to the longest item and returns the lengths
    short = dict(next(iter(items.values())))
    short["logmel"], short["logmel_length"] = short["logmel"][:50], 50
    short["spectral_centroid"], short["spectral_centroid_length"] = short["spectral_centroid"][:50], 50
    batch = ds.collate([short, next(iter(items.values()))])
    assert batch["logmel"].shape == (2, 126, 64) and batch["spectral_centroid"].shape == (2, 126)
    assert batch["logmel_length"].tolist() == [50, 126] and batch["label"].dtype == torch.int64
    assert not batch["logmel"][0, 50:].any() and batch["summary_logmel_mean"].shape == (2, 64)
    names = {item["key"]: item["label"] for item in export.load_torch(run_dir, features=[], label="name")}
    assert all(key.split("/")[1] == label for key, label in names.items())  # sample keys are sample/<label>/<file>


@pytest.fixture(scope="module")
def nine_unit_run(sample_run, tmp_path_factory):
    """The sample run copied with its Parquet rewritten as 3 shards of 3 row groups each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = sample_run["outputs"]["run_dir"]
    run_dir = tmp_path_factory.mktemp("nine-units") / "run"
    (run_dir / "parquet").mkdir(parents=True)
    for name in ("run.json", "features.json"):
        shutil.copy(os.path.join(source, name), run_dir / name)
    table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(os.path.join(source, "parquet", "*.parquet"))))
    for shard in range(3):
        pq.write_table(table.slice(20 * shard, 20), run_dir / "parquet" / f"part-{shard}.parquet", row_group_size=7)
    return str(run_dir)


@pytest.mark.parametrize("layout", ["one unit: split by row", "nine units: split by unit"])
def test_workers_and_ranks_partition_the_records(sample_run, nine_unit_run, layout):
    run_dir = sample_run["outputs"]["run_dir"] if layout.startswith("one") else nine_unit_run
    everything = sorted(_keys(export.load_torch(run_dir, features=["mfcc"])))
    assert len(everything) == 60
    seen = []
    for rank in range(2):  # 2 ranks x 2 DataLoader worker processes = 4 readers
        ds = export.load_torch(run_dir, features=["mfcc"], split="train", shuffle=8, rank=rank, world_size=2)
        seen += _keys(ds, batch_size=4, num_workers=2)
    assert len(seen) == len(set(seen)) == sample_run["split_counts"]["train"]  # every record once
    assert set(seen) < set(everything)


def test_shuffling_is_seeded_per_epoch_and_leaves_global_random_states_alone(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    def keys(ds):  # not through a DataLoader, which draws its workers' base seed from torch's generator
        return [item["key"] for item in ds]

    in_order = keys(export.load_torch(run_dir, features=[]))
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    ds = export.load_torch(run_dir, features=[], shuffle=32, seed=7)
    first, again = keys(ds), keys(ds)
    ds.set_epoch(1)
    second = keys(ds)
    assert first == again == keys(export.load_torch(run_dir, features=[], shuffle=32, seed=7))
    assert first != in_order and second != first and sorted(first) == sorted(second) == sorted(in_order)
    after = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    assert torch.equal(states[0], after[0]) and json.dumps(states[1][1].tolist()) == json.dumps(after[1][1].tolist())
    assert states[2] == after[2]


def test_load_torch_errors_name_the_fix(sample_run, tmp_path):
    run_dir = sample_run["outputs"]["run_dir"]
    with pytest.raises(OutputError, match="has no run.json"):
        export.load_torch(str(tmp_path))
    with pytest.raises(OutputError, match="feature 'nope' is not in run"):
        export.load_torch(run_dir, features=["nope"])
    with pytest.raises(OutputError, match="label must be one of index, name"):
        export.load_torch(run_dir, label="id")
    with pytest.raises(OutputError, match="rank 2 is outside world_size 2"):
        list(export.load_torch(run_dir, rank=2, world_size=2))

