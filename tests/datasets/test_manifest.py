"""CSV and JSONL manifests: columns, relative URIs, splits, and bad rows as dead letters."""

from __future__ import annotations

import json

import pytest
from tests.beam_util import collect

from datasets.base import AudioItem
from datasets.manifest import ManifestDataset
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError



def _list(dataset):
    dataset.prepare()
    out = collect(dataset.listing())
    items = sorted((e for e in out if isinstance(e, AudioItem)), key=lambda it: it.key)
    dead = [e for e in out if isinstance(e, DeadLetter)]
    return items, dead


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "uri,label,split,offset,duration,speaker\n"
        "a.wav,dog,train,1.5,2,alice\n"
        "gs://bucket/b.flac,cat,test,,,bob\n"
        ",cat,test,,,carol\n"
    )
    items, dead = _list(ManifestDataset(uri=str(tmp_path / "m.csv"), allowed_uri_prefixes=["gs://bucket/"]))
    assert [it.uri for it in items] == [str(tmp_path / "a.wav"), "gs://bucket/b.flac"]
    a = items[0]
    assert (a.key, a.label, a.split, a.offset_seconds, a.duration_seconds) == ("a.wav", "dog", "train", 1.5, 2.0)
    assert a.metadata == (("speaker", "alice"),)
    assert items[1].key == "gs://bucket/b.flac" and items[1].offset_seconds is None  # elsewhere: its own key
    assert len(dead) == 1 and dead[0].stage == "list" and "no 'uri'" in dead[0].message
    assert dead[0].key == "m.csv:,cat,test,,,carol" and dead[0].uri == str(tmp_path / "m.csv")


