"""Beam pipelines; `python -m pipelines.extract` is the front door.

Before anything loads NumPy: one BLAS/OpenMP/numba thread per process (featurebeam.threads).
"""

from featurebeam.threads import one_thread_per_process

one_thread_per_process()
