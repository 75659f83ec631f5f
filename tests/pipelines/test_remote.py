"""Local paths with runners whose workers may not see this machine's disk are refused before anything
is submitted (pipelines/remote.py); the sample set is staged to the output's bucket instead; a
Dataflow job gets featurebeam's wheel when its flags give the workers no other way to import it.

The refusals run the real launcher (`extract.main`) with Dataflow's and the portable runner's flags:
no job server, credentials or bucket is needed, because nothing gets that far; a spy on
`Pipeline.run` shows nothing was submitted. Dask clusters are asked for real: the isolated one
(tests/shared_nothing.py, workers in their own mount namespace) cannot see pytest's tmp_path, the
shared-disk one (tests/dask_cluster.py) can.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from featurebeam.errors import ConfigError, OutputError
from pipelines import extract, remote, runners

ROOT = Path(__file__).resolve().parents[2]
DATAFLOW = ["--runner=DataflowRunner", "--project=p", "--region=europe-west1", "--temp_location=gs://fb-remote/tmp"]
PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL", "--environment_config=localhost:1"]
BUCKET = "fb-remote"


@pytest.fixture
def submitted(monkeypatch):
    """Every `Pipeline.run` the launcher makes (a refused launch makes none)."""
    calls = []
    real = beam.Pipeline.run

    def run(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(beam.Pipeline, "run", run)
    return calls


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("featurebeam: error: ")
    return err


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (launcher flags with one local path the job needs, the flag the refusal must name)."""
    (tmp / "audio").mkdir(exist_ok=True)
    (tmp / "prev").mkdir(exist_ok=True)
    (tmp / "model.onnx").write_bytes(b"not read")
    (tmp / "m.csv").write_text("uri\nx.wav\n")
    (tmp / "features.yaml").write_text("features:\n  onnx_model: {path: model.onnx}\n")
    remote_output = f"--output=gs://{BUCKET}/runs"
    return {
        "default_output": (["--dataset=gs://fb-remote/audio/"], "--output=runs (the default)"),
        "output": ([f"--output={tmp / 'out'}", "--dataset=gs://fb-remote/audio/"], f"--output={tmp / 'out'}"),
        "sample_local_output": (["--dataset=sample", f"--output={tmp / 'out'}"], f"--output={tmp / 'out'}"),
        "dataset_folder": ([f"--dataset={tmp / 'audio'}", remote_output], f"--dataset={tmp / 'audio'}"),
        "dataset_glob": ([f"--dataset={tmp}/audio/**.wav", remote_output], f"--dataset={tmp}/audio/**.wav"),
        "manifest": ([f"--dataset={tmp / 'm.csv'}", remote_output], f"--dataset={tmp / 'm.csv'}"),
        "reuse_from": (["--dataset=gs://fb-remote/audio/", remote_output, f"--reuse_from={tmp / 'prev'}"],
                       f"--reuse_from={tmp / 'prev'}"),
        "model": (["--dataset=gs://fb-remote/audio/", remote_output, "--config=features.yaml", "--features=onnx_model"],
                  "features.yaml: features.onnx_model.path=model.onnx"),
        "allowed_prefix": (["--dataset=gs://fb-remote/m.jsonl", remote_output, "--allowed_uri_prefixes=/data/audio/"],
                           "--allowed_uri_prefixes"),
    }


CASES = ("default_output", "output", "sample_local_output", "dataset_folder", "dataset_glob", "manifest", "reuse_from",
         "model", "allowed_prefix")


@pytest.mark.parametrize("runner", ["dataflow", "portable"])
@pytest.mark.parametrize("case", CASES)
def test_a_local_path_with_a_remote_runner_is_refused_before_submitting(case, runner, tmp_path, monkeypatch, capsys, submitted):
    monkeypatch.chdir(tmp_path)  # --output=runs and model.onnx are relative to it
    argv, named = _cases(tmp_path)[case]
    flags = DATAFLOW if runner == "dataflow" else PORTABLE
    assert extract.main(["--features=logmel", *argv, *flags]) == 2  # the last --features counts
    err = _error(capsys)
    assert named in err, err
    assert "on this machine's disk" in err and "gs://BUCKET/" in err
    assert ("DataflowRunner" if runner == "dataflow" else "PortableRunner (--environment_type=EXTERNAL)") in err
    assert submitted == []
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # nothing written either


