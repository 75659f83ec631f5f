"""Audio objects in a Google Cloud Storage bucket, listed by prefix or glob.

A thin layer over `FilesDataset`: the objects are listed inside the pipeline by its listing
tasks (delimiter listings through google-cloud-storage, fanned out by folder, page by page), so a
bucket of millions of objects is never collected in one process. What this module adds is what
only makes sense for buckets: a prefix without a wildcard means "every object below it" (GCS has
no directories to test for), a config can name `bucket` and `prefix`, and the launcher's check
tells a missing bucket from an empty prefix. Each object's size and generation, from the listing
call, enter the dataset fingerprint and the item's content_id.

Credentials are Application Default Credentials; `STORAGE_EMULATOR_HOST` points the launcher's
check, the listing and Beam's `gs://` file system at a local emulator.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable

from apache_beam.io.filesystem import FileSystem

from datasets.files import FilesDataset, has_glob
from featurebeam.audio import AUDIO_EXTENSIONS
from featurebeam.errors import DatasetError

SCHEME = "gs://"
# Bucket naming rules (https://cloud.google.com/storage/docs/buckets#naming), without the
# domain-verification cases; checked so a typo fails with a message instead of a 400.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# The launcher stops looking for a first audio object after this many other objects and leaves
# the verdict to the pipeline, so a huge non-audio prefix cannot stall the launch.
PREPARE_SCAN_LIMIT = 50_000
_LOG = logging.getLogger(__name__)


def split_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/some/path` -> (`bucket`, `some/path`)."""
    if not uri.startswith(SCHEME):
        raise DatasetError(f"{uri!r} is not a gs:// URI; write gs://<bucket>/<prefix or glob>")
    bucket, _, path = uri[len(SCHEME):].partition("/")
    if not BUCKET_RE.match(bucket):
        raise DatasetError(
            f"{bucket!r} in {uri} is not a valid bucket name (3-222 characters: lower-case letters, "
            "digits, '-', '_' and '.', starting and ending with a letter or digit)"
        )
    return bucket, path


class GcsDataset(FilesDataset):
    """Audio objects under a `gs://` prefix or matching a `gs://` glob.

    Listed in tasks fanned out over two "folder" levels below the prefix (delimiter listings),
    so a bucket laid out as `<prefix>/<label>/<speaker>/...` is listed by one task per speaker.

    uri: `gs://bucket/prefix/` (every object below the prefix), `gs://bucket/prefix/**.flac`
      (a glob: `**` crosses '/', `*` does not) or `gs://bucket/path/clip.wav` (one object).
    bucket, prefix: the same as a config would say it (`bucket: b`, `prefix: audio/` or
      `prefix: 'audio/**.wav'`); give either `uri` or `bucket`.
    extensions: object name endings to keep (case-insensitive); default every audio format.
    label_from: "parent_dir" labels each object by its parent "folder" below the prefix
      (`gs://b/audio/<label>/<object>`); "none" leaves labels empty.
    """

    # One task fetches its pages one after another (10,000 sequential requests for 10 million
    # objects); two levels of folders spread a bucket over many workers.
    fanout_levels = 2

    def __init__(
        self,
        *,
        uri: str | None = None,
        bucket: str | None = None,
        prefix: str = "",
        name: str | None = None,
        extensions: Iterable[str] = AUDIO_EXTENSIONS,
        label_from: str = "parent_dir",
    ):
        if (uri is None) == (bucket is None):
            raise DatasetError("a gcs dataset needs either uri (gs://bucket/prefix) or bucket (plus an optional prefix)")
        if bucket is not None:
            uri = f"{SCHEME}{bucket}/{prefix.lstrip('/')}"
        elif prefix:
            raise DatasetError("give prefix together with bucket, or put it in uri (gs://bucket/prefix)")
        if isinstance(extensions, str):
            extensions = [extensions]
        self.bucket, _ = split_uri(uri)
        super().__init__(uri=uri, name=name, extensions=extensions, label_from=label_from)

    def _is_dir(self, uri: str) -> bool:
        # GCS has no directories: anything that is neither a glob nor an audio object name is a
        # prefix to list recursively ("gs://b/audio" lists gs://b/audio/**, not gs://b/audio2/).
        return not has_glob(uri) and not uri.lower().endswith(self.extensions)

    def prepare(self) -> None:
        """Fail fast on a missing bucket or a pattern without audio, listing lazily page by page."""
        from google.api_core import exceptions
        from google.auth.exceptions import DefaultCredentialsError

        from featurebeam import cloud

        pattern = self.patterns[0]
        _, path = split_uri(pattern)
        # The literal part before the first wildcard, as Beam's own GCS match lists it.
        listing_prefix = re.match(r"^[^[*?]*", path).group(0)
        matches = re.compile(FileSystem.translate_pattern(pattern)).match
        scanned = 0
        try:
            client = cloud.storage_client()
        except DefaultCredentialsError:
            raise DatasetError(
                f"no Google credentials to list {pattern}: run 'gcloud auth application-default login', set "
                "GOOGLE_APPLICATION_CREDENTIALS, or STORAGE_EMULATOR_HOST for a local emulator"
            ) from None
        try:
            for blob in client.list_blobs(self.bucket, prefix=listing_prefix or None, page_size=1000):
                uri = f"{SCHEME}{self.bucket}/{blob.name}"
                if matches(uri) and uri.lower().endswith(self.extensions):
                    return
                scanned += 1
                if scanned >= PREPARE_SCAN_LIMIT:
                    _LOG.warning(
                        "no audio among the first %d objects under %s; the pipeline will list the rest",
                        scanned, pattern,
                    )
                    return
        except exceptions.NotFound:
            emulator = os.environ.get(cloud.STORAGE_EMULATOR_ENV)
            raise DatasetError(
                f"bucket gs://{self.bucket} does not exist (listing {pattern})"
                + (f" on the emulator at {emulator} ({cloud.STORAGE_EMULATOR_ENV})" if emulator else "")
                + "; check the bucket name"
            ) from None
        except exceptions.Forbidden as exc:
            raise DatasetError(
                f"not allowed to list gs://{self.bucket} ({exc.message}); the credentials (Application "
                "Default Credentials, or the Dataflow worker service account) need roles/storage.objectViewer"
            ) from None
        except (exceptions.GoogleAPICallError, exceptions.RetryError, OSError) as exc:
            raise DatasetError(f"cannot list {pattern}: {type(exc).__name__}: {exc}") from None
        raise DatasetError(
            f"no audio objects match {pattern} ({scanned} objects under gs://{self.bucket}/{listing_prefix}, "
            f"none of them ending in {', '.join(self.extensions)} and matching); check the prefix, or pass "
            f"a glob such as '{self.root}/**.wav'"
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "bucket": self.bucket}
