"""Bad flags and configs: one line naming the fix, exit code 2, before any pipeline runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import extract


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
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"run written to {tmp_path}/sample/cli" in result.stdout
    assert "3 listed, 3 ok, 0 failed" in result.stdout
    assert "wall time:" in result.stdout and "audio:" in result.stdout
