"""Crash, resume and rerun: kill -9 at several points, resume, and get exactly the uninterrupted
run's records, each key once; identical commands give byte-identical payloads per key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from export import commit, formats
from export.metadata import output_files
from pipelines import extract
from tests import faultinject

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 240
FEATURES = "logmel,mfcc"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """240 short labelled clips (two classes), plus one corrupt file, so dead letters resume too."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(5)
    for i in range(N_ITEMS):
        label = "tone" if i % 2 else "noise"
        (root / label).mkdir(exist_ok=True)
        n = 2000 + 37 * i  # different lengths, so batches pad
        t = np.arange(n) / 8000
        y = np.sin(2 * np.pi * (300 + i) * t) if label == "tone" else rng.standard_normal(n) * 0.2
        soundfile.write(root / label / f"{i:03d}.wav", (0.4 * y).astype(np.float32), 8000)
    (root / "noise" / "corrupt.wav").write_bytes(b"RIFF" + rng.bytes(500))
    return root


def _argv(corpus, output, run_id, *extra):
    return [f"--dataset={corpus}", f"--features={FEATURES}", f"--output={output}", f"--run_id={run_id}",
            "--sample_rate=8000", "--commit_records=16", "--max_failure_ratio=0.5", *extra]


def _payloads(run: dict) -> dict[str, bytes]:
    """key -> the bytes of every feature column (Parquet), for exact comparison."""
    out = {}
    names = [o["name"] for e in run["extractors"] for o in e["outputs"]]
    for path in output_files(run, "parquet"):
        for row in pq.read_table(path).to_pylist():
            if row["key"] in out:
                raise AssertionError(f"key {row['key']} exported twice")
            out[row["key"]] = b"".join(np.asarray(row[n], dtype=np.float32).tobytes() for n in names)
    return out


def _tf_keys(run: dict) -> list[str]:
    import tensorflow as tf

    from export.schema import from_pbtxt, parse_specs

    context, _ = parse_specs(from_pbtxt(Path(run["outputs"]["schema"]).read_text()))
    keys = []
    for record in tf.data.TFRecordDataset(output_files(run, "tfrecords"), compression_type=formats.of_run(run).tf_compression_type):
        parsed, _ = tf.io.parse_single_sequence_example(record, context_features={"key": context["key"]})
        keys.append(parsed["key"].numpy().decode())
    return keys


