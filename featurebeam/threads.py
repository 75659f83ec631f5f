"""One BLAS/OpenMP/numba thread per process, unless the user asked for more.

featurebeam parallelises across worker processes (and each worker's decoder child). Left alone,
OpenBLAS, OpenMP and numba each start one thread per core in every process, so N workers on N
cores run N x N threads that spin against each other in every small matrix product. The thread
counts are read when those libraries load, so `one_thread_per_process()` must run before NumPy
is imported: `pipelines/__init__.py` calls it, which `python -m pipelines.extract` executes first,
and the Beam workers and decoder children the launcher starts inherit the environment. A value
the user already set (say `OPENBLAS_NUM_THREADS=2`) is kept.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def one_thread_per_process() -> dict[str, str]:
    """Default every thread-count variable to 1 where unset; returns the variables it set."""
    changed = {}
    for name in THREAD_VARIABLES:
        if name not in os.environ:
            os.environ[name] = changed[name] = "1"
    return changed


def single_threaded_blas() -> None:
    """Limit the BLAS/OpenMP pools of this process to one thread, now, whatever loaded first.

    Features must not depend on the process that computed them: OpenBLAS splits a matrix product
    differently with more threads, and the float32 sums then differ in their last bits (a log-mel
    computed with 2 threads is not byte-identical to one computed with 1). The environment
    variables above only act before NumPy loads; this acts on the loaded libraries, so a worker
    in a process that imported NumPy early (a test runner, a notebook) still computes the same
    bytes as every other worker. Called by the extraction DoFn's setup.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
