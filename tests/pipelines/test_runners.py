"""pipelines/runners.py: runner names and runner-only flags, before Beam sees them."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from featurebeam.errors import ConfigError
from pipelines import runners


def test_default_runner_is_added_first():
    assert runners.resolve_runner_flags(["--direct_num_workers=2"]) == ["--runner=FnApiRunner", "--direct_num_workers=2"]


@pytest.mark.parametrize("flags", [["--runner=DaskRunner"], ["--runner", "DaskRunner"], ["--runner=x", "--runner=DaskRunner"]])
def test_dask_runner_is_mapped_to_featurebeams_subclass(flags):
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


class _Stateful(beam.DoFn):
    COUNT = beam.transforms.userstate.ReadModifyWriteStateSpec("count", beam.coders.VarIntCoder())
    TIMER = beam.transforms.userstate.TimerSpec("flush", beam.TimeDomain.WATERMARK)

    def process(self, element, count=beam.DoFn.StateParam(COUNT), flush=beam.DoFn.TimerParam(TIMER)):
        yield element

    @beam.transforms.userstate.on_timer(TIMER)
    def on_flush(self):
        return []


class _Holder:
    def emit(self, element, count=beam.DoFn.StateParam(_Stateful.COUNT)):
        yield element


def test_dofn_specs_are_inspected_once_per_class_with_beams_answers():
    """The cache gives Beam's own answer for every DoFn of featurebeam's graph, a stateful DoFn
    and a FlatMap of a bound method (inspected each time), and inspects each class once."""
    from apache_beam.transforms import userstate
    from apache_beam.transforms.core import ParDo

    from pipelines import extract

    runners.cache_dofn_specs()
    runners.cache_dofn_specs()  # idempotent: one layer
    cached = userstate.get_dofn_specs
    inspect_specs = cached.__wrapped__
    assert not getattr(inspect_specs, "_featurebeam_cached", False)

    plan = extract.plan(["--dataset=sample", "--features=logmel,mfcc", "--output=/tmp/unused-featurebeam-runs", "--progress=none"])
    pipeline = beam.Pipeline(options=plan.options)
    extract.build(pipeline, plan)
    fns = []

    class Fns(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, ParDo):
                fns.append(node.transform.fn)

    pipeline.visit(Fns())
    fns += [_Stateful(), beam.FlatMap(_Holder().emit).fn]
    assert len(fns) > 100
    for fn in fns:
        assert cached(fn) == inspect_specs(fn)
    assert cached(fns[-2]) == ({_Stateful.COUNT}, {_Stateful.TIMER})
    assert cached(fns[-1])[0] == {_Stateful.COUNT}  # a bound method's parameters are seen: not cached by class
    answer = cached(fns[-2])
    answer[0].clear()  # callers get copies
    assert cached(fns[-2])[0] == {_Stateful.COUNT}

    class Fresh(beam.DoFn):
        def process(self, element):
            yield element

    calls = []

    def counting(dofn):
        calls.append(dofn)
        return inspect_specs(dofn)

    cached.__wrapped__ = counting
    try:
        for _ in range(5):
            assert cached(Fresh()) == (set(), set())
        for _ in range(3):
            cached(fns[-1])
    finally:
        cached.__wrapped__ = inspect_specs
    assert len(calls) == 1 + 3  # a new class once; the bound method's FlatMap every time


def test_worker_slots_guess_when_the_dask_scheduler_does_not_answer():
    """Nothing listens on the port: the launcher guesses this machine's cores at once, rather
    than failing or waiting for the connection timeout."""
    import os
    import time

    from tests.emulators import _free_port

    flags = runners.resolve_runner_flags(["--runner=DaskRunner", f"--dask_client_address=tcp://127.0.0.1:{_free_port()}"])
    start = time.monotonic()
    assert runners.worker_slots(PipelineOptions(flags)) == (os.cpu_count() or 1)
    assert time.monotonic() - start < runners._SCHEDULER_TIMEOUT_S
