"""Session fixtures that run the real GCS and BigQuery emulators for tests.

Each fixture starts the emulator as a child process on 127.0.0.1 (own process group, free
port), waits until it answers, points the Google client libraries and Beam at it through the
environment, and kills the process group at session end. Nothing here mocks a client: tests
talk to the emulators through google-cloud-storage, google-cloud-bigquery and Beam's IOs.

Load it with ``pytest_plugins = ["tests.emulators"]`` in ``tests/conftest.py`` (or
``pytest -p tests.emulators``). BigQuery needs the DuckDB spatial extension linked once per
machine: ``bash .ci/setup-emulators.sh .venv/bin/python``.

Environment set for the whole session once a fixture is used:

* ``GOOGLE_APPLICATION_CREDENTIALS``: a fake ``authorized_user`` file whose access token
  expires in 2099. google-auth (and so Beam's ``auth.get_service_credentials``) loads it
  without touching the network; without it Beam retries ADC discovery for ~26 s per process.
* ``GOOGLE_CLOUD_PROJECT``: the emulator project (Beam and the clients read it).
* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: read by google-cloud-storage, hence by
  Beam's ``gs://`` filesystem.
* ``BIGQUERY_EMULATOR_HOST=http://127.0.0.1:PORT``: BigQuery REST, read by
  google-cloud-bigquery (verbatim as base URL, so it keeps the scheme).
* ``BIGQUERY_STORAGE_EMULATOR_HOST=127.0.0.1:PORT``: BigQuery Storage Read/Write gRPC;
  project convention, read by :func:`featurebeam.cloud.bigquery_read_client`.

The BigQuery emulator resolves ``gs://bucket/object`` in load jobs to files under the GCS
emulator's data directory (``BQEMU_GCS_LOCAL_ROOT``), so a load job can read objects written
through the GCS emulator. The reverse does not hold: files an extract job writes there are not
registered with the GCS emulator and cannot be listed or read through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from google.cloud import bigquery, bigquery_storage, storage

PROJECT = "featurebeam-test"
_BIN = Path(sys.executable).parent  # the emulators' console scripts live beside python
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GcsEmulator:
    """A running gcp-storage-emulator."""

    endpoint: str  # http://127.0.0.1:PORT, also in STORAGE_EMULATOR_HOST
    project: str
    data_dir: Path  # objects live at data_dir/<bucket>/<name>
    pid: int
    startup_s: float

    def client(self) -> storage.Client:
        """A real google.cloud.storage.Client talking to this emulator."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def make_bucket(self, name: str) -> storage.Bucket:
        """Create bucket ``name``, or return it if it exists (the emulator is session-wide)."""
        from google.api_core.exceptions import Conflict

        client = self.client()
        try:
            return client.create_bucket(name)
        except Conflict:
            return client.bucket(name)


@dataclass(frozen=True)
class BigQueryEmulator:
    """A running bqemulator (REST + Storage Read/Write gRPC)."""

    endpoint: str  # REST, http://127.0.0.1:PORT, also in BIGQUERY_EMULATOR_HOST
    grpc_endpoint: str  # 127.0.0.1:PORT, also in BIGQUERY_STORAGE_EMULATOR_HOST
    project: str
    pid: int
    startup_s: float

    def client(self) -> bigquery.Client:
        """A real google.cloud.bigquery.Client talking to this emulator."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )

    def read_client(self) -> bigquery_storage.BigQueryReadClient:
        """A real Storage Read API client on a plaintext gRPC channel to this emulator."""
        import grpc
        from google.cloud import bigquery_storage
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
            BigQueryReadGrpcTransport,
        )

        channel = grpc.insecure_channel(self.grpc_endpoint)
        return bigquery_storage.BigQueryReadClient(
            transport=BigQueryReadGrpcTransport(channel=channel)
        )

    def make_dataset(self, name: str) -> bigquery.Dataset:
        """Create dataset ``name`` in the emulator project if missing, and return it."""
        return self.client().create_dataset(f"{self.project}.{name}", exists_ok=True)


class EmulatorStartError(RuntimeError):
    """An emulator process did not come up; the message carries its log."""


# One emulator of each kind per test process. pytest keeps a separate session cache for every
# place these fixtures are registered (a conftest importing them, a module's pytest_plugins),
# and two live instances would fight over the environment variables. The first instance owns
# the process; later ones hand out the same handle and leave teardown to the owner, which
# pytest tears down last (session fixtures are finalised in reverse order of setup).
_LIVE: dict[str, object] = {}


@pytest.fixture(scope="session")
def fake_gcp_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ADC at a fake authorized_user file with a token valid until 2099.

    google-auth then never refreshes (refreshing would need oauth2.googleapis.com), and Beam's
    credential lookup returns at once instead of retrying ADC discovery.
    """
    if "credentials" in _LIVE:
        yield _LIVE["credentials"]  # type: ignore[misc]
        return
    path = tmp_path_factory.mktemp("gcp") / "fake_adc.json"
    path.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "featurebeam-test.apps.googleusercontent.com",
                "client_secret": "not-a-secret",
                "refresh_token": "not-a-refresh-token",
                "token": "not-a-token",
                "expiry": "2099-01-01T00:00:00Z",
                "quota_project_id": PROJECT,
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
        mp.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
        # Skip google-auth's GCE metadata-server probe should anything fall through to it.
        mp.setenv("NO_GCE_CHECK", "True")
        _LIVE["credentials"] = path
        try:
            yield path
        finally:
            del _LIVE["credentials"]


