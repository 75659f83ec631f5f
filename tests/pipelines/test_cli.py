"""The command line's exit codes: 0 done; 2 bad flags and configs (one line naming the fix,
before any pipeline runs); 3 the failure budget exceeded (tests/pipelines/test_extract.py,
test_failure_budget_exits_non_zero_after_writing); 4 a job that failed or ended without run.json,
naming the command that resumes it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import apache_beam as beam
import pytest

from pipelines import extract
from tests import faultinject

ROOT = Path(__file__).resolve().parents[2]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("featurebeam: error: ")
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset=no_such_dataset"], "unknown dataset 'no_such_dataset'"),
        (["--dataset=sample", "--features=logmel,nope"], "unknown feature 'nope'; available features are"),
        (["--dataset=sample", "--features="], "--features is empty"),
        (["--dataset=sample", "--no_such_flag=1"], "unknown flag '--no_such_flag=1'"),
        (["--dataset=sample", "--sample_rate=12"], "sample_rate must be an integer in 1000..384000"),
        (["--dataset=sample", "--run_id=a/b"], "must be a plain folder name"),
        (["--dataset=/no/such/dir/**.wav"], "no files match /no/such/dir/**.wav"),
        (["--dataset=sample", "--max_bytes_billed=lots"], "--max_bytes_billed='lots' is not a size"),
        (["--dataset=sample", "--allowed_uri_prefixes=gs://"], "--allowed_uri_prefixes: 'gs://' names no bucket"),
    ],
)
def test_bad_flags(argv, expected, capsys, tmp_path):
    assert extract.main([*argv, f"--output={tmp_path}"]) == 2
    assert expected in _error(capsys)


def test_bad_config_key_names_file_and_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("features:\n  logmel: {n_mel: 40}\n")
    assert extract.main(["--dataset=sample", f"--config={config}", f"--output={tmp_path}"]) == 2
    err = _error(capsys)
    assert str(config) in err and "unknown key 'n_mel'" in err and "n_mels" in err


def test_bad_top_level_config_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("samplerate: 8000\n")
    assert extract.main(["--dataset=sample", f"--config={config}", f"--output={tmp_path}"]) == 2
    assert "unknown key 'samplerate'" in _error(capsys)


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert extract.main(["--dataset=sample", f"--output={blocker / 'runs'}"]) == 2
    err = _error(capsys)
    assert "cannot write to" in err and "pass a writable --output" in err


def test_existing_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "sample" / "r1").mkdir(parents=True)
    assert extract.main(["--dataset=sample", f"--output={tmp_path}", "--run_id=r1"]) == 2
    assert "already exists; pass a new --run_id, --mode=resume to continue it, or --mode=overwrite" in _error(capsys)


@pytest.mark.slow
def test_command_line_prints_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", "--dataset=sample", "--features=logmel", "--limit=3",
         f"--output={tmp_path}", "--run_id=cli"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"run written to {tmp_path}/sample/cli" in result.stdout
    assert "3 listed, 3 ok, 0 failed" in result.stdout
    assert "wall time:" in result.stdout and "audio:" in result.stdout


# -- exit code 4: the job failed or ended incomplete -------------------------------------------


def test_the_resume_command_keeps_every_flag_but_mode_and_run_id():
    plan = types.SimpleNamespace(run_id="r 1", argv=("--dataset=/data/my clips", "--mode", "overwrite", "--run_id=old",
                                                    "--features=logmel", "--runner=DaskRunner"))
    assert extract.resume_command(plan) == ("python -m pipelines.extract '--dataset=/data/my clips' --features=logmel "
                                            "--runner=DaskRunner --mode=resume '--run_id=r 1'")


@pytest.mark.slow
def test_a_job_whose_step_raises_exits_4_naming_the_command_that_resumes_it(tmp_path, capsys):
    """A commit step raises for real (an injected fault, on in the launched process only): exit 4,
    the cause and the resume command on the last line; that command then finishes the run."""
    argv = ["--dataset=sample", "--features=logmel", "--limit=4", f"--output={tmp_path}", "--run_id=failed",
            "--commit_records=1"]
    failed = subprocess.run([sys.executable, "-m", "pipelines.extract", *argv], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **faultinject.environment("raise:commit:2")}, timeout=300)
    assert failed.returncode == extract.EXIT_JOB_FAILED, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("featurebeam: error: the job failed: InjectedFault: fault injected at commit (pass 2)"), last
    command = last.split("resume the run with: ")[1]
    assert command == shlex.join(["python", "-m", "pipelines.extract", *[a for a in argv if a != "--run_id=failed"],
                                  "--mode=resume", "--run_id=failed"])
    assert not (tmp_path / "sample" / "failed" / "run.json").exists()
    assert extract.main(shlex.split(command)[3:]) == 0
    assert "4 listed, 4 ok, 0 failed" in capsys.readouterr().out


def test_a_job_that_ends_without_run_json_exits_4(tmp_path, capsys, monkeypatch):
    """A job that finishes (state DONE) but whose graph never reaches the final step."""
    monkeypatch.setattr(extract, "build", lambda pipeline, plan: pipeline | beam.Create([1]) | beam.Map(str))
    argv = ["--dataset=sample", "--features=logmel", f"--output={tmp_path}", "--run_id=cut"]
    assert extract.main(argv) == extract.EXIT_JOB_FAILED
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert f"the job ended (state DONE) without writing {tmp_path}/sample/cut/run.json, so the run is incomplete" in err
    assert err.endswith(f"resume it with: python -m pipelines.extract --dataset=sample --features=logmel --output={tmp_path} "
                        "--mode=resume --run_id=cut")
