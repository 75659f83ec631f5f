"""A Dataflow template built and staged offline, against the GCS emulator, and inspected.

`--runner=DataflowRunner --template_location=gs://...` makes Beam stage the pipeline proto and
featurebeam's sdist (built from pyproject.toml by `--setup_file`, which needs `build`) and write
the template JSON, without calling the Dataflow API; the fake authorized_user credentials from
tests/emulators.py satisfy the credential lookup and the GCS emulator takes the uploads. What
this cannot check (it needs a real Google Cloud project): that Dataflow accepts and runs it.
"""

from __future__ import annotations

import base64
import bz2
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import soundfile
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import extract
from tests.pipelines.test_portability import problems_in

pytestmark = [pytest.mark.slow, pytest.mark.emulator]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "featurebeam-template"
# Top-level steps the job must have; the lead's graph adds "Finalise".
EXPECTED_STEPS = ("List", "Decode", "Extract", "CommitRows", "CommitDead", "Summarise", "Finalize")
PACKAGES = ("datasets", "features", "pipelines", "export", "featurebeam")


@pytest.fixture(scope="module")
def staged(gcs_emulator, tmp_path_factory):
    bucket = gcs_emulator.make_bucket(BUCKET)
    for i in range(2):
        buf = io.BytesIO()
        soundfile.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
        bucket.blob(f"audio/c{i}.wav").upload_from_string(buf.getvalue())
    argv = [
        f"--dataset=gs://{BUCKET}/audio/**",
        "--features=logmel",
        f"--output=gs://{BUCKET}/runs",
        "--run_id=t",
        "--runner=DataflowRunner",
        f"--project={gcs_emulator.project}",
        "--region=europe-west1",
        f"--temp_location=gs://{BUCKET}/tmp",
        f"--staging_location=gs://{BUCKET}/staging",
        f"--template_location=gs://{BUCKET}/templates/featurebeam.json",
        "--setup_file=./pyproject.toml",
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)  # --setup_file=./pyproject.toml is relative to the checkout, as in the README
    try:
        plan = extract.plan(argv)
        pipeline = beam.Pipeline(options=plan.options)
        extract.build(pipeline, plan)
        pipeline.run()  # writes the template; nothing runs
    finally:
        os.chdir(cwd)
    client = gcs_emulator.client()
    blobs = {b.name: b for b in client.list_blobs(BUCKET)}
    (pb,) = [name for name in blobs if name.startswith("staging/") and name.endswith("/pipeline.pb")]
    return {
        "blobs": blobs,
        "job": json.loads(blobs["templates/featurebeam.json"].download_as_bytes()),
        "proto": beam_runner_api_pb2.Pipeline.FromString(blobs[pb].download_as_bytes()),
        "staging": pb.rsplit("/", 1)[0],
    }


def test_template_json_describes_a_batch_job_on_the_pinned_sdk_image(staged):
    job = staged["job"]
    assert job["type"] == "JOB_TYPE_BATCH"
    env = job["environment"]
    assert env["tempStoragePrefix"].startswith(f"storage.googleapis.com/{BUCKET}/tmp/")
    (pool,) = env["workerPools"]
    packages = {p["name"]: p["location"] for p in pool["packages"]}
    assert packages["workflow.tar.gz"] == f"storage.googleapis.com/{BUCKET}/{staged['staging']}/workflow.tar.gz"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    images = [c["containerImage"] for c in pool["sdkHarnessContainerImages"]]
    assert images == [f"gcr.io/cloud-dataflow/v1beta3/beam_python{python}_sdk:{beam.__version__}"]
    options = env["sdkPipelineOptions"]["options"]
    assert options["template_location"] == f"gs://{BUCKET}/templates/featurebeam.json"
    assert "use_runner_v2" in env["experiments"]


def test_featurebeam_sdist_is_staged(staged):
    data = staged["blobs"][f"{staged['staging']}/workflow.tar.gz"].download_as_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    top = {n.split("/")[1] for n in names if n.count("/") >= 2}
    assert set(PACKAGES) <= top, sorted(top)
    assert any(n.endswith("/pipelines/extract.py") for n in names)


def test_staged_proto_has_the_steps_and_only_portable_transforms(staged):
    proto = staged["proto"]
    (root_id,) = proto.root_transform_ids
    steps = [proto.components.transforms[t].unique_name for t in proto.components.transforms[root_id].subtransforms]
    assert set(EXPECTED_STEPS) <= set(steps), steps
    assert problems_in(proto) == []
    (env,) = proto.components.environments.values()
    assert env.urn == common_urns.environments.DOCKER.urn
    for dep in env.dependencies:  # every artifact the workers fetch is in the staging bucket
        assert dep.type_urn == common_urns.artifact_types.URL.urn
        url = beam_runner_api_pb2.ArtifactUrlPayload.FromString(dep.type_payload).url
        assert url.startswith(f"gs://{BUCKET}/{staged['staging']}/"), url


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
    pickles = _pickles(staged["proto"])
    assert len(pickles) > 10
    commit_fns = [raw for name, raw in pickles.items() if name.startswith("CommitRows/Commit/Run")]
    assert len(commit_fns) == 1 and f"gs://{BUCKET}/runs/".encode() in commit_fns[0]  # configs are readable here
    for name, raw in pickles.items():
        rest = source_file.sub(b"", raw)
        for path in local:
            assert path.encode() not in rest, f"{name} carries the local path {path}"
    options = staged["job"]["environment"]["sdkPipelineOptions"]["options"]
    for key, value in options.items():
        if isinstance(value, str):
            assert not any(value.startswith(p) for p in [*local, str(ROOT)]), (key, value)


def test_launcher_treats_a_template_as_job_only(staged):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import runners

    template = PipelineOptions([f"--template_location=gs://{BUCKET}/templates/featurebeam.json", "--region=europe-west1",
                                "--project=p"])
    assert runners.job_only(template) and runners.job_only(PipelineOptions(["--dry_run=True"]))
    assert not runners.job_only(PipelineOptions(["--runner=DataflowRunner"]))
    message = runners.job_only_message(template, run_dir=f"gs://{BUCKET}/runs/audio/t")
    assert f"gcloud dataflow jobs run featurebeam-" in message and f"--gcs-location=gs://{BUCKET}/templates/featurebeam.json" in message
    # Nothing ran: no commit records, no run.json under the run folder.
    assert not [name for name in staged["blobs"] if name.startswith("runs/") and not name.endswith("_work/plan.json")]


def test_dry_run_builds_the_proto_without_staging(gcs_emulator, tmp_path):
    plan = extract.plan([f"--dataset=gs://{BUCKET}/audio/**", "--features=logmel", f"--output=gs://{BUCKET}/dry",
                         "--run_id=d", "--runner=DataflowRunner", f"--project={gcs_emulator.project}", "--region=europe-west1",
                         f"--temp_location=gs://{BUCKET}/dry-tmp", "--dry_run=True"])
    pipeline = beam.Pipeline(options=plan.options)
    extract.build(pipeline, plan)
    result = pipeline.run()
    assert problems_in(result.job.proto_pipeline) == []
    assert not list(gcs_emulator.client().list_blobs(BUCKET, prefix="dry-tmp/"))
