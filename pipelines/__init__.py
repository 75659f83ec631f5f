"""Beam pipelines; `python -m pipelines.extract` is the front door.

Before anything loads NumPy: one BLAS/OpenMP/numba thread per process (featurebeam.threads);
before any thread starts: at most two malloc arenas (featurebeam.worker.limit_arenas).
"""

from featurebeam.threads import one_thread_per_process
from featurebeam.worker import limit_arenas

one_thread_per_process()
limit_arenas()
