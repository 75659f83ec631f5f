"""--reuse_from: unchanged extractors and unchanged files are carried forward, byte for byte;
a changed parameter recomputes exactly that extractor, a changed file exactly that item."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from pipelines import extract
from export.metadata import output_files

pytestmark = pytest.mark.slow
N = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse-corpus")
    rng = np.random.default_rng(9)
    for i in range(N):
        y = (0.3 * rng.standard_normal(4000 + 900 * i)).astype(np.float32)
        soundfile.write(root / f"{i:02d}.wav", y, 16000)
    return root


def _run(corpus, output, run_id, *extra):
    return extract.run([f"--dataset={corpus}", "--features=logmel,mfcc", f"--output={output}", f"--run_id={run_id}", *extra])


def _columns(run, name):
    out = {}
    for path in output_files(run, "parquet"):
        for row in pq.read_table(path, columns=["key", name]).to_pylist():
            out[row["key"]] = np.asarray(row[name], dtype=np.float32).tobytes()
    return out


@pytest.fixture(scope="module")
def first(corpus, tmp_path_factory):
    return _run(corpus, tmp_path_factory.mktemp("a"), "a")


def _mfcc13(tmp_path):
    config = tmp_path / "mfcc13.yaml"
    config.write_text("features:\n  logmel: {}\n  mfcc: {n_mfcc: 13}\n")
    return f"--config={config}"


def test_changed_parameter_recomputes_only_that_extractor(corpus, first, tmp_path):
    run = _run(corpus, tmp_path, "b", _mfcc13(tmp_path), f"--reuse_from={first['outputs']['run_dir']}")
    assert run["reuse"]["extractors"] == ["logmel"]
    assert run["reuse"]["records_partly_reused"] == N and run["reuse"]["records_fully_reused"] == 0
    assert _columns(run, "logmel") == _columns(first, "logmel")
    shapes = [row["mfcc_shape"][1] for p in output_files(run, "parquet") for row in pq.read_table(p).to_pylist()]
    assert shapes == [13] * N
    assert run["counts"]["ok"] == N


def test_unchanged_run_copies_everything_forward_without_decoding(corpus, first, tmp_path):
    # Same size and modification time but undecodable bytes: the content_id is unchanged, so a
    # reuse that decoded anything would dead-letter this file. It must be copied forward instead.
    victim = corpus / "03.wav"
    original, stat = victim.read_bytes(), victim.stat()
    try:
        victim.write_bytes(b"\0" * len(original))
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        run = _run(corpus, tmp_path, "c", f"--reuse_from={first['outputs']['run_dir']}")
    finally:
        victim.write_bytes(original)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run["counts"]["failed"] == 0
    assert run["reuse"]["records_fully_reused"] == N
    for name in ("logmel", "mfcc"):
        assert _columns(run, name) == _columns(first, name)


def test_changed_file_is_recomputed(corpus, first, tmp_path):
    changed = corpus / "05.wav"
    original, stat = changed.read_bytes(), changed.stat()
    try:
        soundfile.write(changed, np.zeros(6000, dtype=np.float32), 16000)
        run = _run(corpus, tmp_path, "d", f"--reuse_from={first['outputs']['run_dir']}")
    finally:
        changed.write_bytes(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # unchanged again, for the tests after this one
    assert run["reuse"]["records_fully_reused"] == N - 1
    before, after = _columns(first, "logmel"), _columns(run, "logmel")
    assert [k for k in after if after[k] != before[k]] == ["05.wav"]  # keys relative to the folder


def _copy(corpus, where, *, keep_times: bool):
    """The corpus copied to `where`/<its name> (the same dataset name, so the same run folder layout)."""
    import shutil

    target = where / corpus.name
    shutil.copytree(corpus, target, copy_function=shutil.copy2 if keep_times else shutil.copy)
    return target


def test_a_run_on_one_copy_is_reused_whole_by_a_run_on_another(corpus, first, tmp_path):
    """Keys are relative to the folder and content ids hold no path: a copy that kept its files'
    modification times (cp -p, rsync -t, shutil.copytree) is the same audio, copied forward whole."""
    copy = _copy(corpus, tmp_path / "mounted" / "elsewhere", keep_times=True)
    run = _run(copy, tmp_path / "out", "copy", f"--reuse_from={first['outputs']['run_dir']}")
    assert run["reuse"]["records_fully_reused"] == N and run["counts"]["ok"] == N
    for name in ("logmel", "mfcc"):
        assert _columns(run, name) == _columns(first, name)
    uris = [u for p in output_files(run, "parquet") for u in pq.read_table(p, columns=["uri"]).column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(copy / f"{i:02d}.wav") for i in range(N))  # where this run read them


def test_a_copy_with_new_modification_times_is_recomputed_to_the_same_features(corpus, first, tmp_path):
    """A copy that did not keep modification times counts as changed content: recomputed, not reused."""
    copy = _copy(corpus, tmp_path / "fresh", keep_times=False)
    run = _run(copy, tmp_path / "out", "fresh", f"--reuse_from={first['outputs']['run_dir']}")
    assert run["reuse"]["records_fully_reused"] == 0 and run["counts"]["ok"] == N
    assert _columns(run, "logmel") == _columns(first, "logmel")


def test_a_run_with_absolute_path_keys_is_refused(corpus, first, tmp_path, capsys):
    """A run.json without `dataset.keys` comes from a featurebeam whose keys were absolute paths."""
    import json
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(first["outputs"]["run_dir"], old)
    record = json.loads((old / "run.json").read_text())
    del record["dataset"]["keys"]
    (old / "run.json").write_text(json.dumps(record))
    argv = [f"--dataset={corpus}", "--features=logmel,mfcc", f"--output={tmp_path}", f"--reuse_from={old}"]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"featurebeam: error: --reuse_from {old}: that run has absolute-path keys from an earlier "
                   "featurebeam; rerun it or drop --reuse_from"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reuse_from=/no/such/run"], "no readable run.json there"),
        (["--sample_rate=8000"], "that run used sample_rate=16000"),
    ],
)
def test_impossible_reuse_is_refused(corpus, first, tmp_path, capsys, extra, message):
    argv = [f"--dataset={corpus}", "--features=logmel,mfcc", f"--output={tmp_path}", "--run_id=e",
            f"--reuse_from={first['outputs']['run_dir']}", *extra]
    assert extract.main(argv) == 2
    assert message in capsys.readouterr().err


def test_nothing_in_common_is_refused(corpus, first, tmp_path, capsys):
    argv = [f"--dataset={corpus}", "--features=chroma", f"--output={tmp_path}", f"--reuse_from={first['outputs']['run_dir']}"]
    assert extract.main(argv) == 2
    assert "none of chroma was computed there" in capsys.readouterr().err


def test_batched_work_is_shuffled_as_item_bytes_unless_it_carries_more():
    import pickle

    from datasets.base import AudioItem, encode_item
    from pipelines.reuse import decode_work, encode_work

    item = AudioItem(key="a/b.wav", uri="/data/a/b.wav", label="dog", size=1234, generation="7", content_id="1234:7")
    plain = (item, {}, (), ())
    assert encode_work(plain) == b"\x00" + encode_item(item)
    assert len(encode_work(plain)) < len(pickle.dumps(plain, protocol=5)) / 2
    assert decode_work(encode_work(plain)) == plain
    for work in [
        (item, {"a/b.wav": {"logmel": np.arange(6, dtype=np.float32)}}, (), ()),
        (item, {}, frozenset({"a/b.wav#1"}), ()),
        (item, {}, (), ("a row",)),
    ]:
        again = decode_work(encode_work(work))
        assert again[0] == item and again[2:] == work[2:]
        assert again[1].keys() == work[1].keys()
    assert np.array_equal(decode_work(encode_work((item, {"k": {"x": np.ones(3)}}, (), ())))[1]["k"]["x"], np.ones(3))


def test_previous_records_are_read_as_numpy_views_of_only_the_reused_columns(first):
    """What --reuse_from joins: the reused extractors' columns only, feature values as float32
    NumPy arrays sliced from the Parquet list buffers (never lists of Python floats)."""
    from pipelines import reuse

    columns = [name for name, _, _ in reuse.BASE_COLUMNS] + ["logmel", "logmel_shape"]
    path = output_files(first, "parquet")[0]
    records = list(reuse._ReadRecordsFn(columns, batch_rows=3).process(path))  # several Arrow batches
    expected = pq.read_table(path, columns=["item_key", "logmel"]).to_pylist()
    assert [key for key, _ in records] == [row["item_key"] for row in expected]
    for (_, record), row in zip(records, expected):
        assert set(record) == set(columns)  # no mfcc column read
        assert isinstance(record["logmel"], np.ndarray) and record["logmel"].dtype == np.float32
        assert record["logmel"].tobytes() == np.asarray(row["logmel"], dtype=np.float32).tobytes()
