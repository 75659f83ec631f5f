"""Third-party extractors for real: a tiny package with its own pyproject.toml, built and
installed by pip into a temporary folder (never the shared environment), found through the
`featurebeam.extractors` entry-point group by `python -m features list` and by a pipeline run
that records the package's name and version; broken packages fail with one line naming them."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from tests.features.models import write_wavs

ROOT = Path(__file__).resolve().parents[2]

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"

[project.entry-points."featurebeam.extractors"]
{entry_points}

[tool.setuptools]
py-modules = ["{module}"]
"""

PEAK = '''
"""A third-party extractor: the absolute peak of each clip, times `scale`."""
import dataclasses

import numpy as np

from features import Extractor, OutputSpec


@dataclasses.dataclass(frozen=True)
class PeakConfig:
    """scale: multiplies the peak (unitless)."""

    scale: float = 1.0


class Peak(Extractor):
    name = "plugpeak"
    version = "2"
    config_type = PeakConfig
    description = "absolute peak per clip (a plug-in)"

    def output_specs(self):
        return (OutputSpec(name="plugpeak_abs", level="clip", shape=(), sample_rate=self.sample_rate),)

    def extract(self, batch):
        return {"plugpeak_abs": (self.config.scale * np.abs(batch.waveforms).max(axis=1)).astype(np.float32)}
'''

BROKEN_IMPORT = "import numpy as np\nimport featurebeam_no_such_dependency  # noqa\n"

DUPLICATE = '''
from features.logmel import LogMel


class ImpostorLogMel(LogMel):
    """Claims the built-in's name."""
'''


def _install(tmp_path: Path, *, dist: str, version: str, module: str, source: str, entry_points: str) -> Path:
    """Build the package with pip (no network: the venv's setuptools) into its own --target folder."""
    src = tmp_path / f"src-{dist}"
    src.mkdir()
    (src / "pyproject.toml").write_text(
        PYPROJECT.format(dist=dist, version=version, module=module, entry_points=entry_points)
    )
    (src / f"{module}.py").write_text(textwrap.dedent(source))
    target = tmp_path / f"site-{dist}"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    assert list(target.glob(f"{dist.replace('-', '_')}-{version}.dist-info/entry_points.txt"))
    return target


def _run(args, *, site: Path, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=str(ROOT), **kwargs)


@pytest.mark.slow
def test_installed_plugin_is_listed_and_runs_by_name_with_its_package_recorded(tmp_path):
    site = _install(tmp_path, dist="featurebeam-peak-plugin", version="0.3.1", module="featurebeam_peak_plugin",
                    source=PEAK, entry_points='plugpeak = "featurebeam_peak_plugin:Peak"')
    listed = _run(["-m", "features", "list"], site=site)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith("plugpeak ")]
    assert line.split()[:4] == ["plugpeak", "2", "featurebeam-peak-plugin", "0.3.1"]
    assert "plugpeak_abs clip scalar" in line and "a plug-in" in line
    shown = _run(["-m", "features", "show", "plugpeak"], site=site)
    assert "scale" in shown.stdout and "multiplies the peak (unitless)" in shown.stdout

    audio = tmp_path / "audio"
    write_wavs(str(audio), [0.5, 0.8, 0.3])
    config = tmp_path / "plug.yaml"
    config.write_text("features:\n  plugpeak: {scale: 2.0}\n")
    run = _run(["-m", "pipelines.extract", f"--dataset={audio}", "--features=plugpeak", f"--config={config}",
                f"--output={tmp_path / 'runs'}", "--run_id=plug"], site=site, timeout=300)
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "runs" / "audio" / "plug"
    recorded = json.loads((run_dir / "run.json").read_text())
    (extractor,) = recorded["extractors"]
    assert extractor["name"] == "plugpeak" and extractor["version"] == "2"
    assert extractor["package"] == {"name": "featurebeam-peak-plugin", "version": "0.3.1"}
    rows = pq.read_table(sorted(glob.glob(str(run_dir / "parquet" / "part-*.parquet")))).to_pylist()
    assert len(rows) == 3
    for row in rows:
        samples, _ = soundfile.read(row["uri"], dtype="float32")
        assert row["plugpeak_abs"] == pytest.approx(2.0 * np.abs(samples).max(), rel=1e-6)


def test_plugin_that_fails_to_import_names_its_package(tmp_path):
    site = _install(tmp_path, dist="featurebeam-broken-plugin", version="0.0.1", module="featurebeam_broken_plugin",
                    source=BROKEN_IMPORT, entry_points='broken = "featurebeam_broken_plugin:Broken"')
    out = _run(["-m", "features", "list"], site=site)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "package featurebeam-broken-plugin 0.0.1" in line and "ModuleNotFoundError" in line
    assert "fix or uninstall featurebeam-broken-plugin" in line


@pytest.mark.slow
def test_plugin_that_reuses_a_builtin_name_names_its_package_and_stops_the_launch(tmp_path):
    site = _install(tmp_path, dist="featurebeam-impostor", version="1.0", module="featurebeam_impostor",
                    source=DUPLICATE, entry_points='logmel = "featurebeam_impostor:ImpostorLogMel"')
    out = _run(["-m", "pipelines.extract", "--dataset=sample", "--features=logmel", f"--output={tmp_path / 'runs'}"],
               site=site, timeout=300)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "registered twice" in line and "features.logmel.LogMel" in line and "featurebeam_impostor.ImpostorLogMel" in line
    assert "package featurebeam-impostor 1.0" in line
    assert not (tmp_path / "runs").exists()
