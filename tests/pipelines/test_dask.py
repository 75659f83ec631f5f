"""pipelines/dask.py, and the extraction on a real two-worker Dask cluster: the same features and
dead letters as FnApiRunner, work that spreads over both workers, DoFns set up once per worker.

Both run the launcher's own graph (`pipelines.extract`), built from pipelines/portable.py's
runner-neutral transforms; nothing in it depends on the runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import dask as fb_dask
from pipelines import extract, runners
from tests.beam_util import run_and_collect
from tests.conftest import SAMPLE_FEATURES
from tests.pipelines.test_bad_inputs import corpus  # noqa: F401  (the hostile corpus fixture)

pytestmark = pytest.mark.slow


def _files(run: dict, kind: str) -> list[str]:
    listed = run["outputs"][kind]
    if isinstance(listed, dict):  # the pattern form {"pattern", "files", "bytes"}
        import glob

        return sorted(glob.glob(listed["pattern"]))
    return sorted(listed)


def _payloads(run: dict) -> dict[str, bytes]:
    """key -> the bytes of every feature column, for exact comparison; a key twice fails."""
    names = [o["name"] for e in run["extractors"] for o in e["outputs"]]
    out: dict[str, bytes] = {}
    for path in _files(run, "parquet"):
        for row in pq.read_table(path).to_pylist():
            if row["key"] in out:
                raise AssertionError(f"key {row['key']} exported twice")
            out[row["key"]] = b"".join(np.asarray(row[n], dtype=np.float32).tobytes() for n in names)
    return out


def _dead(run: dict) -> dict[str, tuple[str, str]]:
    errors = [json.loads(line) for p in _files(run, "errors") for line in Path(p).read_text().splitlines()]
    return {e["key"]: (e["stage"], e["reason"]) for e in errors}


def test_runner_flag_accepts_dask_runner(dask_cluster, tmp_path):
    # The launcher asks the cluster's workers whether they see the local paths (pipelines/remote.py),
    # so the address must be a real scheduler's; these workers share this machine's disk.
    (tmp_path / "a").mkdir()
    import soundfile

    soundfile.write(tmp_path / "a" / "x.wav", np.zeros(1600, dtype=np.float32), 16000)
    plan = extract.plan([f"--dataset={tmp_path / 'a'}", f"--output={tmp_path / 'out'}", "--runner=DaskRunner",
                         f"--dask_client_address={dask_cluster.address}"])
    all_options = plan.options.get_all_options()
    assert all_options["runner"] == runners.DASK_RUNNER and all_options["address"] == dask_cluster.address


def test_sample_on_dask_equals_fnapi(sample_run, dask_cluster, tmp_path):
    run = extract.run(["--dataset=sample", f"--features={SAMPLE_FEATURES}", f"--output={tmp_path}",
                              "--run_id=dask", *dask_cluster.flags])
    assert run["beam"]["runner"] == runners.DASK_RUNNER
    assert run["counts"] == sample_run["counts"]
    assert run["dataset"]["fingerprint"] == sample_run["dataset"]["fingerprint"]
    reference = _payloads(sample_run)
    assert len(reference) == sample_run["counts"]["records"] == 60
    assert _payloads(run) == reference
    assert _dead(run) == _dead(sample_run) == {}


def test_hostile_corpus_on_dask_equals_fnapi(corpus, dask_cluster, tmp_path):  # noqa: F811
    manifest, expected = corpus
    argv = [f"--dataset={manifest}", "--features=logmel,spectral", "--max_failure_ratio=1"]
    fnapi = extract.run([*argv, f"--output={tmp_path / 'fnapi'}", "--run_id=h", "--runner=FnApiRunner"])
    dask = extract.run([*argv, f"--output={tmp_path / 'dask'}", "--run_id=h", *dask_cluster.flags])
    assert dask["counts"] == fnapi["counts"]
    assert _payloads(dask) == _payloads(fnapi)
    assert _dead(dask) == _dead(fnapi)
    assert len(_dead(fnapi)) == sum(1 for outcome in expected.values() if outcome != "ok")


@pytest.mark.parametrize("own_dask_cluster", [None, 0], indirect=True, ids=["dask-retries", "no-retries"])
def test_a_killed_worker_is_survived_or_resumed(sample_run, own_dask_cluster, tmp_path):
    """SIGKILL one of the two workers once the first shard is committed. Dask recomputes what the
    dead worker held on the other one; if it gives up instead (KilledWorker), the run must fail
    with that error and `--mode=resume` must finish it. Either way each key is exported once,
    with the features FnApiRunner computed. With Dask's default retries the run survives; with
    none (allowed_failures=0) it fails and is resumed."""
    import threading

    from tests.dask_cluster import stop, wait_for

    argv = ["--dataset=sample", f"--features={SAMPLE_FEATURES}", f"--output={tmp_path}", "--run_id=k",
            "--commit_records=4", *own_dask_cluster.flags]
    outcome: dict = {}

    def target():
        try:
            outcome["run"] = extract.run(argv)
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    commits = tmp_path / "sample" / "k" / "_commits"
    assert wait_for(lambda: commits.is_dir() and any(commits.iterdir()), timeout=300, every=0.05)
    victim = own_dask_cluster.workers[0]
    stop(victim, grace=0)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert victim.poll() is not None and own_dask_cluster.workers[1].poll() is None
    print(f"killed-worker outcome: {'failed, then resumed' if 'error' in outcome else 'survived by Dask'}")
    if "error" in outcome:
        assert "KilledWorker" in type(outcome["error"]).__name__ + str(outcome["error"]), repr(outcome["error"])
        outcome["run"] = extract.run([*argv, "--mode=resume"])
    run = outcome["run"]
    assert run["counts"] == sample_run["counts"]
    assert _payloads(run) == _payloads(sample_run)  # _payloads fails on a key exported twice


def test_a_nested_folder_is_listed_by_fan_out_tasks_on_dask(dask_cluster, tmp_path):
    """A folder of sub-folders is listed by one task per sub-folder (the listing's fan-out, a
    multi-output step), on Dask as on FnApiRunner; and the TFDS copy is written on Dask."""
    import soundfile

    root = tmp_path / "nested"
    rng = np.random.default_rng(3)
    for i in range(12):
        folder = root / f"class{i % 3}" / f"take{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        soundfile.write(folder / f"{i:02d}.wav", (0.2 * rng.standard_normal(1600 + 40 * i)).astype(np.float32), 8000)
    argv = [f"--dataset={root}", "--features=logmel", "--sample_rate=8000", "--run_id=n"]
    fnapi = extract.run([*argv, f"--output={tmp_path / 'fnapi'}", "--runner=FnApiRunner"])
    # The Dask run also writes the TFDS copy: its numbering and renames are steps of the same graph.
    dask = extract.run([*argv, f"--output={tmp_path / 'dask'}", "--formats=tfrecord,parquet,tfds", *dask_cluster.flags])
    assert dask["counts"] == fnapi["counts"] and fnapi["counts"]["records"] == 12
    assert dask["label_counts"] == fnapi["label_counts"] == {"take0": 6, "take1": 6}  # labels: parent folders
    assert _payloads(dask) == _payloads(fnapi)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(dask["outputs"]["run_dir"])
    keys = sorted(x["key"].decode() for x in tfds.as_numpy(builder.as_dataset(split="train")))
    assert keys == sorted(_payloads(fnapi))


# pipelines/dask.py: how the graph becomes Dask tasks.


def _worker_name(element):
    from distributed import get_worker

    return get_worker().name


def test_a_reshuffle_spreads_one_partition_over_both_workers(dask_cluster):
    """Eight elements made in one task are dealt over both workers (Beam's runner keeps them on one).
    Four each is what the runner asks for; Dask may still move a task to an idle worker."""
    import collections

    def build(p):
        spread = p | beam.Create([8]) | beam.FlatMap(lambda n: list(range(n))) | beam.Reshuffle()
        return {"spread": spread, "where": spread | beam.Map(_worker_name)}

    got = run_and_collect(build, dask_cluster.beam_flags)
    assert got["spread"] == list(range(8))
    assert set(collections.Counter(got["where"])) == {"w0", "w1"}


class _PartialSizes(beam.CombineFn):
    """Sums, and keeps how many values went into each accumulator that the final merge got."""

    def create_accumulator(self):
        return (0, ())

    def add_input(self, accumulator, value):
        total, sizes = accumulator
        return (total + value, ((sizes[0] if sizes else 0) + 1,))

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (sum(a[0] for a in accumulators), tuple(n for a in accumulators for n in a[1]))

    def extract_output(self, accumulator):
        return accumulator


def test_a_combine_per_key_is_lifted_so_few_accumulators_cross_the_shuffle(dask_cluster):
    """1,000 values of one key, made 125 at a time by 8 elements dealt over the partitions: each
    partition folds its own values before the shuffle, so the merge gets one accumulator per
    partition, each of whole groups of 125. Beam's DaskRunner instead groups the 1,000 values into
    one task and adds them there (its CombineValues splits them three ways: 334, 333, 333)."""

    def build(p):
        values = (p | beam.Create(list(range(8))) | beam.Reshuffle()
                  | beam.FlatMap(lambda part: [("k", part * 125 + i) for i in range(125)]))
        return {"combined": values | beam.CombinePerKey(_PartialSizes())}

    ((key, (total, sizes)),) = run_and_collect(build, dask_cluster.beam_flags)["combined"]
    assert key == "k" and total == sum(range(1000)) and sum(sizes) == 1000
    assert all(size % 125 == 0 for size in sizes), sizes


class _CountSetups(beam.DoFn):
    """Leaves a file per setup and per teardown, named by process."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        import os
        import uuid

        self.name = f"{os.getpid()}-{uuid.uuid4().hex}"
        (Path(self.folder) / f"setup-{self.name}").touch()

    def process(self, element):
        yield element * 2

    def teardown(self):
        (Path(self.folder) / f"teardown-{self.name}").touch()


def test_a_dofn_is_set_up_once_per_worker_process_and_torn_down_at_the_end(dask_cluster, tmp_path):
    """1,000 elements make 8 partitions (Beam's Create: 128 a partition), each a bundle; Beam's
    runner sets the DoFn up for each, featurebeam's once per worker thread, and tears it down
    when the run is over."""
    got = run_and_collect(lambda p: {"x": p | beam.Create(list(range(1000))) | beam.ParDo(_CountSetups(str(tmp_path)))},
                          dask_cluster.beam_flags)
    assert sorted(got["x"]) == [2 * i for i in range(1000)]
    setups = sorted(p.name.split("-", 1)[1] for p in tmp_path.glob("setup-*"))
    assert 1 <= len(setups) <= 2 and len({name.split("-")[0] for name in setups}) == len(setups)  # one per worker
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.glob("teardown-*")) == setups


