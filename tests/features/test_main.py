"""`python -m features list` and `show NAME`, run as a person would (a subprocess)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from features import registry

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "features", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_list_prints_every_extractor_with_version_package_and_outputs():
    out = _run("list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "package", "description", "outputs"]
    rows = {line.split()[0]: line for line in lines[2:] if line and not line.startswith(" ")}
    assert set(rows) == set(registry.available())
    for name, line in rows.items():
        assert line.split()[1:4] == [registry.get(name).version, "featurebeam", registry.source(name)["version"]]
    assert "logmel frame [64]" in rows["logmel"] and "log-mel spectrogram in dB" in rows["logmel"]
    assert "onset_tempo clip scalar" in rows["onset"]
    assert "set by the model" in rows["tf_model"]


def test_show_prints_every_config_key_with_type_default_and_meaning():
    out = _run("show", "tf_model")
    assert out.returncode == 0, out.stderr
    keys = {}
    for line in out.stdout.split("-----\n", 1)[1].splitlines():
        if line and not line.startswith(" ") and not line.startswith("Set keys"):
            keys[line.split()[0]] = line
    assert list(keys) == [f.name for f in dataclasses.fields(registry.get("tf_model").config_type)]
    assert "'serving_default'" in keys["signature"] and "the SavedModel signature to call" in keys["signature"]
    assert "(required)" in keys["path"] and "str" in keys["path"]
    assert "'embedding'" in keys["name"] and "the feature name" in keys["name"]
    shown = _run("show", "mfcc").stdout
    assert "n_mfcc" in shown and "coefficients kept" in shown and "20" in shown


def test_unknown_name_is_one_line_and_exit_2():
    out = _run("show", "logmell")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "unknown feature 'logmell'" in line
