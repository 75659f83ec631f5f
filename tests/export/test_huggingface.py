"""A run's Parquet shards read by Hugging Face `datasets`, in an environment of its own.

featurebeam's top-level package `datasets` shadows Hugging Face's, so the reader runs where a
training job would: a separate virtual environment holding `datasets` and not featurebeam. It is
built once under ~/.cache/featurebeam-tests (FEATUREBEAM_TEST_VENVS elsewhere) with
`pip install datasets`, and reused by later sessions.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

VENVS = Path(os.environ.get("FEATUREBEAM_TEST_VENVS", Path.home() / ".cache" / "featurebeam-tests"))
UNREACHABLE = ("NewConnectionError", "NameResolutionError", "Failed to establish", "Temporary failure in name resolution",
               "No matching distribution found for datasets", "Could not find a version that satisfies")

READ = r"""
import json, sys
import numpy as np
import datasets

run_dir = sys.argv[1]
ds = datasets.load_dataset("parquet", data_files=f"{run_dir}/parquet/*.parquet", split="train")
first = ds[0]
test = ds.filter(lambda row: row["split"] == "test")
as_numpy = ds.with_format("numpy")
print(json.dumps({
    "module": datasets.__file__,
    "rows": ds.num_rows,
    "columns": ds.column_names,
    "key": first["key"],
    "label": first["label"],
    "logmel": np.reshape(first["logmel"], first["logmel_shape"]).tolist(),
    "centroid_shape": first["spectral_centroid_shape"],
    "summary_shape": first["summary_logmel_mean_shape"],
    "test_rows": test.num_rows,
    "numpy_type": type(as_numpy[0]["mfcc"]).__name__,
}))
"""


@pytest.fixture(scope="module")
def hf_python(tmp_path_factory) -> Path:
    """The python of a venv with Hugging Face `datasets` and without featurebeam."""
    venv = VENVS / "hf-datasets-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "datasets"], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            if any(sign in done.stderr for sign in UNREACHABLE):
                pytest.skip(f"pip cannot reach a package registry to install Hugging Face datasets: {done.stderr.strip().splitlines()[-1]}")
            raise AssertionError(f"pip install datasets failed: {done.stderr[-2000:]}")
        (venv / ".complete").write_text("pip install datasets\n")
    return python


def test_hugging_face_datasets_loads_a_runs_parquet_in_its_own_environment(hf_python, sample_run, tmp_path):
    run_dir = sample_run["outputs"]["run_dir"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([str(hf_python), "-c", READ, run_dir], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert "site-packages" in result["module"] and str(Path(__file__).parents[2]) not in result["module"]  # HF's, not ours
    assert result["rows"] == 60 and result["test_rows"] == sample_run["split_counts"]["test"]
    for column in ("key", "label", "split", "logmel", "logmel_shape", "mfcc", "summary_logmel_mean"):
        assert column in result["columns"]
    assert result["key"].split("/")[1] == result["label"]  # sample keys are sample/<label>/<file>
    logmel = np.asarray(result["logmel"], dtype=np.float32)
    assert logmel.shape == (126, 64) and result["centroid_shape"] == [126] and result["summary_shape"] == [64]
    assert result["numpy_type"] == "ndarray"
    # the same values pyarrow reads from the shard
    table = pq.read_table(sorted(glob.glob(f"{run_dir}/parquet/*.parquet")), columns=["key", "logmel"])
    row = table.column("key").to_pylist().index(result["key"])
    np.testing.assert_array_equal(logmel.reshape(-1), np.asarray(table.column("logmel")[row].as_py(), dtype=np.float32))
