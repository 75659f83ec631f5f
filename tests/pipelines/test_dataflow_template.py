"""A Dataflow Flex Template built offline and launched the way Dataflow's launcher runs it, against
the GCS emulator, and the job each launch hands over inspected.

Build: `--flex_template=gs://...` writes the spec (pipelines/template.py). Launch: the image's
launch file (docker/flex_launch.py) is run with what Dataflow's Python template launcher passes: the
launch parameters, `--project`, `--region`, temp and staging locations and
`--template_location=<staging>/template_launches/<id>/job_object`, where DataflowRunner writes the
job (and stages the pipeline proto) instead of calling the Dataflow API; the fake authorized_user
credentials from tests/emulators.py satisfy the credential lookup and the GCS emulator takes the
uploads. The second launch also passes `--setup_file=./pyproject.toml`, as Dataflow's launcher does
for an image that sets FLEX_TEMPLATE_PYTHON_SETUP_FILE, so Beam builds and stages featurebeam's
sdist (which needs `build`). What this cannot check (it needs a real Google Cloud project and the
image built): that Dataflow starts the image, passes these flags and runs the job it is handed.
"""

from __future__ import annotations

import base64
import bz2
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import soundfile
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from export import metadata
from pipelines import extract, template
from tests.pipelines.test_portability import problems_in

pytestmark = [pytest.mark.slow, pytest.mark.emulator]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "featurebeam-template"
SPEC = f"gs://{BUCKET}/templates/featurebeam.json"
IMAGE = "europe-west1-docker.pkg.dev/my-project/images/featurebeam:0.1.0"
# Top-level steps the job must have; the lead's graph adds "Finalise".
EXPECTED_STEPS = ("List", "Decode", "Extract", "CommitRows", "CommitDead", "Summarise", "Finalize")
PACKAGES = ("datasets", "features", "pipelines", "export", "featurebeam")


def _dataflow_launch_flags(project: str, launch: str) -> list[str]:
    """What Dataflow's Python template launcher adds to the launch parameters (no --runner: the
    launch picks DataflowRunner itself)."""
    return [f"--project={project}", "--region=europe-west1", f"--temp_location=gs://{BUCKET}/tmp",
            f"--staging_location=gs://{BUCKET}/staging", f"--job_name=featurebeam-{launch}",
            f"--template_location=gs://{BUCKET}/staging/template_launches/{launch}/job_object"]


def _job(client, launch: str) -> dict:
    blobs = {b.name: b for b in client.list_blobs(BUCKET)}
    job = json.loads(blobs[f"staging/template_launches/{launch}/job_object"].download_as_bytes())
    options = job["environment"]["sdkPipelineOptions"]["options"]
    (pb,) = [name for name in blobs if name.startswith("staging/") and name.endswith("/pipeline.pb")
             and options["job_name"] in name]
    staging = pb.rsplit("/", 1)[0]
    return {
        "blobs": blobs,
        "job": job,
        "proto": beam_runner_api_pb2.Pipeline.FromString(blobs[pb].download_as_bytes()),
        "staging": staging,
    }


@pytest.fixture(scope="module")
def staged(gcs_emulator):
    bucket = gcs_emulator.make_bucket(BUCKET)
    for i in range(2):
        buf = io.BytesIO()
        soundfile.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
        bucket.blob(f"audio/c{i}.wav").upload_from_string(buf.getvalue())
    build = [f"--dataset=gs://{BUCKET}/audio/**", "--features=logmel", f"--output=gs://{BUCKET}/runs",
             "--runner=DataflowRunner", f"--project={gcs_emulator.project}", "--region=europe-west1",
             f"--temp_location=gs://{BUCKET}/tmp", f"--staging_location=gs://{BUCKET}/staging",
             f"--sdk_container_image={IMAGE}", f"--flex_template={SPEC}"]
    assert extract.run(build) is None  # writes the spec; nothing is staged or run
    after_build = {b.name for b in gcs_emulator.client().list_blobs(BUCKET)}
    # Launch 1: the image's launch file, run as Dataflow's launcher runs it, in its own process.
    done = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "flex_launch.py"), f"--{template.SPEC_PARAMETER}={SPEC}",
         *_dataflow_launch_flags(gcs_emulator.project, "l1")],
        cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Launch 2, in this process, with featurebeam's sdist staged as well.
    cwd = os.getcwd()
    os.chdir(ROOT)  # --setup_file=./pyproject.toml is relative to the checkout, as in the README
    try:
        second = template.launch([f"--{template.SPEC_PARAMETER}={SPEC}", *_dataflow_launch_flags(gcs_emulator.project, "l2"),
                                  "--setup_file=./pyproject.toml"])
    finally:
        os.chdir(cwd)
    client = gcs_emulator.client()
    return {"after_build": after_build, "stdout": done.stdout, "first": _job(client, "l1"), "second": _job(client, "l2"),
            "second_plan": second.plan}


def test_building_writes_only_the_spec(staged):
    assert staged["after_build"] == {"audio/c0.wav", "audio/c1.wav", "templates/featurebeam.json"}


def test_each_launch_hands_over_a_batch_job_on_the_templates_image(staged):
    for launch in ("first", "second"):
        job = staged[launch]["job"]
        assert job["type"] == "JOB_TYPE_BATCH"
        env = job["environment"]
        assert env["tempStoragePrefix"].startswith(f"storage.googleapis.com/{BUCKET}/tmp/")
        (pool,) = env["workerPools"]
        assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
        assert "use_runner_v2" in env["experiments"]
        options = env["sdkPipelineOptions"]["options"]
        assert options["sdk_container_image"] == IMAGE and options["runner"] == "DataflowRunner"
    assert "job written to" in staged["stdout"] and "template_launches/l1/job_object" in staged["stdout"]


