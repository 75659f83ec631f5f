"""Kill a step at a fault point, as `kill -9` of a worker would, and leave its files to the test.

`killed_at(where, fn, *args)` runs `fn(*args)` in a forked child that installs
`kill:<where>` (featurebeam/faults.py `install`) and checks that the child died
by SIGKILL, so the point was reached. The child shares the test's loaded modules (no interpreter
start, no pickling), and what it wrote stays on disk for the test to retry the same step on,
in the test's own process, as Beam retries a bundle with the same elements.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

from featurebeam import faults


def killed_at(where: str, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> None:
    """Run `fn(*args, **kwargs)` in a child killed at `where` (`<point>:<n>`); raises if it was not."""

    def child() -> None:
        faults.install(f"kill:{where}")
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):  # a DoFn's process: run it through
            for _ in result:
                pass

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"the step did not finish within {timeout} s, nor die at {where}")
    if process.exitcode != -signal.SIGKILL:
        raise AssertionError(f"the step was not killed at {where}: it exited with {process.exitcode}")
