"""Datasets listed by file pattern: local directories, globs, `file://` and (with datasets.gcs) `gs://`.

Listing runs inside the pipeline as many small tasks, so it scales with the runner. A pattern's
literal part (`gs://b/audio/` of `gs://b/audio/**.wav`) is the first task; a task with fan-out
levels left lists one level (a delimiter listing on GCS, `os.scandir` locally), emits the files
it finds there and one child task per sub-folder, and the child tasks are reshuffled across
workers before the next level. After `fanout_levels` levels every remaining task lists its whole
subtree. Each task streams its listing page by page (at most `PAGE_SIZE` objects in memory),
retries a failed page alone from its page token, and a task that still fails becomes one
list-stage dead letter naming its prefix while the other tasks carry on. Other Beam file systems
(no delimiter listing in Beam's API) are listed by one `FileSystems.match` per pattern.

Every listed file carries its size and version (GCS generation, or local modification time) from
the same listing call; they feed the dataset fingerprint and `datasets.base.content_id`.

A file's key is its path relative to the dataset's root, '/'-separated: a folder's path
(`/data/audio` lists `dog/a.wav`), a single file's folder (`a.wav`), or a glob's fixed root, the
folder before its first wildcard (`/data/a*/x/*.wav` has root `/data`, keys `a1/x/b.wav`). One
root per dataset and distinct paths below it give distinct keys. A listing task that fails is a
dead letter keyed by its prefix relative to the root (`.` for the root itself, `dog/` for a folder).
The launcher only checks, lazily and with an early stop, that each pattern matches something.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
import stat as stat_module
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.metrics import Metrics
from apache_beam.io.filesystems import FileSystems

from datasets.base import AudioItem, Dataset, relative_key
from featurebeam import faults, stages
from pipelines import portable
from featurebeam.audio import AUDIO_EXTENSIONS
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError
from featurebeam.retry import call_with_retries, is_transient

GLOB_CHARS = "*?["
GCS_SCHEME = "gs://"
# Objects per listing page: Cloud Storage's maximum, and the bound on what one task holds.
PAGE_SIZE = 1000
# Folder levels split into separate tasks before each task lists its whole subtree; each level
# costs one reshuffle (about a second on a local runner). A local disk is listed fast by one
# process, so one level (a task per top folder) is enough; see GcsDataset for buckets.
FANOUT_LEVELS = 1
# The launcher stops looking for a first match after this many other entries and leaves the
# verdict to the pipeline, so a huge non-matching tree cannot stall the launch.
PREPARE_SCAN_LIMIT = 50_000
_TASKS = "tasks"
_LOG = logging.getLogger(__name__)


def has_glob(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARS)


def glob_root(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard (`a/b/*/c.wav` -> `a/b`,
    `a/b*/c.wav` -> `a`): always a whole folder, so keys relative to it are whole path segments."""
    head = pattern
    while has_glob(head):
        head = posixpath.dirname(head)
    return head


def literal_prefix(pattern: str) -> str:
    """The text of a pattern before its first wildcard (`gs://b/a/x*/c.wav` -> `gs://b/a/x`)."""
    return re.match(r"^[^*?[]*", pattern).group(0)


def update_token(updated: float | None) -> str | None:
    return None if updated is None else f"updated:{updated:.6f}"


def generation_token(generation: int | str | None) -> str | None:
    return None if generation in (None, "") else f"generation:{generation}"


@dataclasses.dataclass(frozen=True)
class Listed:
    """One file as a listing saw it: path (URI), size in bytes, version token (or None)."""

    path: str
    size: int | None
    version: str | None


@dataclasses.dataclass(frozen=True)
class ListTask:
    """One unit of listing work: every file whose path starts with `prefix`.

    prefix: a folder (`gs://b/audio/`, `/data/audio/`) or a literal pattern head (`/data/a` for
      `/data/a*/x.wav`). levels: fan-out levels left; 0 lists the whole subtree.
    """

    prefix: str
    levels: int


# -- listing back ends: one level (files + sub-folders) or a whole subtree, page by page --------


