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
    items, dead = _list(ManifestDataset(uri=str(tmp_path / "m.csv")))
    assert [it.uri for it in items] == [str(tmp_path / "a.wav"), "gs://bucket/b.flac"]
    a = items[0]
    assert (a.key, a.label, a.split, a.offset_seconds, a.duration_seconds) == (str(tmp_path / "a.wav"), "dog", "train", 1.5, 2.0)
    assert a.metadata == (("speaker", "alice"),)
    assert items[1].offset_seconds is None
    assert len(dead) == 1 and dead[0].stage == "list" and "no 'uri'" in dead[0].message


def test_jsonl_manifest_with_keys_and_bad_rows(tmp_path):
    rows = [{"uri": "x/1.wav", "key": "k1", "label": "a"}, {"uri": "/abs/2.wav", "split": "valid"}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n[1, 2]\n\n"
    (tmp_path / "m.jsonl").write_text(text)
    items, dead = _list(ManifestDataset(uri=str(tmp_path / "m.jsonl")))
    assert [(it.key, it.uri, it.split) for it in items] == [("/abs/2.wav", "/abs/2.wav", "valid"), ("k1", str(tmp_path / "x/1.wav"), None)]
    assert sorted(d.error_type for d in dead) == ["JSONDecodeError", "ValueError"]
    assert all(str(tmp_path / "m.jsonl") in d.message for d in dead)


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
    dataset = ManifestDataset(uri=uri)
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
    dataset = ManifestDataset(uri=uri)
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
