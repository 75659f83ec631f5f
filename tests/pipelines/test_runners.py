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
