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


def _tfds_records(run_dir) -> dict[str, dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(run_dir))
    out: dict[str, dict] = {}
    for split in builder.info.splits:
        for x in tfds.as_numpy(builder.as_dataset(split=split)):
            key = x["key"].decode()
            assert key not in out, f"{key} twice in the TFDS copy"
            out[key] = {"split": split, "logmel": x["logmel"]}
    return out


def _parquet_logmels(run: dict) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    from export.metadata import output_files

    out = {}
    for path in output_files(run, "parquet"):
        for row in pq.read_table(path, columns=["key", "logmel", "logmel_shape"]).to_pylist():
            out[row["key"]] = np.asarray(row["logmel"], np.float32).reshape(row["logmel_shape"])
    return out


def test_the_run_writes_its_own_tfds_copy_on_workers(tmp_path):
    """`--formats=...,tfds`: the commits write the TFDS parts, the pipeline names them, the final
    step writes dataset_info.json; no separate pipeline, and the launcher reads none of it."""
    import json

    import tensorflow_datasets as tfds

    from pipelines import extract, finalize

    assert extract.main(["--dataset=sample", "--features=logmel", f"--output={tmp_path}", "--run_id=t",
                         "--commit_records=8", "--formats=tfrecord,parquet,tfds"]) == 0
    run_dir = str(tmp_path / "sample" / "t")
    run = json.loads(open(f"{run_dir}/run.json").read())
    assert "tfds (none)" in open(f"{run_dir}/report.html").read()  # the command line's report names the copy
    assert run["outputs"]["tfds"] == f"{run_dir}/{run_tfds.DATASET_INFO}"
    assert run["export"]["formats"] == ["tfrecord", "parquet", "tfds"]
    builder = tfds.builder_from_directory(run_dir)
    assert {name: s.num_examples for name, s in builder.info.splits.items()} == run["split_counts"] == {"train": 45, "test": 15}
    records, logmels = _tfds_records(run_dir), _parquet_logmels(run)
    assert set(records) == set(logmels)
    for key, record in records.items():
        np.testing.assert_array_equal(record["logmel"], logmels[key])
    assert not glob.glob(f"{run_dir}/tfds/_parts/*/*")  # every part has its TFDS name
    info = open(f"{run_dir}/{run_tfds.DATASET_INFO}").read()
    finalize.finalize(run_dir)  # redoing the final step rewrites the same dataset_info.json
    assert open(f"{run_dir}/{run_tfds.DATASET_INFO}").read() == info
    assert sorted(_tfds_records(run_dir)) == sorted(records)


def test_tfds_is_not_written_by_default(sample_run):
    assert sample_run["outputs"]["tfds"] is None
    assert not glob.glob(f"{sample_run['outputs']['run_dir']}/tfds/_parts/*/*")


def test_a_tfds_part_missing_with_its_shard_is_a_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(OutputError, match=r"^TFDS part .* and its shard .* are both missing; rerun it with --mode=overwrite$"):
        run_tfds._move(str(tmp_path / "part"), str(tmp_path / "shard"))
    (tmp_path / "part").write_bytes(b"x")
    assert run_tfds._move(str(tmp_path / "part"), str(tmp_path / "shard")) == 1
    assert run_tfds._move(str(tmp_path / "part"), str(tmp_path / "shard")) == 0  # a repeat finds the shard
    assert (tmp_path / "shard").read_bytes() == b"x"


def test_each_numbering_step_killed_is_finished_by_its_retry(tmp_path):
    """The numbering, each rename, each move back and the numbering's deletion, killed right after
    their side effect, are finished by running the same step again on the same input."""
    import json

    from tests.kill_points import killed_at

    run_dir = str(tmp_path)
    # Parts as commit records name them: a repaired commit's part has a new name.
    element = ("train", [("b" * 20, 2, 10, f"tfds/_parts/train/part-{'b' * 20}.tfrecord"),
                         ("a" * 20, 1, 5, f"tfds/_parts/train/part-{'a' * 20}-0123456789ab.tfrecord")])
    for _, _, _, path in element[1]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(path.encode())
    numbering = tmp_path / "tfds" / f"{run_tfds.PLAN_PREFIX}train.json"
    killed_at("tfds_plan:1", run_tfds._plan_split, element, run_dir, "ds", "attempt")
    written = numbering.read_text()
    plan = run_tfds._plan_split(element, run_dir, "ds", "attempt")
    assert numbering.read_text() == written and plan["split"]["shard_lengths"] == [1, 2]
    moves = plan["moves"]
    assert [source for source, _ in moves] == [str(tmp_path / element[1][1][3]), str(tmp_path / element[1][0][3])]
    # The numbering names paths in the run folder, so a run folder copied elsewhere resumes there.
    assert [m["source"] for m in json.loads(written)["moves"]] == [element[1][1][3], element[1][0][3]]
    for source, target in moves:
        killed_at("tfds_rename:1", run_tfds._move, source, target)
        assert run_tfds._move(source, target) == 0  # the retry finds the shard in place
    for source, target in moves:  # a resume moves them back, killed likewise
        killed_at("tfds_rename:1", run_tfds._move, target, source)
        assert run_tfds._move(target, source) == 0
    assert [open(source, "rb").read() for source, _ in moves] == [element[1][1][3].encode(), element[1][0][3].encode()]

    killed_at("tfds_restored:1", run_tfds._delete, str(numbering))
    assert numbering.exists()  # killed before deleting it: the resume still knows the moves
    assert run_tfds._delete(str(numbering)) == 1 and not numbering.exists()
    assert run_tfds._delete(str(numbering)) == 1  # a retry after the deletion is no error
