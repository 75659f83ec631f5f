"""The two set-up commands: `make sample` installs featurebeam alone and never a system package
or a test tool; `make test` installs everything the suite needs. Read from `make -n`, the
commands make would run in a checkout with no venv yet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _would_run(target: str, tmp_path: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        ["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_make_sample_installs_featurebeam_alone(tmp_path):
    commands = _would_run("sample", tmp_path)
    assert "pip install --quiet -e .\n" in commands and "pipelines.extract --dataset=sample" in commands
    run = [line for line in commands.splitlines() if "echo" not in line]  # the note names apt-get
    for heavy in ("[dev", "torch", "apt-get", "setup-system", "setup-emulators", "sudo"):
        assert not any(heavy in line for line in run), heavy
    assert "ffmpeg is not installed; only AAC/M4A files need it" in commands  # a note, not an install


def test_make_test_installs_everything(tmp_path):
    commands = _would_run("test", tmp_path)
    for step in ("install-torch.sh", '-e ".[dev,torch]"', "setup-system.sh", "setup-emulators.sh", "-m pytest"):
        assert step in commands, step
