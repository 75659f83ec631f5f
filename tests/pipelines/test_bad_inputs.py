"""A hostile corpus through the whole pipeline: it finishes, every good file is exported, every
bad one is in errors/ with its specific reason, and nothing else is lost.

(Unreadable-for-permissions is covered in tests/featurebeam/test_decoding_failures.py, which
drops privileges for it; the pipeline's decoder child runs as the test user, root here.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from featurebeam.decoding import display_uri
from pipelines import extract
from tests.featurebeam.test_decoding_failures import wav_bytes
from export.metadata import output_files
from tests import faultinject

pytestmark = pytest.mark.slow


def _tone(seconds=1.0, rate=16000, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    y = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.repeat(y[:, None], channels, axis=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> expected outcome ("ok" or "stage: reason"), and the manifest listing them all."""
    root = tmp_path_factory.mktemp("hostile")
    expected: dict[str, str] = {}

    def good(name, data=None, **kwargs):
        soundfile.write(root / name, _tone() if data is None else data, 16000, **kwargs)
        expected[name] = "ok"

    def bad(name, outcome, data: bytes | None = None):
        if data is not None:
            (root / name).write_bytes(data)
        expected[name] = outcome

    good("tone.wav")
    good("tone.flac")
    good("tone.ogg", format="OGG", subtype="VORBIS")
    good("tone.mp3", format="MP3", subtype="MPEG_LAYER_III")
    good("sixty-four.wav", _tone(channels=64))
    good("silence.wav", np.zeros(16000, dtype=np.float32))
    non_utf8 = os.fsdecode(b"caf\xe9.wav")
    soundfile.write(root / "latin1.wav", _tone(), 16000)  # libsndfile cannot open the odd name to write
    os.rename(root / "latin1.wav", os.path.join(os.fsencode(root), b"caf\xe9.wav"))
    expected[non_utf8] = "ok"

    wav = (root / "tone.wav").read_bytes()
    flac = (root / "tone.flac").read_bytes()
    ogg = (root / "tone.ogg").read_bytes()
    bad("truncated.wav", "decode: truncated", wav[: len(wav) // 2])
    bad("truncated.flac", "decode: truncated", flac[: int(len(flac) * 0.5)])
    bad("truncated.ogg", "decode: undecodable", ogg[: len(ogg) // 2])  # a 1 s Vorbis cut in half loses its codebook pages
    bad("lying-length.wav", "decode: truncated", wav_bytes(rate=16000, data=b"\x01\x00" * 4000, data_size=10**8))
    bad("random.wav", "decode: undecodable", np.random.default_rng(1).bytes(5000))
    bad("random.mp3", "decode: undecodable", np.random.default_rng(2).bytes(5000))
    bad("random.flac", "decode: undecodable", np.random.default_rng(3).bytes(5000))
    bad("empty.wav", "decode: empty", b"")
    bad("zero-hz.wav", "decode: bad_sample_rate", wav_bytes(rate=0))
    bad("ten-mhz.wav", "decode: bad_sample_rate", wav_bytes(rate=10_000_000))
    soundfile.write(root / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    bad("nan.wav", "condition: non_finite")
    soundfile.write(root / "inf.wav", np.concatenate([_tone()[:, 0], [np.inf]]).astype(np.float32), 16000, subtype="FLOAT")
    bad("inf.wav", "condition: non_finite")
    soundfile.write(root / "one-sample.wav", np.array([0.5], dtype=np.float32), 16000)
    bad("one-sample.wav", "condition: too_short")
    (root / "folder.wav").mkdir()
    bad("folder.wav", "read: is_a_directory")
    os.symlink(root / "loop-b.wav", root / "loop-a.wav")
    os.symlink(root / "loop-a.wav", root / "loop-b.wav")
    bad("loop-a.wav", "read: unreadable")
    bad("missing.wav", "read: not_found")

    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"uri": name, "label": "x"}) + "\n" for name in expected))
    return manifest, expected


def test_hostile_corpus(corpus, tmp_path):
    manifest, expected = corpus
    run = extract.run([f"--dataset={manifest}", "--features=logmel,mfcc,spectral", f"--output={tmp_path}",
                       "--run_id=hostile", "--max_failure_ratio=1"])
    base = manifest.parent
    # Keys are the manifest's relative uris; a non-UTF-8 name shows its bad byte as \xNN.
    good = {display_uri(n) for n, o in expected.items() if o == "ok"}
    bad = {display_uri(n): o for n, o in expected.items() if o != "ok"}

    exported = [row["key"] for p in output_files(run, "parquet") for row in pq.read_table(p, columns=["key"]).to_pylist()]
    assert sorted(exported) == sorted(good)
    errors = [json.loads(line) for p in output_files(run, "errors") for line in Path(p).read_text().splitlines()]
    found = {e["key"]: f"{e['stage']}: {e['reason']}" for e in errors}
    assert found == bad
    assert all(e["uri"] == str(base / e["key"]) and e["message"] for e in errors)
    assert run["counts"] == {"listed": len(expected), "ok": len(good), "failed": len(bad), "partial": 0,
                             "records": len(good)}
    silent = [row["key"] for p in output_files(run, "parquet") for row in pq.read_table(p).to_pylist() if row["silent"]]
    assert silent == ["silence.wav"]  # allowed, and flagged
    assert "caf\\xe9.wav" in " ".join(exported)


def test_a_decoder_segfault_is_one_dead_letter(tmp_path, monkeypatch):
    """A real SIGSEGV in the decoder child (fault injection) costs that item, not the job."""
    for name in ("a.wav", "crash_me.wav", "b.wav"):
        soundfile.write(tmp_path / name, _tone(), 16000)
    for name, value in faultinject.environment("segfault:crash_me").items():  # for the decoder children
        monkeypatch.setenv(name, value)
    run = extract.run([f"--dataset={tmp_path}", "--features=logmel", f"--output={tmp_path / 'out'}", "--run_id=s",
                       "--max_failure_ratio=1"])
    assert run["counts"]["ok"] == 2 and run["counts"]["failed"] == 1
    (error,) = [json.loads(line) for p in output_files(run, "errors") for line in Path(p).read_text().splitlines()]
    assert (error["stage"], error["reason"]) == ("decode", "decoder_crashed")
    assert error["key"] == "crash_me.wav" and "SIGSEGV" in error["message"]
