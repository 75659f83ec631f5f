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


ITEMS = [
    AudioItem(key="k", uri="k"),  # uri equal to key, nothing optional
    AudioItem(key="/data/a.wav", uri="/data/a.wav", label="dog", size=4044, generation="updated:1796223908.464197"),
    AudioItem(
        key="clip-7", uri="gs://bucket/x/\u00e9t\u00e9.flac", label="", split="valid", metadata=(("speaker", "s1"), ("lang", "")),
        size=0, generation="generation:17", offset_seconds=1.5, duration_seconds=0.25, content_id="c" * 32,
    ),
    AudioItem(key="/data/bad-\udcff.wav", uri="/data/bad-\udcff.wav", size=-1),  # a non-UTF-8 file name
    AudioItem(key="m", uri="/data/m.wav", offset_seconds=0.0, duration_seconds=1e-9),
    AudioItem(key="dog/a.wav", uri="/data/dog/a.wav", label="dog", size=4044, generation="updated:1.5"),  # a listed file
    AudioItem(key="bad-\udcff.wav", uri="/data/bad-\udcff.wav"),  # the key escapes the byte, the uri keeps it
]


@pytest.mark.parametrize("item", ITEMS, ids=range(len(ITEMS)))
def test_audio_items_round_trip_through_their_coder_and_pickle(item):
    import pickle

    import apache_beam as beam

    from datasets.base import AudioItemCoder, decode_item, encode_item

    coder = beam.coders.registry.get_coder(AudioItem)
    assert isinstance(coder, AudioItemCoder) and coder.is_deterministic()
    for back in (coder.decode(coder.encode(item)), pickle.loads(pickle.dumps(item)), beam.coders.FastPrimitivesCoder().decode(
        beam.coders.FastPrimitivesCoder().encode((item.key, item)))[1]):
        assert back == item and type(back) is AudioItem
        assert [getattr(back, f) for f in ("key", "uri", "metadata")] == [item.key, item.uri, item.metadata]
    assert encode_item(decode_item(encode_item(item))) == encode_item(item)  # deterministic


def test_an_item_encodes_in_far_fewer_bytes_than_its_fields_pickle():
    import pickle

    from datasets.base import encode_item

    item = ITEMS[1]
    fields = pickle.dumps({name: getattr(item, name) for name in item.__dataclass_fields__}, 5)
    assert len(encode_item(item)) * 2 < len(fields)


def test_a_listed_files_uri_costs_only_its_root_beyond_the_key():
    from datasets.base import encode_item

    item = AudioItem(key="dog/a.wav", uri="/data/corpus/dog/a.wav")  # the uri is the root, then the key
    other = AudioItem(key="dog/a.wav", uri="/data/corpus/dog/b.wav")  # as long, not ending with the key
    assert len(encode_item(other)) - len(encode_item(item)) == len("dog/a.wav")


def test_item_bytes_of_another_format_name_the_fix():
    from datasets.base import decode_item, encode_item

    data = bytearray(encode_item(ITEMS[0]))
    data[0] = 9
    with pytest.raises(ValueError, match="same featurebeam version"):
        decode_item(bytes(data))
