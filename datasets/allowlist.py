"""Which URIs a dataset's rows may point the workers at.

A folder, glob or bucket prefix given on the command line names what it reads itself. A manifest
row or a BigQuery catalogue row is data: whoever can write the catalogue could otherwise make the
workers open `/etc/passwd`, another team's bucket or a credentials file. So URIs that come from
data must fall under an allowed prefix: by default the dataset's own scheme and bucket (a
`gs://b/...` manifest allows `gs://b/`; a local manifest its own folder; a BigQuery table, which
lives in no bucket, nothing), plus every prefix given with `--allowed_uri_prefixes=gs://a/,gs://b/`
(or a dataset config's `allowed_uri_prefixes:`). A row outside them becomes a list-stage dead
letter with reason `uri_not_allowed` naming the URI and the flag; it is never read.

Prefixes are folders: `gs://a/clips` allows `gs://a/clips/x.wav`, not `gs://a/clips2/x.wav`.
Local paths (bare or `file://`) are compared after normalisation, so `../` cannot climb out.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Iterable

from featurebeam.deadletter import DeadLetter
from featurebeam.errors import ConfigError

FLAG = "--allowed_uri_prefixes"
REASON = "uri_not_allowed"


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(path: str) -> str:
    """A local path or file:// URI as a normalised absolute path."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.normpath(os.path.abspath(path))


def normalise_prefix(prefix: str) -> str:
    """One allowed prefix as a folder: `gs://a` -> `gs://a/`, `./audio` -> `/abs/audio/`."""
    prefix = str(prefix).strip()
    if not prefix:
        raise ConfigError(f"{FLAG} has an empty entry; write comma-separated prefixes, e.g. {FLAG}=gs://a/,gs://b/")
    if _is_remote(prefix):
        scheme, _, rest = prefix.partition("://")
        if not rest.strip("/"):
            raise ConfigError(f"{FLAG}: {prefix!r} names no bucket or host; write e.g. {scheme}://my-bucket/")
        return prefix.rstrip("/") + "/"
    return _local(prefix).rstrip("/") + "/"


def parse_prefixes(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`gs://a/,gs://b/` (the flag's text) or a list of prefixes, normalised, duplicates dropped."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(normalise_prefix(p) for p in items))


def own_prefix(uri: str) -> str:
    """The scheme and bucket (or host) of a remote URI, else the local folder holding the path."""
    if _is_remote(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}/"
    return posixpath.dirname(_local(uri)).rstrip("/") + "/"


@dataclasses.dataclass(frozen=True)
class UriAllowList:
    """The prefixes a dataset's rows may point at (normalised folders, see `normalise_prefix`)."""

    prefixes: tuple[str, ...]

    @classmethod
    def for_dataset(cls, *, own: str | None, extra: Iterable[str] = ()) -> "UriAllowList":
        """`own` (the dataset's own bucket or folder, None for none) plus the `extra` prefixes."""
        found = ([normalise_prefix(own)] if own else []) + list(parse_prefixes(tuple(extra)))
        return cls(tuple(dict.fromkeys(found)))

    def allows(self, uri: str) -> bool:
        target = uri if _is_remote(uri) else _local(uri)
        return any(target.startswith(p) or target == p.rstrip("/") for p in self.prefixes)

    def refusal(self, *, key: str, uri: str, source: str) -> DeadLetter:
        """The list-stage dead letter of a row whose `uri` is outside the prefixes."""
        allowed = ", ".join(self.prefixes) or "none"
        return DeadLetter(
            key=key,
            item_key=key,
            uri=uri,
            stage="list",
            error_type="UriNotAllowed",
            reason=REASON,
            message=(
                f"{uri} (listed by {source}) is outside the URIs this dataset may read (allowed: {allowed}); "
                f"if the workers may read it, pass {FLAG}={own_prefix(uri)} (comma-separated, with any others)"
            ),
        )
