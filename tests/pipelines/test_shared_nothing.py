"""The extraction on workers that share nothing with the launcher but the installed code (a Dask
cluster and Beam's portable runner on a worker pool, each worker in its own mount namespace: see
tests/shared_nothing.py), with every byte of data through the GCS emulator, gives what FnApiRunner
gives on the same gs:// data: the same features key by key, the same counts, and for the hostile
corpus the same dead letters (key, stage, reason).

Runs are compared with each other, never with hard-coded keys, so the checks hold whatever form
the keys take.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from apache_beam.io.filesystems import FileSystems

from export.metadata import output_files
from pipelines import extract, runners
from tests.pipelines.test_bad_inputs import corpus as hostile  # noqa: F401  (the hostile corpus fixture)

pytestmark = [pytest.mark.slow, pytest.mark.emulator]
BUCKET = "fb-shared-nothing"
ENGINES = ["isolated_dask_cluster", "isolated_worker_pool"]
ENGINE_IDS = ["dask", "portable"]
RUNNER_NAMES = {"isolated_dask_cluster": runners.DASK_RUNNER, "isolated_worker_pool": "PortableRunner"}
CODECS = (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III"))


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def payloads(run: dict) -> dict[str, bytes]:
    """key -> the bytes of every feature column of a run anywhere Beam can read (gs:// here);
    a key exported twice fails."""
    names = [o["name"] for e in run["extractors"] for o in e["outputs"]]
    out: dict[str, bytes] = {}
    for path in output_files(run, "parquet"):
        for row in pq.read_table(io.BytesIO(_read(path))).to_pylist():
            if row["key"] in out:
                raise AssertionError(f"key {row['key']} exported twice")
            out[row["key"]] = b"".join(np.asarray(row[n], dtype=np.float32).tobytes() for n in names)
    return out


def dead_letters(run: dict) -> dict[str, tuple[str, str]]:
    """key -> (stage, reason) of every dead letter of a run; a key twice fails."""
    found: dict[str, tuple[str, str]] = {}
    for path in output_files(run, "errors"):
        for line in _read(path).decode().splitlines():
            error = json.loads(line)
            if error["key"] in found:
                raise AssertionError(f"dead letter for {error['key']} written twice")
            found[error["key"]] = (error["stage"], error["reason"])
    return found


def upload(gcs_emulator, root, prefix: str) -> int:
    """Upload every regular file below `root` to gs://BUCKET/prefix/, keeping relative names.

    What a bucket cannot hold stays behind (a folder named like a file, symlinks, a name that is
    not UTF-8): the manifest's entries for them are then missing objects, for every runner alike.
    """
    bucket = gcs_emulator.make_bucket(BUCKET)
    count = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            try:
                relative.encode("utf-8")
            except UnicodeEncodeError:
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            bucket.blob(f"{prefix}/{relative}").upload_from_filename(path)
            count += 1
    return count


@pytest.fixture(scope="module")
def clips(gcs_emulator, tmp_path_factory) -> str:
    """A folder on gs:// of 12 short clips in four codecs, two sample rates, mono and stereo, in
    two label folders."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(23)
    for i in range(12):
        ext, fmt, subtype = CODECS[i % len(CODECS)]
        rate = (16000, 22050)[i % 2]
        t = np.arange(int(rate * (0.4 + 0.05 * i))) / rate
        y = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        if i % 3 == 2:
            y = np.stack([y, 0.5 * y], axis=1)
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        soundfile.write(root / f"class{i % 2}" / f"clip{i:02d}.{ext}", y.astype(np.float32), rate, format=fmt, subtype=subtype)
    assert upload(gcs_emulator, root, "clips") == 12
    return f"gs://{BUCKET}/clips/"


@pytest.fixture(scope="module")
def hostile_manifest(gcs_emulator, hostile) -> str:  # noqa: F811
    manifest, _ = hostile
    upload(gcs_emulator, manifest.parent, "hostile")
    return f"gs://{BUCKET}/hostile/{manifest.name}"


CLIP_ARGS = ["--features=logmel,spectral", "--sample_rate=16000", "--commit_records=4"]
HOSTILE_ARGS = ["--features=logmel,spectral", "--max_failure_ratio=1", "--commit_records=4"]


def _run(dataset: str, engine: str, args: list[str], flags: list[str]) -> dict:
    return extract.run([f"--dataset={dataset}", f"--output=gs://{BUCKET}/runs/{engine}", "--run_id=sn", *args, *flags])


@pytest.fixture(scope="module")
def fnapi_clips(clips) -> dict:
    return _run(clips, "fnapi", CLIP_ARGS, ["--runner=FnApiRunner"])


@pytest.fixture(scope="module")
def fnapi_hostile(hostile_manifest) -> dict:
    return _run(hostile_manifest, "fnapi", HOSTILE_ARGS, ["--runner=FnApiRunner"])


@pytest.mark.parametrize("engine", ENGINES, ids=ENGINE_IDS)
def test_clips_on_gs_equal_fnapi(engine, request, clips, fnapi_clips):
    run = _run(clips, engine, CLIP_ARGS, request.getfixturevalue(engine).flags)
    assert run["beam"]["runner"] == RUNNER_NAMES[engine]
    assert run["outputs"]["run_dir"].startswith(f"gs://{BUCKET}/runs/{engine}/")
    reference = payloads(fnapi_clips)
    assert len(reference) == fnapi_clips["counts"]["records"] == fnapi_clips["counts"]["ok"] == 12
    assert run["counts"] == fnapi_clips["counts"]
    assert run["label_counts"] == fnapi_clips["label_counts"] == {"class0": 6, "class1": 6}
    assert run["dataset"]["fingerprint"] == fnapi_clips["dataset"]["fingerprint"]
    assert payloads(run) == reference
    assert dead_letters(run) == dead_letters(fnapi_clips) == {}


@pytest.mark.parametrize("engine", ENGINES, ids=ENGINE_IDS)
def test_hostile_corpus_on_gs_gives_the_same_dead_letters(engine, request, hostile_manifest, fnapi_hostile, hostile):  # noqa: F811
    _, expected = hostile
    run = _run(hostile_manifest, engine, HOSTILE_ARGS, request.getfixturevalue(engine).flags)
    reference = dead_letters(fnapi_hostile)
    # Every bad file and every file a bucket cannot hold is a dead letter; the good ones are exported.
    assert fnapi_hostile["counts"]["listed"] == len(expected)
    assert len(reference) == fnapi_hostile["counts"]["failed"] >= sum(1 for o in expected.values() if o != "ok")
    assert len(payloads(fnapi_hostile)) == fnapi_hostile["counts"]["records"] > 0
    assert dead_letters(run) == reference
    assert run["counts"] == fnapi_hostile["counts"]
    assert payloads(run) == payloads(fnapi_hostile)
