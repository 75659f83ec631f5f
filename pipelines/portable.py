"""Runner-neutral forms of Beam constructs that Beam 2.77's DaskRunner mistranslates.

featurebeam runs one graph on FnApiRunner, Dask and Dataflow. Beam's DaskRunner
(`apache_beam/runners/dask/`) translates only Create, ParDo, GroupByKey and Flatten to Dask bags
and gets several things wrong; each transform here builds the same result from those four
primitives, so it is correct everywhere and costs little on the other runners (fusion makes the
extra Map/FlatMap steps free on FnApiRunner and Dataflow). What Beam 2.77's DaskRunner does
(each case has a test in tests/pipelines/test_portable.py):

* Impulse and `beam.io.Read` (so `ReadFromText`, `ReadFromParquet`, ...) have no translation:
  the next ParDo gets no input bag and translation fails with
  "AttributeError: 'NoneType' object has no attribute 'map'". Use `beam.Create([...])` of the
  paths followed by a `ReadAll...` transform or a DoFn that reads.
* A multi-output ParDo (`.with_outputs(...)`, `Map(...).with_exception_handling()`, and so
  `beam.Partition`) hands every output to every consumer: the main-output consumer also sees
  the tagged elements. Use `ParDoWithOutputs` and `Partition` below.
* Output from `finish_bundle` is dropped (the bundle's results are gathered before it runs),
  so `beam.BatchElements` loses each bundle's last batch and `beam.combiners.Top.Of` (hence
  any limit built on it) yields nothing. Use `BatchBySize` and `SmallestByKey` below; side
  effects in finish_bundle (flushing a commit buffer) still happen.
* Only the last transform applied to the pipeline is computed, with what it depends on; any
  other branch (a second sink, `WriteToText` before other steps) silently never runs. Make
  every sink feed one last step with `AfterAll`, and apply that step last;
  `dangling_transforms(pipeline)` lists what such a pipeline would skip.
* `WriteToText` and other file sinks leave their `beam-temp-*` folders (their finalisation is
  a side-input step that Dask computes separately), and are skipped entirely unless last. Use
  `WriteJson` (one object, temp + rename) or the project's commit writers.
* Metrics: counters are silently discarded and `PipelineResult.metrics()` raises
  NotImplementedError; progress must not depend on them (see pipelines/progress.py).
* Also (correct but slow): DoFn `setup`/`teardown` run once per bundle (Dask partition), not
  once per worker; `Reshuffle` is a no-op; side inputs are recomputed inside every task that
  reads them; stateful DoFns and timers (`GroupIntoBatches`) are not supported.

`--runner=DaskRunner` is featurebeam's subclass (pipelines/dask.py): the same results, including
every gap above, but DoFns set up once per worker process, a Reshuffle that spreads, and shuffles
of a bounded number of partitions.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zlib
from typing import Any, Callable, Iterable, Iterator, List, Tuple

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

MAIN = "main"


def stable_shard(key: str | bytes, shards: int) -> int:
    """A shard in [0, shards) from `key`, the same in every process (unlike hash() of a str)."""
    data = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % shards


class _TagAsValueFn(beam.DoFn):
    """Runs `fn` and turns each of its outputs into a (tag, value) pair on the one main output."""

    def __init__(self, fn: beam.DoFn, main: str):
        self.fn = fn
        self.main = main

    def setup(self):
        self.fn.setup()

    def start_bundle(self):
        self.fn.start_bundle()

    def process(self, element, *args, **kwargs):
        for out in self.fn.process(element, *args, **kwargs) or ():
            if isinstance(out, TaggedOutput):
                yield out.tag, out.value
            else:
                yield self.main, out

    def finish_bundle(self):
        if self.fn.finish_bundle() is not None:
            raise ValueError(
                f"{type(self.fn).__name__}.finish_bundle returns output, which Beam's DaskRunner drops; "
                "flush from process() or from a grouping step instead"
            )

    def teardown(self):
        self.fn.teardown()


def _select(pair: tuple[str, Any], tag: str) -> Iterator[Any]:
    if pair[0] == tag:
        yield pair[1]


class ParDoWithOutputs(beam.PTransform):
    """`beam.ParDo(fn).with_outputs(*tags, main=main)` that every runner splits correctly.

    fn: a DoFn whose process() yields main outputs and `TaggedOutput(tag, value)`s; it must not
    use DoFn parameters (TimestampParam, state, timers) and must not output from finish_bundle.
    Returns a dict {main: PCollection, tag: PCollection, ...}.
    """

    def __init__(self, fn: beam.DoFn, *tags: str, main: str = MAIN, args: Iterable[Any] = ()):
        super().__init__()
        if main in tags:
            raise ValueError(f"the main output name {main!r} is also a tag")
        self.fn, self.tags, self.main, self.args = fn, tags, main, tuple(args)

    def expand(self, pcoll):
        pairs = pcoll | "Run" >> beam.ParDo(_TagAsValueFn(self.fn, self.main), *self.args)
        return {tag: pairs | f"Select_{tag}" >> beam.FlatMap(_select, tag) for tag in (self.main, *self.tags)}


class Partition(beam.PTransform):
    """`beam.Partition(fn, n)` from one single-output ParDo plus n selections; returns a tuple."""

    def __init__(self, fn: Callable[[Any, int], int], n: int):
        super().__init__()
        self.fn, self.n = fn, n

    def expand(self, pcoll):
        fn, n = self.fn, self.n

        def tag(element):
            index = fn(element, n)
            if not 0 <= index < n:
                raise ValueError(f"partition function returned {index}, outside [0, {n})")
            return index, element

        pairs = pcoll | "Tag" >> beam.Map(tag)
        return tuple(pairs | f"Select_{i}" >> beam.FlatMap(_select, i) for i in range(n))


def encode(value: Any) -> bytes:
    """`value` as shuffled bytes (pickle protocol 5: NumPy arrays as their raw buffers)."""
    return pickle.dumps(value, protocol=5)


def decode(data: bytes) -> Any:
    return pickle.loads(data)


# Shuffling many small values as few large blobs. FnApiRunner holds a GroupByKey's whole input in
# the runner's process (the launcher, locally), decoded, element by element: a listed AudioItem as
# CoGroupByKey tags it is about 530 B of Python objects there. So the transforms below turn each
# value into a bytes record and shuffle the records through a combiner that packs them into
# compressed blobs (`_PackFn`): each bundle sends one blob per shuffle key it saw (combiner lifting,
# on every runner that has it: FnApiRunner, Dataflow), and a listed item crosses the shuffle as
# about 25 to 45 B. A worker holds one bundle's records per key before the shuffle (the combiner's
# table) and one key's blobs after it. Runners that shuffle on workers (Dataflow, Dask) do one
# shuffle of less data, as they would for the plain transform.
_RECORD = "<IIB"  # a record's header: key length, value length, tag index; then key, then value
_RECORD_SIZE = struct.calcsize(_RECORD)


def _record(key: bytes, index: int, value: bytes) -> bytes:
    return struct.pack(_RECORD, len(key), len(value), index) + key + value


def _records(blobs: Iterable[bytes]) -> Iterator[tuple[bytes, int, bytes]]:
    """(key, tag index, value) of each record in `blobs` (what `_PackFn` gives), a blob at a time."""
    for packed in blobs:
        blob = zlib.decompress(packed)
        offset, size = 0, len(blob)
        while offset < size:
            key_length, value_length, index = struct.unpack_from(_RECORD, blob, offset)
            offset += _RECORD_SIZE
            key = blob[offset:offset + key_length]
            offset += key_length
            yield key, index, blob[offset:offset + value_length]
            offset += value_length


class _PackFn(beam.CombineFn):
    """Packs bytes records into zlib blobs (level 1: records under one shuffle key share most of
    their keys' and paths' bytes, so a blob is a fraction of them, for about a microsecond a record).

    The accumulator is (records not yet packed, blobs); compact() packs the records into one blob,
    so what crosses a shuffle is blobs. Gives the list of blobs; `_records` reads them.
    """

    def create_accumulator(self) -> tuple[list[bytes], list[bytes]]:
        return [], []

    def add_input(self, accumulator, record: bytes):
        accumulator[0].append(record)
        return accumulator

    def merge_accumulators(self, accumulators):
        records: list[bytes] = []
        blobs: list[bytes] = []
        for more_records, more_blobs in accumulators:
            records.extend(more_records)
            blobs.extend(more_blobs)
        return records, blobs

    def compact(self, accumulator):
        records, blobs = accumulator
        if records:
            blobs = [*blobs, zlib.compress(b"".join(records), 1)]
        return [], blobs

    def extract_output(self, accumulator) -> list[bytes]:
        return self.compact(accumulator)[1]


def _pack() -> beam.PTransform:
    """(int, bytes record) pairs to (int, [blobs]): one element per key, the key's records packed."""
    return beam.CombinePerKey(_PackFn()).with_output_types(Tuple[int, List[bytes]])


