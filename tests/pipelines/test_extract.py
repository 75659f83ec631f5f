"""The extraction pipeline end to end on a real Beam runner: counts, keys, labels, exports, run.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from datasets.sample import CLASSES, CLIPS_PER_CLASS
from export import formats
from export.records import from_parquet_row
from featurebeam import audio
from features import Batch, registry
from pipelines import extract, transforms
from export.metadata import output_files

pytestmark = pytest.mark.slow

N_SAMPLE = len(CLASSES) * CLIPS_PER_CLASS


def _manifest_rows():
    from datasets.sample import SampleDataset

    dataset = SampleDataset()
    dataset.prepare()
    return [json.loads(line) for line in Path(dataset.uri).read_text().splitlines()]


def _tf_records(run):
    import tensorflow as tf

    from export.schema import from_pbtxt, parse_specs

    schema = from_pbtxt(Path(run["outputs"]["schema"]).read_text())
    context_spec, sequence_spec = parse_specs(schema)
    out = {}
    for record in tf.data.TFRecordDataset(output_files(run, "tfrecords"), compression_type=formats.of_run(run).tf_compression_type):
        context, sequence = tf.io.parse_single_sequence_example(
            record, context_features=context_spec, sequence_features=sequence_spec
        )
        key = context["key"].numpy().decode()
        out[key] = {**{k: v.numpy() for k, v in context.items()}, **{k: v.numpy() for k, v in sequence.items()}}
    return out


def _parquet_rows(run):
    table = pq.read_table(os.path.join(run["outputs"]["run_dir"], "parquet"))
    return {row["key"]: row for row in table.to_pylist()}


def test_sample_run_counts_keys_and_labels(sample_run):
    manifest = _manifest_rows()
    assert sample_run["counts"] == {"listed": N_SAMPLE, "ok": N_SAMPLE, "failed": 0, "partial": 0, "records": N_SAMPLE}
    records = _tf_records(sample_run)
    assert set(records) == {row["key"] for row in manifest}
    for row in manifest:
        assert records[row["key"]]["label"].decode() == row["label"]
        assert records[row["key"]]["split"].decode() == row["split"]
    assert sample_run["labels"] == sorted(CLASSES)
    assert sample_run["label_counts"] == {label: CLIPS_PER_CLASS for label in CLASSES}
    assert sample_run["audio_seconds"] == pytest.approx(N_SAMPLE * 2.0, rel=1e-3)


def test_run_json_is_complete(sample_run):
    run_dir = Path(sample_run["outputs"]["run_dir"])
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(sample_run))
    for key in ("run_id", "started", "finished", "featurebeam_version", "git_commit", "config", "config_hash",
                "extractors", "dataset", "counts", "audio_seconds", "outputs", "beam"):
        assert key in on_disk, key
    assert on_disk["run_id"] == "session"
    assert on_disk["started"] < on_disk["finished"]
    assert on_disk["config_hash"].startswith("sha256:")
    assert [e["name"] for e in on_disk["extractors"]] == ["logmel", "mfcc", "spectral", "summary"]
    assert all(e["version"] and e["outputs"] for e in on_disk["extractors"])
    assert on_disk["config"]["features"]["logmel"]["n_mels"] == 64  # defaults filled in, not just user keys
    assert on_disk["dataset"]["name"] == "sample"
    assert on_disk["dataset"]["keys"] == "relative"  # the key scheme; --reuse_from and resume refuse runs without it
    assert json.loads((run_dir / extract.WORK / "plan.json").read_text())["dataset"]["keys"] == "relative"
    assert on_disk["dataset"]["fingerprint"].startswith("sha256sum:")
    assert on_disk["beam"]["runner"] == "FnApiRunner"
    assert output_files(on_disk, "tfrecords") and output_files(on_disk, "parquet")
    assert all(Path(p).exists() for p in output_files(on_disk, "tfrecords") + output_files(on_disk, "parquet"))
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") or "beam-temp" in str(p)]
    # (other tests add report.html and a TFDS copy to this shared run folder)
    assert {p.name for p in run_dir.iterdir()} - {"report.html", "dataset_info.json", "tfds"} == {
        "run.json", "features.json", "schema.pbtxt", "tfrecords", "parquet", "errors", "tables", "statistics", "_commits",
        extract.WORK,
    }
    assert (run_dir / "schema.pbtxt").read_text().count("name:") > 10
    features_json = json.loads((run_dir / "features.json").read_text())
    assert features_json["record_type"] == "SequenceExample"
    assert {o["name"] for o in features_json["outputs"]} >= {"logmel", "mfcc", "spectral_centroid"}


def _in_memory_features(uri: str, run) -> dict[str, np.ndarray]:
    """The features of one file computed directly, outside Beam, one item per batch."""
    waveform = audio.condition(audio.decode(audio.read_bytes(uri), uri=uri), sample_rate=16000, uri=uri)
    batch = Batch.from_waveforms([waveform], sample_rate=16000)
    out = {}
    for e in run["extractors"]:
        extractor = registry.build(e["name"], e["config"], sample_rate=16000)
        for spec in extractor.output_specs():
            value = batch.outputs(extractor)[spec.name][0]
            out[spec.name] = value[: 1 + len(waveform) // spec.hop_length] if spec.level == "frame" else value
    return out


def test_tfrecords_and_parquet_equal_in_memory_features(sample_run):
    records = _tf_records(sample_run)
    parquet = _parquet_rows(sample_run)
    specs = tuple(
        spec
        for e in sample_run["extractors"]
        for spec in registry.build(e["name"], e["config"], sample_rate=16000).output_specs()
    )
    assert set(parquet) == set(records)
    checked = 0
    for key in sorted(records)[:: len(records) // 6]:  # every format, rate and channel layout
        uri = records[key]["uri"].decode()
        expected = _in_memory_features(uri, sample_run)
        from_parquet = from_parquet_row(parquet[key], specs)
        for spec in specs:
            tf_value = records[key][spec.name]
            if spec.level == "frame" and spec.shape == ():
                tf_value = tf_value[:, 0]
            # Batching pads items to a common length; results match the single-item run to
            # float32 round-off (the batched einsum sums in another order).
            np.testing.assert_allclose(tf_value, expected[spec.name], rtol=1e-4, atol=1e-3, err_msg=f"{key} {spec.name}")
            np.testing.assert_array_equal(from_parquet[spec.name], tf_value.reshape(from_parquet[spec.name].shape))
        checked += 1
    assert checked >= 6


def test_testpipeline_graph_emits_every_key(tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    manifest = _manifest_rows()
    argv = ["--dataset=sample", "--features=logmel", f"--output={tmp_path}", "--run_id=tp", "--limit=7"]
    the_plan = extract.plan(argv)
    with TestPipeline(runner="FnApiRunner") as p:
        outputs = extract.build(p, the_plan)
        assert_that(outputs["rows"] | "Keys" >> __import__("apache_beam").FlatMap(lambda rows: [r.key for r in rows]),
                    equal_to(sorted(row["key"] for row in manifest)[:7]))
        assert_that(outputs["dead"], equal_to([]), label="NoDead")


def _write_corpus(root: Path) -> dict[str, str]:
    """Two good files and four bad ones; returns file name -> expected outcome."""
    rng = np.random.default_rng(7)
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    soundfile.write(root / "good" / "tone.wav", tone, 8000)
    soundfile.write(root / "good" / "tone.flac", tone, 8000)
    (root / "bad" / "random.wav").write_bytes(rng.bytes(4096))
    (root / "bad" / "empty.ogg").write_bytes(b"")
    flac = (root / "good" / "tone.flac").read_bytes()
    (root / "bad" / "truncated.flac").write_bytes(flac[:60])
    nan = np.full(4000, np.nan, dtype=np.float32)
    soundfile.write(root / "bad" / "nan.wav", nan, 8000, subtype="FLOAT")
    return {"tone.wav": "ok", "tone.flac": "ok", "random.wav": "decode: undecodable", "empty.ogg": "decode: empty",
            "truncated.flac": "decode: undecodable", "nan.wav": "condition: non_finite"}


def test_corrupt_files_become_dead_letters(tmp_path):
    expected = _write_corpus(tmp_path / "audio")
    run = extract.run([f"--dataset={tmp_path / 'audio'}", "--features=logmel,mfcc", f"--output={tmp_path / 'out'}",
                       "--run_id=bad", "--max_failure_ratio=1"])
    assert run["counts"]["listed"] == 6
    assert run["counts"]["ok"] == 2
    assert run["counts"]["failed"] == 4
    errors = [json.loads(line) for path in output_files(run, "errors") for line in Path(path).read_text().splitlines()]
    by_name = {Path(e["uri"]).name: e for e in errors}
    for name, outcome in expected.items():
        if outcome == "ok":
            assert name not in by_name
        else:
            assert f"{by_name[name]['stage']}: {by_name[name]['reason']}" == outcome, by_name[name]
            assert by_name[name]["key"] == f"bad/{name}" and by_name[name]["uri"] == str(tmp_path / "audio" / "bad" / name)
            assert name in by_name[name]["message"]
            assert by_name[name]["extractors"] == ["logmel@1", "mfcc@1"]
    assert set(_parquet_rows(run)) == {"good/tone.wav", "good/tone.flac"}
    assert {p["reason"] for p in run["failures"]["reasons"]} == {o for o in expected.values() if o != "ok"}


def test_failure_budget_exits_non_zero_after_writing(tmp_path, capsys):
    _write_corpus(tmp_path / "audio")
    code = extract.main([f"--dataset={tmp_path / 'audio'}", "--features=logmel", f"--output={tmp_path / 'out'}", "--run_id=x"])
    assert code == extract.EXIT_FAILURE_BUDGET
    err = capsys.readouterr().err
    assert "4 of 6 items failed" in err and "--max_failure_ratio" in err
    assert (tmp_path / "out" / "audio" / "x" / "run.json").exists()


def test_segmentation_gives_stable_offset_keys(tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    y = np.random.default_rng(0).standard_normal(16000 * 2 + 4000).astype(np.float32) * 0.1
    soundfile.write(root / "a.wav", y, 16000)
    run = extract.run([f"--dataset={root}", "--features=logmel", "--segment_seconds=1", f"--output={tmp_path / 'o'}", "--run_id=s"])
    rows = _parquet_rows(run)
    assert sorted(rows) == ["a.wav#0", "a.wav#16000", "a.wav#32000"]  # <key>#<start sample>, keys relative to the folder
    assert [rows[k]["num_samples"] for k in sorted(rows)] == [16000, 16000, 4000]
    assert all(rows[k]["item_key"] == "a.wav" and rows[k]["uri"] == str(root / "a.wav") for k in rows)
    assert run["counts"] == {"listed": 1, "ok": 1, "failed": 0, "partial": 0, "records": 3}
    assert rows["a.wav#16000"]["logmel_shape"] == [1 + 16000 // 256, 64]


def test_unsegmented_items_longer_than_the_batch_are_windowed_to_the_same_bytes(tmp_path):
    """--batch_seconds=1 extracts 6.3 s and 2.5 s items in windows of 1 s; every feature of every
    built-in is byte-identical to a run whose batch holds both items whole."""
    from features.registry import BUILTIN_MODULES

    root = tmp_path / "long"
    root.mkdir()
    rng = np.random.default_rng(3)
    for name, seconds in (("a.wav", 6.3), ("b.wav", 2.5)):
        n = int(16000 * seconds)
        t = np.arange(n) / 16000
        y = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 0.7 * t)) + 0.03 * rng.standard_normal(n)
        soundfile.write(root / name, y.astype(np.float32), 16000, subtype="FLOAT")
    features = ",".join(BUILTIN_MODULES)
    runs = {
        seconds: extract.run([f"--dataset={root}", f"--features={features}", f"--batch_seconds={seconds}",
                              f"--output={tmp_path / 'out'}", f"--run_id=b{seconds}"])
        for seconds in (1, 240)
    }
    windowed, whole = (_parquet_rows(runs[s]) for s in (1, 240))
    assert sorted(windowed) == sorted(whole) == ["a.wav", "b.wav"]
    names = [o["name"] for e in runs[240]["extractors"] for o in e["outputs"]]
    assert "onset_tempo" in names and "summary_logmel_mean" in names and "chroma" in names
    for key in whole:
        assert windowed[key]["num_samples"] > 16000
        for name in names:
            expected = np.asarray(whole[key][name], dtype=np.float32)
            assert np.asarray(windowed[key][name], dtype=np.float32).tobytes() == expected.tobytes(), (key, name)


def test_limit_keeps_first_keys(tmp_path):
    run = extract.run(["--dataset=sample", "--features=logmel", "--limit=5", f"--output={tmp_path}", "--run_id=l"])
    keys = sorted(row["key"] for row in _manifest_rows())[:5]
    assert sorted(_parquet_rows(run)) == keys
    assert run["counts"]["listed"] == 5


def test_parquet_is_queryable_with_duckdb(sample_run):
    import duckdb

    pattern = os.path.join(sample_run["outputs"]["run_dir"], "parquet", "*.parquet")
    rows = duckdb.sql(
        f"SELECT label, count(*) AS n, avg(spectral_centroid[1]) AS c FROM read_parquet('{pattern}') GROUP BY label ORDER BY label"
    ).fetchall()
    assert [(label, n) for label, n, _ in rows] == [(label, CLIPS_PER_CLASS) for label in sorted(CLASSES)]
    assert all(c > 0 for _, _, c in rows)


def test_beam_flags_reach_the_runner(tmp_path):
    """Standard Beam options work: two worker processes, and run.json records them."""
    run = extract.run(["--dataset=sample", "--features=logmel", "--limit=8", f"--output={tmp_path}", "--run_id=mp",
                       "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert run["counts"] == {"listed": 8, "ok": 8, "failed": 0, "partial": 0, "records": 8}
    assert run["beam"]["options"]["direct_num_workers"] == 2
    assert run["beam"]["options"]["direct_running_mode"] == "multi_processing"


def test_every_builtin_extractor_runs_in_the_pipeline(tmp_path):
    from features.registry import BUILTIN_MODULES  # model extractors need a model: tests/pipelines/test_model_extract.py

    run = extract.run(["--dataset=sample", f"--features={','.join(BUILTIN_MODULES)}", "--limit=10", f"--output={tmp_path}", "--run_id=all"])
    assert run["counts"]["failed"] == 0, run["failures"]
    rows = _parquet_rows(run)
    assert len(rows) == 10
    row = next(iter(rows.values()))
    assert isinstance(row["onset_tempo"], float) and 30 < row["onset_tempo"] < 320
    assert row["chroma_shape"][1] == 12


def test_beam_metrics_count_items_and_audio(tmp_path):
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    _write_corpus(tmp_path / "audio")
    the_plan = extract.plan([f"--dataset={tmp_path / 'audio'}", "--features=logmel", f"--output={tmp_path / 'o'}", "--run_id=m"])
    p = TestPipeline(runner="FnApiRunner")
    extract.build(p, the_plan)
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("featurebeam"))["counters"]
    }
    assert counters["records_ok"] == 2 and counters["records_committed"] == 2
    assert counters["items_failed"] == 4
    assert counters["extracted_audio_ms"] == 2000  # two 1 s tones
    # per-stage time (benchmarks/compare.py prints it): every stage, listing to commit records, took some
    from featurebeam.stages import STAGES, counter_name

    assert all(counters[counter_name(stage)] > 0 for stage in STAGES), counters


def test_items_are_batched_for_the_runners_workers_not_a_fixed_shard_count(sample_run, tmp_path):
    """Every decode batch is at least one commit: 60 clips on one worker make full batches (one
    item shard cut into batches of 256, extracted 64 clips at a time), not one per clip (a fixed
    256 shards gave 2.3 clips each); more shards (as for more workers) make at most one partial
    batch each."""
    per_batch = min(extract.ITEMS_PER_BATCH, transforms.BATCH_CLIPS)
    assert len(output_files(sample_run, "parquet")) == -(-N_SAMPLE // per_batch)
    run = extract.run(["--dataset=sample", "--features=logmel", f"--output={tmp_path}", "--run_id=four", "--item_shards=4"])
    assert run["counts"]["records"] == N_SAMPLE
    assert len(output_files(run, "parquet")) <= 4 + -(-N_SAMPLE // per_batch)
    with pytest.raises(Exception, match="--item_shards must be positive"):
        extract.plan(["--dataset=sample", f"--output={tmp_path}", "--run_id=zero", "--item_shards=0"])


def test_a_batch_of_many_clips_is_extracted_64_at_a_time_while_its_decoder_works_ahead(tmp_path):
    """150 one-second items in one decode batch: clips leave in extraction batches of
    BATCH_CLIPS, in order, and every item after the first is requested ahead of its turn (the
    child decodes them while earlier clips are extracted), with one decoder child throughout."""
    from datasets.base import AudioItem

    items = []
    for i in range(150):
        path = tmp_path / f"c{i:03d}.wav"
        soundfile.write(path, np.full(16000, 0.001 * (i + 1), np.float32), 16000)
        items.append(AudioItem(key=f"c{i:03d}", uri=str(path)))
    decode = transforms.DecodeFn(sample_rate=16000, segment_samples=None, extractor_ids=("logmel@1",), max_item_seconds=None)
    fn = transforms.DecodeBatchFn(decode, max_batch_samples=240 * 16000)
    fn.setup()
    try:
        sent = []
        prefetch = decode.decoder.prefetch

        def watched(upcoming):
            before = decode.decoder.ahead
            prefetch(upcoming)
            sent.append(decode.decoder.ahead - before)

        decode.decoder.prefetch = watched
        batches = list(fn.process([(item, {}, frozenset(), ()) for item in items]))
        assert decode.decoder.starts == 1
    finally:
        fn.teardown()
    assert [len(batch) for batch in batches] == [64, 64, 22]
    clips = [clip for batch in batches for clip in batch]
    assert [clip.key for clip in clips] == [item.key for item in items]
    assert all(np.allclose(clip.waveform, 0.001 * (i + 1), atol=1e-4) for i, clip in enumerate(clips))
    assert sent[0] == 149 and sum(sent) == 149  # all sent ahead once the first item began
