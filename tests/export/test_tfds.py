"""TensorFlow Datasets opens a real sample run by directory: splits from the dataset's split
labels, shapes and values equal to the run's own records, and finalisation safe to repeat."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from export import tfds as run_tfds
from featurebeam.errors import OutputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    run_tfds.export_for_run(run_dir, records_per_shard=16)  # a separate pipeline over the Parquet shards
    return run_dir


def test_builder_from_directory_yields_the_run_records(run_dir, sample_run):
    import pyarrow.parquet as pq
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(run_dir)
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == sample_run["split_counts"]
    assert builder.info.splits["train"].num_shards == 3  # 45 records, 16 per shard
    assert not glob.glob(f"{run_dir}/tfds/_parts/*/*")  # every part became a TFDS shard
    assert builder.info.features["logmel"].shape == (None, 64)
    parquet = {}
    for path in glob.glob(f"{run_dir}/parquet/part-*.parquet"):
        for row in pq.read_table(path, columns=["key", "label", "logmel", "logmel_shape", "summary_logmel_mean"]).to_pylist():
            parquet[row["key"]] = row
    seen = 0
    for split in ("train", "test"):
        for x in tfds.as_numpy(builder.as_dataset(split=split)):
            row = parquet[x["key"].decode()]
            assert x["split"].decode() == split and x["label"].decode() == row["label"]
            np.testing.assert_array_equal(x["logmel"], np.asarray(row["logmel"], np.float32).reshape(row["logmel_shape"]))
            np.testing.assert_array_equal(x["summary_logmel_mean"], np.asarray(row["summary_logmel_mean"], np.float32))
            assert x["spectral_centroid"].shape == (x["logmel"].shape[0],)
            seen += 1
    assert seen == sample_run["counts"]["records"]
    features, label = next(iter(tfds.as_numpy(builder.as_dataset(split="test", as_supervised=True))))
    assert features.shape == (126, 64) and label.decode() in sample_run["labels"]


def test_write_metadata_again_changes_nothing(run_dir, sample_run):
    import json

    import tensorflow_datasets as tfds

    from export import metadata

    before = open(f"{run_dir}/{run_tfds.DATASET_INFO}").read()
    run_tfds.write_metadata(run_dir, run=sample_run, features_json=metadata.read_json(f"{run_dir}/features.json"))
    assert json.loads(open(f"{run_dir}/{run_tfds.DATASET_INFO}").read()) == json.loads(before)
    assert sum(1 for _ in tfds.builder_from_directory(run_dir).as_dataset(split="test")) == sample_run["split_counts"]["test"]


def test_write_metadata_without_shards_names_the_fix(tmp_path):
    with pytest.raises(OutputError, match="python -m export.tfds"):
        run_tfds.write_metadata(str(tmp_path), run={"dataset": {"name": "x"}}, features_json={"outputs": []})
