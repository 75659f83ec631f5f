"""The shared-nothing workers (tests/shared_nothing.py) see the installed code and nothing of the
launcher's disk: a file the launcher writes in tmp_path does not exist for them, its caches are
empty for them, and featurebeam still imports there, from this checkout."""

from __future__ import annotations

import os
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

import featurebeam

pytestmark = [pytest.mark.slow, pytest.mark.emulator]
CHECKOUT_CODE = os.path.dirname(featurebeam.__file__)


def _seen_by_a_worker(path: str) -> tuple:
    """What a worker process sees: the path, its caches, its HOME, and where it imports code from."""
    import importlib
    import os
    import tempfile

    from datasets import sample

    return (
        os.path.exists(path),
        sorted(set(os.listdir("/tmp")) - {"home", "tmp", "work"}),
        os.environ["HOME"],
        tempfile.gettempdir(),
        os.path.exists(os.path.expanduser("~/adc.json")),
        os.path.dirname(importlib.import_module("featurebeam").__file__),
        str(sample.cache_dir()),
        os.getpid(),
    )


def _expected() -> tuple:
    # (launcher's file, anything else in /tmp, HOME, TMPDIR, own credentials, code, sample cache)
    return (False, [], "/tmp/home", "/tmp/tmp", True, CHECKOUT_CODE, "/tmp/home/.cache/featurebeam")


def _launcher_file(tmp_path: Path) -> str:
    path = tmp_path / "launcher-only.txt"
    path.write_text("the launcher's disk")
    assert os.path.exists(path)
    return str(path)


def test_isolated_dask_workers_see_the_code_but_not_the_launchers_disk(isolated_dask_cluster, tmp_path):
    path = _launcher_file(tmp_path)
    with isolated_dask_cluster.client() as client:
        assert client.run(os.path.exists, path) == {w: False for w in client.scheduler_info()["workers"]}
        seen = client.run(_seen_by_a_worker, path)
    assert len(seen) == 2
    pids = set()
    for found in seen.values():
        assert found[:-1] == _expected()
        pids.add(found[-1])
    assert os.getpid() not in pids and len(pids) == 2
    # The launcher's own cache (pytest's, under /tmp) is invisible too.
    with isolated_dask_cluster.client() as client:
        cache = os.environ["FEATUREBEAM_CACHE_DIR"]
        assert os.path.isdir(cache)
        assert set(client.run(os.path.exists, cache).values()) == {False}


def test_isolated_worker_pool_sees_the_code_but_not_the_launchers_disk(isolated_worker_pool, tmp_path):
    path = _launcher_file(tmp_path)
    launcher = os.getpid()
    with beam.Pipeline(argv=isolated_worker_pool.flags) as p:
        seen = p | beam.Create([path]) | beam.Map(_seen_by_a_worker)
        assert_that(seen | beam.Map(lambda found: found[:-1]), equal_to([_expected()]))
        assert_that(seen | "Pid" >> beam.Map(lambda found: found[-1] != launcher), equal_to([True]), label="OtherProcess")


def test_the_launcher_accepts_the_portable_flags(isolated_worker_pool):
    """The launcher passes the portable runner's flags to Beam unchanged, and Beam knows them all."""
    from pipelines import extract, runners

    flags = runners.resolve_runner_flags(isolated_worker_pool.flags)
    assert flags == isolated_worker_pool.flags
    extract._check_beam_flags(flags)  # raises ConfigError for a flag no options class knows
    options = runners.pipeline_options(flags).get_all_options()
    assert (options["runner"], options["job_endpoint"], options["environment_type"]) == ("PortableRunner", "embed", "EXTERNAL")
    assert options["environment_config"] == f"localhost:{isolated_worker_pool.port}"
