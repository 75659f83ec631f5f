"""Run metadata: `run.json`, `features.json`, `schema.pbtxt`, written so no partial file is ever visible.

Every metadata file is written to a temporary name in the same folder and renamed, through
Beam's FileSystems, so the same code works on local disk and `gs://`. run.json is written last:
its presence means the run is complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from apache_beam.io.filesystems import FileSystems

RUN_JSON = "run.json"
FEATURES_JSON = "features.json"
SCHEMA_PBTXT = "schema.pbtxt"


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def write_atomic(path: str, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary sibling and a rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    if "://" not in path:  # os.replace is atomic and overwrites; FileSystems.rename may not overwrite
        os.replace(tmp, path)
        return
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_json(path: str, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read().decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def git_commit(directory: Path | None = None) -> str | None:
    """The commit of the featurebeam checkout (with '-dirty' if it has local changes), or None."""
    directory = directory or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