class BatchBySize(beam.PTransform):
    """Group elements into lists of total size at most `max_size` (an element larger alone).

    Replaces `beam.BatchElements`, whose last batch per bundle comes from finish_bundle. Elements
    are spread over `shards` groups by a stable hash of `key_fn(element)` and each group is cut
    into batches as it is iterated, so a worker holds one batch at a time (on runners that stream
    grouped values); at most `shards` batches are not full. Which elements share a batch is not
    deterministic, so what runs on a batch must give each element the same result whatever else
    is in it (featurebeam's extractors do). Costs one shuffle of the elements.

    encoded: shuffle each element as bytes (True: its pickle; or an `(encode, decode)` pair), packed
    into compressed blobs (see `_PackFn`), not as what its coder makes of it. A worker then holds a
    shard's blobs (the shard's elements compressed) and one blob's elements decoded, rather than
    one batch.
    """

    def __init__(self, *, max_size: int, size_fn: Callable[[Any], int], key_fn: Callable[[Any], str], shards: int = 16,
                 encoded: bool | tuple[Callable[[Any], bytes], Callable[[bytes], Any]] = False):
        super().__init__()
        if max_size <= 0 or shards <= 0:
            raise ValueError(f"max_size and shards must be positive, got {max_size} and {shards}")
        self.max_size, self.size_fn, self.key_fn, self.shards = max_size, size_fn, key_fn, shards
        self.codec = (encode, decode) if encoded is True else (encoded or None)

    def expand(self, pcoll):
        key_fn, shards, size_fn, max_size, codec = self.key_fn, self.shards, self.size_fn, self.max_size, self.codec

        def cut(elements: Iterable[Any]) -> Iterator[list[Any]]:
            batch: list[Any] = []
            total = 0
            for element in elements:
                size = max(1, size_fn(element))
                if batch and total + size > max_size:
                    yield batch
                    batch, total = [], 0
                batch.append(element)
                total += size
            if batch:
                yield batch

        if codec is None:
            return (
                pcoll
                | "Shard" >> beam.Map(lambda element: (stable_shard(key_fn(element), shards), element))
                | "Group" >> beam.GroupByKey()
                | "Cut" >> beam.FlatMap(lambda group: cut(group[1]))
            )
        encoder, decoder = codec
        return (
            pcoll
            | "Shard" >> beam.Map(lambda element: (stable_shard(key_fn(element), shards), _record(b"", 0, encoder(element))))
            .with_output_types(Tuple[int, bytes])
            | "Group" >> _pack()
            | "Cut" >> beam.FlatMap(lambda group: cut(decoder(value) for _, _, value in _records(group[1])))
        )


