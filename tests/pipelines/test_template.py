"""Flex Templates (pipelines/template.py): a template built once launches many runs.

End to end: a spec is built against the GCS emulator, then launched twice through the template's
launch path with Beam's portable runner (a worker pool whose processes share nothing with the
launcher) standing in for Dataflow. Each launch must decide its own run id and attempt, run to
completion in its own run folder, and be loaded into the BigQuery emulator by the job's own final
step. What only Dataflow can show (its launcher VM passing these flags, the image) is in the README.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from export import bigquery, metadata
from featurebeam.errors import ConfigError
from pipelines import extract, finalize, template

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "europe-west1-docker.pkg.dev/my-project/images/featurebeam:0.1.0"
N_ITEMS = 5


def _write_spec(path: Path, parameters: list[dict], environment: dict | None = None) -> str:
    spec = {"image": IMAGE, "sdkInfo": {"language": "PYTHON"}, "defaultEnvironment": environment or {},
            "metadata": {"name": template.TEMPLATE_NAME, "parameters": parameters}}
    path.write_text(json.dumps(spec))
    return str(path)


# --- the launch's flags, from a spec on disk (no emulator) -------------------------------------


def test_a_launch_takes_the_stored_flags_and_lets_launch_parameters_override_them(tmp_path):
    spec = _write_spec(
        tmp_path / "spec.json",
        [
            {"name": "dataset", "defaultValue": "gs://b/audio/**"},
            {"name": "features", "defaultValue": "logmel,mfcc"},
            {"name": "output", "defaultValue": "gs://b/runs"},
            {"name": "decode_in_process", "defaultValue": "true"},
            {"name": "bigquery_frames", "defaultValue": "false"},
            {"name": "number_of_worker_harness_threads", "defaultValue": "4"},
            {"name": "save_main_session", "defaultValue": "true", "customMetadata": {"featurebeam_switch": "true"}},
            {"name": "run_id"},  # declared, not stored
            {"name": template.SPEC_PARAMETER, "defaultValue": "gs://b/t/spec.json"},
        ],
        {"tempLocation": "gs://b/tmp", "maxWorkers": 8, "additionalExperiments": ["a", "b"]},
    )
    argv = template.launch_argv([f"--{template.SPEC_PARAMETER}={spec}", "--features=chroma", "--mode=resume",
                                 "--run_id=r1", "--limit=", "--project=p", "--region=europe-west1"])
    assert argv == [
        "--dataset=gs://b/audio/**", "--output=gs://b/runs", "--decode_in_process", "--number_of_worker_harness_threads=4",
        "--save_main_session", "--features=chroma", "--mode=resume", "--run_id=r1", "--project=p", "--region=europe-west1",
        "--temp_location=gs://b/tmp", "--max_num_workers=8", f"--sdk_container_image={IMAGE}", "--experiments=a,b",
        "--runner=DataflowRunner",
    ]
    # Dataflow's own launcher options win over the spec's environment; a given runner is kept.
    argv = template.launch_argv([f"--{template.SPEC_PARAMETER}={spec}", "--temp_location=gs://c/tmp", "--runner=PortableRunner"])
    assert "--temp_location=gs://c/tmp" in argv and "--temp_location=gs://b/tmp" not in argv
    assert [flag for flag in argv if flag.startswith("--runner")] == ["--runner=PortableRunner"]


def test_a_launch_refuses_what_it_cannot_run(tmp_path):
    spec = _write_spec(tmp_path / "spec.json", [{"name": "dataset", "defaultValue": "gs://b/a/**"}])
    with pytest.raises(ConfigError, match=f"--parameters={template.SPEC_PARAMETER}=gs://"):
        template.launch_argv(["--dataset=gs://b/a/**"])
    with pytest.raises(ConfigError, match="--output=runs in this launch is not a gs:// URI.*Cloud Storage"):
        template.launch_argv([f"--{template.SPEC_PARAMETER}={spec}", "--output=runs"])
    with pytest.raises(ConfigError, match="--dataset=sample in this launch is not a gs:// or bq:// URI"):
        template.launch_argv([f"--{template.SPEC_PARAMETER}={spec}", "--dataset=sample"])
    with pytest.raises(ConfigError, match="a switch takes true or false"):
        template.launch_argv([f"--{template.SPEC_PARAMETER}={spec}", "--decode_in_process=yes"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"image": IMAGE, "metadata": {"name": "someone-else"}}))
    with pytest.raises(ConfigError, match="not a featurebeam Flex Template spec"):
        template.launch_argv([f"--{template.SPEC_PARAMETER}={other}"])


def test_the_images_launch_file_runs_the_launch_and_exits_2_naming_the_fix():
    """docker/flex_launch.py is what Dataflow's launcher runs (FLEX_TEMPLATE_PYTHON_PY_FILE)."""
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "flex_launch.py"), "--dataset=gs://b/a/**"],
                          cwd="/", env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("featurebeam: error: this launch did not say which template it runs")


