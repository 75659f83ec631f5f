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
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any, Callable, Iterable, Iterator, Tuple

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

MAIN = "main"


def stable_shard(key: str, shards: int) -> int:
    """A shard in [0, shards) from `key`, the same in every process (unlike hash() of a str)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


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


class BatchBySize(beam.PTransform):
    """Group elements into lists of total size at most `max_size` (an element larger alone).

    Replaces `beam.BatchElements`, whose last batch per bundle comes from finish_bundle. Elements
    are spread over `shards` groups by a stable hash of `key_fn(element)` and each group is cut
    into batches as it is iterated, so a worker holds one batch at a time (on runners that stream
    grouped values); at most `shards` batches are not full. Which elements share a batch is not
    deterministic, so what runs on a batch must give each element the same result whatever else
    is in it (featurebeam's extractors do). Costs one shuffle of the elements.
    """

    def __init__(self, *, max_size: int, size_fn: Callable[[Any], int], key_fn: Callable[[Any], str], shards: int = 16,
                 encoded: bool | tuple[Callable[[Any], bytes], Callable[[bytes], Any]] = False):
        super().__init__()
        if max_size <= 0 or shards <= 0:
            raise ValueError(f"max_size and shards must be positive, got {max_size} and {shards}")
        self.max_size, self.size_fn, self.key_fn, self.shards = max_size, size_fn, key_fn, shards
        # encoded: shuffle each element as bytes (True: its pickle; or an (encode, decode) pair),
        # not as what its coder makes of it; see GroupEncoded for why a runner that holds
        # shuffles in memory wants that.
        self.codec = (encode, decode) if encoded is True else (encoded or None)

    def expand(self, pcoll):
        key_fn, shards, size_fn, max_size, codec = self.key_fn, self.shards, self.size_fn, self.max_size, self.codec
        encoded = codec is not None

        def shard(element: Any) -> tuple[int, Any]:
            return stable_shard(key_fn(element), shards), (codec[0](element) if encoded else element)

        def cut(group: tuple[int, Iterable[Any]]) -> Iterator[list[Any]]:
            batch: list[Any] = []
            total = 0
            for element in group[1]:
                if encoded:
                    element = codec[1](element)
                size = max(1, size_fn(element))
                if batch and total + size > max_size:
                    yield batch
                    batch, total = [], 0
                batch.append(element)
                total += size
            if batch:
                yield batch

        return (
            pcoll
            | "Shard" >> (beam.Map(shard).with_output_types(Tuple[int, bytes]) if encoded else beam.Map(shard))
            | "Group" >> beam.GroupByKey()
            | "Cut" >> beam.FlatMap(cut)
        )


def encode(value: Any) -> bytes:
    """`value` as shuffled bytes (pickle protocol 5: NumPy arrays as their raw buffers)."""
    return pickle.dumps(value, protocol=5)


def decode(data: bytes) -> Any:
    return pickle.loads(data)


class GroupEncoded(beam.PTransform):
    """`beam.CoGroupByKey` of a dict of `(str key, value)` PCollections, shuffling bytes.

    A tag may name a tuple of PCollections: their values are grouped under that tag, as if they
    had been flattened first, without that Flatten (see `Dataset.listing_parts`).

    Gives `(key, {tag: [values]})` as CoGroupByKey does, but each value crosses the shuffle as
    one bytes object: a tag byte and the value's encoding (`codecs[tag]`, an `(encode, decode)`
    pair, by default pickle). FnApiRunner holds a GroupByKey's whole input in the runner's process
    (the launcher, locally), decoded: a listed AudioItem tagged as CoGroupByKey tags it is about
    530 B of Python objects there, its bytes about 130 B. Runners that shuffle on workers
    (Dataflow, Dask) are indifferent; values are decoded by the step after the grouping.
    """

    def __init__(self, codecs: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] | None = None):
        super().__init__()
        self.codecs = dict(codecs or {})

    def expand(self, pcolls: dict[str, beam.PCollection]):
        tags = list(pcolls)
        if len(tags) > 255:
            raise ValueError(f"GroupEncoded takes at most 255 inputs, got {len(tags)}")
        codecs = [self.codecs.get(tag, (encode, decode)) for tag in tags]

        def tagger(index: int) -> Callable[[tuple[str, Any]], tuple[str, bytes]]:
            prefix, encoder = bytes((index,)), codecs[index][0]
            return lambda kv: (kv[0], prefix + encoder(kv[1]))

        def ungroup(element: tuple[str, Iterable[bytes]]) -> tuple[str, dict[str, list[Any]]]:
            key, values = element
            grouped: dict[str, list[Any]] = {tag: [] for tag in tags}
            for value in values:
                index = value[0]
                grouped[tags[index]].append(codecs[index][1](value[1:]))
            return key, grouped

        tagged = []
        for index, tag in enumerate(tags):
            parts = pcolls[tag] if isinstance(pcolls[tag], (tuple, list)) else (pcolls[tag],)
            for number, part in enumerate(parts):
                label = f"Encode[{tag}]" if number == 0 else f"Encode[{tag}]{number}"
                tagged.append(part | label >> beam.Map(tagger(index)).with_output_types(Tuple[str, bytes]))
        return tagged | "Flatten" >> beam.Flatten() | "Group" >> beam.GroupByKey() | "Decode" >> beam.Map(ungroup)


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
