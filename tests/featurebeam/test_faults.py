"""Fault injection is off unless a test turns it on: FEATUREBEAM_FAULT_INJECT alone cannot kill a
real run; the test-only plug-in (tests/faultinject) or `faults.install` can."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from featurebeam import faults
from tests import faultinject

PASS_THREE_TIMES = "from featurebeam import faults\nfor _ in range(3): faults.point('commit')\nprint('alive')"


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=faultinject.ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_variable_alone_does_nothing():
    env = {**os.environ, faults.ENV: "kill:commit:2"}
    env.pop("PYTHONPATH", None)
    done = _python(PASS_THREE_TIMES, env)
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr


def test_the_test_plugin_turns_it_on_in_a_child_process():
    killed = _python(PASS_THREE_TIMES, {**os.environ, **faultinject.environment("kill:commit:2")})
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""


def test_installed_in_this_process_a_point_raises_on_its_pass():
    with faultinject.inject("raise:commit:2,raise:list:1"):
        faults.point("commit")
        with pytest.raises(faults.InjectedFault, match="fault injected at commit"):
            faults.point("commit")
        faults.point("commit")  # only the 2nd pass
        faults.point("decode")
    faults.point("list")  # removed again


def test_a_directive_that_is_not_one_is_refused():
    for spec in ("kill:commit", "explode:commit:1", "kill:commit:x", "segfault:"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.install(spec)
