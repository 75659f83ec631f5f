"""Listing through a store that fails like a network: transient errors are retried with
backoff, permanent ones and exhausted retries become list-stage dead letters, not crashes."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import soundfile
from apache_beam.io.localfilesystem import LocalFileSystem

from datasets.files import MatchWithRetries
from featurebeam.deadletter import DeadLetter
from pipelines import extract
from tests.beam_util import collect


class FlakyListingFileSystem(LocalFileSystem):
    """flakylist://<local path>: local files whose listing fails `failures` times first."""

    failures: int = 0
    permanent: bool = False
    every_other: bool = False  # fail every odd-numbered call instead
    calls: int = 0

    @classmethod
    def scheme(cls):
        return "flakylist"

    def match(self, patterns, limits=None):
        cls = FlakyListingFileSystem
        cls.calls += 1
        if cls.permanent:
            raise PermissionError(errno.EACCES, "caller does not have storage.objects.list access")
        if cls.calls <= cls.failures or (cls.every_other and cls.calls % 2):
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        local = [p[len("flakylist://") :] for p in patterns]
        results = super().match(local, limits)
        for result in results:
            for meta in result.metadata_list:
                meta.path = "flakylist://" + meta.path
        return results

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        return super().open(path[len("flakylist://") :], mime_type, compression_type)


@pytest.fixture
def corpus(tmp_path):
    for i in range(3):
        soundfile.write(tmp_path / f"{i}.wav", (0.2 * np.random.default_rng(i).standard_normal(4000)).astype(np.float32), 8000)
    FlakyListingFileSystem.calls = 0
    FlakyListingFileSystem.permanent = False
    yield tmp_path
    FlakyListingFileSystem.failures = 0
    FlakyListingFileSystem.permanent = False
    FlakyListingFileSystem.every_other = False


def _listed(pattern, tries=4, root=""):
    return collect(
        __import__("apache_beam").Create([pattern])
        | __import__("apache_beam").ParDo(MatchWithRetries(tries=tries, base_delay=0.001, root=root))
    )


def test_transient_listing_errors_are_retried(corpus):
    FlakyListingFileSystem.failures = 2
    found = _listed(f"flakylist://{corpus}/*.wav")
    assert sorted(m.path.rsplit("/", 1)[1] for m in found) == ["0.wav", "1.wav", "2.wav"]
    assert FlakyListingFileSystem.calls == 3


def test_exhausted_retries_become_a_dead_letter(corpus):
    FlakyListingFileSystem.failures = 99
    (dead,) = _listed(f"flakylist://{corpus}/*.wav", tries=3, root=f"flakylist://{corpus}")
    assert isinstance(dead, DeadLetter)
    assert (dead.stage, dead.reason) == ("list", "transient_list_failed")
    assert (dead.key, dead.uri) == ("*.wav", f"flakylist://{corpus}/*.wav")  # keyed relative to the dataset's root
    assert "after 3 tries" in dead.message and str(corpus) in dead.message
    assert FlakyListingFileSystem.calls == 3


def test_permanent_listing_error_is_not_retried(corpus):
    FlakyListingFileSystem.permanent = True
    (dead,) = _listed(f"flakylist://{corpus}/*.wav")
    assert (dead.stage, dead.reason) == ("list", "list_failed")
    assert FlakyListingFileSystem.calls == 1


@pytest.mark.slow
def test_pipeline_lists_through_a_flaky_store(corpus, tmp_path_factory):
    # Fails the launcher's check once and the pipeline's listing once: both retry. Decoding runs
    # in-process because the decoder child does not import this test's file system.
    FlakyListingFileSystem.every_other = True
    out = tmp_path_factory.mktemp("out")
    pattern = f"flakylist://{corpus}/*.wav"
    run = extract.run([f"--dataset={pattern}", "--features=logmel", f"--output={out}", "--run_id=f",
                       "--sample_rate=8000", "--decode_in_process"])
    assert run["counts"] == {"listed": 3, "ok": 3, "failed": 0, "partial": 0, "records": 3}
    assert FlakyListingFileSystem.calls >= 4  # check: fail, ok; pipeline listing: fail, ok; then content ids
