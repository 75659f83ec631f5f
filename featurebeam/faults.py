"""Fault injection for crash tests: kill this process (or fail a step) at a named point.

Production code only marks points: `point(name)` where a crash is worst (listed below) and
`decoded(uri)` in the decoder child. They do nothing
until a test calls `install(spec)` in the process: nothing here reads the environment, so no
variable set on a real run can kill it. Tests install directives in their own process with a
fixture, and in the processes they start (the launcher, Beam workers, the decoder child)
through a test-only `sitecustomize` that installs FEATUREBEAM_FAULT_INJECT (tests/faultinject:
its folder on PYTHONPATH turns it on). Not installed, a point costs one global lookup.

Directives, comma-separated:
- `kill:<point>:<n>` kills the process with SIGKILL the n-th time it passes `<point>`, exactly
  as `kill -9` would: no cleanup, no flush;
- `raise:<point>:<n>` raises `InjectedFault` there instead: a step that fails;
- `segfault:<substring>` and `hang:<substring>`, for the decoder child (featurebeam/isolation.py):
  for a URI containing the substring it crashes with a real SIGSEGV (it reads address 0 through
  ctypes), or sleeps forever, right after it has sent the item's SourceInfo, i.e. mid-item.

The points, in the order a run passes them:
- `list`, `decode`: listing an item, decoding one;
- `commit_shard` (after each shard file of a commit), `commit` (all its shards written, the
  commit record not yet), `commit_record` (the record written, the bundle not finished);
- in a resumed run's repair of commits that share keys (export/commit.py `_repair`):
  `rewrite_shards` (the new shards written, the record still names the old ones),
  `rewrite_record` (the record replaced, the old shards not yet deleted), `rewrite_delete`
  (after each old shard deleted), `repair_drop` (the record of a commit that keeps nothing
  deleted, its shards not yet);
- TFDS numbering (export/tfds.py): `tfds_plan` (a split's numbering written, no part renamed),
  `tfds_rename` (after each part renamed, or moved back by a resume), `tfds_restored` (a
  resume moved every part of a numbering back, the numbering not yet deleted);
- `orphan_delete`: after each file orphan removal deletes (orphan records first, then shards);
- `finalize`: in the final step, features.json written, run.json not yet.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "FEATUREBEAM_FAULT_INJECT"  # the variable the tests' plug-in installs; read by nothing here
_directives: tuple[tuple[str, str, int], ...] | None = None  # None: not installed
_passes: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """A `raise:` directive fired: a test made this step fail."""


def install(spec: str | None) -> None:
    """Obey the directives of `spec` in this process from now on; None or "" removes them.
    Only tests call this."""
    global _directives
    directives = []
    for entry in filter(None, (part.strip() for part in (spec or "").split(","))):
        kind, _, rest = entry.partition(":")
        if kind in ("kill", "raise"):
            name, _, count = rest.partition(":")
            if not name or not count.isdigit():
                raise ValueError(f"{ENV}: {entry!r} is not {kind}:<point>:<n>")
            directives.append((kind, name, int(count)))
        elif kind in ("segfault", "hang") and rest:
            directives.append((kind, rest, 0))
        else:
            raise ValueError(f"{ENV}: unknown directive {entry!r}")
    _passes.clear()
    _directives = tuple(directives) or None


def point(name: str) -> None:
    """Mark a crash point; dies (or raises) here if a test installed a directive for it."""
    directives = _directives
    if directives is None:
        return
    for kind, target, count in directives:
        if kind in ("kill", "raise") and target == name:
            _passes[name] = _passes.get(name, 0) + 1
            if _passes[name] == count:
                if kind == "raise":
                    raise InjectedFault(f"fault injected at {name} (pass {count})")
                os.kill(os.getpid(), signal.SIGKILL)


def decoded(uri: str | bytes) -> None:
    """The decoder child's point, once an item's SourceInfo is sent: a `segfault:` or `hang:`
    directive whose substring is in `uri` fires here."""
    directives = _directives
    if directives is None:
        return
    text = os.fsdecode(uri) if isinstance(uri, bytes) else uri
    for kind, needle, _ in directives:
        if kind in ("segfault", "hang") and needle in text:
            if kind == "segfault":
                import ctypes

                ctypes.string_at(0)  # a real SIGSEGV: reads address 0
            while True:  # hang
                time.sleep(3600)