class _LocalLister:
    """Local folders through `os.scandir`, streamed: pages of at most `PAGE_SIZE` entries, each
    from one folder (a folder with more entries gives several pages)."""

    def _dir(self, prefix: str) -> str:
        return prefix if prefix.endswith("/") else (posixpath.dirname(prefix) + "/")

    def _entries(self, directory: str, prefix: str) -> Iterator[tuple[os.DirEntry, bool]]:
        try:
            handle = call_with_retries(lambda: os.scandir(directory), what=f"list {directory}", tries=3, base_delay=0.1)
        except FileNotFoundError:
            return  # a prefix that names no folder lists nothing, as an object-store prefix would
        with handle:
            for entry in handle:
                path = entry.path
                try:
                    # Symlinks to files are followed; symlinks to folders are not (no cycles).
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if (path + "/" if is_dir else path).startswith(prefix):
                    yield entry, is_dir

    @staticmethod
    def _file(entry: os.DirEntry) -> Listed | None:
        try:
            st = entry.stat()
        except OSError:  # removed since the folder was read, or a dangling link
            return None
        if not stat_module.S_ISREG(st.st_mode):
            return None
        return Listed(entry.path, st.st_size, update_token(st.st_mtime))

    def level(self, prefix: str) -> Iterator[tuple[list[Listed], list[str]]]:
        files, folders, paged = [], [], False
        for entry, is_dir in self._entries(self._dir(prefix), prefix):
            if is_dir:
                folders.append(entry.path + "/")
            elif (listed := self._file(entry)) is not None:
                files.append(listed)
            if len(files) + len(folders) >= PAGE_SIZE:
                yield files, folders
                files, folders, paged = [], [], True
        if files or folders or not paged:
            yield files, folders

    def tree(self, prefix: str) -> Iterator[list[Listed]]:
        pending = [prefix]
        while pending:
            top = pending.pop()
            files = []
            for entry, is_dir in self._entries(self._dir(top), top):
                if is_dir:
                    pending.append(entry.path + "/")
                elif (listed := self._file(entry)) is not None:
                    files.append(listed)
                if len(files) >= PAGE_SIZE:
                    yield files
                    files = []
            if files:
                yield files


class _GcsLister:
    """Cloud Storage through google-cloud-storage: `PAGE_SIZE` objects a page, each page retried alone."""

    def __init__(self, tries: int, base_delay: float):
        from featurebeam import cloud

        self.client = cloud.storage_client()
        self.tries, self.base_delay = tries, base_delay

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[tuple[list[Listed], list[str]]]:
        bucket, _, name_prefix = prefix[len(GCS_SCHEME):].partition("/")
        token = None
        while True:
            def fetch(token=token):
                # retry=None: featurebeam.retry decides, so one policy (and one count) holds.
                blobs = self.client.list_blobs(
                    bucket, prefix=name_prefix or None, delimiter=delimiter, page_size=PAGE_SIZE,
                    page_token=token, retry=None,
                )
                page = next(blobs.pages)
                items = [
                    Listed(f"{GCS_SCHEME}{bucket}/{blob.name}", blob.size, generation_token(blob.generation))
                    for blob in page
                ]
                return items, [f"{GCS_SCHEME}{bucket}/{p}" for p in page.prefixes], blobs.next_page_token

            what = f"list {prefix}" + (" (next page)" if token else "")
            items, folders, token = call_with_retries(fetch, what=what, tries=self.tries, base_delay=self.base_delay)
            yield items, folders
            if not token:
                return

    def level(self, prefix: str) -> Iterator[tuple[list[Listed], list[str]]]:
        return self._pages(prefix, "/")

    def tree(self, prefix: str) -> Iterator[list[Listed]]:
        for items, _ in self._pages(prefix, None):
            yield items


def object_version(uri: str) -> tuple[int | None, str | None]:
    """(size in bytes, version token) of one file, with one metadata request (or one stat).

    The same tokens the listing gives: `generation:<n>` for gs:// objects, `updated:<mtime>`
    elsewhere. Raises what the store raises (FileNotFoundError, google NotFound, ...).
    """
    if uri.startswith(GCS_SCHEME):
        from featurebeam import cloud

        bucket, _, name = uri[len(GCS_SCHEME):].partition("/")
        from google.api_core.exceptions import NotFound

        # blob.reload() is one GET; bucket.get_blob() would first GET the bucket as well.
        blob = cloud.storage_client().bucket(bucket).blob(name)
        try:
            blob.reload()
        except NotFound:
            raise FileNotFoundError(f"no object {uri}") from None
        return blob.size, generation_token(blob.generation)
    if "://" not in uri or uri.startswith("file://"):
        st = os.stat(uri[len("file://"):] if uri.startswith("file://") else uri)
        return st.st_size, update_token(st.st_mtime)
    meta = FileSystems.match([uri], limits=[1])[0].metadata_list[0]
    return meta.size_in_bytes, update_token(meta.last_updated_in_seconds)


