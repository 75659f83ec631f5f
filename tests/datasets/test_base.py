"""content_id: pure when the listing gave size and version; one request through stat_content_id."""

from __future__ import annotations

import os

import pytest

from datasets.base import AudioItem, content_id, stat_content_id
from datasets.files import FilesDataset
from tests.datasets.conftest import run_listing


def test_content_id_is_pure_and_needs_size_and_version():
    item = AudioItem(key="k", uri="gs://no-such-bucket-anywhere/a.wav", size=10, generation="generation:7")
    assert len(content_id(item)) == 32 and content_id(item) == content_id(item)  # no I/O: the bucket does not exist
    changed = [AudioItem(key="k", uri=item.uri, size=11, generation="generation:7"),
               AudioItem(key="k", uri=item.uri, size=10, generation="generation:8"),
               AudioItem(key="k", uri=item.uri, size=10, generation="generation:7", offset_seconds=1.0)]
    assert len({content_id(other) for other in changed} | {content_id(item)}) == 4
    assert content_id(AudioItem(key="k", uri=item.uri)) == ""  # a manifest row: no size or version listed
    assert content_id(AudioItem(key="k", uri=item.uri, size=10)) == ""


def test_stat_content_id_of_a_local_file_equals_the_listed_one(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"RIFF" + bytes(40))
    (listed,), _ = run_listing(FilesDataset(uri=str(tmp_path)))
    bare = AudioItem(key="m", uri=str(path))  # as a manifest lists it
    assert listed.content_id == "" and content_id(listed) == stat_content_id(bare) != ""
    os.utime(path, (1_700_000_000, 1_700_000_000))  # rewritten: a new modification time
    assert stat_content_id(bare) not in ("", content_id(listed))
    assert stat_content_id(AudioItem(key="m", uri=str(tmp_path / "missing.wav"))) == ""


@pytest.mark.emulator
def test_gcs_content_ids_come_from_the_listing_without_requests(gcs_emulator, gcs_audio, flaky_gcs):
    from datasets.gcs import GcsDataset

    elements, _ = run_listing(GcsDataset(uri=f"{gcs_audio.root}/"))
    before = flaky_gcs.requests
    ids = {item.uri: content_id(item) for item in elements}
    assert flaky_gcs.requests == before and all(ids.values()) and len(set(ids.values())) == len(ids)
    # A manifest item pointing at the same object: one request, the same id.
    uri = sorted(ids)[0]
    assert stat_content_id(AudioItem(key="m", uri=uri)) == ids[uri]
    assert flaky_gcs.requests == before + 1, flaky_gcs.paths[before:]
    name = uri.split("/", 3)[3]
    bucket = gcs_emulator.client().bucket(gcs_audio.bucket)
    bucket.blob(name).upload_from_string(bucket.blob(name).download_as_bytes())  # same bytes, new generation
    assert stat_content_id(AudioItem(key="m", uri=uri)) not in ("", ids[uri])
    assert stat_content_id(AudioItem(key="m", uri=f"gs://{gcs_audio.bucket}/corpus/none.wav")) == ""