def test_refusals_raise_the_launchers_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="--output=runs"):
        extract.plan(["--dataset=gs://fb-remote/audio/", *DATAFLOW])
    with pytest.raises(ConfigError, match="--dataset="):
        extract.plan([f"--dataset={tmp_path}", f"--output=gs://{BUCKET}/runs", *DATAFLOW])


def _workers(*flags: str) -> remote.Workers:
    return remote.workers_of(runners.pipeline_options(runners.resolve_runner_flags(list(flags))))


@pytest.mark.parametrize(
    "flags, kind, stock",
    [
        ([], remote.HERE, False),
        (["--runner=FnApiRunner"], remote.HERE, False),
        (["--runner=DirectRunner"], remote.HERE, False),
        (["--runner=PrismRunner"], remote.HERE, False),  # LOOPBACK by default
        (["--runner=PrismRunner", "--environment_type=DOCKER"], remote.REMOTE, True),
        (["--runner=PortableRunner", "--environment_type=LOOPBACK"], remote.HERE, False),
        (["--runner=PortableRunner"], remote.REMOTE, True),  # DOCKER, Beam's stock image
        (["--runner=PortableRunner", "--environment_config=my/image:1"], remote.REMOTE, False),
        (["--runner=PortableRunner", "--environment_type=PROCESS"], remote.REMOTE, False),
        (PORTABLE, remote.REMOTE, False),
        (["--runner=FlinkRunner"], remote.HERE, False),  # an embedded Flink: LOOPBACK
        (["--runner=FlinkRunner", "--flink_master=flink:8081"], remote.REMOTE, True),
        (["--runner=SparkRunner"], remote.HERE, False),  # local[4]: LOOPBACK
        (["--runner=SparkRunner", "--spark_master_url=spark://spark:7077"], remote.REMOTE, True),
        (["--runner=DataflowRunner"], remote.REMOTE, True),
        (["--runner=DataflowRunner", "--sdk_container_image=my/image:1"], remote.REMOTE, False),
        (["--runner=DaskRunner"], remote.HERE, False),  # a LocalCluster on this machine
        (["--runner=DaskRunner", "--dask_client_address=tcp://h:8786"], remote.DASK, False),
    ],
)
def test_which_runners_workers_may_not_see_this_disk(flags, kind, stock):
    workers = _workers(*flags)
    assert (workers.kind, workers.stock_image) == (kind, stock)
    if kind == remote.DASK:
        assert workers.address == "tcp://h:8786"


def test_a_loopback_portable_run_keeps_its_local_paths(tmp_path):
    """LOOPBACK runs the workers in the launcher's process: local paths are fine (the plan is made)."""
    plan = extract.plan(["--dataset=sample", f"--output={tmp_path}", "--features=logmel", "--runner=PortableRunner",
                         "--job_endpoint=embed", "--environment_type=LOOPBACK"])
    assert plan.run_dir.startswith(str(tmp_path)) and not plan.dataset.uri.startswith("gs://")


@pytest.mark.parametrize(
    "flags, needs",
    [
        (["--runner=DataflowRunner"], True),
        (["--runner=DataflowRunner", "--requirements_file=requirements.txt"], True),  # does not install featurebeam
        (["--runner=DataflowRunner", "--setup_file=./pyproject.toml"], False),
        (["--runner=DataflowRunner", "--extra_package=dist/featurebeam-0.1.0.tar.gz"], False),
        (["--runner=DataflowRunner", "--sdk_container_image=my/image:1"], False),
        (["--runner=DataflowRunner", "--dry_run=True"], False),  # stages nothing
        (["--runner=PortableRunner"], True),  # Beam's stock image installs staged packages
        (PORTABLE, False),  # the pool's own Python must have featurebeam
        (["--runner=FnApiRunner"], False),
    ],
)
def test_which_jobs_get_a_package_built(flags, needs):
    options = runners.pipeline_options(runners.resolve_runner_flags(flags))
    source = remote.package_source(workers=remote.workers_of(options), options=options)
    assert source == (ROOT if needs else None)


# --- slow: the package, the template, a wheel-installed launcher -----------------------------------------