class FilesDataset(Dataset):
    """Audio files matched by a pattern.

    uri: a directory (listed recursively), a single file, or a glob (`**` crosses directories,
      `*` does not), locally or on any Beam file system.
    extensions: file endings to keep (case-insensitive) when listing directories or globs.
    label_from: "parent_dir" labels each file by its parent directory's name when that directory
      lies below the dataset root (the `root/<label>/<file>` layout); "none" leaves labels empty.
    """

    fanout_levels = FANOUT_LEVELS

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

    def backend(self) -> str:
        """How this dataset is listed: "local" (scandir), "gcs" (delimiter listings) or "match"."""
        if self.uri.startswith(GCS_SCHEME):
            return "gcs"
        return "local" if "://" not in self.uri else "match"

    def tasks(self) -> list[ListTask]:
        """The first listing tasks: one per pattern, at its literal head."""
        return [ListTask(prefix=literal_prefix(pattern), levels=self.fanout_levels) for pattern in self.patterns]

    def prepare(self) -> None:
        if self.backend() == "local":
            for pattern in self.patterns:
                self._check_local(pattern)
            return
        for pattern in self.patterns:
            try:
                result = call_with_retries(
                    lambda: FileSystems.match([pattern], limits=[1])[0], what=f"list {pattern}", tries=3
                )
            except Exception as exc:  # Beam raises BeamIOError with the backend error inside
                raise DatasetError(f"cannot list {pattern}: {exc}") from None
            if not result.metadata_list:
                raise DatasetError(self._no_match(pattern))

    def _no_match(self, pattern: str) -> str:
        return (
            f"no files match {pattern}; check the path, or pass a directory, a glob such as "
            f"'{self.root}/**.wav', or a dataset name from configs/datasets"
        )

    def _check_local(self, pattern: str) -> None:
        """A lazy walk that stops at the first match (or after PREPARE_SCAN_LIMIT entries)."""
        matches = re.compile(FileSystem.translate_pattern(pattern)).match
        scanned = 0
        try:
            for page in _LocalLister().tree(literal_prefix(pattern)):
                for listed in page:
                    if matches(listed.path):
                        return
                    scanned += 1
                if scanned >= PREPARE_SCAN_LIMIT:
                    _LOG.warning("no match among the first %d files under %s; the pipeline will list the rest", scanned, pattern)
                    return
        except OSError as exc:
            raise DatasetError(f"cannot list {pattern}: {type(exc).__name__}: {exc}") from None
        raise DatasetError(self._no_match(pattern))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patterns": self.patterns,
            "extensions": list(self.extensions),
            "label_from": self.label_from,
        }

    def identity(self) -> dict[str, Any]:
        described = self.describe()
        described.pop("bucket", None)  # GcsDataset's
        return {**described, "uri": self.key(self.uri), "patterns": [self.key(p) for p in self.patterns]}

    def key(self, path: str) -> str:
        """The key of a listed path (or a listing prefix): relative to the dataset's root."""
        return relative_key(path, self.root)

    def item(self, listed: Listed) -> AudioItem:
        """The item for one listed file: keyed relative to the root, read from its path."""
        faults.point("list")
        path = listed.path
        label = None
        if self.label_from == "parent_dir":
            parent = posixpath.dirname(path)
            if parent.rstrip("/") != self.root.rstrip("/") and parent.startswith(self.root):
                label = posixpath.basename(parent)
        return AudioItem(key=self.key(path), uri=path, label=label, size=listed.size, generation=listed.version)

    def keep(self, listed: Listed) -> bool:
        return listed.path.lower().endswith(self.extensions)

    def listing(self) -> beam.PTransform:
        return _ListFiles(self)

    def listing_parts(self) -> beam.PTransform:
        return _ListFiles(self, parts=True)


def _list_dead_letter(what: str, exc: Exception, *, key: str, tries: int, listed: int) -> DeadLetter:
    """The dead letter of a listing task that failed: `what` (its prefix or pattern) as the uri,
    `key` (the same relative to the dataset's root) as the key."""
    transient = is_transient(exc)
    return DeadLetter(
        key=key,
        item_key=key,
        uri=what,
        stage="list",
        error_type=type(exc).__name__,
        reason="transient_list_failed" if transient else "list_failed",
        message=f"cannot list {what}"
        + (f" after {tries} tries" if transient else "")
        + (f" (stopped after {listed} files)" if listed else "")
        + f": {type(exc).__name__}: {exc}",
    )