def _dead_keys(run: dict) -> list[str]:
    return [json.loads(line)["key"] for p in output_files(run, "errors") for line in Path(p).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return extract.run(_argv(corpus, tmp_path_factory.mktemp("ref"), "ref"))


def test_reruns_are_byte_identical(corpus, reference, tmp_path):
    again = extract.run(_argv(corpus, tmp_path, "again"))
    assert again["counts"] == reference["counts"] == {"listed": N_ITEMS + 1, "ok": N_ITEMS, "failed": 1, "partial": 0, "records": N_ITEMS}
    assert _payloads(again) == _payloads(reference)
    assert again["config_hash"] == reference["config_hash"]
    assert again["dataset"]["fingerprint"] == reference["dataset"]["fingerprint"]


@pytest.mark.parametrize("where", ["list:100", "decode:150", "commit:3", "commit:9", "finalize:1"])
def test_kill_then_resume_equals_uninterrupted(corpus, reference, tmp_path, where):
    env = {**os.environ, **faultinject.environment(f"kill:{where}")}
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", *_argv(corpus, tmp_path, "k")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / corpus.name / "k"
    assert not (run_dir / "run.json").exists()
    if where.startswith("commit"):
        # Data files of the commit in flight exist, without their commit record.
        assert len(list((run_dir / "parquet").glob("*.parquet"))) > len(list((run_dir / "_commits").glob("[!d]*.json")))

    resumed = extract.run(_argv(corpus, tmp_path, "k", "--mode=resume"))
    assert resumed["counts"] == reference["counts"]
    assert resumed["started"] < resumed["finished"]
    payloads = _payloads(resumed)
    assert payloads == _payloads(reference)
    keys = _tf_keys(resumed)
    assert len(keys) == len(set(keys)) == N_ITEMS
    assert set(keys) == set(payloads)
    assert sorted(_dead_keys(resumed)) == ["noise/corrupt.wav"]
    # Statistics describe every record, the killed attempt's too.
    statistics, expected = resumed["statistics"], reference["statistics"]
    assert statistics["records"] == expected["records"] == N_ITEMS
    assert statistics["categorical"] == expected["categorical"]
    for name, numbers in expected["numeric"].items():
        assert statistics["numeric"][name]["count"] == numbers["count"], name
        assert statistics["numeric"][name]["mean"] == pytest.approx(numbers["mean"], rel=1e-6, abs=1e-6), name
    leftovers = [p for p in run_dir.rglob("*") if p.is_file() and p.parent.name in ("parquet", "tfrecords")]
    assert sorted(leftovers) == sorted(Path(p) for p in output_files(resumed, "parquet") + output_files(resumed, "tfrecords"))


def test_resume_of_complete_run_is_a_no_op(corpus, reference):
    run_dir = Path(reference["outputs"]["run_dir"])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = extract.run(_argv(corpus, run_dir.parent.parent, "ref", "--mode=resume"))
    assert again == reference
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_with_other_flags_is_refused(corpus, tmp_path, capsys):
    env = {**os.environ, **faultinject.environment("kill:commit:2")}
    subprocess.run([sys.executable, "-m", "pipelines.extract", *_argv(corpus, tmp_path, "k")],
                   cwd=ROOT, env=env, capture_output=True, timeout=600)
    argv = [a if not a.startswith("--features") else "--features=logmel" for a in _argv(corpus, tmp_path, "k", "--mode=resume")]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert "was started with config" in err and "resume with the same" in err


def test_a_run_killed_on_one_copy_resumes_on_another(corpus, reference, tmp_path):
    """The same audio mounted elsewhere has the same keys, and the config hash holds no path of it:
    a run killed reading copy A is finished from copy B, each key once, the reference's payloads."""
    import shutil

    copies = [shutil.copytree(corpus, tmp_path / where / corpus.name) for where in ("a", "b")]
    env = {**os.environ, **faultinject.environment("kill:commit:3")}
    killed = subprocess.run([sys.executable, "-m", "pipelines.extract", *_argv(copies[0], tmp_path / "out", "k")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "out" / corpus.name / "k"
    records = [json.loads(p.read_text()) for p in (run_dir / commit.COMMITS).glob("*.json")]
    committed = {row["key"] for record in records for row in record.get("rows", ())}
    assert committed  # the killed attempt's commits: what the resume must keep, not redo
    resumed = extract.run(_argv(copies[1], tmp_path / "out", "k", "--mode=resume"))
    assert resumed["counts"] == reference["counts"]
    assert _payloads(resumed) == _payloads(reference)  # fails on any key exported twice
    assert sorted(_dead_keys(resumed)) == ["noise/corrupt.wav"]
    uris = {r["key"]: r["uri"] for p in output_files(resumed, "parquet") for r in pq.read_table(p, columns=["key", "uri"]).to_pylist()}
    read_from = {key: Path(uri).parents[2] for key, uri in uris.items()}  # <copy>/<label>/<file>: the copy's parent
    assert {read_from[key] for key in committed if key in read_from} == {tmp_path / "a"}
    assert set(read_from.values()) == {tmp_path / "a", tmp_path / "b"}  # the rest was read from copy B


def test_resume_of_a_run_with_absolute_path_keys_is_refused(corpus, tmp_path, capsys):
    """A plan.json without `dataset.keys` was written by a featurebeam whose keys were absolute paths."""
    extract.plan(_argv(corpus, tmp_path, "old"))  # prepares the run folder: writes _work/plan.json
    plan_json = tmp_path / corpus.name / "old" / extract.WORK / "plan.json"
    record = json.loads(plan_json.read_text())
    del record["dataset"]["keys"]
    plan_json.write_text(json.dumps(record))
    assert extract.main(_argv(corpus, tmp_path, "old", "--mode=resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has absolute-path keys from an earlier featurebeam" in err[0]
    assert "--mode=overwrite" in err[0]


def test_resume_needs_an_existing_run(corpus, tmp_path, capsys):
    assert extract.main(_argv(corpus, tmp_path, "missing", "--mode=resume")) == 2
    assert "no run folder" in capsys.readouterr().err


def _tfds_keys(run_dir: Path) -> list[str]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(run_dir))
    return [x["key"].decode() for split in builder.info.splits for x in tfds.as_numpy(builder.as_dataset(split=split))]


@pytest.mark.parametrize("where", ["commit:3", "tfds_rename:2"])
def test_kill_then_resume_gives_a_tfds_copy_with_each_key_once(corpus, reference, tmp_path, where):
    """The TFDS copy survives kill -9 like every shard: between a commit's shards and its record,
    and while the final step renames the parts (the resumed run moves them back first)."""
    argv = _argv(corpus, tmp_path, "k", "--formats=tfrecord,parquet,tfds")
    env = {**os.environ, **faultinject.environment(f"kill:{where}")}
    killed = subprocess.run([sys.executable, "-m", "pipelines.extract", *argv], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / corpus.name / "k"
    if where.startswith("tfds_rename"):  # some parts have their TFDS names, the rest not yet
        assert list((run_dir / "tfds").glob("*.tfrecord-*")) and list((run_dir / "tfds" / "_parts").glob("*/*"))
    resumed = extract.run([*argv, "--mode=resume"])
    assert resumed["counts"] == reference["counts"]
    keys = _tfds_keys(run_dir)
    assert len(keys) == len(set(keys)) == N_ITEMS
    assert set(keys) == set(_payloads(resumed)) == set(_payloads(reference))
    assert not list((run_dir / "tfds" / "_parts").glob("*/*"))


def test_overwrite_killed_then_resumed_equals_uninterrupted_with_nothing_of_the_old_run(corpus, reference, tmp_path):
    """--mode=overwrite of a finished run made with other flags (features, codecs, a TFDS copy, many
    more dead letters), killed mid-run, then resumed: the reference run's records and dead letters,
    each once, and no file of the old run, though some new commits have the old ones' ids."""
    # Many item shards (about one item each) batch the same keys alike in every run, so that new
    # commits get old commits' ids, the case orphan removal by path is for.
    shards = "--item_shards=256"
    old = extract.run(_argv(corpus, tmp_path, "ow", "--features=logmel", "--formats=tfrecord,parquet,tfds",
                            "--tfrecord_compression=none", "--max_item_seconds=0.5", shards))
    run_dir = Path(old["outputs"]["run_dir"])
    assert old["counts"]["failed"] > 50 and (run_dir / "dataset_info.json").exists()
    old_ids = {p.name for p in (run_dir / "_commits").iterdir()}
    env = {**os.environ, **faultinject.environment("kill:commit:3")}
    killed = subprocess.run([sys.executable, "-m", "pipelines.extract", *_argv(corpus, tmp_path, "ow", "--mode=overwrite", shards)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "run.json").exists() and list((run_dir / "tfds").glob("*.tfrecord-*"))  # the old shards wait for workers

    resumed = extract.run(_argv(corpus, tmp_path, "ow", "--mode=resume", shards))
    assert resumed["counts"] == reference["counts"]
    assert _payloads(resumed) == _payloads(reference)
    keys = _tf_keys(resumed)
    assert len(keys) == len(set(keys)) == N_ITEMS
    assert sorted(_dead_keys(resumed)) == ["noise/corrupt.wav"]
    assert resumed["statistics"]["records"] == N_ITEMS and resumed["outputs"]["tfds"] is None
    plan = json.loads((run_dir / "_work" / "plan.json").read_text())
    records = [json.loads(p.read_text()) for p in (run_dir / "_commits").iterdir()]
    assert len(plan["attempts"]) == 2 and {r["attempt"] for r in records} <= set(plan["attempts"])
    assert old_ids & {f"{r['id']}.json" for r in records}  # the same keys batched alike: same ids, new files
    named = {run_dir / path for record in records for path in commit.named_paths(record)}
    metadata_files = {run_dir / name for name in ("run.json", "features.json", "schema.pbtxt", "_work/plan.json", "_work/summary.json",
                                                  "statistics/statistics.pb", "tables/runs/part-00000.parquet")}
    files = {p for p in run_dir.rglob("*") if p.is_file()}
    progress = {p for p in files if "progress" in p.parts}
    assert len({p.parent for p in progress}) <= 1  # the resumed launch's own
    assert files == named | metadata_files | progress


# --- a kill at every point of a commit, a repair, the TFDS numbering and orphan removal ------------
# Small runs (8 sample clips, two rows per commit, with a TFDS copy): kill -9, resume, and get
# exactly the uninterrupted run's exports, each key once, and no file beyond what the run names.


def _small_argv(output, run_id, *extra):
    return ["--dataset=sample", "--limit=8", "--features=logmel", f"--output={output}", f"--run_id={run_id}",
            "--commit_records=2", "--formats=tfrecord,parquet,tfds", *extra]


def _killed(argv, where):
    killed = subprocess.run([sys.executable, "-m", "pipelines.extract", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **faultinject.environment(f"kill:{where}")})
    assert killed.returncode == -signal.SIGKILL, f"not killed at {where}: {killed.stderr[-2000:]}"


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    return extract.run(_small_argv(tmp_path_factory.mktemp("small"), "ref"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A small run killed in its third commit: two commit records, and the third's shards without one."""
    output = tmp_path_factory.mktemp("interrupted")
    _killed(_small_argv(output, "k"), "commit:3")
    return output / "sample" / "k"


def _copy(run_dir: Path, output: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, output / "sample" / run_dir.name))


def _assert_equals_reference(run: dict, reference: dict) -> None:
    """The run's exports are the reference's, each key once, and it keeps no file it does not name."""
    from export import tfds

    run_dir = Path(run["outputs"]["run_dir"])
    assert run["counts"] == reference["counts"]
    payloads = _payloads(run)
    assert payloads == _payloads(reference)
    keys = _tf_keys(run)
    assert len(keys) == len(set(keys)) == len(payloads)
    tfds_keys = _tfds_keys(run_dir)
    assert len(tfds_keys) == len(set(tfds_keys)) and set(tfds_keys) == set(payloads)
    records = [json.loads(p.read_text()) for p in (run_dir / commit.COMMITS).iterdir()]
    named = {run_dir / path for record in records for path in commit.named_paths(record)}
    summary = json.loads((run_dir / "_work" / "summary.json").read_text())
    named |= {run_dir / path for path in tfds.named_paths(summary["tfds"], dataset=tfds.dataset_name("sample"))}
    metadata_files = {run_dir / name for name in ("run.json", "features.json", "schema.pbtxt", "_work/plan.json", "_work/summary.json",
                                                  "statistics/statistics.pb", "tables/runs/part-00000.parquet", tfds.DATASET_INFO)}
    files = {p for p in run_dir.rglob("*") if p.is_file() and "progress" not in p.parts}
    assert files == (named & files) | metadata_files  # nothing else left
    assert not [p for p in named if not p.exists() and "/_parts/" not in str(p)]  # every shard named is there (parts have TFDS names)


def _attempt_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "_work" / "plan.json").read_text())


def _commit_rows(run_dir: Path, reference: dict, keys: list[str], *, attempt: str) -> dict:
    """Commit the reference run's rows of `keys` into `run_dir` as one of its workers would, stamped
    `attempt`: what a retried bundle that batched rows differently leaves."""
    import pyarrow.parquet as pq

    from export.records import row_from_parquet
    from pipelines.finalize import spec_from_json

    plan = _attempt_of(run_dir)
    specs = tuple(spec_from_json(s) for s in plan["specs"])
    rows = {row["key"]: row for path in output_files(reference, "parquet") for row in pq.read_table(path).to_pylist()}
    table = commit.TableContext(run_id=plan["run_id"], started=plan["started"], extractors=tuple(plan["extractors"]),
                                frames=plan["bigquery_frames"], attempt=attempt)
    fn = commit._CommitRowsFn(run_dir=str(run_dir), specs=specs, table=table, commit_records=64, commit_bytes=1 << 30,
                              formats=formats.of_run(plan))
    fn.setup()
    return fn.commit([commit._encode(row_from_parquet(rows[k], specs, reused=()), specs, (), with_tfds=True) for k in keys])


@pytest.mark.parametrize("where", ["commit_shard:5", "commit_record:2"])
def test_kill_in_a_commit_then_resume_equals_uninterrupted(small_reference, tmp_path, where):
    _killed(_small_argv(tmp_path, "k"), where)
    _assert_equals_reference(extract.run(_small_argv(tmp_path, "k", "--mode=resume")), small_reference)


@pytest.mark.parametrize("where", ["rewrite_shards:1", "rewrite_record:1", "rewrite_delete:1", "repair_drop:1"])
def test_kill_in_a_repair_then_resume_equals_uninterrupted(small_reference, interrupted, tmp_path, where):
    """An interrupted run whose commits share keys (retried bundles batched differently): the
    resume that repairs them is killed in the repair, and the next resume finishes it."""
    run_dir = _copy(interrupted, tmp_path)
    attempt = _attempt_of(run_dir)["attempts"][-1]
    records = [json.loads(p.read_text()) for p in (run_dir / commit.COMMITS).iterdir()]
    committed = {row["key"]: r["id"] for r in records for row in r["rows"]}
    assert len(records) == 2 and len(committed) == 4
    fresh = sorted(set(_payloads(small_reference)) - set(committed))
    # One commit that shares a key with another and has one of its own (one of the two is
    # rewritten), and one that holds a key only (it is deleted: it sorts after the other holder).
    shared = sorted(committed)[0]
    _commit_rows(run_dir, small_reference, [shared, fresh[0]], attempt=attempt)
    alone = next(k for k in sorted(committed)[1:] if commit.group_id([k]) > committed[k])
    _commit_rows(run_dir, small_reference, [alone], attempt=attempt)
    _killed(_small_argv(tmp_path, "k", "--mode=resume"), where)
    _assert_equals_reference(extract.run(_small_argv(tmp_path, "k", "--mode=resume")), small_reference)


@pytest.mark.parametrize("where", ["orphan_delete:1", "orphan_delete:3"])
def test_kill_in_orphan_removal_then_resume_equals_uninterrupted(small_reference, interrupted, tmp_path, where):
    """A resume that removes orphans (a replaced run's commit, besides what the kill left) is
    killed while it deletes them: first the record, then its shards; the next resume finishes."""
    run_dir = _copy(interrupted, tmp_path)
    fresh = sorted(set(_payloads(small_reference)) - {row["key"] for p in (run_dir / commit.COMMITS).iterdir()
                                                      for row in json.loads(p.read_text())["rows"]})
    replaced = _commit_rows(run_dir, small_reference, fresh[:1], attempt="2000-01-01T00:00:00+00:00/sha256:old")
    _killed(_small_argv(tmp_path, "k", "--mode=resume"), where)
    assert not (run_dir / commit.COMMITS / f"{replaced['id']}.json").exists()  # the record went first
    _assert_equals_reference(extract.run(_small_argv(tmp_path, "k", "--mode=resume")), small_reference)


@pytest.fixture(scope="module")
def renaming(tmp_path_factory):
    """A small run killed while its TFDS parts get their TFDS names: some renamed, some not."""
    output = tmp_path_factory.mktemp("renaming")
    _killed(_small_argv(output, "k"), "tfds_rename:2")
    return output / "sample" / "k"


def test_kill_after_the_tfds_numbering_then_resume_equals_uninterrupted(small_reference, tmp_path):
    _killed(_small_argv(tmp_path, "k"), "tfds_plan:1")
    _assert_equals_reference(extract.run(_small_argv(tmp_path, "k", "--mode=resume")), small_reference)


@pytest.mark.parametrize("where", ["tfds_rename:1", "tfds_restored:1"])
def test_kill_while_a_resume_moves_tfds_parts_back_then_resume_equals_uninterrupted(small_reference, renaming, tmp_path, where):
    run_dir = _copy(renaming, tmp_path)
    assert list((run_dir / "tfds").glob("*.tfrecord-*")) and list((run_dir / "tfds" / "_parts").glob("*/*"))
    _killed(_small_argv(tmp_path, "k", "--mode=resume"), where)
    _assert_equals_reference(extract.run(_small_argv(tmp_path, "k", "--mode=resume")), small_reference)
