"""Shared fixtures: an isolated cache for the generated sample set, and one sample run reused by
the export, loader and training tests (a Beam run costs seconds, so it is made once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# The real GCS and BigQuery emulator fixtures, registered once so a session starts one of each;
# Dask clusters and worker pools (tests/shared_nothing.py: workers that share no disk with the launcher).
pytest_plugins = ["tests.emulators", "tests.dask_cluster", "tests.shared_nothing"]

SAMPLE_FEATURES = "logmel,mfcc,spectral,summary"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Generated data (the sample set) goes to a per-session folder, not the user's cache."""
    path = tmp_path_factory.mktemp("featurebeam-cache")
    old = os.environ.get("FEATUREBEAM_CACHE_DIR")
    os.environ["FEATUREBEAM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEATUREBEAM_CACHE_DIR", None)
    else:
        os.environ["FEATUREBEAM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory):
    """run.json of one extraction of the sample set with the default feature set plus summaries."""
    from pipelines import extract

    output = tmp_path_factory.mktemp("runs")
    return extract.run(
        ["--dataset=sample", f"--features={SAMPLE_FEATURES}", f"--output={output}", "--run_id=session", "--runner=FnApiRunner"]
    )