# --- what a template cannot store, refused at build (no emulator) ------------------------------

BUILD = ["--dataset=gs://b/audio/**", "--output=gs://b/runs", "--runner=DataflowRunner", "--project=p",
         "--region=europe-west1", "--flex_template=gs://b/templates/featurebeam.json", f"--sdk_container_image={IMAGE}"]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--run_id=x"], "--run_id is decided by each launch.*--parameters=run_id="),
        (["--mode=resume"], "--mode is decided by each launch"),
        (["--output=runs"], "--output=runs in a template is not a gs:// URI"),
        (["--config=configs/features/default.yaml"], "--config=configs/features/default.yaml in a template is not a gs://"),
        (["--setup_file=./pyproject.toml"], "--setup_file names a local file.*drop --setup_file"),
        (["--runner=DaskRunner"], "a Flex Template runs on Dataflow"),
        (["--flex_template=templates/featurebeam.json"], "must be a gs:// path"),
        (["--template_location=gs://b/t.json"], "--template_location builds a classic Dataflow template.*--flex_template="),
    ],
)
def test_build_refuses_what_a_template_cannot_store(change, message, capsys):
    name = change[0].split("=")[0]
    argv = [flag for flag in BUILD if not flag.startswith(name + "=")] + change
    assert extract.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("featurebeam: error: ")
    assert re.search(message, err), err


def test_build_needs_the_image(capsys):
    assert extract.main([f for f in BUILD if not f.startswith("--sdk_container_image")]) == 2
    assert "--flex_template needs --sdk_container_image=IMAGE" in capsys.readouterr().err


def test_a_classic_template_is_refused_before_anything_is_resolved(capsys, tmp_path):
    argv = [f"--dataset={tmp_path}/missing", "--runner=DataflowRunner", "--template_location=gs://b/templates/t.json"]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert "classic Dataflow template" in err and "--flex_template=gs://" in err and "missing" not in err


# --- built against the GCS emulator, launched twice on the portable runner ----------------------

BUCKET = "fb-flex"
SPEC = f"gs://{BUCKET}/templates/featurebeam.json"


@pytest.fixture(scope="module")
def pool(bq_emulator, gcs_emulator, tmp_path_factory):
    """A shared-nothing Beam worker pool started once the BigQuery emulator runs (its address is in
    the workers' environment: the job's final step loads from a worker)."""
    from tests import shared_nothing

    reason = shared_nothing.unavailable()
    if reason:
        pytest.skip(reason)
    with shared_nothing.isolated_worker_pool_at(tmp_path_factory.mktemp("flex-pool")) as running:
        yield running


@pytest.fixture(scope="module")
def built(gcs_emulator, bq_emulator):
    bucket = gcs_emulator.make_bucket(BUCKET)
    rng = np.random.default_rng(5)
    for i in range(N_ITEMS):
        buf = io.BytesIO()
        soundfile.write(buf, (0.2 * rng.standard_normal(4000 + 200 * i)).astype(np.float32), 8000, format="WAV")
        bucket.blob(f"audio/c{i % 2}/{i}.wav").upload_from_string(buf.getvalue())
    bucket.blob("configs/narrow.yaml").upload_from_string("features:\n  logmel:\n    n_mels: 16\n")
    dataset = f"{bq_emulator.project}.flex_loads"
    argv = [
        f"--dataset=gs://{BUCKET}/audio/**", "--features=logmel", f"--config=gs://{BUCKET}/configs/narrow.yaml",
        f"--output=gs://{BUCKET}/runs", "--sample_rate=8000", "--commit_records=2", f"--bigquery_dataset={dataset}",
        "--runner=DataflowRunner", f"--project={gcs_emulator.project}", "--region=europe-west1",
        f"--temp_location=gs://{BUCKET}/tmp", "--max_num_workers=3", f"--sdk_container_image={IMAGE}", f"--flex_template={SPEC}",
    ]
    assert extract.run(argv) is None
    return {"spec": metadata.read_json(SPEC), "dataset": dataset}


@pytest.mark.slow
@pytest.mark.emulator
def test_the_spec_names_the_image_and_stores_the_flags_as_defaults(built):
    spec = built["spec"]
    assert spec["image"] == IMAGE and spec["sdkInfo"]["language"] == "PYTHON"
    assert spec["defaultEnvironment"] == {"tempLocation": f"gs://{BUCKET}/tmp", "maxWorkers": 3, "sdkContainerImage": IMAGE}
    params = {p["name"]: p for p in spec["metadata"]["parameters"]}
    stored = {name: p["defaultValue"] for name, p in params.items() if "defaultValue" in p}
    assert stored == {
        "dataset": f"gs://{BUCKET}/audio/**", "features": "logmel", "config": f"gs://{BUCKET}/configs/narrow.yaml",
        "output": f"gs://{BUCKET}/runs", "sample_rate": "8000", "commit_records": "2", "bigquery_dataset": built["dataset"],
        template.SPEC_PARAMETER: SPEC,
    }
    # run_id and mode are launch parameters without a default; every flag has help for the console.
    assert "defaultValue" not in params["run_id"] and params["mode"]["regexes"] == ["^(new|resume|overwrite)$"]
    assert all(p["helpText"] and p["label"] for p in params.values())
    assert not {"runner", "project", "region", "flex_template", "progress"} & set(params)
    # Building wrote nothing but the spec: no run folder.
    assert not list(metadata.FileSystems.match([f"gs://{BUCKET}/runs/**"])[0].metadata_list)


