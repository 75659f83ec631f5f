"""The `featurebeam` console script, installed from this checkout as pip installs it: its --help
lists every `python -m` entry point, and subcommands run with their module's flags and exit codes."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import command

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("featurebeam", "features", "datasets", "pipelines", "export")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """featurebeam built into its own --target folder (from a copy, so the checkout gets no build/)."""
    tmp = tmp_path_factory.mktemp("command")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return target / "bin" / "featurebeam", env


def _entry_point_modules() -> set[str]:
    """Every package module with an `if __name__ == "__main__"` block, and every __main__.py."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
                    found.add(module)
            if path.name == "__main__.py":
                found.add(module)
    return found


def test_every_python_m_entry_point_is_a_subcommand():
    internal = {"featurebeam.isolation", "pipelines.command"}  # the decoder's child process; the script itself
    assert _entry_point_modules() - internal == {module for module, _ in command.COMMANDS.values()}


@pytest.mark.slow
def test_the_installed_script_lists_every_subcommand_and_runs_them_with_their_exit_codes(installed, tmp_path):
    script, env = installed
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    listed = [line.split()[0] for line in shown.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(command.COMMANDS)
    for name in ("extract", "finalize", "report", "compare", "query", "features", "statistics", "tfds", "bigquery"):
        assert name in listed

    features = subprocess.run([str(script), "features", "show", "logmel"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert features.returncode == 0 and "n_mels" in features.stdout, features.stderr

    bad = subprocess.run(
        [str(script), "extract", "--dataset=no-such-dataset", f"--output={tmp_path}"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert bad.returncode == 2 and "unknown dataset 'no-such-dataset'" in bad.stderr
    unknown = subprocess.run([str(script), "extrakt"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "featurebeam --help" in unknown.stderr

