"""Before a job is submitted: what its workers can reach of this machine, and how they get featurebeam.

A runner's workers may run elsewhere: Dataflow's always do, a portable runner's (Flink, Spark,
PortableRunner, Prism) do unless `--environment_type=LOOPBACK` runs them in the launcher's
process, and a Dask cluster's (`--dask_client_address`) may or may not share a disk with the
launcher. A local path such a worker cannot read would fail only on the workers, minutes into the
job, or worse, succeed there: workers writing a local `--output` into their own disks leave the
launcher without run.json. So the launcher refuses, before anything is submitted or written, every
local path the job needs (`--output`, `--dataset`, `--reuse_from`, an extractor's model `path`,
local `--allowed_uri_prefixes`), with one line naming the flag and the fix. Dataflow and portable
runners are refused outright; a Dask cluster is asked (`client.run` of a small check on every
worker): a read path must show the same thing there (a file's size and first 64 KiB, a few names
of a folder), and `--output` must hold a probe file the launcher just wrote and be writable.
Constant work: a handful of paths, never the dataset's files.

The built-in `sample` set is generated on this machine; for workers that cannot read it, it is
copied once to `<output>/_sample/v<version>-<content hash>/` (datasets/sample.py) and listed
from there.

Code: a Dataflow job (or a portable job on Beam's stock Docker image) whose flags give its workers
no way to install featurebeam (`--setup_file`, `--extra_package`, `--sdk_container_image`; a
`--requirements_file` alone does not) gets a wheel built from this checkout's source tree and added
as `--extra_package`; an installation without a source tree (from a wheel) is refused with one line
naming those flags. A worker pool (`EXTERNAL`), a `PROCESS` command or a Docker image named by
`--environment_config` must have featurebeam installed already: nothing here can check it.

The config YAMLs (`--config`, `configs/datasets/*.yaml`) are read by the launcher only; what they
name that the workers read (a model `path`, a dataset's folder or manifest, allowed prefixes) is
checked as above.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fnmatch
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from featurebeam.errors import ConfigError, OutputError

HERE, REMOTE, DASK = "here", "remote", "dask"
LOOPBACK = "LOOPBACK"
# A file is compared by its size and a digest of its first HEAD_BYTES; a folder by whether these
# many of its names (the first the launcher's listing yields) are there too.
HEAD_BYTES = 64 << 10
FOLDER_NAMES = 8
PROBE_PREFIX = ".featurebeam-probe-"
DASK_TIMEOUT_S = 10
# Flags that give a Dataflow (or stock-image Docker) worker featurebeam's code.
CODE_FLAGS = "--setup_file, --extra_package or --sdk_container_image"
_BUILD_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Workers:
    """Where a runner's workers run, as far as its flags say.

    kind: HERE (they see this machine's disk: FnApiRunner, DirectRunner, Prism or a portable runner
      with a LOOPBACK environment, Beam's DaskRunner without an address, which starts a
      LocalCluster here), REMOTE (they never do: Dataflow, portable runners' DOCKER, PROCESS and
      EXTERNAL environments) or DASK (a Dask cluster at `address`: ask it).
    runner: how messages name it, e.g. "DataflowRunner" or "PortableRunner (--environment_type=EXTERNAL)".
    stock_image: REMOTE workers on an image without featurebeam (Dataflow's default, or a
      portable DOCKER environment without --environment_config), which install staged packages.
    """

    kind: str
    runner: str
    address: str | None = None
    stock_image: bool = False


def _runner_class(name: str):
    """The runner class `--runner` names (Beam's short names, a dotted path), or None if unknown."""
    import importlib

    from apache_beam.options.pipeline_options import StandardOptions

    if "." not in name:
        known = {path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}
        name = known.get(name.lower()) or known.get(name.lower() + "runner") or ""
    module, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        return None


def _environment_type(cls, options) -> str:
    """The SDK environment a portable runner will use: `--environment_type`, else the runner's
    default as Beam 2.77 decides it (Prism, Flink with an embedded master, Spark with a local master:
    LOOPBACK; else DOCKER)."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PortableOptions, SparkRunnerOptions

    portable = options.view_as(PortableOptions)
    if portable.environment_type:
        return portable.environment_type
    if portable.output_executable_path:
        return "DOCKER"
    from apache_beam.runners.portability import flink_runner, prism_runner, spark_runner

    if issubclass(cls, prism_runner.PrismRunner):
        return LOOPBACK
    if issubclass(cls, flink_runner.FlinkRunner) and options.view_as(FlinkRunnerOptions).flink_master in flink_runner.MAGIC_HOST_NAMES:
        return LOOPBACK
    if issubclass(cls, spark_runner.SparkRunner) and re.match(
        spark_runner.LOCAL_MASTER_PATTERN, options.view_as(SparkRunnerOptions).spark_master_url or ""
    ):
        return LOOPBACK
    return "DOCKER"


def workers_of(options) -> Workers:
    """Where the workers of a pipeline with these (resolved) options run; see `Workers`."""
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions, WorkerOptions

    from pipelines import runners

    runner = str(options.view_as(StandardOptions).runner or runners.DEFAULT_RUNNER)
    short = runner.rsplit(".", 1)[-1]
    if runners.is_dask(runner):
        from apache_beam.runners.dask.dask_runner import DaskOptions

        address = options.view_as(DaskOptions).address  # --dask_client_address
        return Workers(DASK, short, address=address) if address else Workers(HERE, short)
    cls = _runner_class(runner)
    if cls is None:  # a runner Beam does not know: nothing to go by
        return Workers(HERE, short)
    from apache_beam.runners.portability.portable_runner import PortableRunner

    if "Dataflow" in cls.__name__:
        worker = options.view_as(WorkerOptions)
        return Workers(REMOTE, short, stock_image=not (worker.sdk_container_image or worker.worker_harness_container_image))
    if issubclass(cls, PortableRunner):
        from apache_beam.portability import python_urns

        env = _environment_type(cls, options)
        if env in (LOOPBACK, python_urns.EMBEDDED_PYTHON_LOOPBACK):
            return Workers(HERE, short)
        stock = env in ("DOCKER", "beam:env:docker:v1") and not options.view_as(PortableOptions).environment_config
        return Workers(REMOTE, f"{short} (--environment_type={env})", stock_image=stock)
    return Workers(HERE, short)


# --- the local paths a job needs -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalPath:
    """A path on this machine that the workers read (or, for `--output`, write).

    path: absolute. named: how the user gave it, for the message (`--output=runs`).
    fix: what to pass instead, for the message. writes: the workers write there.
    """

    path: str
    named: str
    fix: str
    writes: bool = False


def is_local(uri: str) -> bool:
    """A bare path or a file:// URI."""
    return "://" not in uri or uri.startswith("file://")


def _local(uri: str) -> str:
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def dataset_paths(dataset, *, spec: str) -> list[LocalPath]:
    """Local paths the workers read to list `dataset` (`--dataset=spec`): its folder, glob root or
    manifest, and local prefixes its rows may point at."""
    from datasets.files import glob_root, has_glob
    from datasets.sample import SampleDataset

    if isinstance(dataset, SampleDataset):  # generated here, and staged for workers elsewhere (check_reach)
        return []
    found = []
    uri = getattr(dataset, "uri", "") or ""
    if uri and is_local(uri):
        path = _local(uri)
        found.append(LocalPath(
            glob_root(path) if has_glob(path) else path, f"--dataset={spec}",
            "copy it to a bucket and pass --dataset=gs://BUCKET/PATH (a folder, glob or manifest there)",
        ))
    for prefix in getattr(dataset, "allowed_uri_prefixes", ()):
        if is_local(prefix):
            found.append(LocalPath(
                _local(prefix).rstrip("/") or "/", f"--allowed_uri_prefixes (or the dataset config's allowed_uri_prefixes) entry {prefix}",
                "point the rows at gs:// objects and allow their bucket, e.g. --allowed_uri_prefixes=gs://BUCKET/",
            ))
    return found


def model_paths(features: Mapping[str, Mapping[str, Any]], *, where: str) -> list[LocalPath]:
    """Local `path` values of extractor configs (tf_model, onnx_model, any extractor whose config
    has a `path` field): files the workers load."""
    from features import registry

    found = []
    for name, values in features.items():
        _, kind, values = registry.resolve_feature(name, values)
        if kind is None:  # a plain function: its code travels pickled by value, not as a file
            continue
        path = (values or {}).get("path")
        fields = {f.name for f in dataclasses.fields(registry.instance_class(name, values).config_type)}
        if "path" in fields and isinstance(path, str) and path and is_local(path):
            found.append(LocalPath(
                _local(path), f"{where}: features.{name}.path={path}", "copy the model to a bucket and set path: gs://BUCKET/MODEL",
            ))
    return found


def job_paths(
    *, output: str, output_given: bool, dataset, dataset_spec: str, reuse_from: str | None,
    features: Mapping[str, Mapping[str, Any]], config_where: str,
) -> list[LocalPath]:
    """Every local path the job's workers need, `--output` first."""
    paths = []
    if is_local(output):
        paths.append(LocalPath(
            _local(output), f"--output={output}" + ("" if output_given else " (the default)"),
            "pass --output=gs://BUCKET/PATH", writes=True,
        ))
    paths += dataset_paths(dataset, spec=dataset_spec)
    if reuse_from and is_local(reuse_from):
        paths.append(LocalPath(
            _local(reuse_from), f"--reuse_from={reuse_from}", "pass the previous run's folder in its bucket, --reuse_from=gs://BUCKET/...",
        ))
    paths += model_paths(features, where=config_where)
    return paths


# --- asking a Dask cluster -------------------------------------------------------------------------


def signature(path: str) -> tuple | None:
    """What identifies `path` across machines, cheaply: ("file", size, sha256 of the first
    HEAD_BYTES), ("dir", up to FOLDER_NAMES names in it), or None when it is not there."""
    try:
        if os.path.isdir(path):
            names = []
            with os.scandir(path) as entries:
                for entry in entries:
                    if not entry.name.startswith(PROBE_PREFIX):
                        names.append(entry.name)
                    if len(names) >= FOLDER_NAMES:
                        break
            return ("dir", tuple(sorted(names)))
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        return ("file", os.path.getsize(path), hashlib.sha256(head).hexdigest())
    except OSError:
        return None


def _sees(path: str, expected: tuple) -> str | None:
    """On a worker: None if `path` shows what `expected` (the launcher's `signature`) says, else why not."""
    if not os.path.exists(path):
        return "no such path there"
    if not os.access(path, os.R_OK):
        return "not readable there"
    if expected[0] == "dir":
        if not os.path.isdir(path):
            return "not a folder there"
        missing = [name for name in expected[1] if not os.path.lexists(os.path.join(path, name))]
        return f"another folder there (no {missing[0]!r} in it)" if missing else None
    if signature(path) != expected:
        return "another file there"
    return None


def _probe_worker(checks: list[tuple[str, str, Any]]) -> list[str | None]:
    """Run on every Dask worker by `client.run`: for each (kind, path, expected) None if this
    worker sees what the launcher does, else why not. kind "read": `expected` is the launcher's
    `signature`; kind "write": `path/expected` is a probe file holding `expected`, and the folder
    must be writable."""
    out: list[str | None] = []
    for kind, path, expected in checks:
        if kind == "write":
            probe = os.path.join(path, PROBE_PREFIX + expected)
            try:
                with open(probe) as handle:
                    ok = handle.read() == expected
            except OSError:
                ok = False
            if not ok:
                out.append("another folder there, or none" if os.path.isdir(path) else "no such folder there")
            elif not os.access(path, os.W_OK | os.X_OK):
                out.append("not writable there")
            else:
                out.append(None)
        else:
            out.append(_sees(path, expected))
    return out


class _OutputProbe:
    """A probe file in `--output` (made if missing) for the workers to find. `close` removes it,
    and with `undo` the folders it made (the output was refused: the launch leaves nothing)."""

    def __init__(self, path: str):
        self.path = path
        self.token = secrets.token_hex(8)
        self.made: list[str] = []
        self.file: str | None = None
        missing, here = [], path
        while not os.path.isdir(here):
            missing.append(here)
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
        try:
            for folder in reversed(missing):
                os.mkdir(folder)
                self.made.append(folder)
            with open(os.path.join(path, PROBE_PREFIX + self.token), "w") as handle:
                handle.write(self.token)
            self.file = os.path.join(path, PROBE_PREFIX + self.token)
        except OSError:
            pass  # not writable from here either: the run folder's own check says so later

    def close(self, *, undo: bool) -> None:
        with contextlib.suppress(OSError):
            if self.file:
                os.remove(self.file)
        for folder in reversed(self.made if undo else []):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _ask_dask(address: str, checks: list[tuple[str, str, Any]]) -> tuple[int, list[tuple[int, str]]]:
    """Run `_probe_worker(checks)` on every worker of the cluster at `address`: (how many
    workers answered, one (failing workers, reason) per check, 0 workers for a check all pass)."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("--runner=DaskRunner needs Dask: pip install 'apache-beam[dask]' distributed") from None
    try:
        client = Client(address, timeout=f"{DASK_TIMEOUT_S}s", set_as_default=False)
    except Exception as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}: {exc}); check --dask_client_address"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=DASK_TIMEOUT_S)
        except Exception:
            raise ConfigError(
                f"the Dask cluster at {address} has no workers to check the local paths with; start its workers, "
                "or give only gs:// paths"
            ) from None
        answers = client.run(_probe_worker, checks, on_error="return")
    failed: list[list[str]] = [[] for _ in checks]
    for worker, answer in answers.items():
        if isinstance(answer, BaseException):
            name = type(answer).__name__
            if isinstance(answer, ImportError):
                raise ConfigError(
                    f"the Dask workers at {address} cannot import featurebeam ({name}: {answer}); install featurebeam, "
                    "at the launcher's version, where they run"
                )
            raise ConfigError(f"cannot check the local paths on the Dask worker {worker} ({name}: {answer}); check --dask_client_address")
        for i, why in enumerate(answer):
            if why:
                failed[i].append(why)
    return len(answers), [(len(whys), whys[0] if whys else "") for whys in failed]


# --- the check -----------------------------------------------------------------------------------


def _refusal(path: LocalPath, why: str, *, shared: bool = False) -> Exception:
    """The error for `path`; `shared`: say that a path the workers share with this machine works too."""
    message = f"{path.named} {why}; {path.fix}" + (", or a path they share with this machine" if shared else "")
    return OutputError(message) if path.writes else ConfigError(message)


def check_reach(*, workers: Workers, paths: Sequence[LocalPath], dataset, output: str):
    """Refuse the first of `paths` the workers cannot reach (OutputError for `--output`, else
    ConfigError); returns the dataset to list: `dataset`, or for the sample set generated on this
    machine and workers that cannot read it, its copy staged to `<output>/_sample/...`.

    workers: `workers_of(options)`. paths: `job_paths(...)`, `--output` first. output: `--output`.
    HERE workers are not asked; REMOTE ones are refused outright; a DASK cluster is asked once.
    """
    from datasets.sample import SampleDataset

    sample = dataset if isinstance(dataset, SampleDataset) and dataset.local else None
    if workers.kind == HERE:
        return dataset
    if workers.kind == REMOTE:
        if paths:
            raise _refusal(paths[0], f"is on this machine's disk, which the workers of {workers.runner} cannot see")
        return _staged(sample, output) if sample is not None else dataset
    # A Dask cluster: one round trip checks every path, the sample's manifest included. A read
    # path missing here is left to the dataset's or the model's own check.
    checks: list[tuple[LocalPath | None, tuple[str, str, Any]]] = []
    probe = None
    done = False
    try:
        for path in paths:
            if path.writes:
                probe = _OutputProbe(path.path)
                if probe.file:
                    checks.append((path, ("write", path.path, probe.token)))
            elif (seen := signature(path.path)) is not None:
                checks.append((path, ("read", path.path, seen)))
        if sample is not None:
            sample.prepare()  # generated here first: the workers may share this disk
            checks.append((None, ("read", _local(sample.uri), signature(_local(sample.uri)))))
        if not checks:
            done = True
            return dataset
        answered, verdicts = _ask_dask(workers.address, [check for _, check in checks])
        for (path, _), (failing, why) in zip(checks, verdicts):
            if failing and path is not None:
                raise _refusal(path, f"cannot be {'written' if path.writes else 'read'} by the Dask workers at "
                               f"{workers.address} ({failing} of {answered} workers: {why})", shared=True)
        done = True
    finally:
        if probe is not None:  # a refused launch leaves no folder it made
            probe.close(undo=not done)
    if sample is not None and verdicts[-1][0]:
        return _staged(sample, output)
    return dataset


def _staged(sample, output: str):
    """`sample` copied to the output's bucket (once), announced in one line."""
    staged = sample.staged(to=output)
    print(f"featurebeam: the sample set is staged for the workers at {staged.root}", file=sys.stderr)
    return staged


# --- featurebeam's code for the workers ------------------------------------------------------------


def source_root() -> Path | None:
    """The checkout featurebeam runs from (an editable install or PYTHONPATH): the folder of its
    pyproject.toml, found from the installed package; None when installed from a wheel."""
    import tomllib

    import featurebeam

    root = Path(featurebeam.__file__).resolve().parents[1]
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text())
    except (OSError, ValueError):
        return None
    return root if project.get("project", {}).get("name") == "featurebeam" else None


