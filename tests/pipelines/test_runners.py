"""pipelines/runners.py: runner names and runner-only flags, before Beam sees them."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from featurebeam.errors import ConfigError
from pipelines import runners


def test_default_runner_is_added_first():
    assert runners.resolve_runner_flags(["--direct_num_workers=2"]) == ["--runner=FnApiRunner", "--direct_num_workers=2"]


@pytest.mark.parametrize("flags", [["--runner=DaskRunner"], ["--runner", "DaskRunner"], ["--runner=x", "--runner=DaskRunner"]])
def test_dask_runner_is_mapped_to_beams_class(flags):
    resolved = runners.resolve_runner_flags([*flags, "--dask_client_address=tcp://127.0.0.1:8786"])
    assert resolved == [f"--runner={runners.DASK_RUNNER}", "--dask_client_address=tcp://127.0.0.1:8786"]
    options = PipelineOptions(resolved).get_all_options()
    assert options["runner"] == runners.DASK_RUNNER and options["address"] == "tcp://127.0.0.1:8786"
    assert runners.is_dask(options["runner"]) and runners.is_dask("DaskRunner") and not runners.is_dask("FnApiRunner")


def test_other_runners_pass_through():
    assert runners.resolve_runner_flags(["--runner=DataflowRunner", "--project=p"]) == ["--runner=DataflowRunner", "--project=p"]


def test_dask_address_with_another_runner_is_refused():
    with pytest.raises(ConfigError, match="--dask_client_address only applies to --runner=DaskRunner"):
        runners.resolve_runner_flags(["--dask_client_address=tcp://127.0.0.1:8786"])


@pytest.mark.parametrize(
    ("flags", "slots"),
    [
        ([], 1),
        (["--direct_num_workers=2"], 2),
        (["--runner=DataflowRunner", "--max_num_workers=10", "--machine_type=n2-standard-4"], 40),
        (["--runner=DataflowRunner", "--num_workers=3"], 3),
        (["--runner=DaskRunner", "--dask_npartitions=7"], 7),
        (["--runner=FlinkRunner"], 16),
    ],
)
def test_worker_slots_come_from_each_runners_own_flags(flags, slots):
    assert runners.worker_slots(PipelineOptions(runners.resolve_runner_flags(flags))) == slots


def test_dask_is_imported_only_when_asked_for():
    """Importing Beam's Dask runner (dask.distributed) costs every other run half a second of start-up."""
    import subprocess
    import sys

    code = (
        "import sys; from pipelines import extract, runners; "
        "runners.resolve_runner_flags(['--direct_num_workers=2']); assert 'distributed' not in sys.modules, 'early'; "
        "runners.resolve_runner_flags(['--runner=DaskRunner']); assert 'distributed' in sys.modules, 'late'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pipeline_options_cache_one_view_per_class_that_shares_values():
    import copy
    import pickle

    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, TypeOptions

    options = runners.pipeline_options(["--runner=FnApiRunner", "--direct_num_workers=2"])
    assert options.view_as(TypeOptions) is options.view_as(TypeOptions)
    assert options.view_as(DirectOptions).direct_num_workers == 2
    options.view_as(StandardOptions).runner = "DataflowRunner"  # a write through one view is seen by all
    assert options.get_all_options()["runner"] == "DataflowRunner"
    for twin in (copy.deepcopy(options), pickle.loads(pickle.dumps(options))):
        assert twin.get_all_options() == options.get_all_options()
        assert twin.view_as(StandardOptions).runner == "DataflowRunner" and twin.view_as(DirectOptions).direct_num_workers == 2