class GroupEncoded(beam.PTransform):
    """`beam.CoGroupByKey` of a dict of `(key, value)` PCollections, shuffling packed bytes.

    Keys are str (or, with `key_type=bytes`, bytes).

    A tag may name a tuple of PCollections: their values are grouped under that tag, as if they
    had been flattened first, without that Flatten (see `Dataset.listing_parts`).

    Gives `(key, {tag: [values]})` as CoGroupByKey does. Each value becomes one bytes record (its
    key, a tag byte and the value's encoding, `codecs[tag]`, an `(encode, decode)` pair, by default
    pickle), in a bucket, a stable hash of the key into `buckets`. Each input packs its records by
    bucket (see `_PackFn`); the packed inputs are flattened and grouped by bucket, and the step after
    that splits each bucket back into keys. Two shuffles of packed records rather than one of
    values: what a runner holds between the steps is compressed blobs, a few per bucket and input,
    where CoGroupByKey (and FnApiRunner's materialised Flatten in front of it) hold an object per
    value. A worker holds one bucket at a time after the grouping, about items x 170 B / buckets
    decoded.

    per_bucket: give one `Bucket` per bucket instead of its keys' groups one by one, so a step can
    fold a bucket's values into one accumulator (`pipelines.combine.CombineToOne(inputs=...)`)
    where they are grouped anyway; `beam.FlatMap(lambda bucket: bucket)` gives the groups.
    """

    def __init__(self, codecs: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] | None = None,
                 *, buckets: int = 1024, key_type: type = str, per_bucket: bool = False):
        super().__init__()
        if buckets <= 0:
            raise ValueError(f"buckets must be positive, got {buckets}")
        if key_type not in (str, bytes):
            raise ValueError(f"GroupEncoded groups by str or bytes keys, not {key_type.__name__}")
        self.codecs = dict(codecs or {})
        self.buckets = buckets
        self.key_type = key_type
        self.per_bucket = per_bucket

    def expand(self, pcolls: dict[str, beam.PCollection]):
        tags = list(pcolls)
        if len(tags) > 255:
            raise ValueError(f"GroupEncoded takes at most 255 inputs, got {len(tags)}")
        codecs = [self.codecs.get(tag, (encode, decode)) for tag in tags]
        buckets, key_type = self.buckets, self.key_type
        as_text = key_type is str

        def tagger(index: int) -> Callable[[tuple[str, Any]], tuple[int, bytes]]:
            encoder = codecs[index][0]

            def bucketed(kv: tuple[str, Any]) -> tuple[int, bytes]:
                if type(kv[0]) is not key_type:
                    raise TypeError(
                        f"GroupEncoded groups by {key_type.__name__} keys; {tags[index]!r} has a {type(kv[0]).__name__} key"
                    )
                key = kv[0].encode("utf-8") if as_text else kv[0]
                return stable_shard(key, buckets), _record(key, index, encoder(kv[1]))

            return bucketed

        decoders = tuple(codec[1] for codec in codecs)

        def bucket(element: tuple[int, Iterable[list[bytes]]]) -> Bucket:
            # One bucket: its keys in the order first seen, each with its values' bytes per tag.
            keys: dict[bytes, list[list[bytes]]] = {}
            for blobs in element[1]:
                for key, index, value in _records(blobs):
                    groups = keys.get(key)
                    if groups is None:
                        groups = keys[key] = [[] for _ in tags]
                    groups[index].append(value)
            return Bucket(keys, tuple(tags), decoders, as_text)

        packed = []
        for index, tag in enumerate(tags):
            parts = pcolls[tag] if isinstance(pcolls[tag], (tuple, list)) else (pcolls[tag],)
            for number, part in enumerate(parts):
                suffix = f"[{tag}]" if number == 0 else f"[{tag}]{number}"
                packed.append(
                    part
                    | f"Encode{suffix}" >> beam.Map(tagger(index)).with_output_types(Tuple[int, bytes])
                    | f"Pack{suffix}" >> _pack()
                )
        return (
            packed
            | "Flatten" >> beam.Flatten().with_output_types(Tuple[int, List[bytes]])
            | "Group" >> beam.GroupByKey()
            | "Decode" >> (beam.Map(bucket) if self.per_bucket else beam.FlatMap(bucket))
        )