@pytest.mark.slow
def test_the_wheel_holds_the_packages_and_leaves_the_checkout_clean(tmp_path):
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True).stdout
    wheel = remote.build_wheel(root=ROOT, out=tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name == "featurebeam-0.1.0-py3-none-any.whl"
    for package in ("featurebeam", "datasets", "features", "pipelines", "export"):
        assert f"{package}/__init__.py" in names
    assert "pipelines/extract.py" in names and "export/queries/runs.sql" in names
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)
    after = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before  # no build/ or egg-info in the checkout
    # Beam's own stager (what a portable DOCKER environment stages) takes it as an extra package.
    from apache_beam.transforms.environments import python_sdk_dependencies

    (tmp_path / "stage").mkdir()
    artifacts = python_sdk_dependencies(PipelineOptions([f"--extra_package={wheel}"]), str(tmp_path / "stage"))
    staged = {a.role_payload for a in artifacts}
    assert any(wheel.name.encode() in payload for payload in staged)


@pytest.mark.slow
def test_a_launcher_without_source_tree_names_the_code_flags(tmp_path):
    """featurebeam installed from a wheel (its packages without pyproject.toml beside them)."""
    site = tmp_path / "site"
    for package in ("featurebeam", "datasets", "features", "pipelines", "export"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", "--dataset=gs://fb-remote/audio/", f"--output=gs://{BUCKET}/runs",
         "--features=logmel", *DATAFLOW],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot import featurebeam" in line and "--setup_file, --extra_package or --sdk_container_image" in line


@pytest.mark.slow
@pytest.mark.emulator
def test_a_dataflow_job_without_code_flags_stages_featurebeams_wheel(gcs_emulator, tmp_path, capsys):
    """A Dataflow job written without --setup_file/--extra_package/--sdk_container_image carries the
    wheel built from this checkout. The job is written where Dataflow's launcher reads it
    (`--template_location`), as a Flex Template launch does (`extract.launch`): nothing leaves the machine."""
    import numpy as np
    import soundfile

    bucket = gcs_emulator.make_bucket(BUCKET)
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    bucket.blob("audio/c0.wav").upload_from_string(buf.getvalue())
    argv = [f"--dataset=gs://{BUCKET}/audio/", "--features=logmel", f"--output=gs://{BUCKET}/runs", "--run_id=tpl",
            "--runner=DataflowRunner", f"--project={gcs_emulator.project}", "--region=europe-west1",
            f"--temp_location=gs://{BUCKET}/tmp", f"--staging_location=gs://{BUCKET}/staging",
            f"--template_location=gs://{BUCKET}/templates/remote.json"]
    launched = extract.launch(argv)
    assert launched.plan.run_dir == f"gs://{BUCKET}/runs/audio/tpl"
    out = capsys.readouterr()
    notes = [line for line in out.err.splitlines() if line.startswith("featurebeam: no ")]
    assert notes == [f"featurebeam: no {remote.CODE_FLAGS}: the workers get featurebeam-0.1.0-py3-none-any.whl, built from {ROOT}"]
    assert f"job written to gs://{BUCKET}/templates/remote.json" in out.out
    blobs = {b.name: b for b in gcs_emulator.client().list_blobs(BUCKET, prefix="staging/")}
    (wheel,) = [name for name in blobs if name.endswith("/featurebeam-0.1.0-py3-none-any.whl")]
    names = zipfile.ZipFile(io.BytesIO(blobs[wheel].download_as_bytes())).namelist()
    assert "pipelines/extract.py" in names
    job = json.loads(gcs_emulator.client().bucket(BUCKET).blob("templates/remote.json").download_as_bytes())
    (pool,) = job["environment"]["workerPools"]
    assert "featurebeam-0.1.0-py3-none-any.whl" in {p["name"] for p in pool["packages"]}


# --- Dask clusters: asked whether their workers see the paths ------------------------------------------


def _dask_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "audio").mkdir(exist_ok=True)
    (tmp / "audio" / "a.wav").write_bytes(b"RIFF")
    (tmp / "prev").mkdir(exist_ok=True)
    (tmp / "prev" / "run.json").write_text("{}")
    (tmp / "model.onnx").write_bytes(b"not read")
    (tmp / "features.yaml").write_text(f"features:\n  onnx_model: {{path: {tmp / 'model.onnx'}}}\n")
    remote_output = f"--output=gs://{BUCKET}/dask"
    return {
        "output": ([f"--output={tmp / 'out' / 'runs'}", f"--dataset=gs://{BUCKET}/audio/"], f"--output={tmp / 'out' / 'runs'}"),
        "dataset": ([f"--dataset={tmp / 'audio'}", remote_output], f"--dataset={tmp / 'audio'}"),
        "reuse_from": ([f"--dataset=gs://{BUCKET}/audio/", remote_output, f"--reuse_from={tmp / 'prev'}"], "--reuse_from="),
        "model": ([f"--dataset=gs://{BUCKET}/audio/", remote_output, f"--config={tmp / 'features.yaml'}", "--features=onnx_model"],
                  "features.onnx_model.path="),
    }


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.parametrize("case", ["output", "dataset", "reuse_from", "model"])
def test_a_dask_cluster_that_cannot_see_a_local_path_refuses_it(case, isolated_dask_cluster, tmp_path, capsys, submitted):
    argv, named = _dask_cases(tmp_path)[case]
    assert extract.main(["--features=logmel", *argv, *isolated_dask_cluster.flags]) == 2
    err = _error(capsys)
    assert named in err and f"by the Dask workers at {isolated_dask_cluster.address} (2 of 2 workers: " in err, err
    assert err.endswith(", or a path they share with this machine")
    assert submitted == []
    assert not (tmp_path / "out").exists()  # the probe's folders are gone with it


