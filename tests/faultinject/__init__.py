"""Turning featurebeam's fault injection on, for tests only (featurebeam/faults.py).

Production code never reads FEATUREBEAM_FAULT_INJECT; a process obeys it only once a test has
installed it there:

- in this process: `with inject("raise:commit:1"): ...`;
- in a process a test starts (`python -m pipelines.extract`, Beam's worker processes, the
  decoder child): `env={**os.environ, **environment("kill:commit:4")}`. That sets the variable and
  puts this folder first on PYTHONPATH, whose `sitecustomize` installs the variable at start-up
  (and the repository, so that it can import featurebeam there).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from featurebeam import faults

PLUGIN_DIR = Path(__file__).resolve().parent
ROOT = PLUGIN_DIR.parents[1]


def environment(spec: str) -> dict[str, str]:
    """The variables that make a child process obey `spec` (to merge over os.environ)."""
    path = [str(PLUGIN_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {faults.ENV: spec, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@contextlib.contextmanager
def inject(spec: str) -> Iterator[None]:
    """Obey `spec` in this process inside the block."""
    faults.install(spec)
    try:
        yield
    finally:
        faults.install(None)