def code_flags_given(options) -> bool:
    """True when the flags give the workers featurebeam: a setup file, an extra package or a container image."""
    from apache_beam.options.pipeline_options import SetupOptions, WorkerOptions

    setup = options.view_as(SetupOptions)
    worker = options.view_as(WorkerOptions)
    return bool(setup.setup_file or setup.extra_packages or worker.sdk_container_image or worker.worker_harness_container_image)


def package_source(*, workers: Workers, options) -> Path | None:
    """The checkout to build a featurebeam package from for the workers, or None when none is needed.

    Needed for REMOTE workers on a stock image (Dataflow without `--sdk_container_image`, a
    portable DOCKER environment without `--environment_config`) whose flags stage no featurebeam,
    except for a `--dry_run`, which stages nothing. Raises ConfigError when featurebeam has no
    source tree to build from (installed from a wheel). Cheap: the build is `package_for_workers`.
    """
    from apache_beam.options.pipeline_options import TestOptions

    if workers.kind != REMOTE or not workers.stock_image or code_flags_given(options):
        return None
    root = source_root()
    if root is None:
        raise ConfigError(
            f"the workers of {workers.runner} cannot import featurebeam: pass {CODE_FLAGS} (featurebeam here is "
            "installed without its source tree, so the launcher cannot build a package of it)"
        )
    return None if options.view_as(TestOptions).dry_run else root


