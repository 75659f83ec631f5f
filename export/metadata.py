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
from typing import Any, Sequence

import apache_beam as beam
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


def delete_present(paths: Sequence[str]) -> int:
    """Delete the files at `paths`, one by one; one already gone (deleted by a retried bundle, or
    never written) is not an error. Returns how many this call deleted."""
    from apache_beam.io.filesystem import BeamIOError

    removed = 0
    for path in paths:
        try:
            if "://" not in path and not os.path.lexists(path):
                continue
            FileSystems.delete([path])
            removed += 1
        except BeamIOError:
            if FileSystems.exists(path):
                raise
    return removed


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


def output_files(run: dict[str, Any], kind: str, *, run_dir: str | None = None) -> list[str]:
    """The shard files of one output kind (`tfrecords`, `parquet`, `errors`) of a finished run.

    run.json names outputs by pattern, count and bytes (its size does not grow with the run), so
    this lists the pattern; `run_dir` moves the pattern along with a run folder copied elsewhere.
    An older run.json's list of files is returned as it is.
    """
    entry = run["outputs"][kind]
    if not isinstance(entry, dict):
        return list(entry)
    pattern = entry["pattern"]
    recorded = run["outputs"]["run_dir"].rstrip("/")
    if run_dir is not None and pattern.startswith(recorded + "/"):
        pattern = run_dir.rstrip("/") + pattern[len(recorded) :]
    return matching(pattern)


def matching(pattern: str) -> list[str]:
    """The sorted paths matching `pattern`, locally or on any Beam file system; [] when its
    folder does not exist (nothing of that kind was written)."""
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:
        return []



class MatchFn(beam.DoFn):
    """File pattern -> path of every match, with retries; a local folder that does not exist yet
    matches nothing (a new run's `_commits/`)."""

    def process(self, pattern: str):
        from featurebeam.retry import call_with_retries

        def match():
            try:
                return FileSystems.match([pattern])[0].metadata_list
            except Exception:
                if "://" not in pattern and not os.path.isdir(os.path.dirname(pattern.split("*", 1)[0])):
                    return []
                raise

        for found in call_with_retries(match, what=f"list {pattern}"):
            yield found.path
