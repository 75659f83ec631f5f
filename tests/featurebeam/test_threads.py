"""Every featurebeam process runs one BLAS thread unless the user set a count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from featurebeam import threads

ROOT = Path(__file__).resolve().parents[2]
# What OpenBLAS (NumPy's BLAS) really runs with, after `import pipelines` then NumPy.
PROBE = (
    "import pipelines, numpy, threadpoolctl; "
    "print([i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'][0])"
)


def _blas_threads(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in threads.THREAD_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_importing_pipelines_limits_blas_to_one_thread():
    assert _blas_threads() == 1


def test_a_count_the_user_set_is_kept():
    assert _blas_threads(OPENBLAS_NUM_THREADS="2") == 2


def test_only_unset_variables_change(monkeypatch):
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    changed = threads.one_thread_per_process()
    assert "OMP_NUM_THREADS" not in changed and os.environ["OMP_NUM_THREADS"] == "3"
    assert all(os.environ[name] == "1" for name in changed) and "OPENBLAS_NUM_THREADS" in changed
