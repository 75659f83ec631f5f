"""Listing local folders and globs through Beam's MatchAll, with labels from parent folders."""

from __future__ import annotations

import pytest
from tests.beam_util import collect

from datasets.files import FilesDataset
from featurebeam.errors import DatasetError


@pytest.fixture
def tree(tmp_path):
    for rel in ("dog/a.wav", "dog/b.FLAC", "cat/c.mp3", "cat/deep/d.ogg", "top.wav", "notes.txt", "cat/e.wav.bak"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(rel) + 1))
    return tmp_path


def _list(dataset):
    dataset.prepare()
    return sorted(((it.key, it.label, it.size) for it in collect(dataset.listing())), key=lambda x: x[0])


def test_directory_lists_audio_recursively_with_labels(tree):
    listed = _list(FilesDataset(uri=str(tree)))
    assert [(k[len(str(tree)) + 1 :], label) for k, label, _ in listed] == [
        ("cat/c.mp3", "cat"), ("cat/deep/d.ogg", "deep"), ("dog/a.wav", "dog"), ("dog/b.FLAC", "dog"), ("top.wav", None)
    ]
    assert all(size == len(k[len(str(tree)) + 1 :]) + 1 for k, _, size in listed)  # sizes come from the listing


def test_glob_and_file_uri(tree):
    listed = _list(FilesDataset(uri=f"file://{tree}/*/*.wav"))
    assert [k.split("/")[-1] for k, _, _ in listed] == ["a.wav"]
    star_star = _list(FilesDataset(uri=f"{tree}/cat/**"))
    assert [k.split("/")[-1] for k, _, _ in star_star] == ["c.mp3", "d.ogg"]


def test_label_from_none_and_name(tree):
    dataset = FilesDataset(uri=str(tree / "dog"), label_from="none")
    assert dataset.name == "dog"
    assert {label for _, label, _ in _list(dataset)} == {None}


def test_empty_match_names_the_pattern(tmp_path):
    with pytest.raises(DatasetError, match=r"no files match .*/\*\*\.wav"):
        FilesDataset(uri=f"{tmp_path}/**.wav").prepare()


def test_keys_are_stable_across_listings(tree):
    assert _list(FilesDataset(uri=str(tree))) == _list(FilesDataset(uri=str(tree)))


def test_bad_label_from_is_refused():
    with pytest.raises(DatasetError, match="label_from must be 'parent_dir' or 'none'"):
        FilesDataset(uri=".", label_from="folder")


def test_listing_fans_out_by_folder_and_lists_each_file_once(tree):
    from tests.datasets.conftest import run_listing

    (tree / "cat/deep/er/est").mkdir(parents=True)
    (tree / "cat/deep/er/est/f.wav").write_bytes(b"x")
    (tree / "empty").mkdir()
    (tree / "link.wav").symlink_to(tree / "top.wav")  # a link to a file is listed under its own name
    (tree / "cat/loop").symlink_to(tree)  # a link to a folder is not followed (no cycles)
    elements, counters = run_listing(FilesDataset(uri=str(tree)))
    assert sorted(e.key[len(str(tree)) + 1:] for e in elements) == [
        "cat/c.mp3", "cat/deep/d.ogg", "cat/deep/er/est/f.wav", "dog/a.wav", "dog/b.FLAC", "link.wav", "top.wav"
    ]
    assert {e.key.rsplit("/", 1)[1]: e.label for e in elements}["f.wav"] == "est"
    # one fan-out level locally: root, then cat/, dog/ and empty/ as whole subtrees
    assert counters["listing_tasks"] == 4 and "listing_tasks_failed" not in counters


def test_partial_name_globs_and_pages(tree, monkeypatch):
    from datasets import files
    from tests.datasets.conftest import run_listing

    for i in range(7):
        (tree / "dog" / f"many_{i}.wav").write_bytes(b"x")
    monkeypatch.setattr(files, "PAGE_SIZE", 3)  # the FnApiRunner runs in this process
    elements, counters = run_listing(FilesDataset(uri=f"{tree}/do*/*.wav"))
    assert sorted(e.key.rsplit("/", 1)[1] for e in elements) == ["a.wav"] + [f"many_{i}.wav" for i in range(7)]
    # tasks: '<tree>/do' (one page: the folder dog/), then dog/ in pages of at most 3 files
    assert counters["listing_tasks"] == 2 and counters["listing_pages"] == 1 + 3


def test_prepare_stops_at_the_first_match(tree, monkeypatch):
    from datasets import files

    monkeypatch.setattr(files, "PREPARE_SCAN_LIMIT", 2)
    FilesDataset(uri=f"{tree}/**.ogg").prepare()  # found, or given up on after two files: no error
    with pytest.raises(DatasetError, match=r"no files match .*/nothing/\*\*"):
        FilesDataset(uri=f"{tree}/nothing/**").prepare()