def test_jsonl_manifest_with_keys_and_bad_rows(tmp_path):
    rows = [{"uri": "x/1.wav", "key": "k1", "label": "a"}, {"uri": "/abs/2.wav", "split": "valid"}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n[1, 2]\n\n"
    (tmp_path / "m.jsonl").write_text(text)
    items, dead = _list(ManifestDataset(uri=str(tmp_path / "m.jsonl"), allowed_uri_prefixes=["/abs"]))
    assert [(it.key, it.uri, it.split) for it in items] == [("/abs/2.wav", "/abs/2.wav", "valid"), ("k1", str(tmp_path / "x/1.wav"), None)]
    assert sorted(d.error_type for d in dead) == ["JSONDecodeError", "ValueError"]
    assert all(str(tmp_path / "m.jsonl") in d.message for d in dead)


def test_keys_without_a_key_column_are_relative_to_the_manifests_folder(tmp_path):
    """Relative uris as written (normalised), absolute ones under the manifest's folder relative
    to it, anything else its own key; explicit keys as given. A manifest copied with its audio
    keeps every key but those naming audio elsewhere by absolute uri."""
    import shutil

    rows = ["a.wav", "./sub/b.wav", "sub/../c.wav", "{here}/sub/d.wav", "file://{here}/e.wav", "../up/f.wav",
            "/abs/g.wav", "gs://bucket/h.wav"]
    here = tmp_path / "one" / "lists"
    here.mkdir(parents=True)
    (here / "m.csv").write_text("uri\n" + "".join(r.format(here=here) + "\n" for r in rows))
    expected = ["a.wav", "sub/b.wav", "c.wav", "sub/d.wav", "e.wav", "../up/f.wav", "/abs/g.wav", "gs://bucket/h.wav"]

    def keys(folder):
        dataset = ManifestDataset(uri=str(folder / "m.csv"), allowed_uri_prefixes=[str(tmp_path), "/abs", "gs://bucket"])
        items, dead = _list(dataset)
        assert not dead
        return {it.uri: it.key for it in items}, dataset

    listed, dataset = keys(here)
    assert [listed[dataset.resolve(r.format(here=here))] for r in rows] == expected  # each row's uri as resolved
    assert listed[str(here / "sub/../c.wav")] == "c.wav" and listed[f"file://{here}/e.wav"] == "e.wav"
    copy = tmp_path / "two" / "lists"
    shutil.copytree(here, copy)
    (copy / "m.csv").write_text((here / "m.csv").read_text().replace(str(here), str(copy)))  # its own absolute paths
    copied, copied_dataset = keys(copy)
    assert sorted(copied.values()) == sorted(expected)
    assert copied_dataset.identity() == dataset.identity() and str(here) not in json.dumps(dataset.identity())
    # An explicit key column wins, whatever the uri.
    (here / "k.jsonl").write_text(json.dumps({"uri": "/abs/g.wav", "key": "mine"}) + "\n")
    items, _ = _list(ManifestDataset(uri=str(here / "k.jsonl"), allowed_uri_prefixes=["/abs"]))
    assert [(it.key, it.uri) for it in items] == [("mine", "/abs/g.wav")]


def test_a_bucket_manifests_keys_follow_the_same_rule():
    dataset = ManifestDataset(uri="gs://b/lists/m.csv")
    assert [dataset.row_key(u) for u in ("a.wav", "gs://b/lists/sub/x.wav", "gs://b/other/y.wav", "gs://c/lists/z.wav")] == [
        "a.wav", "sub/x.wav", "gs://b/other/y.wav", "gs://c/lists/z.wav"
    ]


def _refused(letter: DeadLetter, uri: str, suggestion: str) -> None:
    assert (letter.stage, letter.reason, letter.error_type, letter.uri) == ("list", "uri_not_allowed", "UriNotAllowed", uri)
    assert uri in letter.message and f"--allowed_uri_prefixes={suggestion}" in letter.message
    assert "\n" not in letter.message


def test_local_manifest_rows_stay_in_its_folder_unless_allowed(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "m.csv").write_text(
        "uri,key\n"
        "a.wav,inside\n"
        "sub/b.wav,below\n"
        "../secret.wav,climbs\n"
        "/etc/passwd,absolute\n"
        "file:///etc/shadow,file-uri\n"
        "gs://other-team/x.wav,bucket\n"
    )
    manifest = ManifestDataset(uri=str(tmp_path / "audio" / "m.csv"))
    items, dead = _list(manifest)
    assert [it.key for it in items] == ["below", "inside"]
    refused = {d.key: d for d in dead}
    assert sorted(refused) == ["absolute", "bucket", "climbs", "file-uri"]
    _refused(refused["climbs"], str(tmp_path / "audio" / "../secret.wav"), f"{tmp_path}/")
    _refused(refused["absolute"], "/etc/passwd", "/etc/")
    _refused(refused["file-uri"], "file:///etc/shadow", "/etc/")
    _refused(refused["bucket"], "gs://other-team/x.wav", "gs://other-team/")
    assert f"allowed: {tmp_path}/audio/" in refused["bucket"].message
    # --allowed_uri_prefixes (as registry.resolve passes it) opens exactly the prefixes named.
    manifest.restrict(allowed_uri_prefixes="gs://other-team/,/etc")
    items, dead = _list(manifest)
    assert [it.key for it in items] == ["absolute", "below", "bucket", "file-uri", "inside"]
    assert [d.key for d in dead] == ["climbs"]
    assert manifest.describe()["allowed_uri_prefixes"] == [f"{tmp_path}/audio/", "gs://other-team/", "/etc/"]


def test_allowed_prefixes_are_folders_and_bad_ones_are_refused(tmp_path):
    from datasets.allowlist import UriAllowList, parse_prefixes
    from featurebeam.errors import ConfigError

    allow = UriAllowList.for_dataset(own="gs://a/m.csv".rsplit("/", 1)[0], extra=["gs://b/clips"])
    assert allow.prefixes == ("gs://a/", "gs://b/clips/")
    assert allow.allows("gs://a/x/y.wav") and allow.allows("gs://b/clips/1.wav")
    assert not allow.allows("gs://b/clips2/1.wav") and not allow.allows("gs://ab/x.wav")
    assert not allow.allows("/a/x.wav") and not allow.allows("s3://a/x.wav")
    for bad, match in (("gs://", "names no bucket"), ("gs://a/,,gs://b/", "empty entry")):
        with pytest.raises(ConfigError, match=match):
            parse_prefixes(bad)


def _manifest(tmp_path, fmt: str) -> tuple[str, list[tuple[str, str]]]:
    """A manifest of 40 rows of varied lengths, CRLF line ends, a BOM and a blank line."""
    rows = [(f"/clips/{i:03d}{'x' * (i % 7)}.wav", f"label,{i % 3}") for i in range(40)]
    if fmt == "csv":
        lines = ["uri,label"] + [f'{uri},"{label}"' for uri, label in rows]
    else:
        lines = [json.dumps({"uri": uri, "label": label}) for uri, label in rows]
    lines.insert(5, "")
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    return str(path), rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_every_byte_range_split_lists_each_row_once(tmp_path, fmt):
    from datasets.manifest import _PlanRangesFn, _ReadRangeFn

    uri, rows = _manifest(tmp_path, fmt)
    dataset = ManifestDataset(uri=uri, allowed_uri_prefixes=["/clips"])
    dataset.prepare()
    size = (tmp_path / f"m.{fmt}").stat().st_size
    for range_bytes in [1, 2, 3, 5, 8, 13, 31, 64, 100, 257, size - 1, size, 1 << 20]:
        ranges = list(_PlanRangesFn(range_bytes).process(uri))
        assert ranges[0].start == 0 and ranges[-1].end == size and len(ranges) == -(-size // range_bytes)
        reader = _ReadRangeFn(dataset)
        listed = [e for r in ranges for e in reader.process(r)]
        assert [(it.uri, it.label) for it in listed] == rows, range_bytes  # in order, each once, no dead letters


def test_manifest_ranges_are_read_by_separate_tasks(tmp_path):
    from tests.datasets.conftest import run_listing

    uri, rows = _manifest(tmp_path, "csv")
    dataset = ManifestDataset(uri=uri, allowed_uri_prefixes=["/clips"])
    dataset.prepare()
    dataset.range_bytes = 256
    elements, counters = run_listing(dataset)
    assert sorted((it.uri, it.label) for it in elements) == sorted(rows)
    assert counters["manifest_ranges"] == -(-(tmp_path / "m.csv").stat().st_size // 256) > 1


def test_csv_without_uri_column_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.wav,dog\n")
    with pytest.raises(DatasetError, match="has no 'uri' column \\(found path, label\\)"):
        ManifestDataset(uri=str(tmp_path / "m.csv")).prepare()


def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ManifestDataset(uri=str(tmp_path / "none.jsonl")).prepare()


@pytest.mark.emulator
def test_manifest_in_a_bucket_lists_relative_and_absolute_uris(gcs_emulator, gcs_audio):
    from tests.datasets.conftest import AUDIO_BUCKET

    bucket = gcs_emulator.client().bucket(AUDIO_BUCKET)
    wren = sorted(u for u, label in gcs_audio.clips.items() if label == "wren")
    rows = "uri,key,label,split\n" + "".join(
        f"{uri.replace(gcs_audio.root + '/', '') if i % 2 else uri},w{i},wren,{'valid' if i == 0 else 'train'}\n"
        for i, uri in enumerate(wren)
    )
    bucket.blob("corpus/wren.csv").upload_from_string(rows)  # relative URIs resolve against corpus/
    items, dead = _list(ManifestDataset(uri=f"{gcs_audio.root}/wren.csv"))
    assert not dead
    assert [(it.key, it.uri, it.split) for it in items] == [
        (f"w{i}", uri, "valid" if i == 0 else "train") for i, uri in enumerate(wren)
    ]


@pytest.mark.emulator
def test_bucket_manifest_rows_stay_in_its_bucket(gcs_emulator, gcs_audio):
    from tests.datasets.conftest import AUDIO_BUCKET

    inside = sorted(gcs_audio.clips)[0]
    rows = [{"uri": inside, "key": "inside"}, {"uri": "crow/crow_0.wav", "key": "relative"},
            {"uri": "gs://other-team/x.wav", "key": "other-bucket"}, {"uri": "/etc/passwd", "key": "local-path"},
            {"uri": "file:///etc/passwd", "key": "file-uri"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    gcs_emulator.client().bucket(AUDIO_BUCKET).blob("corpus/lanes.jsonl").upload_from_string(text)
    items, dead = _list(ManifestDataset(uri=f"{gcs_audio.root}/lanes.jsonl"))
    assert [it.key for it in items] == ["inside", "relative"]  # the manifest's own bucket
    refused = {d.key: d for d in dead}
    _refused(refused["other-bucket"], "gs://other-team/x.wav", "gs://other-team/")
    _refused(refused["local-path"], "/etc/passwd", "/etc/")  # a remote catalogue never names local files by default
    _refused(refused["file-uri"], "file:///etc/passwd", "/etc/")
    assert f"allowed: gs://{AUDIO_BUCKET}/)" in refused["local-path"].message


@pytest.mark.emulator
@pytest.mark.slow
def test_split_column_of_a_bucket_manifest_reaches_the_exports(gcs_emulator, gcs_audio, tmp_path):
    import os

    import pyarrow.parquet as pq

    from export import load_tfrecords
    from pipelines import extract
    from tests.datasets.conftest import AUDIO_BUCKET, counts

    clips = sorted(gcs_audio.clips.items())
    splits = {uri: ("test", "valid", "train")[i % 3] for i, (uri, _) in enumerate(clips)}
    text = "".join(json.dumps({"uri": uri, "label": label, "split": splits[uri]}) + "\n" for uri, label in clips)
    gcs_emulator.client().bucket(AUDIO_BUCKET).blob("manifests/birds.jsonl").upload_from_string(text)
    run = extract.run([f"--dataset=gs://{AUDIO_BUCKET}/manifests/birds.jsonl", "--features=logmel",
                       f"--output={tmp_path}", "--run_id=m"])
    assert counts(run) == {"listed": len(clips), "ok": len(clips), "failed": 0, "records": len(clips)}
    assert run["split_counts"] == {"test": 2, "train": 2, "valid": 2}
    table = pq.read_table(os.path.join(run["outputs"]["run_dir"], "parquet"), columns=["key", "split"])
    assert dict(zip(*table.to_pydict().values())) == splits
    valid = load_tfrecords(run["outputs"]["run_dir"], features=["logmel"], split="valid", batch_size=8)
    labels = [label for _, batch in valid for label in batch.numpy().tolist()]
    assert len(labels) == 2


@pytest.mark.slow
def test_refused_rows_reach_the_run_as_list_dead_letters_and_are_never_read(tmp_path):
    import glob
    import os

    import numpy as np
    import soundfile

    from pipelines import extract

    audio = tmp_path / "audio"
    audio.mkdir()
    rate = 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    for name in ("a.wav", "b.wav"):
        soundfile.write(audio / name, tone, rate)
    outside = tmp_path / "private" / "c.wav"
    outside.parent.mkdir()
    soundfile.write(outside, tone, rate)
    (audio / "m.csv").write_text(f"uri,key\na.wav,a\nb.wav,b\n{outside},c\n")
    run = extract.run([f"--dataset={audio / 'm.csv'}", "--features=summary", f"--output={tmp_path / 'runs'}",
                       "--run_id=lanes", "--max_failure_ratio=1", "--decode_in_process"])
    assert {k: run["counts"][k] for k in ("listed", "ok", "failed")} == {"listed": 3, "ok": 2, "failed": 1}
    errors = [json.loads(line) for path in glob.glob(os.path.join(run["outputs"]["run_dir"], "errors", "part-*"))
              for line in open(path)]
    assert [(e["key"], e["stage"], e["reason"], e["uri"]) for e in errors] == [("c", "list", "uri_not_allowed", str(outside))]
    assert "--allowed_uri_prefixes=" in errors[0]["message"]
    assert run["dataset"]["allowed_uri_prefixes"] == [f"{audio}/"]
