"""The gs:// adapter against the GCS emulator: listing, keys, labels, fingerprints, failures, and
full extraction runs reading from and writing to the emulated bucket."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from tests.beam_util import collect
from tests.datasets.conftest import AUDIO_BUCKET, counts, encode, run_listing

from datasets import registry
from datasets.base import FingerprintFn
from datasets.gcs import GcsDataset
from featurebeam.errors import ConfigError, DatasetError
from export import formats
from export.metadata import output_files



def _list(dataset):
    """uri -> item (keys are relative to the dataset's root, so they differ between these datasets)."""
    dataset.prepare()
    return {item.uri: item for item in collect(dataset.listing())}


def _relative(clips: dict[str, str], root: str) -> dict[str, str]:
    """`gcs_audio.clips` keyed as a dataset rooted at `root` keys them."""
    return {uri[len(root) + 1:]: label for uri, label in clips.items() if uri.startswith(f"{root}/")}


# -- without the emulator ----------------------------------------------------------------------


def test_specs_and_configs_resolve_to_gcs_datasets(tmp_path, monkeypatch):
    folder = registry.resolve("gs://b-1/audio")
    assert isinstance(folder, GcsDataset)
    assert (folder.root, folder.patterns, folder.name) == ("gs://b-1/audio", ["gs://b-1/audio/**"], "audio")
    assert GcsDataset(uri="gs://b-1/").patterns == ["gs://b-1/**"]
    assert registry.resolve("gs://b-1/a/**.wav").patterns == ["gs://b-1/a/**.wav"]
    assert registry.resolve("gs://b-1/a/clip.WAV").patterns == ["gs://b-1/a/clip.WAV"]  # one object
    assert registry.resolve("gs://b-1/lists/train.csv").__class__.__name__ == "ManifestDataset"
    monkeypatch.setenv("FEATUREBEAM_DATASETS_DIR", str(tmp_path))
    (tmp_path / "birds.yaml").write_text("type: gcs\nbucket: b-1\nprefix: audio/\nextensions: [flac]\nlabel_from: none\n")
    birds = registry.resolve("birds")
    assert (birds.name, birds.patterns, birds.extensions, birds.label_from) == ("birds", ["gs://b-1/audio/**"], (".flac",), "none")


@pytest.mark.parametrize(
    "text, match",
    [
        ("type: gcs\nprefix: audio/\n", r"birds.yaml: a gcs dataset needs either uri .* or bucket"),
        ("type: gcs\nbucket: Bad_Bucket!\n", r"birds.yaml: 'Bad_Bucket!' in gs://Bad_Bucket!/ is not a valid bucket name"),
        ("type: gcs\nbucket: b-1\nglob: '*.wav'\n", r"birds.yaml: unknown key 'glob' for a GcsDataset; valid keys are"),
        ("type: gcs\nuri: /local/path\n", r"birds.yaml: '/local/path' is not a gs:// URI"),
    ],
)
def test_bad_gcs_configs(tmp_path, monkeypatch, text, match):
    monkeypatch.setenv("FEATUREBEAM_DATASETS_DIR", str(tmp_path))
    (tmp_path / "birds.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        registry.resolve("birds")


# -- listing against the emulator --------------------------------------------------------------


@pytest.mark.emulator
def test_prefix_lists_audio_recursively_with_stable_keys_labels_and_sizes(gcs_emulator, gcs_audio):
    listed = _list(GcsDataset(uri=f"{gcs_audio.root}/"))
    assert sorted(listed) == sorted(gcs_audio.clips)  # README.txt and notes.json are not audio
    bucket = gcs_emulator.client().bucket(AUDIO_BUCKET)
    for uri, item in listed.items():
        key = uri[len(gcs_audio.root) + 1:]  # relative to the prefix: crow/crow_0.wav
        assert (item.key, item.uri, item.label, item.size) == (key, uri, gcs_audio.clips[uri], gcs_audio.sizes[uri])
        # The object's generation, from the listing call itself.
        assert item.generation == f"generation:{bucket.get_blob(uri.split('/', 3)[3]).generation}"
    again = _list(registry.resolve(gcs_audio.root))
    assert again == listed  # keys, sizes and generations are stable across listings


@pytest.mark.emulator
def test_globs_and_extension_filters(gcs_audio):
    wavs = _list(GcsDataset(uri=f"gs://{AUDIO_BUCKET}/**.wav"))
    assert sorted(wavs) == sorted(u for u in gcs_audio.clips if u.endswith(".wav"))
    one_level = _list(GcsDataset(uri=f"{gcs_audio.root}/*/*.flac"))
    assert sorted(one_level) == sorted(u for u in gcs_audio.clips if u.endswith(".flac"))
    config = _list(GcsDataset(bucket=AUDIO_BUCKET, prefix="corpus/crow", extensions=["ogg", ".FLAC"], label_from="none"))
    assert sorted(config) == sorted(u for u in gcs_audio.clips if "/crow/" in u and not u.endswith(".wav"))
    assert {item.label for item in config.values()} == {None}
    # Keys: relative to the bucket for a glob at its top, to the fixed folder of a deeper glob, to the prefix.
    assert sorted(i.key for i in wavs.values()) == sorted(u.split("/", 3)[3] for u in wavs)
    assert sorted(i.key for i in one_level.values()) == sorted(u[len(gcs_audio.root) + 1:] for u in one_level)
    assert all("/" not in i.key for i in config.values())


@pytest.mark.emulator
def test_overwriting_an_object_changes_the_fingerprint(gcs_emulator, gcs_audio):
    bucket = gcs_emulator.client().bucket(AUDIO_BUCKET)
    bucket.blob("refresh/a.wav").upload_from_string(encode(300.0, ext=".wav"))
    bucket.blob("refresh/b.wav").upload_from_string(encode(600.0, ext=".wav"))
    dataset = GcsDataset(uri=f"gs://{AUDIO_BUCKET}/refresh/")

    def fingerprint():
        items = list(_list(dataset).values())
        fn = FingerprintFn()
        return fn.extract_output(fn.add_inputs(fn.create_accumulator(), items)), {i.key: i.generation for i in items}

    before, generations = fingerprint()
    bucket.blob("refresh/a.wav").upload_from_string(encode(300.0, ext=".wav"))  # same bytes, new generation
    after, new_generations = fingerprint()
    assert before["listed"] == after["listed"] == 2
    assert before["fingerprint"] != after["fingerprint"]
    changed = [k for k in generations if generations[k] != new_generations[k]]
    assert changed == ["a.wav"]


@pytest.mark.emulator
def test_listing_fans_out_by_folder_and_lists_each_object_once(gcs_emulator):
    bucket = gcs_emulator.make_bucket("featurebeam-fanout")
    names = ["fan/top.wav", "fan/a/1.wav", "fan/a/x/2.wav", "fan/a/x/deep/er/3.wav", "fan/b/4.flac", "fan/b/y/5.wav",
             "fan/b/y/notes.txt", "fan/b/z/deep/6.wav"]
    for name in names:
        bucket.blob(name).upload_from_string(b"RIFF" + name.encode())
    dataset = GcsDataset(uri="gs://featurebeam-fanout/fan/")
    dataset.prepare()
    elements, counters = run_listing(dataset)
    audio = sorted(n[len("fan/"):] for n in names if not n.endswith(".txt"))
    assert sorted(e.key for e in elements) == audio  # once each, across every fan-out level, relative to fan/
    assert {e.key.rsplit("/", 1)[-1]: e.label for e in elements} == {
        "top.wav": None, "1.wav": "a", "2.wav": "x", "3.wav": "er", "4.flac": "b", "5.wav": "y", "6.wav": "deep"
    }
    # fan/ -> fan/a/, fan/b/ -> fan/a/x/, fan/b/y/, fan/b/z/ (whole subtrees): six tasks
    assert counters["listing_tasks"] == 6 and "listing_tasks_failed" not in counters
    glob, _ = run_listing(GcsDataset(uri="gs://featurebeam-fanout/fan/*/*/*.wav"))
    assert sorted(e.key for e in glob) == ["a/x/2.wav", "b/y/5.wav"]  # relative to the glob's root, fan/
    assert sorted(e.uri for e in glob) == ["gs://featurebeam-fanout/fan/a/x/2.wav", "gs://featurebeam-fanout/fan/b/y/5.wav"]


@pytest.mark.emulator
def test_a_prefix_a_copy_in_another_bucket_and_a_local_copy_have_the_same_keys(gcs_emulator, gcs_audio, tmp_path):
    """Keys are relative to the prefix (or folder): the same objects staged elsewhere keep them,
    while each item's uri says where it was read."""
    from datasets.files import FilesDataset

    source = gcs_emulator.client().bucket(AUDIO_BUCKET)
    staged = gcs_emulator.make_bucket("featurebeam-staged")
    local = tmp_path / "mirror"
    for uri in gcs_audio.clips:
        name = uri.split("/", 3)[3]
        data = source.blob(name).download_as_bytes()
        staged.blob(f"deeper/down/{name}").upload_from_string(data)
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)

    def keys(dataset):
        return sorted((item.key, item.label, item.size) for item in _list(dataset).values())

    original = keys(GcsDataset(uri=f"{gcs_audio.root}/"))
    assert [key for key, _, _ in original] == sorted(_relative(gcs_audio.clips, gcs_audio.root))
    assert keys(GcsDataset(uri="gs://featurebeam-staged/deeper/down/corpus")) == original
    assert keys(FilesDataset(uri=str(local / "corpus"))) == original
    assert sorted(_list(GcsDataset(uri="gs://featurebeam-staged/deeper/down/corpus/"))) == sorted(
        f"gs://featurebeam-staged/deeper/down/{uri.split('/', 3)[3]}" for uri in gcs_audio.clips
    )


@pytest.mark.emulator
def test_a_transient_failure_of_one_task_is_retried_alone(gcs_audio, flaky_gcs):
    flaky_gcs.fail("corpus/wren/", times=2)  # two 503s, then the listing goes through
    elements, counters = run_listing(GcsDataset(uri=f"{gcs_audio.root}/"))
    assert sorted(e.uri for e in elements) == sorted(gcs_audio.clips)
    # The failing task was tried three times; the root task and its sibling once each.
    assert dict(flaky_gcs.lists) == {("corpus/", "/"): 1, ("corpus/crow/", "/"): 1, ("corpus/wren/", "/"): 3}
    assert counters["listing_tasks"] == 3


@pytest.mark.emulator
@pytest.mark.parametrize("status, reason, calls", [(503, "transient_list_failed", 3), (403, "list_failed", 1)])
def test_a_failing_task_becomes_one_dead_letter_and_the_others_list(gcs_audio, flaky_gcs, status, reason, calls):
    from datasets.files import _ListFiles
    from featurebeam.deadletter import DeadLetter

    flaky_gcs.fail("corpus/wren/", times=99, status=status)
    dataset = GcsDataset(uri=f"{gcs_audio.root}/")
    elements, counters = run_listing(dataset, _ListFiles(dataset, tries=3, base_delay=0.01))
    (dead,) = [e for e in elements if isinstance(e, DeadLetter)]
    assert (dead.key, dead.uri, dead.stage, dead.reason) == ("wren/", f"{gcs_audio.root}/wren/", "list", reason)
    assert f"cannot list {gcs_audio.root}/wren/" in dead.message
    assert sorted(e.uri for e in elements if not isinstance(e, DeadLetter)) == sorted(
        uri for uri, label in gcs_audio.clips.items() if label == "crow"
    )
    assert flaky_gcs.lists[("corpus/wren/", "/")] == calls and flaky_gcs.lists[("corpus/crow/", "/")] == 1
    assert counters["listing_tasks_failed"] == 1


@pytest.mark.emulator
@pytest.mark.parametrize(
    "uri, match",
    [
        (f"gs://{AUDIO_BUCKET}/corpus/**.mp3", rf"no audio objects match gs://{AUDIO_BUCKET}/corpus/\*\*\.mp3"),
        (f"gs://{AUDIO_BUCKET}/docs/", rf"no audio objects match gs://{AUDIO_BUCKET}/docs/\*\* \(1 objects under gs://{AUDIO_BUCKET}/docs/, none"),
        (f"gs://{AUDIO_BUCKET}/nothing-here/", rf"no audio objects match gs://{AUDIO_BUCKET}/nothing-here/\*\*"),
        ("gs://featurebeam-no-such-bucket/audio/**.wav", r"bucket gs://featurebeam-no-such-bucket does not exist \(listing .*\) on the emulator at http://127.0.0.1:\d+ .*; check the bucket name"),
    ],
)
def test_empty_match_and_missing_bucket_name_the_pattern(gcs_audio, uri, match):
    with pytest.raises(DatasetError, match=match):
        GcsDataset(uri=uri).prepare()


# -- whole runs --------------------------------------------------------------------------------


def _tf_records(run):
    import tensorflow as tf

    from export.schema import from_pbtxt, parse_specs

    with open(run["outputs"]["schema"]) as handle:
        context_spec, sequence_spec = parse_specs(from_pbtxt(handle.read()))
    out = {}
    for record in tf.data.TFRecordDataset(output_files(run, "tfrecords"), compression_type=formats.of_run(run).tf_compression_type):
        context, sequence = tf.io.parse_single_sequence_example(
            record, context_features=context_spec, sequence_features=sequence_spec
        )
        out[context["key"].numpy().decode()] = {**context, **sequence}
    return out


@pytest.mark.emulator
@pytest.mark.slow
def test_extract_from_gs_uri(gcs_audio, tmp_path):
    from pipelines import extract

    run = extract.run([f"--dataset={gcs_audio.root}/**", "--features=logmel", f"--output={tmp_path}", "--run_id=gcs"])
    n = len(gcs_audio.clips)
    assert counts(run) == {"listed": n, "ok": n, "failed": 0, "records": n}
    assert run["dataset"]["type"] == "GcsDataset" and run["dataset"]["bucket"] == AUDIO_BUCKET
    assert run["dataset"]["fingerprint"].startswith("sha256sum:") and run["dataset"]["listed"] == n
    assert run["label_counts"] == {"crow": 3, "wren": 3}
    assert run["outputs"]["run_dir"] == os.path.join(str(tmp_path), "corpus", "gcs")
    clips = _relative(gcs_audio.clips, gcs_audio.root)  # keys relative to the glob's root, the prefix corpus/
    rows = {row["key"]: row for row in pq.read_table(os.path.join(run["outputs"]["run_dir"], "parquet")).to_pylist()}
    assert {k: r["label"] for k, r in rows.items()} == clips
    assert all(r["uri"] == f"{gcs_audio.root}/{k}" and r["num_samples"] == 8000 for k, r in rows.items())
    records = _tf_records(run)
    assert sorted(records) == sorted(clips)
    peaks = {"crow": set(), "wren": set()}
    for key, record in records.items():
        assert record["label"].numpy().decode() == clips[key]
        assert record["logmel"].shape == (1 + 8000 // 256, 64)
        peaks[clips[key]].add(int(record["logmel"].numpy().mean(axis=0).argmax()))
    assert max(peaks["crow"]) < min(peaks["wren"])  # 440 Hz tones peak in lower mel bands than 1760 Hz ones
    assert json.loads((tmp_path / "corpus" / "gcs" / "run.json").read_text())["run_id"] == "gcs"


@pytest.mark.emulator
@pytest.mark.slow
def test_extract_writes_its_run_to_gs(gcs_emulator, gcs_audio):
    from apache_beam.io.filesystems import FileSystems

    from export import metadata
    from pipelines import extract

    gcs_emulator.make_bucket("featurebeam-runs")
    run = extract.run(
        [f"--dataset={gcs_audio.root}/**.flac", "--features=logmel", "--output=gs://featurebeam-runs/runs", "--run_id=to-gcs"]
    )
    run_dir = "gs://featurebeam-runs/runs/corpus/to-gcs"
    assert run["outputs"]["run_dir"] == run_dir
    assert metadata.read_json(f"{run_dir}/run.json") == json.loads(json.dumps(run))
    assert counts(run) == {"listed": 2, "ok": 2, "failed": 0, "records": 2}
    written = sorted(m.path for m in FileSystems.match([f"{run_dir}/**"])[0].metadata_list)
    assert [p for p in written if p.startswith(f"{run_dir}/parquet/")] == sorted(output_files(run, "parquet"))
    assert not [p for p in written if p.rsplit("/", 1)[1].startswith(".")]  # no temporary files left
    labels = {}
    for path in output_files(run, "parquet"):
        with FileSystems.open(path) as handle:
            labels.update(zip(*pq.read_table(handle, columns=["key", "label"]).to_pydict().values()))
    assert labels == {key: label for key, label in _relative(gcs_audio.clips, gcs_audio.root).items() if key.endswith(".flac")}
