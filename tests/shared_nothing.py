"""Workers that share nothing with the launcher but the installed code: a Dask cluster and a Beam
worker pool whose processes each run in their own mount namespace.

Every worker process is started as
``unshare -m --propagation private sh -c 'mount -t tmpfs none /tmp && mount -t tmpfs none ~/.cache ... && exec CMD'``
with its own HOME, TMPDIR and working directory inside its private ``/tmp``. It sees the code (this
checkout on PYTHONPATH, the venv) and nothing the launcher wrote: pytest's tmp_path, the GCS
emulator's files, the generated sample set and the launcher's caches are all under ``/tmp`` or
``~/.cache``, which the worker sees as empty folders. Data reaches it only through the network (the
GCS emulator, whose address it gets in STORAGE_EMULATOR_HOST), as on a real cluster. It gets its own
copy of the fake GCP credentials file (the launcher's is under ``/tmp``), as a cloud worker has its
own service account.

- `isolated_dask_cluster` (session fixture) / `isolated_dask_cluster_at`: a `dask scheduler` and two
  single-threaded `dask worker` processes (tests/dask_cluster.py's workers, each unshared); pass
  ``cluster.flags`` (``--runner=DaskRunner --dask_client_address=tcp://...``) to the launcher.
- `isolated_worker_pool` (session fixture) / `isolated_worker_pool_at`: Beam's
  ``python -m apache_beam.runners.worker.worker_pool_main``, the Python worker Flink and Spark start;
  pass ``pool.flags`` (``--runner=PortableRunner --job_endpoint=embed --environment_type=EXTERNAL
  --environment_config=localhost:PORT``) to the launcher. The job service (and so every shuffle)
  runs in the launcher's process; every DoFn runs in the pool's SDK workers.

Namespaces need root (``unshare -m`` and ``mount``): elsewhere the fixtures skip, naming why.
Teardown kills each process group, so no worker or SDK harness outlives its fixture.
Loaded as a pytest plugin by tests/conftest.py; benchmarks/scale_out.py uses the context managers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dask_cluster import DaskCluster, _spawn, dask_cluster_at, stop, worker_command
from tests.emulators import GcsEmulator, _free_port

_BIN = Path(sys.executable).parent
_START_TIMEOUT_S = 60.0
# Inside a worker's own /tmp (a tmpfs only it sees).
HOME = "/tmp/home"
TMPDIR = "/tmp/tmp"
WORKDIR = "/tmp/work"


def _hidden_dirs() -> list[str]:
    """The launcher's folders a worker sees as empty: /tmp, then its caches outside /tmp."""
    hidden = ["/tmp"]
    for candidate in (Path.home() / ".cache", tempfile.gettempdir(), os.environ.get("FEATUREBEAM_CACHE_DIR")):
        if not candidate:
            continue
        path = os.path.realpath(candidate)
        if os.path.isdir(path) and not any(path == h or path.startswith(h + "/") for h in hidden):
            hidden.append(path)
    return hidden