def test_each_launch_decides_its_own_run(staged):
    """The run folder, run id and attempt are made by the launch, not stored in the template."""
    run_dirs = []
    for launch in ("first", "second"):
        commit_fns = [raw for name, raw in _pickles(staged[launch]["proto"]).items() if name.startswith("CommitRows/Commit/Run")]
        (found,) = {m.decode() for m in re.findall(rb"gs://" + BUCKET.encode() + rb"/runs/[\w./-]+", commit_fns[0])}
        run_dirs.append(found)
    first, second = run_dirs
    assert first != second
    for run_dir in run_dirs:
        plan = metadata.read_json(f"{run_dir}/_work/plan.json")
        assert plan["run_dir"] == run_dir and len(plan["attempts"]) == 1
        assert not metadata.FileSystems.exists(f"{run_dir}/run.json")  # nothing ran
    assert staged["second_plan"].run_dir == second
    spec = json.dumps(metadata.read_json(SPEC))
    assert first.rsplit("/", 1)[1] not in spec and second.rsplit("/", 1)[1] not in spec


def test_featurebeam_sdist_is_staged(staged):
    second = staged["second"]
    data = second["blobs"][f"{second['staging']}/workflow.tar.gz"].download_as_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    top = {n.split("/")[1] for n in names if n.count("/") >= 2}
    assert set(PACKAGES) <= top, sorted(top)
    assert any(n.endswith("/pipelines/extract.py") for n in names)
    # The first launch relies on the image alone: no package to install on the workers.
    assert not any(name.endswith("/workflow.tar.gz") for name in staged["first"]["blobs"] if staged["first"]["staging"] in name)


def test_staged_proto_has_the_steps_and_only_portable_transforms(staged):
    for launch in ("first", "second"):
        proto, staging = staged[launch]["proto"], staged[launch]["staging"]
        (root_id,) = proto.root_transform_ids
        steps = [proto.components.transforms[t].unique_name for t in proto.components.transforms[root_id].subtransforms]
        assert set(EXPECTED_STEPS) <= set(steps), steps
        assert problems_in(proto) == []
        (env,) = proto.components.environments.values()
        assert env.urn == common_urns.environments.DOCKER.urn
        assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == IMAGE
        for dep in env.dependencies:  # every artifact the workers fetch is in the staging bucket
            assert dep.type_urn == common_urns.artifact_types.URL.urn
            url = beam_runner_api_pb2.ArtifactUrlPayload.FromString(dep.type_payload).url
            assert url.startswith(f"gs://{BUCKET}/{staging}/"), url


def _pickles(proto) -> dict[str, bytes]:
    out = {}
    for transform in proto.components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn.payload
            if payload:
                out[transform.unique_name] = bz2.decompress(base64.b64decode(payload))
    return out


def test_no_local_paths_reach_the_workers(staged, isolated_cache, tmp_path_factory):
    """The DoFns and their configs name gs:// objects only; source file names of pickled lambdas
    (code-object metadata, never opened) are the one local path allowed."""
    local = [str(isolated_cache), str(tmp_path_factory.getbasetemp()), os.path.expanduser("~")]
    source_file = re.compile(re.escape(str(ROOT)).encode() + rb"/[\w/]+\.py")
    for launch in ("first", "second"):
        pickles = _pickles(staged[launch]["proto"])
        assert len(pickles) > 10
        commit_fns = [raw for name, raw in pickles.items() if name.startswith("CommitRows/Commit/Run")]
        assert len(commit_fns) == 1 and f"gs://{BUCKET}/runs/".encode() in commit_fns[0]  # configs are readable here
        for name, raw in pickles.items():
            rest = source_file.sub(b"", raw)
            for path in local:
                assert path.encode() not in rest, f"{name} carries the local path {path}"
        options = staged[launch]["job"]["environment"]["sdkPipelineOptions"]["options"]
        for key, value in options.items():
            if isinstance(value, str) and key != "setup_file":
                assert not any(value.startswith(p) for p in [*local, str(ROOT)]), (key, value)


def test_launcher_treats_a_launch_with_a_template_location_as_job_only(staged):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import runners

    launch = PipelineOptions([f"--template_location=gs://{BUCKET}/staging/template_launches/x/job_object",
                              "--region=europe-west1", "--project=p"])
    assert runners.job_only(launch) and runners.job_only(PipelineOptions(["--dry_run=True"]))
    assert not runners.job_only(PipelineOptions(["--runner=DataflowRunner"]))
    message = runners.job_only_message(launch, run_dir=f"gs://{BUCKET}/runs/audio/t")
    assert "Flex Template launcher" in message and f"gs://{BUCKET}/runs/audio/t" in message


def test_dry_run_builds_the_proto_without_staging(gcs_emulator, tmp_path):
    plan = extract.plan([f"--dataset=gs://{BUCKET}/audio/**", "--features=logmel", f"--output=gs://{BUCKET}/dry",
                         "--run_id=d", "--runner=DataflowRunner", f"--project={gcs_emulator.project}", "--region=europe-west1",
                         f"--temp_location=gs://{BUCKET}/dry-tmp", "--dry_run=True"])
    pipeline = beam.Pipeline(options=plan.options)
    extract.build(pipeline, plan)
    result = pipeline.run()
    assert problems_in(result.job.proto_pipeline) == []
    assert not list(gcs_emulator.client().list_blobs(BUCKET, prefix="dry-tmp/"))
