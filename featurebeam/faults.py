"""Fault injection for crash tests: kill this process with SIGKILL at a named point.

`FEATUREBEAM_FAULT_INJECT=kill:<point>:<n>` kills the process the n-th time it passes `<point>`
(`list`, `decode`, `commit`, `tfds_rename`, `finalize`), exactly as `kill -9` would: no cleanup, no flush. Unset
(the normal case) it costs one dictionary lookup. The decoder child reads the same variable for
its own `segfault:` and `hang:` directives (featurebeam/isolation.py).
"""

from __future__ import annotations

import os
import signal

ENV = "FEATUREBEAM_FAULT_INJECT"
_passes: dict[str, int] = {}


def point(name: str) -> None:
    """Mark a crash point; dies here if the environment asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for directive in spec.split(","):
        parts = directive.split(":")
        if len(parts) == 3 and parts[0] == "kill" and parts[1] == name:
            _passes[name] = _passes.get(name, 0) + 1
            if _passes[name] == int(parts[2]):
                os.kill(os.getpid(), signal.SIGKILL)
