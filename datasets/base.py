"""The dataset contract: an adapter lists `AudioItem`s as a Beam transform.

Listing is a `PTransform` from the pipeline root, not a Python list built in the launcher, so a
bucket of millions of objects is listed on the runner's workers and never held in one process.

Keys are relative to the dataset's root (`relative_key`): a folder's, a glob's fixed root's, a
bucket prefix's, a manifest's folder. So the same audio copied, mounted or staged elsewhere keeps
its keys (and `--reuse_from` and resume recognise it), and no launcher path ends up in published
features; an item's `uri` keeps where it was read from. Every adapter records this as
`describe()["keys"] == KEYS`; runs without it were made with absolute-path keys.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from typing import Any, Mapping

import apache_beam as beam

from featurebeam.deadletter import printable

# The key scheme run.json and _work/plan.json record under `dataset.keys`. A run whose record lacks
# it has absolute-path keys (an earlier featurebeam): --reuse_from and resume refuse it.
KEYS = "relative"


def relative_key(path: str, root: str) -> str:
    """`path` relative to the folder `root`, '/'-separated (`/data/a/b.wav` under `/data` -> `a/b.wav`).

    `root` is a folder with or without its trailing '/' (`gs://b/audio`, `/data/`, or `""` for
    the file system's root). The root itself is `.`; a sub-folder keeps its trailing '/'. A path
    outside `root` is returned unchanged (adapters only pass paths they listed under it).
    """
    head = root if root.endswith("/") else root + "/"
    if path.startswith(head):
        return path[len(head):] or "."
    if path == root:
        return "."
    return path


@dataclasses.dataclass(frozen=True)
class AudioItem:
    """One listed audio object.

    key: stable identifier relative to the dataset's root (see `relative_key`; a manifest's or a
      catalogue's `key` column as given), never random, never dependent on where the dataset is.
    uri: where the bytes were read from (a local path, file:// or gs:// URI).
    label, split: optional class label and train/valid/test split.
    metadata: further string columns, as sorted (name, value) pairs so items stay hashable.
    size, generation: the object's size in bytes and storage generation, when the listing knows
      them; both enter the run's dataset fingerprint.
    offset_seconds, duration_seconds: an excerpt of the file, when a manifest asks for one.
    content_id: a fingerprint of the object's content (`content_id(item)`: size and generation,
      or size and modification time, as listed), filled in before decoding;
      `--reuse_from` reuses a previous run's features only for records whose content_id is unchanged.
    """

    key: str
    uri: str
    label: str | None = None
    split: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    size: int | None = None
    generation: str | None = None
    offset_seconds: float | None = None
    duration_seconds: float | None = None
    content_id: str = ""

    def __post_init__(self):
        # Keys are shuffled and exported as UTF-8 text; a non-UTF-8 file name keeps its exact
        # bytes in `uri` (to open it) while the key shows them as \xNN escapes.
        object.__setattr__(self, "key", printable(self.key))

    def __reduce__(self):
        # Pickled (FastPrimitivesCoder's fallback, Dask, Dataflow) as AudioItemCoder's bytes, not
        # as a class path plus a dict of field names: items cross every shuffle of the run.
        return _item_from_bytes, (encode_item(self),)

    def fingerprint_line(self) -> str:
        """The canonical text this item contributes to the dataset fingerprint."""
        return json.dumps(
            [self.key, self.uri, self.label, self.split, list(self.metadata), self.size, self.generation,
             self.offset_seconds, self.duration_seconds],
            separators=(",", ":"),
        )


# encode_item's flags: which optional fields follow. The flags a listed file's item carries come
# first, so they fit in the varint's first byte (seven bits).
_URI_HEAD, _LABEL, _SPLIT, _SIZE, _GENERATION, _CONTENT_ID, _URI, _OFFSET, _DURATION = (1 << i for i in range(9))
_ITEM_FORMAT = 2


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")  # a uri may hold a file name's undecodable bytes


def encode_item(item: AudioItem) -> bytes:
    """`item` as compact, deterministic bytes: a format byte, a flags varint naming the optional
    fields present, then the fields (texts length-prefixed UTF-8, integers as varints, seconds as
    doubles); of `uri` only what precedes `key` when it ends with the key (a listed file's root),
    nothing when it equals it. About a third of a pickle of the dataclass."""
    from apache_beam.coders.coder_impl import create_OutputStream

    uri_head = item.uri[: len(item.uri) - len(item.key)] if item.uri != item.key and item.uri.endswith(item.key) else None
    flags = (
        (_URI_HEAD if uri_head is not None else _URI if item.uri != item.key else 0) | (_LABEL if item.label is not None else 0)
        | (_SPLIT if item.split is not None else 0) | (_SIZE if item.size is not None else 0)
        | (_GENERATION if item.generation is not None else 0) | (_OFFSET if item.offset_seconds is not None else 0)
        | (_DURATION if item.duration_seconds is not None else 0) | (_CONTENT_ID if item.content_id else 0)
    )
    out = create_OutputStream()
    out.write_byte(_ITEM_FORMAT)
    out.write_var_int64(flags)
    out.write(_text(item.key), True)
    for flag, text in ((_URI, item.uri), (_URI_HEAD, uri_head), (_LABEL, item.label), (_SPLIT, item.split)):
        if flags & flag:
            out.write(_text(text), True)
    out.write_var_int64(len(item.metadata))
    for name, value in item.metadata:
        out.write(_text(name), True)
        out.write(_text(value), True)
    if flags & _SIZE:
        out.write_var_int64(item.size)
    if flags & _GENERATION:
        out.write(_text(item.generation), True)
    if flags & _OFFSET:
        out.write_bigendian_double(item.offset_seconds)
    if flags & _DURATION:
        out.write_bigendian_double(item.duration_seconds)
    if flags & _CONTENT_ID:
        out.write(_text(item.content_id), True)
    return out.get()


def decode_item(data: bytes) -> AudioItem:
    """The AudioItem `encode_item` made `data` from."""
    from apache_beam.coders.coder_impl import create_InputStream

    stream = create_InputStream(data)
    version = stream.read_byte()
    if version != _ITEM_FORMAT:
        raise ValueError(
            f"AudioItem bytes of format {version}, this featurebeam reads format {_ITEM_FORMAT}; "
            "run the launcher and the workers with the same featurebeam version"
        )
    flags = stream.read_var_int64()

    def text() -> str:
        return stream.read_all(True).decode("utf-8", "surrogatepass")

    key = text()
    uri = text() if flags & _URI else text() + key if flags & _URI_HEAD else key
    label = text() if flags & _LABEL else None
    split = text() if flags & _SPLIT else None
    metadata = tuple((text(), text()) for _ in range(stream.read_var_int64()))
    size = stream.read_var_int64() if flags & _SIZE else None
    generation = text() if flags & _GENERATION else None
    offset = stream.read_bigendian_double() if flags & _OFFSET else None
    duration = stream.read_bigendian_double() if flags & _DURATION else None
    content = text() if flags & _CONTENT_ID else ""
    item = object.__new__(AudioItem)  # the key is printable already: no __post_init__ again
    for name, value in (
        ("key", key), ("uri", uri), ("label", label), ("split", split), ("metadata", metadata), ("size", size),
        ("generation", generation), ("offset_seconds", offset), ("duration_seconds", duration), ("content_id", content),
    ):
        object.__setattr__(item, name, value)
    return item


def _item_from_bytes(data: bytes) -> AudioItem:
    return decode_item(data)


class AudioItemCoder(beam.coders.Coder):
    """Beam coder of `AudioItem` (`encode_item`), registered for the type: PCollections typed
    AudioItem use it directly; elsewhere items pickle to the same bytes (`AudioItem.__reduce__`)."""

    def encode(self, value: AudioItem) -> bytes:
        return encode_item(value)

    def decode(self, encoded: bytes) -> AudioItem:
        return decode_item(encoded)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return AudioItem


beam.coders.registry.register_coder(AudioItem, AudioItemCoder)


def content_id(item: AudioItem) -> str:
    """A fingerprint of the item's bytes as stored, from what the listing gave: its size and
    version (GCS generation, or modification time). Pure: no I/O. "" when the listing did not
    give both (manifest and BigQuery items); `stat_content_id` fills those in with one request.

    It does not hold the item's uri (records are matched by key): a copy of a folder that kept its
    files' modification times (`cp -p`, `rsync -t`, `shutil.copytree`) has the same ids as the
    original, while a copy that did not, or a copy to another bucket (new generations), counts as
    changed content and is recomputed.
    """
    if item.size is None or not item.generation:
        return ""
    text = json.dumps([item.size, item.generation, item.offset_seconds, item.duration_seconds])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stat_content_id(item: AudioItem) -> str:
    """`content_id` after one metadata request (GCS object get, or a local stat) for the item's
    size and version, for items whose listing lacked them. Equal to what a listing of the same
    object gives. "" when the object cannot be stat-ed (decoding will then dead-letter it)."""
    if item.size is not None and item.generation:
        return content_id(item)
    from datasets.files import object_version

    try:
        size, version = object_version(item.uri)
    except Exception:
        return ""
    return content_id(dataclasses.replace(item, size=size, generation=version))


class _OnePart(beam.PTransform):
    def __init__(self, listing: beam.PTransform):
        super().__init__()
        self.listing = listing

    def expand(self, pbegin):
        return (pbegin | self.listing,)


class Dataset(abc.ABC):
    """A source of audio items: `name` (used in the run folder) and `uri` describe it."""

    name: str
    uri: str

    @abc.abstractmethod
    def listing(self) -> beam.PTransform:
        """A transform from the pipeline root to a PCollection of `AudioItem`."""

    def listing_parts(self) -> beam.PTransform:
        """A transform from the pipeline root to a tuple of PCollections whose elements together
        are `listing()`'s (an adapter that lists in several steps gives each step's output).

        The pipeline joins the parts where it flattens anyway (the grouping by key) instead of
        flattening them first: on FnApiRunner a Flatten of PCollections made by different stages
        is written out whole in the runner's (the launcher's) memory, and read back by one more
        stage, which costs the launcher several times the listing's size in transport.
        """
        return _OnePart(self.listing())

    def prepare(self) -> None:
        """Launcher-side checks and set-up before the pipeline is built (fail fast on bad input)."""

    def describe(self) -> dict[str, Any]:
        """What run.json records about the dataset (`keys`: the key scheme, `KEYS`)."""
        return {"name": self.name, "uri": self.uri, "type": type(self).__name__, "keys": KEYS}

    def identity(self) -> dict[str, Any]:
        """What the run's config hash holds of the dataset: `describe()` without where the
        dataset lies (an adapter with a root replaces its paths by ones relative to it), so a run
        started on one copy of the audio can be resumed on another mounted elsewhere."""
        return self.describe()
    # Limits from the command line (`--max_bytes_billed`, `--allowed_uri_prefixes`). Only adapters
    # that run BigQuery queries or read URIs from data use them; for the others they change nothing.
    max_bytes_billed: int | None = None  # None: featurebeam.billing.DEFAULT_MAX_BYTES_BILLED
    allowed_uri_prefixes: tuple[str, ...] = ()  # beyond the dataset's own bucket or folder

    def own_uri_prefix(self) -> str | None:
        """The bucket or folder rows of this dataset may always point at (None: only the allowed prefixes)."""
        return None

    @property
    def allow_list(self):
        """The `datasets.allowlist.UriAllowList` that URIs from this dataset's rows must match."""
        from datasets.allowlist import UriAllowList

        cached = self.__dict__.get("_allow")
        if cached is None or cached[0] != self.allowed_uri_prefixes:  # restrict() may add prefixes
            allow = UriAllowList.for_dataset(own=self.own_uri_prefix(), extra=self.allowed_uri_prefixes)
            cached = self.__dict__["_allow"] = (self.allowed_uri_prefixes, allow)
        return cached[1]

    def restrict(self, *, max_bytes_billed: int | str | None = None, allowed_uri_prefixes=None) -> None:
        """Apply the command line's limits: a bytes-billed ceiling (a flag wins over the config's)
        and further URI prefixes that rows may point at (added to the config's)."""
        from datasets.allowlist import parse_prefixes
        from featurebeam import billing

        if max_bytes_billed is not None:
            self.max_bytes_billed = billing.parse_bytes(max_bytes_billed)
        if allowed_uri_prefixes:
            self.allowed_uri_prefixes = tuple(
                dict.fromkeys((*self.allowed_uri_prefixes, *parse_prefixes(allowed_uri_prefixes)))
            )



class FingerprintFn(beam.CombineFn):
    """Order-independent fingerprint of a listing: count plus the sum (mod 2**256) of item hashes.

    A sum, unlike a hash of a sorted list, combines across workers without collecting the listing.
    """

    MOD = 1 << 256

    def create_accumulator(self):
        return 0, 0

    def add_input(self, acc, item: AudioItem):
        digest = int.from_bytes(hashlib.sha256(item.fingerprint_line().encode()).digest(), "big")
        return acc[0] + 1, (acc[1] + digest) % self.MOD

    def merge_accumulators(self, accs):
        count, total = 0, 0
        for c, t in accs:
            count, total = count + c, (total + t) % self.MOD
        return count, total

    def extract_output(self, acc) -> Mapping[str, Any]:
        return {"listed": acc[0], "fingerprint": f"sha256sum:{acc[1]:064x}"}