class Bucket:
    """One bucket of `GroupEncoded`: iterating it gives its `(key, {tag: [values]})` in the order
    the keys were first seen, each key's values decoded as it is reached; `values(tag)` gives one
    tag's values of every key. Holds the bucket's records as the shuffle gave them (bytes)."""

    def __init__(self, keys: dict[bytes, list[list[bytes]]], tags: tuple[str, ...], decoders: tuple, as_text: bool):
        self._keys, self._tags, self._decoders, self._as_text = keys, tags, decoders, as_text

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[Any, dict[str, list[Any]]]]:
        tags, decoders, as_text = self._tags, self._decoders, self._as_text
        for key, groups in self._keys.items():
            yield key.decode("utf-8") if as_text else key, {
                tag: [decoders[index](value) for value in groups[index]] for index, tag in enumerate(tags)
            }

    def values(self, tag: str) -> Iterator[Any]:
        index = self._tags.index(tag)
        decode = self._decoders[index]
        for groups in self._keys.values():
            for value in groups[index]:
                yield decode(value)


class SmallestByKey(beam.PTransform):
    """The `n` elements with the smallest `key(element)`, as a PCollection of elements.

    Replaces `beam.combiners.Top.Of(n, key=..., reverse=True) | FlatMap`, whose per-bundle step
    outputs from finish_bundle; a CombineGlobally of the same combiner does not.
    """

    def __init__(self, n: int, *, key: Callable[[Any], Any]):
        super().__init__()
        self.n, self.key = n, key

    def expand(self, pcoll):
        return (
            pcoll
            | "Top" >> beam.CombineGlobally(beam.combiners.TopCombineFn(self.n, key=self.key, reverse=True))
            | "Explode" >> beam.FlatMap(lambda batch: batch)
        )


