"""`python -m features new NAME`: write a plug-in package that adds extractor NAME to featurebeam.

The package is complete as written: a pyproject.toml that declares the extractor in the
`featurebeam.extractors` entry-point group (features/registry.py finds it there once the package
is installed), a module with a working `Extractor` subclass (frame-level RMS and clip-level
peak, centred frames as the built-ins count them) for the author to replace, and a test that
runs the extractor through a real featurebeam pipeline (`pipelines.extract.run` on a few
generated WAVs) and checks what the Parquet export holds against values computed independently.
So the first thing an author does is install the package and see its test pass; every edit
after that is checked the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from featurebeam.errors import ConfigError

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "The {name} feature extractor for featurebeam"
requires-python = ">=3.10"
dependencies = ["featurebeam", "numpy"]

[project.optional-dependencies]
test = ["pytest", "pyarrow", "soundfile"]

# featurebeam finds the extractor here: `python -m features list` shows it once the package is
# installed, and `--features={name}` (or `features: {{{name}: {{...}}}}` in a --config YAML) runs it.
[project.entry-points."featurebeam.extractors"]
{name} = "{module}:{cls}"

[tool.setuptools]
packages = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
# featurebeam's dev extras install the BigQuery emulator, whose pytest plugin needs testcontainers
addopts = "-p no:bqemulator"
'''

MODULE = '''\
"""`{name}`: a featurebeam extractor (written by `python -m features new {name}`; make it yours).

An extractor turns a `Batch` of equal-rate mono waveforms (`batch.waveforms [B, n]` float32,
zero-padded; item i is valid for `batch.lengths[i]` samples) into named arrays: frame-level
outputs `[B, T, *shape]`, clip-level outputs `[B, *shape]`. Frame-level outputs are centred: an
item of n samples has `1 + n // hop_length` frames, frame t centred on sample t * hop_length;
the pipeline trims each item's padding frames. Change the config, the outputs and `extract`;
bump `version` whenever the values change, so `--reuse_from` and `--mode=resume` know.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from features import Batch, Extractor, OutputSpec


@dataclasses.dataclass(frozen=True)
class {cls}Config:
    """frame_length: samples per frame; hop_length: samples between frames."""

    frame_length: int = 1024
    hop_length: int = 512

    def __post_init__(self):
        if self.frame_length <= 0 or self.hop_length <= 0:
            raise ValueError("frame_length and hop_length must be positive numbers of samples")


class {cls}(Extractor):
    name = "{name}"
    version = "1"
    config_type = {cls}Config
    description = "frame RMS and clip peak (a plug-in made by python -m features new)"

    def output_specs(self) -> tuple[OutputSpec, ...]:
        c = self.config
        return (
            OutputSpec(name="{name}_rms", level="frame", shape=(), hop_length=c.hop_length, sample_rate=self.sample_rate,
                       description="root mean square of each centred frame"),
            OutputSpec(name="{name}_peak", level="clip", shape=(), sample_rate=self.sample_rate,
                       description="largest absolute sample of the clip"),
        )

    def window_parts(self):
        # extract() reads only the waveform, so a long item needs no STFT kept whole.
        return ()

    def extract(self, batch: Batch) -> dict[str, np.ndarray]:
        c = self.config
        half = c.frame_length // 2
        frames = 1 + batch.waveforms.shape[1] // c.hop_length
        padded = np.pad(batch.waveforms, ((0, 0), (half, c.frame_length - half)))  # zeros past the edges
        windows = np.lib.stride_tricks.sliding_window_view(padded, c.frame_length, axis=1)[:, :: c.hop_length][:, :frames]
        rms = np.sqrt(np.mean(np.square(windows, dtype=np.float64), axis=2))
        peak = np.abs(batch.waveforms).max(axis=1)  # padding is zeros, which never raise the peak
        return {{"{name}_rms": rms.astype(np.float32), "{name}_peak": peak.astype(np.float32)}}
