"""Beam pipelines; `python -m pipelines.extract` is the front door.

Before anything loads NumPy: one BLAS/OpenMP/numba thread per process (featurebeam.threads);
before any thread starts: at most two malloc arenas, and large blocks mapped and returned when
freed (featurebeam.worker: the launcher's transport buffers; workers raise the threshold).
"""

from featurebeam.threads import one_thread_per_process
from featurebeam.worker import limit_arenas, return_large_blocks

one_thread_per_process()
limit_arenas()
return_large_blocks()