def package_for_workers(root: Path) -> Path:
    """featurebeam's wheel built from the checkout at `root` into a temp folder removed at exit."""
    out = Path(tempfile.mkdtemp(prefix="featurebeam-package-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return build_wheel(root=root, out=out)


def _copy_sources(root: Path, to: Path) -> None:
    """pyproject.toml, its readme and the packages its setuptools config includes, without caches:
    the build runs on this copy, so the checkout gets no build/ or egg-info, and two launches
    building at once do not meet."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", ["*"])
    to.mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", to / "pyproject.toml")
    readme = project.get("project", {}).get("readme")
    if isinstance(readme, str) and (root / readme).is_file():
        shutil.copy2(root / readme, to / readme)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").is_file() and any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            shutil.copytree(entry, to / entry.name, ignore=ignore)


def build_wheel(*, root: Path, out: Path) -> Path:
    """Build featurebeam's wheel from the checkout at `root` into `out`; returns its path.

    Runs the project's build backend (setuptools) in a child process, on a copy of the sources;
    where the backend is not installed here, `pip wheel` fetches it (isolated build).
    """
    import tomllib

    src = out / "src"
    _copy_sources(root, src)
    backend = tomllib.loads((root / "pyproject.toml").read_text()).get("build-system", {}).get("build-backend", "setuptools.build_meta")
    hook = "import importlib, sys; print(importlib.import_module(sys.argv[1]).build_wheel(sys.argv[2]))"
    attempts = [
        [sys.executable, "-c", hook, backend, str(out)],
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(src)],
    ]
    error = ""
    for cmd in attempts:
        done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        wheels = sorted(out.glob("featurebeam-*.whl"))
        if done.returncode == 0 and wheels:
            return wheels[0]
        error = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
    raise ConfigError(f"cannot build featurebeam's package from {root} for the workers ({error}); pass {CODE_FLAGS}")
