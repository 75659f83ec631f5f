"""A worker process reuses freed batch-sized memory and keeps its start-up objects out of the collector."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Page faults of allocating, filling and freeing a 24 MiB array (about one 240 s batch's power
# spectrogram) five times over, after `prepare()` or without it, in a fresh interpreter.
PROBE = """
import resource, sys
import numpy as np
from featurebeam import worker
if sys.argv[1] == "prepared":
    worker.prepare()
np.ones(6 * 1024 * 1024, dtype=np.float32)  # the first time faults in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    np.ones(6 * 1024 * 1024, dtype=np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_batch_arrays_are_reused_rather_than_faulted_in_again():
    from featurebeam import worker

    assert worker.reuse_freed_memory()  # glibc here: the settings took
    # 24 MiB is 6,144 pages of 4 KiB (or 12 huge pages): five fresh mappings fault every time,
    # a reused heap block not at all
    assert _faults("plain") >= 5 * 12
    assert _faults("prepared") < 12


def test_prepare_freezes_what_exists_once_per_process():
    probe = (
        "import gc; from featurebeam import worker; worker.prepare(); first = gc.get_freeze_count(); "
        "garbage = [[] for _ in range(1000)]; worker.prepare(); print(first, gc.get_freeze_count())"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    first, second = map(int, done.stdout.split())
    assert first > 1000  # the interpreter's and the imports' objects
    assert second == first  # the second call changes nothing


# Threads that allocate at once, then glibc's own account of its heaps (malloc_info's XML).
ARENAS_PROBE = r"""
import ctypes, ctypes.util, os, sys, tempfile, threading
import pipelines  # what `python -m pipelines.extract` imports first
barrier = threading.Barrier(8)
def churn():
    barrier.wait()
    blocks = [bytearray(4096) for _ in range(20000)]
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(open(path).read().count("<heap nr="), os.environ["MALLOC_ARENA_MAX"])
os.remove(path)
"""


def _arenas(**env: str) -> tuple[int, str]:
    import os

    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", ARENAS_PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, check=True)
    heaps, variable = done.stdout.split()
    return int(heaps), variable


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_importing_pipelines_caps_malloc_arenas_here_and_in_children():
    heaps, variable = _arenas()
    assert heaps <= 2 and variable == "2"  # the main arena and at most one more, however many threads
    heaps, variable = _arenas(MALLOC_ARENA_MAX="6")  # the user's value is kept, and followed
    assert 2 < heaps <= 6 and variable == "6"


LAUNCHER_PROBE = """
import resource, sys
import pipelines  # the launcher's settings
import numpy as np
from featurebeam import worker
if sys.argv[1] == "worker":
    worker.prepare()
np.ones(1024 * 1024, dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    np.ones(1024 * 1024, dtype=np.float32)  # 4 MiB, about one transport message's parse
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_launcher_returns_large_blocks_and_a_worker_keeps_them():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", LAUNCHER_PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return int(done.stdout.strip())

    assert faults("launcher") >= 5 * 2  # mapped and unmapped every time: at least 2 huge pages each
    assert faults("worker") < 2  # the worker's heap serves them again
