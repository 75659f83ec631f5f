"""Per-process settings of a worker that computes features: the allocator and the garbage collector.

Measured on 16 recordings of 5 minutes (benchmarks/compare.py's long corpus, one worker, log-mel
+ MFCC): the worker process spent 1.4 to 2.3 of its 5.3 to 6.1 CPU seconds in the kernel, most of
it zeroing fresh pages (`perf record`: `clear_page_erms` under page faults in `FLOAT_square` and
`memmove`, 21 % of the process). A batch's STFT, power spectrogram and their temporaries are tens
of MB each; glibc serves blocks that large with `mmap` and gives freed memory back at once, so
every batch faults in its arrays again, and NumPy's huge-page advice makes each fault zero 2 MiB.
`reuse_freed_memory()` has glibc serve blocks up to 32 MiB from its heap and keep up to 256 MiB
of freed heap before returning it: 260,000 page faults per run became 75,000 and kernel time
1.0 s. The cost is that a worker keeps up to that much freed memory mapped between batches.

Python's cyclic garbage collector, meanwhile, walks every object the imports and the Beam worker
made each time it runs a full collection (0.24 s in four collections in the same run).
`freeze_startup_objects()` moves the objects that exist once the worker is set up out of the
collector's sight (`gc.freeze`); everything made afterwards is collected as before.

`prepare()` does both, once per process; the extraction DoFn's setup calls it.

Arenas: glibc gives each thread that allocates under contention its own heap (up to 8 per core),
and memory freed in one is not reused by another. The launcher is also FnApiRunner's runner,
whose gRPC and bundle threads receive every stage's output: in `benchmarks/scale.py` at 100,000
items its peak RSS was 531 MiB with glibc's default and 414 MiB with two arenas (1,000 items:
259 and 247 MiB); one arena measured the same as two. `limit_arenas()` sets two for this
process (`pipelines/__init__.py` calls it before any thread starts) and, through
`MALLOC_ARENA_MAX`, for the processes it starts (Beam workers, decoder children), unless the
user set that variable.

The launcher's transport buffers: FnApiRunner moves each stage's output between the worker
processes and itself in messages of up to 10 MB, parsed and copied on the way. glibc's dynamic
threshold serves blocks that size from the heap once one has been freed, and the heap then
keeps the high-water mark of every stage's copies. `return_large_blocks()` fixes the threshold at
1 MiB, so those buffers are mapped and unmapped: 428 -> 377 MiB at 100,000 items. It is for
the launcher only: a worker's `prepare()` (the extraction DoFn's setup, also in the launcher
when it runs the work in-process) raises it to 32 MiB again for its batch arrays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 256 * 1024 * 1024

_lock = threading.Lock()
_prepared = False


def _mallopt():
    """glibc's `mallopt`, or None (not Linux, or a libc without it, such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def reuse_freed_memory() -> bool:
    """Serve blocks up to MMAP_THRESHOLD from the heap and keep up to TRIM_THRESHOLD of freed heap
    (glibc only; False where there is no glibc `mallopt`, which changes nothing)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


LAUNCHER_MMAP_THRESHOLD = 1024 * 1024


def return_large_blocks() -> bool:
    """Serve blocks of LAUNCHER_MMAP_THRESHOLD and more by mmap, returned to the system when freed
    (this process only; a later `reuse_freed_memory()` raises the threshold again)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, LAUNCHER_MMAP_THRESHOLD))


def limit_arenas() -> bool:
    """At most ARENAS malloc arenas in this process and, by default, in the processes it starts
    (a `MALLOC_ARENA_MAX` the user set is kept, and then this process follows it too)."""
    os.environ.setdefault("MALLOC_ARENA_MAX", str(ARENAS))
    mallopt = _mallopt()
    if mallopt is None:
        return False
    try:
        arenas = int(os.environ["MALLOC_ARENA_MAX"])
    except ValueError:
        return False
    return arenas > 0 and bool(mallopt(_M_ARENA_MAX, arenas))


def freeze_startup_objects() -> None:
    """Exempt every object that exists now from later collections (`gc.freeze`). Not preceded by a
    collection (a full one costs about 0.1 s here): what is garbage now stays, once."""
    gc.freeze()


def prepare() -> None:
    """`reuse_freed_memory()` and `freeze_startup_objects()`, the first time it is called in a process."""
    global _prepared
    with _lock:
        if _prepared:
            return
        _prepared = True
    reuse_freed_memory()
    freeze_startup_objects()