'''

TEST = '''\
"""`{name}` through a real featurebeam pipeline: a few WAVs in, the Parquet export read back and
compared with values computed here, one clip at a time, without the extractor's code."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from features import registry
from pipelines import extract

SR = 16000


def _write_wavs(root, seconds=(0.4, 1.3, 2.1)):
    rng = np.random.default_rng(0)
    for i, s in enumerate(seconds):
        t = np.arange(int(s * SR)) / SR
        y = 0.4 * np.sin(2 * np.pi * (200 + 150 * i) * t) * np.linspace(1, 0.2, len(t)) + 0.02 * rng.standard_normal(len(t))
        folder = os.path.join(root, "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        soundfile.write(os.path.join(folder, f"clip{{i}}.wav"), y.astype(np.float32), SR, subtype="PCM_16")


def _frame_rms(samples, frame_length=1024, hop_length=512):
    padded = np.concatenate([np.zeros(frame_length // 2), samples, np.zeros(frame_length - frame_length // 2)])
    return np.array([np.sqrt(np.mean(padded[t * hop_length : t * hop_length + frame_length] ** 2))
                     for t in range(1 + len(samples) // hop_length)])


def test_the_entry_point_registers_{name}():
    assert "{name}" in registry.available()
    assert registry.source("{name}")["name"] == "{dist}"


def test_{name}_through_the_pipeline(tmp_path):
    _write_wavs(tmp_path / "audio")
    run = extract.run([f"--dataset={{tmp_path / 'audio'}}", "--features={name}", f"--output={{tmp_path / 'runs'}}",
                       "--run_id=test", f"--sample_rate={{SR}}", "--no_report"])
    assert run["counts"]["ok"] == 3 and run["counts"]["failed"] == 0
    (entry,) = run["extractors"]
    assert entry["name"] == "{name}" and entry["package"]["name"] == "{dist}"
    rows = pq.read_table(sorted(glob.glob(os.path.join(run["outputs"]["run_dir"], "parquet", "*.parquet")))).to_pylist()
    assert len(rows) == 3
    for row in rows:
        samples, sr = soundfile.read(row["uri"], dtype="float32")
        assert sr == SR
        assert row["{name}_peak"] == pytest.approx(np.abs(samples).max(), rel=1e-6)
        rms = np.asarray(row["{name}_rms"], np.float32).reshape(row["{name}_rms_shape"])
        np.testing.assert_allclose(rms, _frame_rms(samples.astype(np.float64)), rtol=1e-5, atol=1e-7)
'''

README = '''\
# {dist}

The `{name}` extractor for featurebeam, made by `python -m features new {name}`.

    pip install --no-build-isolation -e .      # into the environment featurebeam is installed in
    python -m features list                    # shows {name}
    python -m pytest                           # runs it through a real pipeline
    python -m pipelines.extract --dataset=sample --features=logmel,{name} --output=runs

Replace the computation in `{module}/__init__.py`, keep the test honest, and bump `version`
when the values change.
'''


def names(name: str) -> dict[str, str]:
    """The distribution, module and class names of plug-in `name`."""
    return {
        "name": name,
        "dist": "featurebeam-" + name.replace("_", "-"),
        "module": "featurebeam_" + name,
        "cls": "".join(part.capitalize() for part in name.split("_")) or name,
    }


def write_package(*, name: str, directory: str | None = None) -> Path:
    """Write the plug-in package for extractor `name` into `directory` (default
    `./featurebeam-<name>`), which must not exist or be empty; returns its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise ConfigError(
            f"extractor name {name!r} must start with a lowercase letter and hold only lowercase letters, digits and "
            "underscores (it prefixes output names, TFRecord keys and BigQuery columns)"
        )
    from features import registry

    if name in registry.available():
        source = registry.source(name)
        raise ConfigError(f"an extractor named {name!r} exists already (from {source['name']}); pick another name")
    parts = names(name)
    root = Path(directory or parts["dist"])
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} exists and is not an empty folder; pass --dir with a new folder")
    files = {
        "pyproject.toml": PYPROJECT,
        f"{parts['module']}/__init__.py": MODULE,
        f"tests/test_{name}.py": TEST,
        "README.md": README,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**parts))
    return root