class _ListTaskFn(beam.DoFn):
    """ListTask -> AudioItem | DeadLetter (main) and child ListTasks (tagged `tasks`)."""

    def __init__(self, dataset: FilesDataset, *, tries: int, base_delay: float):
        self.dataset = dataset
        self.tries, self.base_delay = tries, base_delay
        self.tasks = Metrics.counter("featurebeam", "listing_tasks")
        self.pages = Metrics.counter("featurebeam", "listing_pages")
        self.failed = Metrics.counter("featurebeam", "listing_tasks_failed")
        self.list_us = stages.counter("list")

    def setup(self):
        dataset = self.dataset
        self.lister = (
            _GcsLister(self.tries, self.base_delay) if dataset.backend() == "gcs" else _LocalLister()
        )
        self.patterns = [re.compile(FileSystem.translate_pattern(p)).match for p in dataset.patterns]

    def _items(self, page: list[Listed]) -> Iterator[AudioItem]:
        for listed in page:
            if self.dataset.keep(listed) and any(match(listed.path) for match in self.patterns):
                yield self.dataset.item(listed)

    def process(self, task: ListTask):
        return stages.timed(self._list(task), self.list_us)

    def _list(self, task: ListTask):
        self.tasks.inc()
        listed = 0
        try:
            if task.levels > 0:
                for page, folders in self.lister.level(task.prefix):
                    self.pages.inc()
                    listed += len(page)
                    yield from self._items(page)
                    for folder in folders:
                        yield beam.pvalue.TaggedOutput(_TASKS, ListTask(prefix=folder, levels=task.levels - 1))
            else:
                for page in self.lister.tree(task.prefix):
                    self.pages.inc()
                    listed += len(page)
                    yield from self._items(page)
        except Exception as exc:
            self.failed.inc()
            yield _list_dead_letter(task.prefix, exc, key=self.dataset.key(task.prefix), tries=self.tries, listed=listed)


class MatchWithRetries(beam.DoFn):
    """pattern -> FileMetadata of every match, retrying transient store errors with backoff.

    For file systems without a delimiter listing (Beam's API has none): one task per pattern. A
    pattern that still cannot be listed (permanent error, or every try transient) becomes a
    list-stage dead letter naming it, so one bad prefix among several does not fail the run.
    """

    def __init__(self, *, tries: int = 5, base_delay: float = 0.5, root: str = ""):
        self.tries = tries
        self.base_delay = base_delay
        self.root = root  # the dataset's root: a failed pattern's dead letter is keyed relative to it

    def process(self, pattern: str):
        try:
            result = call_with_retries(
                lambda: FileSystems.match([pattern])[0], what=f"list {pattern}", tries=self.tries, base_delay=self.base_delay
            )
        except Exception as exc:
            yield _list_dead_letter(pattern, exc, key=relative_key(pattern, self.root), tries=self.tries, listed=0)
            return
        yield from result.metadata_list


def _from_metadata(metadata: FileMetadata) -> Listed:
    return Listed(metadata.path, metadata.size_in_bytes, update_token(metadata.last_updated_in_seconds))


class _ListFiles(beam.PTransform):
    def __init__(self, dataset: FilesDataset, *, tries: int = 5, base_delay: float = 0.5, parts: bool = False):
        super().__init__()
        self.dataset = dataset
        self.tries, self.base_delay = tries, base_delay
        self.parts = parts  # each level's items as its own PCollection (Dataset.listing_parts)

    def expand(self, pbegin):
        dataset = self.dataset
        if dataset.backend() == "match":
            matched = (
                pbegin
                | "Patterns" >> beam.Create(dataset.patterns)
                | "Match" >> beam.ParDo(MatchWithRetries(tries=self.tries, base_delay=self.base_delay, root=dataset.root))
                | "ToListed" >> beam.Map(lambda m: m if isinstance(m, DeadLetter) else _from_metadata(m))
                | "KeepAudio" >> beam.Filter(lambda m: isinstance(m, DeadLetter) or dataset.keep(m))
                | "ToItem" >> beam.Map(lambda m: m if isinstance(m, DeadLetter) else dataset.item(m))
            )
            return (matched,) if self.parts else matched
        # A fixed number of levels keeps the graph static (no recursion in Beam): level i's child
        # tasks are reshuffled, so sub-folders are listed by different workers, then listed by
        # level i + 1; the last level lists whole subtrees.
        tasks = pbegin | "Tasks" >> beam.Create(dataset.tasks())  # one per pattern: nothing to spread
        found = []
        for level in range(dataset.fanout_levels + 1):
            if level:
                tasks = tasks | f"Spread{level}" >> beam.Reshuffle()
            out = tasks | f"List{level}" >> portable.ParDoWithOutputs(
                _ListTaskFn(dataset, tries=self.tries, base_delay=self.base_delay), _TASKS, main="found"
            )  # not ParDo.with_outputs: Beam's DaskRunner mixes up the outputs of a multi-output ParDo
            found.append(out["found"])
            tasks = out[_TASKS]
        return tuple(found) if self.parts else found | "Listing" >> beam.Flatten()