@pytest.mark.slow
@pytest.mark.emulator
def test_a_dask_cluster_that_cannot_see_the_sample_gets_it_staged(isolated_dask_cluster, gcs_emulator):
    gcs_emulator.make_bucket(BUCKET)
    plan = extract.plan(["--dataset=sample", "--features=logmel", f"--output=gs://{BUCKET}/dask-sample", "--run_id=d",
                         *isolated_dask_cluster.flags])
    assert plan.dataset.root.startswith(f"gs://{BUCKET}/dask-sample/_sample/v1-")
    assert len(_staged_generations(gcs_emulator, "dask-sample/_sample/")) == 61


@pytest.mark.slow
def test_a_dask_cluster_on_this_disk_accepts_local_paths(dask_cluster, tmp_path, submitted):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"RIFF")
    output = tmp_path / "out" / "runs"
    plan = extract.plan([f"--dataset={tmp_path / 'audio'}", f"--output={output}", "--features=logmel", "--run_id=r",
                         *dask_cluster.flags])
    assert plan.run_dir == str(output / "audio" / "r")
    assert [p.name for p in output.iterdir()] == ["audio"]  # the probe file is gone
    plan = extract.plan(["--dataset=sample", f"--output={output}", "--features=logmel", "--run_id=s", *dask_cluster.flags])
    assert not plan.dataset.uri.startswith(str(output))  # read where it was generated: no copy
    assert submitted == []


# --- the sample set, staged to the output's bucket ----------------------------------------------------------


def _staged_generations(gcs_emulator, prefix: str) -> dict[str, int]:
    return {b.name: b.generation for b in gcs_emulator.client().list_blobs(BUCKET, prefix=prefix)}


@pytest.mark.slow
@pytest.mark.emulator
def test_the_sample_is_staged_once_for_dataflow(gcs_emulator, capsys):
    gcs_emulator.make_bucket(BUCKET)
    argv = ["--dataset=sample", "--features=logmel", f"--output=gs://{BUCKET}/staged", *DATAFLOW, "--dry_run=True"]
    plan = extract.plan([*argv, "--run_id=a"])
    root = plan.dataset.root
    assert root.startswith(f"gs://{BUCKET}/staged/_sample/v1-") and plan.dataset.name == "sample"
    assert plan.run_dir == f"gs://{BUCKET}/staged/sample/a"
    assert f"the sample set is staged for the workers at {root}" in capsys.readouterr().err
    staged = _staged_generations(gcs_emulator, "staged/_sample/")
    assert len(staged) == 61 and any(name.endswith("/manifest.jsonl") for name in staged)
    again = extract.plan([*argv, "--run_id=b"])
    assert again.dataset.root == root
    assert _staged_generations(gcs_emulator, "staged/_sample/") == staged  # nothing uploaded again


@pytest.mark.slow
@pytest.mark.emulator
def test_the_sample_runs_on_a_worker_pool_that_shares_nothing(gcs_emulator, isolated_worker_pool, capsys):
    """The portable runner's workers (own /tmp and ~/.cache) read the staged copy from the bucket."""
    gcs_emulator.make_bucket(BUCKET)
    output = f"gs://{BUCKET}/pool"
    run = extract.run(["--dataset=sample", "--features=logmel", f"--output={output}", "--run_id=p", "--limit=6",
                       *isolated_worker_pool.flags])
    assert run["counts"]["listed"] == 6 and run["counts"]["ok"] == 6 and run["counts"]["failed"] == 0
    assert run["dataset"]["name"] == "sample" and run["dataset"]["uri"].startswith(f"{output}/_sample/v1-")
    assert "the sample set is staged" in capsys.readouterr().err
