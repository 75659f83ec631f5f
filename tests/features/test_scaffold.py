"""`python -m features new NAME`: the package it writes installs (pip, offline, into a temporary
folder, never the shared environment), is listed by `python -m features list`, and passes its
own test, which runs the extractor through a real pipeline; bad names and folders are one line
and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, *, cwd: Path, site: Path | None = None, **kwargs):
    path = [str(site)] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=str(cwd), **kwargs)


@pytest.mark.slow
def test_a_new_plugin_installs_is_listed_and_passes_its_own_pipeline_test(tmp_path):
    made = _run(["-m", "features", "new", "zcr_plus", "--dir", "pkg"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    package = tmp_path / "pkg"
    assert (package / "pyproject.toml").read_text().count('zcr_plus = "featurebeam_zcr_plus:ZcrPlus"') == 1
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(package)],
        check=True, capture_output=True,
    )
    listed = _run(["-m", "features", "list"], cwd=tmp_path, site=site)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith("zcr_plus ")]
    assert line.split()[:4] == ["zcr_plus", "1", "featurebeam-zcr-plus", "0.1.0"]
    assert "zcr_plus_rms frame scalar, zcr_plus_peak clip scalar" in line
    # The generated package's own test, as its author runs it: pytest in the package folder.
    tested = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package, site=site, timeout=900)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "2 passed" in tested.stdout


def test_bad_names_and_folders_are_one_line_exit_2(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("taken")
    for args, message in (
        (["Bad-Name"], "must start with a lowercase letter"),
        (["logmel"], "an extractor named 'logmel' exists already (from featurebeam)"),
        (["fresh", "--dir", "full"], "full exists and is not an empty folder; pass --dir with a new folder"),
    ):
        result = _run(["-m", "features", "new", *args], cwd=tmp_path)
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert message in line
    assert not (tmp_path / "featurebeam-fresh").exists()