def _launch(pool, *extra):
    launched = template.launch([f"--{template.SPEC_PARAMETER}={SPEC}", *pool.flags, *extra])
    if launched.result is not None:
        assert launched.result.wait_until_finish() == "DONE"
    return launched


@pytest.fixture(scope="module")
def two_launches(built, pool):
    return [_launch(pool), _launch(pool)]


def _rows(client, sql):
    return [dict(row) for row in client.query(sql).result()]


@pytest.mark.slow
@pytest.mark.emulator
def test_two_launches_make_two_complete_runs_each_loaded_by_its_job(two_launches, built, bq_emulator):
    first, second = (launched.plan for launched in two_launches)
    assert first.run_id != second.run_id and first.run_dir != second.run_dir
    assert extract._attempt(first) != extract._attempt(second)
    client = bq_emulator.client()
    for plan in (first, second):
        run = metadata.read_json(plan.path("run.json"))
        assert run["run_id"] == plan.run_id and run["counts"]["records"] == N_ITEMS == run["counts"]["ok"]
        assert run["config"]["features"]["logmel"]["n_mels"] == 16  # the stored gs:// config
        assert run["beam"]["runner"] == "PortableRunner"
        # Each run's own attempt, and only it, stamped its commits: nothing of the other run's.
        record = metadata.read_json(plan.path("_work", "plan.json"))
        assert record["attempts"] == [extract._attempt(plan)]
        commits = [metadata.read_json(m.path) for m in metadata.FileSystems.match([plan.path("_commits", "*.json")])[0].metadata_list]
        assert commits and {c["attempt"] for c in commits} == {extract._attempt(plan)}
        # Loaded by the job's final step (the launcher did not wait), with fixed job ids.
        loaded = metadata.read_json(plan.path("_work", finalize.BIGQUERY_JSON))
        assert loaded["attempt"] == extract._attempt(plan) and loaded["dataset"] == built["dataset"]
        assert {t: e["action"] for t, e in loaded["tables"].items()} == {"features": "loaded", "runs": "loaded", "errors": "empty"}
        (job_id, *_) = bigquery.job_ids(table="features", dataset=built["dataset"],
                                       job_key=f"{plan.run_dir}|{extract._attempt(plan)}")
        assert client.get_job(job_id).state == "DONE"  # (the emulator's output_rows counts the whole table)
    counts = _rows(client, f"SELECT run_id, COUNT(*) AS n FROM `{built['dataset']}.features` GROUP BY run_id ORDER BY run_id")
    assert counts == sorted([{"run_id": first.run_id, "n": N_ITEMS}, {"run_id": second.run_id, "n": N_ITEMS}], key=lambda r: r["run_id"])
    runs = _rows(client, f"SELECT run_id FROM `{built['dataset']}.runs` ORDER BY run_id")
    assert runs == sorted([{"run_id": first.run_id}, {"run_id": second.run_id}], key=lambda r: r["run_id"])


@pytest.mark.slow
@pytest.mark.emulator
def test_a_retried_final_step_and_a_resume_launch_load_nothing_twice(two_launches, built, bq_emulator, pool):
    first = two_launches[0].plan
    record = metadata.read_json(first.path("_work", "plan.json"))
    # The final step again, as a retry of its bundle would run it (same attempt, same job ids).
    report = finalize.load_bigquery(record, job_key=f"{first.run_dir}|{finalize.attempt(record)}")
    assert {t: e["action"] for t, e in report.items()} == {"features": "skipped", "runs": "skipped", "errors": "empty"}
    # A launch that resumes the complete first run submits nothing and adds no row.
    resumed = _launch(pool, "--mode=resume", f"--run_id={first.run_id}")
    assert resumed.result is None and resumed.plan.run_dir == first.run_dir
    client = bq_emulator.client()
    n = _rows(client, f"SELECT COUNT(*) AS n FROM `{built['dataset']}.features` WHERE run_id = '{first.run_id}'")
    assert n == [{"n": N_ITEMS}]
    assert _rows(client, f"SELECT COUNT(*) AS n FROM `{built['dataset']}.runs`") == [{"n": 2}]
