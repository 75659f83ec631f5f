"""Runner names the launcher accepts, and what each needs before Beam sees the flags.

Beam resolves `--runner` by class name only for the runners it registers (DirectRunner,
DataflowRunner, FlinkRunner, ...); a Dask runner must be named by full dotted path. featurebeam
accepts the short `--runner=DaskRunner` and rewrites it to its own `pipelines.dask.DaskRunner`
(Beam's DaskRunner with shuffles of a bounded number of partitions, a Reshuffle that spreads, and
DoFns set up once per worker process; see that module), so the flag reads like the others. Beam's
own class, named by its dotted path, runs the same graph. `--dask_client_address=tcp://HOST:PORT`
is Beam's own Dask option and is passed through unchanged; without it the runner starts a
`dask.distributed.LocalCluster` in the launcher's machine.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from featurebeam.errors import ConfigError

_LOG = logging.getLogger(__name__)

DEFAULT_RUNNER = "FnApiRunner"
DASK_RUNNER = "pipelines.dask.DaskRunner"
BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
_DASK_RUNNERS = (DASK_RUNNER, BEAM_DASK_RUNNER)

# Short names featurebeam maps to a dotted class path Beam can import.
ALIASES = {"DaskRunner": DASK_RUNNER}
# Flags that belong to one runner only: given with another runner they would be ignored silently.
_RUNNER_ONLY_FLAGS = {"--dask_client_address": _DASK_RUNNERS}
# How long the launcher waits for a Dask scheduler to say how many worker threads it has.
_SCHEDULER_TIMEOUT_S = 5.0


def runner_of(flags: Sequence[str]) -> str | None:
    """The value of the last `--runner` flag in `flags` (Beam's own parsing keeps the last), or None."""
    value = None
    flags = list(flags)
    for i, flag in enumerate(flags):
        if flag.startswith("--runner="):
            value = flag.split("=", 1)[1]
        elif flag == "--runner" and i + 1 < len(flags):
            value = flags[i + 1]
    return value


def resolve_runner_flags(flags: Sequence[str]) -> list[str]:
    """Return Beam flags with the runner resolved: a default added, aliases expanded, checked.

    flags: the Beam pipeline flags (everything the launcher did not parse itself).
    Returns a new list with exactly one `--runner=...` flag first. Raises ConfigError for a
    runner-only flag given with another runner, or for `--runner=DaskRunner` when the Dask
    extra is not installed.
    """
    rest: list[str] = []
    skip = False
    for i, flag in enumerate(flags):
        if skip:
            skip = False
            continue
        if flag == "--runner":
            skip = True
            continue
        if flag.startswith("--runner="):
            continue
        rest.append(flag)
    runner = runner_of(flags) or DEFAULT_RUNNER
    runner = ALIASES.get(runner, runner)
    if runner in _DASK_RUNNERS or any(flag.startswith("--dask_") for flag in rest):
        _register_dask_options()
    for flag in rest:
        name = flag.split("=", 1)[0]
        needs = _RUNNER_ONLY_FLAGS.get(name)
        if needs is not None and runner not in needs:
            raise ConfigError(f"{name} only applies to --runner=DaskRunner, but the runner is {runner}; drop the flag or pass --runner=DaskRunner")
    if runner in _DASK_RUNNERS:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise ConfigError("--runner=DaskRunner needs Dask: pip install 'apache-beam[dask]' distributed") from None
    return [f"--runner={runner}", *rest]


def _register_dask_options() -> None:
    """Import Beam's Dask runner, which registers DaskOptions (--dask_client_address, ...) with
    Beam's option parser. Only when Dask is asked for: the import pulls in dask.distributed, about
    half a second of every other run's start-up."""
    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    except ImportError:  # the [dask] extra is missing; the check below says so
        pass


class _CachedViewOptions(PipelineOptions):
    """PipelineOptions with cached views (see `pipeline_options`); adds no flags of its own."""

    def view_as(self, cls):
        views = self.__dict__.get("_featurebeam_views")
        if views is None:
            views = {}
            object.__setattr__(self, "_featurebeam_views", views)
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_featurebeam_views", None)  # rebuilt on demand after unpickling or copying
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


def is_dask(runner: str | None) -> bool:
    """True for featurebeam's DaskRunner under either name, and for Beam's."""
    return runner is not None and ALIASES.get(runner, runner) in _DASK_RUNNERS


def pipeline_options(flags: Sequence[str]):
    """`PipelineOptions(flags)` whose `view_as` returns one cached view per options class.

    Beam calls `view_as(TypeOptions)` and the like several times for every transform it applies
    (type inference, beartype checks), and each call builds an argparse parser of that class's
    flags and parses the command line again: about 800 calls and half of the graph's
    construction time for featurebeam's ~550 applications. A view holds no state of its own
    (values live in the `_all_options` dict every view shares), so one view per class is
    equivalent to a new one each time.
    """
    return _CachedViewOptions(list(flags))


def cache_dofn_specs() -> None:
    """Make Beam look for a DoFn class's state and timer parameters once, not ~8 times per ParDo.

    `apache_beam.transforms.userstate.get_dofn_specs` wraps every method of a DoFn (about 30,
    most inherited) and inspects its signature, and Beam calls it twice when a ParDo is made,
    three times when the graph is turned into its proto and twice more for each ParDo when
    FnApiRunner sets up a stage: 1,068 calls for featurebeam's 137 ParDos, about 1.1 s of every
    run (py-spy). The answer depends only on the methods' default arguments, so it is kept per
    class. A DoFn holding a bound method as an instance attribute (a `beam.Map` of a bound
    method) may differ from its class: it is inspected every time, as before. The result is
    Beam's own, copied, so callers may change it. Idempotent; this process only.
    """
    import types

    from apache_beam.transforms import userstate

    if getattr(userstate.get_dofn_specs, "_featurebeam_cached", False):
        return
    inspect_specs = userstate.get_dofn_specs
    by_class: dict[type, tuple] = {}

    def get_dofn_specs(dofn):
        if any(isinstance(value, types.MethodType) for value in getattr(dofn, "__dict__", {}).values()):
            return get_dofn_specs.__wrapped__(dofn)
        found = by_class.get(type(dofn))
        if found is None:
            found = by_class[type(dofn)] = get_dofn_specs.__wrapped__(dofn)
        return set(found[0]), set(found[1])

    get_dofn_specs._featurebeam_cached = True
    get_dofn_specs.__wrapped__ = inspect_specs
    get_dofn_specs.__doc__ = inspect_specs.__doc__
    userstate.get_dofn_specs = get_dofn_specs


def worker_slots(options) -> int:
    """How many bundles the runner can process at once, as far as the flags say.

    FnApiRunner: `--direct_num_workers` (0 means one per core). Dask: `--dask_npartitions`, else
    the worker threads the scheduler at `--dask_client_address` has (`dask_threads`), else the
    cores of this machine (a local cluster's default, and the guess when the scheduler does not
    answer or has no worker yet). Dataflow: `--max_num_workers` (else `--num_workers`, else 100)
    times the vCPUs its `--machine_type` names (else 1). Other runners: 16. A hint for sizing
    work, never a limit.
    """
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, WorkerOptions

    runner = str(options.view_as(StandardOptions).runner or DEFAULT_RUNNER)
    if runner in (DEFAULT_RUNNER, "DirectRunner", "BundleBasedDirectRunner"):
        workers = options.view_as(DirectOptions).direct_num_workers
        if workers is None:
            return 1
        return max(1, workers or os.cpu_count() or 1)
    if is_dask(runner):
        all_options = options.get_all_options()
        partitions = all_options.get("npartitions")
        if partitions:
            return partitions
        threads = dask_threads(all_options["address"]) if all_options.get("address") else None
        return max(1, threads or os.cpu_count() or 1)
    if "Dataflow" in runner:
        worker = options.view_as(WorkerOptions)
        machines = worker.max_num_workers or worker.num_workers or 100
        cores = re.search(r"-(\d+)$", worker.machine_type or "")
        return max(1, machines * (int(cores.group(1)) if cores else 1))
    return 16


def dask_threads(address: str, *, timeout: float = _SCHEDULER_TIMEOUT_S) -> int | None:
    """The worker threads the Dask scheduler at `address` has now: one request, answered from the
    scheduler's own table (no Client, no worker contacted). None when it does not answer within
    `timeout` s, or has no worker yet (a cluster still scaling up)."""
    import asyncio
    import socket

    from distributed.core import rpc

    if address.startswith("tcp://"):  # a refused connection fails at once here; Dask's connect retries until the timeout
        host, _, port = address[len("tcp://"):].rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except (OSError, ValueError):
            _LOG.warning("the Dask scheduler at %s does not answer; guessing %d worker threads", address, os.cpu_count() or 1)
            return None

    async def ask() -> int:
        async with rpc(address, timeout=timeout) as scheduler:
            return sum((await scheduler.ncores()).values())

    try:
        threads = asyncio.run(asyncio.wait_for(ask(), timeout))
    except Exception:  # unreachable, refused, timed out: the caller guesses
        _LOG.warning("the Dask scheduler at %s did not say how many worker threads it has; guessing %d", address,
                     os.cpu_count() or 1)
        return None
    return threads or None


def template_location(options) -> str | None:
    """`--template_location`: where DataflowRunner writes the job instead of submitting it. A Flex
    Template's launcher passes it at each launch; featurebeam refuses it anywhere else."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    return options.view_as(GoogleCloudOptions).template_location or None


def job_only(options) -> bool:
    """True when `p.run()` only builds a job and nothing runs: a `--dry_run`, or a job a Flex Template
    launch writes to `--template_location` for Dataflow's launcher to submit.

    The launcher must then neither wait for nor finalise the run (the pipeline's own Finalise step
    does that when the job runs, or `python -m pipelines.finalize RUN_DIR`).
    """
    from apache_beam.options.pipeline_options import TestOptions

    return bool(template_location(options) or options.view_as(TestOptions).dry_run)


def job_only_message(options, *, run_dir: str) -> str:
    """What the launcher prints instead of a run summary when `job_only(options)`."""
    location = template_location(options)
    if not location:
        return "dry run: the pipeline was built and checked; nothing was staged or run"
    return (
        f"job written to {location} for Dataflow's Flex Template launcher to submit\n"
        f"  output:  {run_dir} (run.json appears when the job's Finalise step has run)"
    )