def test_grouping_keys_go_to_the_same_partition_in_every_process():
    keys = ["a", b"b", 7, ("k", "decode"), "\udcff"]
    assert [fb_dask.partition_of(key, 5) for key in keys] == [fb_dask.partition_of(key, 5) for key in keys]
    assert fb_dask.partition_of(7, 5) == 2 and all(0 <= fb_dask.partition_of(key, 5) < 5 for key in keys)


def test_worker_slots_ask_the_scheduler(dask_cluster):
    """Two one-thread workers: 2 slots, whatever this machine's cores; --dask_npartitions still wins."""
    from apache_beam.options.pipeline_options import PipelineOptions

    assert runners.worker_slots(PipelineOptions(dask_cluster.beam_flags)) == 2
    assert runners.worker_slots(PipelineOptions([*dask_cluster.beam_flags, "--dask_npartitions=7"])) == 7


def test_batches_of_one_item_shard_are_processed_on_both_workers(dask_cluster, tmp_path, monkeypatch):
    """--item_shards=1 puts every item on one shuffle key; its batches still spread over the
    workers. Each worker process leaves its own progress totals (`done-<pid>-...json`): both
    workers committed records."""
    import soundfile

    monkeypatch.setattr(extract, "ITEMS_PER_BATCH", 4)  # 16 clips: 4 batches, not 1
    rng = np.random.default_rng(5)
    (tmp_path / "clips").mkdir()
    for i in range(16):
        soundfile.write(tmp_path / "clips" / f"{i:02d}.wav", (0.1 * rng.standard_normal(3200)).astype(np.float32), 16000)
    run = extract.run([f"--dataset={tmp_path / 'clips'}", "--features=logmel", f"--output={tmp_path / 'out'}", "--run_id=r",
                       "--item_shards=1", "--progress=log", *dask_cluster.flags])
    assert run["counts"]["records"] == 16
    done: dict[int, int] = {}
    for path in Path(run["outputs"]["run_dir"]).glob("_work/progress/*/done-*.json"):
        pid = int(path.name.split("-")[1])
        done[pid] = done.get(pid, 0) + json.loads(path.read_text())["elements"]
    assert sum(done.values()) == 16
    assert {pid for pid, records in done.items() if records} == {worker.pid for worker in dask_cluster.workers}
