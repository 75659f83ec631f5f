"""Listing local folders and globs through Beam's MatchAll, with labels from parent folders."""

from __future__ import annotations

import os

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
    assert [(k, label) for k, label, _ in listed] == [
        ("cat/c.mp3", "cat"), ("cat/deep/d.ogg", "deep"), ("dog/a.wav", "dog"), ("dog/b.FLAC", "dog"), ("top.wav", None)
    ]
    assert all(size == len(k) + 1 for k, _, size in listed)  # sizes come from the listing


def test_keys_are_relative_to_the_root_and_uris_say_where_the_file_was_read(tree):
    """A folder's keys are relative to it; a single file's to its folder; a glob's to its fixed
    root, the whole folder before the first wildcard (so `do*` keeps its folder name)."""
    cases = {
        str(tree): ["cat/c.mp3", "cat/deep/d.ogg", "dog/a.wav", "dog/b.FLAC", "top.wav"],
        f"{tree}/": ["cat/c.mp3", "cat/deep/d.ogg", "dog/a.wav", "dog/b.FLAC", "top.wav"],
        str(tree / "dog" / "a.wav"): ["a.wav"],
        f"file://{tree}/*/*.wav": ["dog/a.wav"],
        f"{tree}/cat/**": ["c.mp3", "deep/d.ogg"],
        f"{tree}/do*/*.wav": ["dog/a.wav"],
        f"{tree}/ca?/de*/*.ogg": ["cat/deep/d.ogg"],
        f"{tree}/**.wav": ["dog/a.wav", "top.wav"],
    }
    for uri, keys in cases.items():
        dataset = FilesDataset(uri=uri)
        dataset.prepare()
        items = sorted(collect(dataset.listing()), key=lambda it: it.key)
        assert [it.key for it in items] == keys, uri
        assert [it.uri for it in items] == [f"{dataset.root}/{k}" for k in keys], uri  # where each was read
        assert os.path.isdir(dataset.root), uri  # a whole folder, never a partial name like `do`


def test_two_copies_of_a_folder_list_the_same_keys_labels_and_content_ids(tree, tmp_path_factory):
    import shutil

    from datasets.base import content_id
    from tests.datasets.conftest import run_listing

    copy = tmp_path_factory.mktemp("elsewhere") / "mounted" / tree.name  # the same name: the same run folder
    shutil.copytree(tree, copy, symlinks=True)  # copy2: modification times kept

    def listed(root):
        elements, _ = run_listing(FilesDataset(uri=str(root)))
        return sorted((it.key, it.label, content_id(it)) for it in elements), sorted(it.uri for it in elements)

    (original, uris), (copied, copied_uris) = listed(tree), listed(copy)
    assert original == copied and len(original) == 5 and all(cid for _, _, cid in original)
    assert all(u.startswith(f"{tree}/") for u in uris) and all(u.startswith(f"{copy}/") for u in copied_uris)
    identity = FilesDataset(uri=str(tree)).identity()  # the config hash's view: no path of either copy
    assert identity == FilesDataset(uri=str(copy)).identity() and str(tree) not in str(identity)
    assert FilesDataset(uri=str(tree)).describe()["keys"] == "relative"


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
    assert sorted(e.key for e in elements) == [
        "cat/c.mp3", "cat/deep/d.ogg", "cat/deep/er/est/f.wav", "dog/a.wav", "dog/b.FLAC", "link.wav", "top.wav"
    ]
    assert {e.key: e.label for e in elements}["cat/deep/er/est/f.wav"] == "est"
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