def isolated_command(cmd: list[str]) -> list[str]:
    """`cmd` run in a private mount namespace, with empty tmpfs over every `_hidden_dirs()` folder.

    The script makes HOME, TMPDIR and the working directory inside the private /tmp, writes the
    credentials passed in SHARED_NOTHING_ADC to GOOGLE_APPLICATION_CREDENTIALS there, drops the
    launcher's FEATUREBEAM_CACHE_DIR, and execs `cmd` (so the process keeps the pid, and the process
    group, that `stop` kills).
    """
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(d)}" for d in _hidden_dirs())
    script = (
        f"set -e; {mounts}; "
        f'mkdir -p "$HOME" "$TMPDIR" {WORKDIR}; cd {WORKDIR}; unset FEATUREBEAM_CACHE_DIR; '
        'if [ -n "${SHARED_NOTHING_ADC:-}" ]; then printf %s "$SHARED_NOTHING_ADC" > "$GOOGLE_APPLICATION_CREDENTIALS"; fi; '
        'unset SHARED_NOTHING_ADC; exec "$@"'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


def isolated_env() -> dict[str, str]:
    """Environment a worker gets on top of tests/dask_cluster.py's (PYTHONPATH=this checkout)."""
    env = {
        "HOME": HOME,
        "TMPDIR": TMPDIR,
        # Beam's worker pool starts SDK harnesses as plain `python`: it must be the venv's.
        "PATH": os.pathsep.join([str(_BIN), os.environ.get("PATH", "")]),
    }
    credentials = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if credentials and os.path.isfile(credentials):
        env["SHARED_NOTHING_ADC"] = Path(credentials).read_text()
        env["GOOGLE_APPLICATION_CREDENTIALS"] = f"{HOME}/adc.json"
    return env


@functools.cache
def unavailable() -> str | None:
    """Why workers cannot be isolated here (not root, no unshare, mounts refused), or None."""
    if sys.platform != "linux":
        return "shared-nothing workers need Linux mount namespaces"
    if os.geteuid() != 0:
        return "shared-nothing workers need root (unshare -m and mount -t tmpfs); CI runs as root"
    if shutil.which("unshare") is None:
        return "shared-nothing workers need unshare (util-linux)"
    probe = subprocess.run(isolated_command(["true"]), env={**os.environ, **isolated_env()},
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -m / mount -t tmpfs failed here: {probe.stderr.strip()[-300:]}"
    return None


def hidden_code() -> str | None:
    """Why the isolated workers could not import this checkout's code: it or its venv lies under a
    folder they get an empty tmpfs over (a clone in /tmp, say). None when they can."""
    code = {"the checkout": Path(__file__).resolve().parents[1], "the venv": Path(sys.prefix).resolve()}
    for what, path in code.items():
        for hidden in _hidden_dirs():
            if path == Path(hidden) or Path(hidden) in path.parents:
                return (f"{what} ({path}) lies under {hidden}, which shared-nothing workers see as an empty tmpfs; "
                        "run the tests from a checkout outside it")
    return None


def _skip_unless_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    hidden = hidden_code()
    if hidden:
        pytest.fail(hidden, pytrace=False)  # not a skip: these tests must run in CI


def start_isolated_worker(cluster: DaskCluster, name: str) -> subprocess.Popen:
    """Start one `dask worker` of `cluster` in its own mount namespace (see `isolated_command`)."""
    log = (cluster.log_dir or Path(".")) / f"worker-{name}.log"
    proc = _spawn(isolated_command(worker_command(cluster.address, name)), log, isolated_env())
    cluster.workers.append(proc)
    return proc


@contextlib.contextmanager
def isolated_dask_cluster_at(log_dir: Path, workers: int = 2) -> Iterator[DaskCluster]:
    """A scheduler and `workers` isolated single-threaded workers; all stopped on exit."""
    with dask_cluster_at(log_dir, workers=workers, start=start_isolated_worker) as cluster:
        yield cluster


@dataclass
class WorkerPool:
    """A running Beam worker pool (`worker_pool_main`) in its own mount namespace."""

    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def flags(self) -> list[str]:
        """The launcher's (and a bare `beam.Pipeline`'s) flags that run a pipeline on this pool."""
        return ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{self.port}"]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def isolated_worker_pool_at(log_dir: Path) -> Iterator[WorkerPool]:
    """Start `python -m apache_beam.runners.worker.worker_pool_main` isolated; stop its group on exit.

    The pool starts one SDK harness process per worker the job asks for, in its own process group
    and namespace, so one killpg ends them all.
    """
    port = _free_port()
    log = log_dir / "worker-pool.log"
    proc = _spawn(
        isolated_command([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"]),
        log, isolated_env(),
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Beam worker pool did not come up; log:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield WorkerPool(port=port, proc=proc, log=log)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def isolated_dask_cluster(gcs_emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A session-wide Dask cluster of two isolated workers that reach data only via the GCS emulator.

    Depends on `gcs_emulator` so the workers start with its address and credentials in their
    environment.
    """
    _skip_unless_available()
    with isolated_dask_cluster_at(tmp_path_factory.mktemp("isolated-dask")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def isolated_worker_pool(gcs_emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """A session-wide isolated Beam worker pool; `isolated_worker_pool.flags` for the launcher."""
    _skip_unless_available()
    with isolated_worker_pool_at(tmp_path_factory.mktemp("isolated-pool")) as pool:
        yield pool


@contextlib.contextmanager
def gcs_emulator_at(root: Path) -> Iterator[GcsEmulator]:
    """A GCS emulator outside pytest (for benchmarks), as tests/emulators.py's `gcs_emulator` starts
    it: fake credentials, STORAGE_EMULATOR_HOST and the project set in os.environ while it runs."""
    from tests import emulators

    credentials = root / "fake_adc.json"
    credentials.write_text(json.dumps({
        "type": "authorized_user", "client_id": "featurebeam-test.apps.googleusercontent.com",
        "client_secret": "not-a-secret", "refresh_token": "not-a-refresh-token", "token": "not-a-token",
        "expiry": "2099-01-01T00:00:00Z", "quota_project_id": emulators.PROJECT,
    }))
    port = _free_port()
    log = root / "gcs-emulator.log"
    started = time.monotonic()
    proc = emulators._spawn([str(_BIN / "gcp-storage-emulator"), "--data-dir", str(root), "start", "--host", "127.0.0.1",
                             "--port", str(port)], log=log, env=os.environ.copy())
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "NO_GCE_CHECK", "STORAGE_EMULATOR_HOST")}
    try:
        emulators._wait_until(lambda: emulators._http_ok(f"{endpoint}/"), proc=proc, log=log, what="gcp-storage-emulator")
        os.environ.update(GOOGLE_APPLICATION_CREDENTIALS=str(credentials), GOOGLE_CLOUD_PROJECT=emulators.PROJECT,
                          NO_GCE_CHECK="True", STORAGE_EMULATOR_HOST=endpoint)
        yield GcsEmulator(endpoint=endpoint, project=emulators.PROJECT, data_dir=root / ".cloudstorage", pid=proc.pid,
                          startup_s=time.monotonic() - started)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulators._stop(proc)
