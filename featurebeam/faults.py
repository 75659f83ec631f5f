"""Fault injection for crash tests: kill this process with SIGKILL at a named point.

`FEATUREBEAM_FAULT_INJECT=kill:<point>:<n>` kills the process the n-th time it passes `<point>`,
exactly as `kill -9` would: no cleanup, no flush. Unset (the normal case) it costs one dictionary
lookup. Several directives are separated by commas. The decoder child reads the same variable
for its own `segfault:` and `hang:` directives (featurebeam/isolation.py).

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
