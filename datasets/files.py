"""Datasets listed by file pattern: local directories, globs, `file://` and (with datasets.gcs) `gs://`.

Listing runs inside the pipeline (`MatchWithRetries`: FileSystems.match per pattern, as
`fileio.MatchAll` does, plus retries), so it scales with the runner. The launcher only checks,
with a one-object match, that each pattern matches something.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems

from datasets.base import AudioItem, Dataset
from featurebeam import faults
from featurebeam.audio import AUDIO_EXTENSIONS
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError
from featurebeam.retry import call_with_retries, is_transient

GLOB_CHARS = "*?["


def has_glob(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARS)


def glob_root(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard (`a/b/*/c.wav` -> `a/b`)."""
    head = pattern
    while has_glob(head):
        head = posixpath.dirname(head)
    return head


class FilesDataset(Dataset):
    """Audio files matched by a pattern.

    uri: a directory (listed recursively), a single file, or a glob (`**` crosses directories,
      `*` does not), locally or on any Beam file system.
    extensions: file endings to keep (case-insensitive) when listing directories or globs.
    label_from: "parent_dir" labels each file by its parent directory's name when that directory
      lies below the dataset root (the `root/<label>/<file>` layout); "none" leaves labels empty.
    """

    def __init__(
        self,
        *,
        uri: str,
        name: str | None = None,
        extensions: Iterable[str] = AUDIO_EXTENSIONS,
        label_from: str = "parent_dir",
    ):
        if label_from not in ("parent_dir", "none"):
            raise DatasetError(f"label_from must be 'parent_dir' or 'none', not {label_from!r}")
        self.uri = self._normalise(uri)
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.label_from = label_from
        if has_glob(self.uri):
            self.root, self.patterns = glob_root(self.uri), [self.uri]
        elif self._is_dir(self.uri):
            self.root = self.uri.rstrip("/")
            self.patterns = [f"{self.root}/**"]
        else:
            self.root, self.patterns = posixpath.dirname(self.uri), [self.uri]
        self.name = name or posixpath.basename(self.root.rstrip("/")) or "files"

    @staticmethod
    def _normalise(uri: str) -> str:
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))
        return uri

    @staticmethod
    def _is_dir(uri: str) -> bool:
        return "://" not in uri and os.path.isdir(uri)

    def prepare(self) -> None:
        for pattern in self.patterns:
            try:
                result = call_with_retries(
                    lambda: FileSystems.match([pattern], limits=[1])[0], what=f"list {pattern}", tries=3
                )
            except Exception as exc:  # Beam raises BeamIOError with the backend error inside
                raise DatasetError(f"cannot list {pattern}: {exc}") from None
            if not result.metadata_list:
                raise DatasetError(
                    f"no files match {pattern}; check the path, or pass a directory, a glob such as "
                    f"'{self.root}/**.wav', or a dataset name from configs/datasets"
                )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patterns": self.patterns,
            "extensions": list(self.extensions),
            "label_from": self.label_from,
        }

    def item(self, metadata: FileMetadata) -> AudioItem:
        """The item for one matched file (its path is both key and URI)."""
        faults.point("list")
        path = metadata.path
        label = None
        if self.label_from == "parent_dir":
            parent = posixpath.dirname(path)
            if parent.rstrip("/") != self.root.rstrip("/") and parent.startswith(self.root):
                label = posixpath.basename(parent)
        return AudioItem(key=path, uri=path, label=label, size=metadata.size_in_bytes, generation=self.generation(metadata))

    def generation(self, metadata: FileMetadata) -> str | None:
        """What identifies this version of the file besides its size: its modification time.

        Beam's listings carry size and update time for local files and GCS objects alike (not
        GCS's generation number); every overwrite moves the update time. It feeds the dataset
        fingerprint and each item's content_id (what --reuse_from compares).
        """
        return update_token(metadata.last_updated_in_seconds)

    def keep(self, metadata: FileMetadata) -> bool:
        return metadata.path.lower().endswith(self.extensions)

    def listing(self) -> beam.PTransform:
        return _ListFiles(self)


def update_token(updated: float | None) -> str | None:
    return None if updated is None else f"updated:{updated:.6f}"


class MatchWithRetries(beam.DoFn):
    """pattern -> FileMetadata of every match, retrying transient store errors with backoff.

    A pattern that still cannot be listed (permanent error, or every try transient) becomes a
    list-stage dead letter naming it, so one bad prefix among several does not fail the run.
    """

    def __init__(self, *, tries: int = 5, base_delay: float = 0.5):
        self.tries = tries
        self.base_delay = base_delay

    def process(self, pattern: str):
        try:
            result = call_with_retries(
                lambda: FileSystems.match([pattern])[0], what=f"list {pattern}", tries=self.tries, base_delay=self.base_delay
            )
        except Exception as exc:
            transient = is_transient(exc)
            yield DeadLetter(
                key=pattern,
                item_key=pattern,
                uri=pattern,
                stage="list",
                error_type=type(exc).__name__,
                reason="transient_list_failed" if transient else "list_failed",
                message=f"cannot list {pattern}"
                + (f" after {self.tries} tries" if transient else "")
                + f": {type(exc).__name__}: {exc}",
            )
            return
        yield from result.metadata_list


class _ListFiles(beam.PTransform):
    def __init__(self, dataset: FilesDataset):
        super().__init__()
        self.dataset = dataset

    def expand(self, pbegin):
        dataset = self.dataset
        matched = (
            pbegin
            | "Patterns" >> beam.Create(dataset.patterns)
            | "Match" >> beam.ParDo(MatchWithRetries())
        )
        return (
            matched
            | "KeepAudio" >> beam.Filter(lambda m: isinstance(m, DeadLetter) or dataset.keep(m))
            | "ToItem" >> beam.Map(lambda m: m if isinstance(m, DeadLetter) else dataset.item(m))
        )
