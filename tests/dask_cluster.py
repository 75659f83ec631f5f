"""A real Dask cluster for tests: one `dask scheduler` and two `dask worker` processes on 127.0.0.1.

Each process runs in its own session (process group) so teardown can stop it and anything it
forked with one killpg; nothing is left running after the session. The workers get this checkout
on PYTHONPATH, so they import the featurebeam code under test (not whatever an editable install
points at). `DaskCluster.flags` are the Beam flags that send a pipeline to the cluster.

Load it with ``pytest_plugins = ["tests.dask_cluster"]`` (tests/conftest.py does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.emulators import _free_port

_BIN = Path(sys.executable).parent
_REPO = Path(__file__).resolve().parents[1]
_START_TIMEOUT_S = 60.0
WORKERS = 2


@dataclass
class DaskCluster:
    """A running scheduler and its workers."""

    address: str  # tcp://127.0.0.1:PORT
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def flags(self) -> list[str]:
        """The launcher's flags for this cluster (`python -m pipelines.extract ... *flags`)."""
        return ["--runner=DaskRunner", f"--dask_client_address={self.address}"]

    @property
    def beam_flags(self) -> list[str]:
        """The same for a bare `beam.Pipeline`, which knows the runner only by its dotted path."""
        from pipelines import runners

        return runners.resolve_runner_flags(self.flags)

    def client(self):
        """A `distributed.Client` on the cluster (close it after use)."""
        from distributed import Client

        return Client(self.address, timeout=30)

    def wait_for_workers(self, n: int = WORKERS, timeout: float = _START_TIMEOUT_S) -> None:
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _spawn(cmd: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={**_env(), **(extra_env or {})},
            cwd=_REPO, start_new_session=True,
        )


def stop(*procs: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop process groups: SIGTERM to all at once, then SIGKILL what is left after `grace` s."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:  # the leader may be gone while a child it forked lives on in the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # SIGKILL cannot be refused; reap it so poll() tells


def worker_command(address: str, name: str, *, cpus: str | None = None) -> list[str]:
    """The `dask worker` command line of one worker of the cluster at `address`.

    One process with one thread and no nanny: two workers for two cores, the worker itself may
    fork (featurebeam's decoder child), and a killed worker stays dead instead of being restarted.
    cpus: pin the worker and every process it starts to these CPUs (`taskset -c`), e.g. "0".
    """
    pinned = ["taskset", "-c", cpus] if cpus is not None else []
    return [*pinned, str(_BIN / "dask"), "worker", address, "--nworkers=1", "--nthreads=1", "--no-nanny",
            "--host=127.0.0.1", f"--name={name}", "--no-dashboard", "--memory-limit=0"]


def start_worker(cluster: DaskCluster, name: str, *, cpus: str | None = None) -> subprocess.Popen:
    """Start one more `dask worker` on `cluster` (see `worker_command`)."""
    log = (cluster.log_dir or Path(".")) / f"worker-{name}.log"
    proc = _spawn(worker_command(cluster.address, name, cpus=cpus), log)
    cluster.workers.append(proc)
    return proc


@contextlib.contextmanager
def dask_cluster_at(
    log_dir: Path, workers: int = WORKERS, allowed_failures: int | None = None, start=start_worker,
    pin: list[str] | None = None,
) -> Iterator[DaskCluster]:
    """Start a scheduler and `workers` workers; stop them all on exit.

    allowed_failures: how many workers may die running one task before the scheduler gives up on
    it with KilledWorker (Dask's default is 3).
    start: `start(cluster, name)` starts one worker and appends it to `cluster.workers`
    (tests/shared_nothing.py starts them in their own mount namespaces).
    pin: the CPUs of each worker (`start_worker`'s cpus), e.g. ["0", "1"] for benchmarks.
    """
    port = _free_port()
    env = {} if allowed_failures is None else {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(allowed_failures)}
    scheduler = _spawn(
        [str(_BIN / "dask"), "scheduler", "--host=127.0.0.1", f"--port={port}", "--no-dashboard"],
        log_dir / "scheduler.log",
        env,
    )
    cluster = DaskCluster(address=f"tcp://127.0.0.1:{port}", scheduler=scheduler, log_dir=log_dir)
    try:
        for i in range(workers):
            if pin:
                start(cluster, f"w{i}", cpus=pin[i])
            else:
                start(cluster, f"w{i}")
        try:
            cluster.wait_for_workers(workers)
        except Exception as exc:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(log_dir.glob("*.log")))
            raise RuntimeError(f"Dask cluster did not come up ({exc}); logs:\n{logs}") from None
        yield cluster
    finally:
        stop(*cluster.workers, scheduler)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A session-wide scheduler plus two single-threaded workers on 127.0.0.1."""
    with dask_cluster_at(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster


@pytest.fixture
def own_dask_cluster(tmp_path: Path, request) -> Iterator[DaskCluster]:
    """A cluster for one test (for tests that kill workers); `indirect` params set allowed_failures."""
    log_dir = tmp_path / "dask"
    log_dir.mkdir()
    with dask_cluster_at(log_dir, allowed_failures=getattr(request, "param", None)) as cluster:
        yield cluster


def wait_for(predicate, timeout: float = _START_TIMEOUT_S, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