class AfterAll(beam.PTransform):
    """One element (how many elements its inputs had) once every input PCollection is complete.

    Give it the outputs of every sink (they may be empty) and feed the result to the pipeline's
    last step; that step then depends on every branch, which Beam's DaskRunner needs in order to
    run them at all, and which a Finalise step needs anyway.
    """

    def expand(self, pcolls):
        pcolls = list(pcolls.values()) if isinstance(pcolls, dict) else list(pcolls)
        ones = [pc | f"One_{i}" >> beam.Map(lambda _: 1) for i, pc in enumerate(pcolls)]
        return ones | "Flatten" >> beam.Flatten() | "Count" >> beam.CombineGlobally(sum)


class _WriteJsonFn(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, value):
        from export import metadata

        metadata.write_json(self.path, value)
        yield self.path


class WriteJson(beam.PTransform):
    """Write the one element of a PCollection as JSON at `path` (temp + rename); outputs `path`.

    Replaces `WriteToText(..., num_shards=1, shard_name_template="")` for small results such
    as a CombineGlobally's, without a sink's temp folders and finalisation.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        return pcoll | "Write" >> beam.ParDo(_WriteJsonFn(self.path))


def dangling_transforms(pipeline: beam.Pipeline) -> list[str]:
    """Full labels of leaf transforms the pipeline's last applied leaf does not depend on.

    Beam's DaskRunner computes only that last leaf and its inputs (side inputs included), so
    these would never run there. An empty list means every step feeds the last one.
    """
    leaves: list[Any] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            leaves.append(node)

    pipeline.visit(Visitor())
    if not leaves:
        return []
    needed: set[int] = set()
    stack = [leaves[-1]]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        for value in list(node.inputs) + [si.pvalue for si in node.side_inputs]:
            producer = getattr(value, "producer", None)
            if producer is not None:
                stack.append(producer)
    return [node.full_label for node in leaves if id(node) not in needed]
