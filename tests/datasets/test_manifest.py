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


def test_csv_without_uri_column_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.wav,dog\n")
    with pytest.raises(DatasetError, match="has no 'uri' column \\(found path, label\\)"):
        ManifestDataset(uri=str(tmp_path / "m.csv")).prepare()


def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ManifestDataset(uri=str(tmp_path / "none.jsonl")).prepare()
