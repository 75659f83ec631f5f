"""The generated sample set is deterministic, labelled, split, and spans formats and rates."""

from __future__ import annotations

import json

import soundfile

from datasets.sample import CLASSES, CLIPS_PER_CLASS, generate


def test_sample_is_deterministic_and_varied(tmp_path):
    a, b = generate(tmp_path / "a"), generate(tmp_path / "b")
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    assert rows_a == [json.loads(line) for line in b.read_text().splitlines()]
    assert len(rows_a) == len(CLASSES) * CLIPS_PER_CLASS
    assert {r["label"] for r in rows_a} == set(CLASSES)
    assert {r["split"] for r in rows_a} == {"train", "test"}
    infos = [soundfile.info(a.parent / r["uri"]) for r in rows_a]
    assert {i.format for i in infos} == {"WAV", "FLAC", "OGG", "MP3"}
    assert {i.samplerate for i in infos} == {16000, 22050, 44100}
    assert {i.channels for i in infos} == {1, 2}
    for r in rows_a:
        if r["uri"].endswith((".wav", ".flac")):  # lossless: identical samples
            assert (a.parent / r["uri"]).read_bytes() == (b.parent / r["uri"]).read_bytes()
    assert generate(tmp_path / "a") == a  # idempotent
    # Keys do not depend on where the sample was generated (or staged): the manifest names them.
    from datasets.sample import SampleDataset
    from tests.beam_util import collect

    listed = []
    for root in (tmp_path / "a", tmp_path / "b"):
        dataset = SampleDataset(root=str(root))
        dataset.prepare()
        items = sorted(collect(dataset.listing()), key=lambda it: it.key)
        assert all(it.uri.startswith(f"{root}/") and str(tmp_path) not in it.key for it in items)
        listed.append(([(it.key, it.label, it.split) for it in items], dataset.identity()))
    assert listed[0] == listed[1] and listed[0][0][0] == ("sample/chirp/chirp_00.ogg", "chirp", "train")