@pytest.fixture(scope="session")
def gcs_emulator(
    fake_gcp_credentials: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GcsEmulator]:
    """A gcp-storage-emulator process for the session, with STORAGE_EMULATOR_HOST set."""
    if "gcs" in _LIVE:
        yield _LIVE["gcs"]  # type: ignore[misc]
        return
    root = tmp_path_factory.mktemp("gcs_emulator")
    log = root / "emulator.log"
    started = time.monotonic()
    # The emulator cannot report a port it chose itself, so pick one; a lost race shows up
    # as an early exit with "Address already in use" in the log.
    port = _free_port()
    proc = _spawn(
        [
            str(_BIN / "gcp-storage-emulator"),
            "--data-dir",
            str(root),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log=log,
        env=os.environ.copy(),
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until(
            lambda: _http_ok(f"{endpoint}/"), proc=proc, log=log, what="gcp-storage-emulator"
        )
        emulator = GcsEmulator(
            endpoint=endpoint,
            project=PROJECT,
            # gcp-storage-emulator keeps object bytes, unchanged, under <data-dir>/.cloudstorage.
            data_dir=root / ".cloudstorage",
            pid=proc.pid,
            startup_s=time.monotonic() - started,
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
            _LIVE["gcs"] = emulator
            yield emulator
    finally:
        _LIVE.pop("gcs", None)
        _stop(proc)


@pytest.fixture(scope="session")
def bq_emulator(
    fake_gcp_credentials: Path,
    gcs_emulator: GcsEmulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BigQueryEmulator]:
    """A bqemulator process for the session, with BIGQUERY_*EMULATOR_HOST set.

    Depends on ``gcs_emulator`` so load jobs can read ``gs://`` objects written through it.
    """
    if "bq" in _LIVE:
        yield _LIVE["bq"]  # type: ignore[misc]
        return
    root = tmp_path_factory.mktemp("bq_emulator")
    log = root / "emulator.log"
    env = os.environ.copy()
    env.update(
        # Ports 0: the emulator binds free ports itself and logs them (race-free).
        BQEMU_REST_HOST="127.0.0.1",
        BQEMU_REST_PORT="0",
        BQEMU_GRPC_HOST="127.0.0.1",
        BQEMU_GRPC_PORT="0",
        BQEMU_DEFAULT_PROJECT_ID=PROJECT,
        BQEMU_LOG_FORMAT="json",
        BQEMU_LOG_LEVEL="info",
        BQEMU_UPLOAD_STAGING_DIR=str(root / "uploads"),
        BQEMU_GCS_LOCAL_ROOT=str(gcs_emulator.data_dir),
        # Its optional Avro extension would be downloaded from extensions.duckdb.org, which
        # is unreachable here: the attempt costs ~1 s at startup and then fails anyway.
        BQEMU_ENABLE_FORMAT_EXTENSIONS="false",
    )
    started = time.monotonic()
    # In-memory DuckDB (ephemeral mode): each session starts empty.
    proc = _spawn([str(_BIN / "bqemulator"), "start", "--ephemeral"], log=log, env=env)
    try:
        ports: dict[str, int] = {}

        def ready() -> bool:
            ports.update(_logged_ports(log))
            if "grpc.listen" not in ports:  # gRPC binds after REST: wait for both
                return False
            return _http_ok(f"http://127.0.0.1:{ports['rest.listen']}/readyz")

        _wait_until(ready, proc=proc, log=log, what="bqemulator", hint=_SPATIAL_HINT)
        emulator = BigQueryEmulator(
            endpoint=f"http://127.0.0.1:{ports['rest.listen']}",
            grpc_endpoint=f"127.0.0.1:{ports['grpc.listen']}",
            project=PROJECT,
            pid=proc.pid,
            startup_s=time.monotonic() - started,
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BIGQUERY_EMULATOR_HOST", emulator.endpoint)
            mp.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", emulator.grpc_endpoint)
            _LIVE["bq"] = emulator
            yield emulator
    finally:
        _LIVE.pop("bq", None)
        _stop(proc)


@dataclass(frozen=True)
class SentJob:
    """One job as this process sent it to BigQuery (jobs.insert or jobs.query): its kind
    ("query", "load", ...), SQL, whether it was a dry run, and its byte ceiling (None: none)."""

    kind: str
    sql: str | None
    dry_run: bool
    maximum_bytes_billed: int | None


def _sent_job(path: str, body: dict) -> SentJob:
    if path.endswith("/queries"):  # jobs.query: the request is the query's configuration
        query, dry_run = body, bool(body.get("dryRun"))
        kind = "query"
    else:
        configuration = body.get("configuration", {})
        kind = next((k for k in ("query", "load", "copy", "extract") if k in configuration), "other")
        query, dry_run = configuration.get(kind, {}), bool(configuration.get("dryRun"))
    cap = query.get("maximumBytesBilled") if kind == "query" else None
    return SentJob(kind, query.get("query") if kind == "query" else None, dry_run, None if cap is None else int(cap))


@pytest.fixture
def bq_jobs(bq_emulator: BigQueryEmulator, monkeypatch: pytest.MonkeyPatch) -> list[SentJob]:
    """Every job this process sends to the BigQuery emulator during the test, in order, read from
    the request bodies as google-cloud-bigquery sends them: the real client and real requests;
    the record is taken at the client's HTTP connection, on the way out.

    Beam's in-process runner runs the pipeline's DoFns in this process, so their jobs are here too.
    """
    from google.cloud.bigquery import _http

    sent: list[SentJob] = []
    original = _http.Connection.api_request

    def recording(self, *args, **kwargs):
        method = kwargs.get("method", args[0] if args else None)
        path = kwargs.get("path", args[1] if len(args) > 1 else "")
        data = kwargs.get("data", args[3] if len(args) > 3 else None)
        if method == "POST" and isinstance(data, dict) and (path.endswith("/jobs") or path.endswith("/queries")):
            sent.append(_sent_job(path, data))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_http.Connection, "api_request", recording)
    return sent


_SPATIAL_HINT = (
    "If the log says the DuckDB spatial extension could not be installed, link it from the "
    "duckdb-extension-spatial wheel: bash .ci/setup-emulators.sh .venv/bin/python"
)


def _spawn(cmd: list[str], *, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # A new session makes the emulator a process-group leader, so _stop can take down
        # it and anything it forks with one killpg.
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )


def _wait_until(
    ready: Callable[[], bool],
    *,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    hint: str = "",
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode}"
            raise EmulatorStartError(_failure(what, problem, log, hint))
        if ready():
            return
        time.sleep(0.1)
    raise EmulatorStartError(
        _failure(what, f"did not answer within {_START_TIMEOUT_S:.0f} s", log, hint)
    )


def _failure(what: str, problem: str, log: Path, hint: str) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    tail = "\n".join(text.splitlines()[-60:])
    return f"{what} {problem}. Log {log} (last 60 lines):\n{tail}\n{hint}".rstrip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the emulator's process group: SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT_S)
    # The leader may be gone while a child it forked lives on in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _logged_ports(log: Path) -> dict[str, int]:
    """Ports from bqemulator's JSON log events ``rest.listen`` and ``grpc.listen``."""
    ports = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") in ("rest.listen", "grpc.listen") and "port" in event:
            ports[event["event"]] = int(event["port"])
    return ports
