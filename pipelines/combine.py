"""Runner-neutral singletons: fold a PCollection into exactly one value, and join several of them.

Beam's DaskRunner lifts no combiner: a `CombinePerKey` there is a GroupByKey that gathers every
element of a key in one task, so a one-key combine of the run's rows would bring every row, its
features included, to one worker. So `CombineToOne(fn, inputs=...)` never groups the elements
themselves: each element, already a batch (an extraction batch's rows, a commit record, a bucket
of listed items), is folded into one accumulator of all its inputs by the step that makes it, and
only accumulators are grouped, in a two-level tree:

1. by a shard drawn once per bundle: a runner that lifts combiners (FnApiRunner, Dataflow) sends
   one accumulator per bundle through this shuffle, one that does not (Dask) groups each bundle's
   accumulators apart from the others' and merges them;
2. under one key, with a seed element that makes an empty input give its combiner's default:
   at most one accumulator per shard and input arrives there.

The same graph is correct everywhere and, with `inputs`, holds only accumulators at every
grouping; a runner that lifts combiners merely sends fewer of them. Results do not depend on how
elements fall into bundles, up to the merge order (floating-point sums, the statistics' quantile
sketches).

`beam.CombineGlobally` would also produce its value for an empty input through a side input, and
summaries travel to the final step most simply as side inputs too; not every runner has side
inputs (Beam's DaskRunner does not), so singletons meet in one `CoGroupByKey` (`JoinSingletons`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Sequence

import apache_beam as beam

_KEY = "run"
SHARDS = 16  # level-one keys: what reaches the last merge is at most this many accumulators per input


class _Seed:
    """The placeholder element that makes an empty input produce its combiner's default."""

    def __reduce__(self):  # one identity across pickling, so `is SEED` holds on every worker
        return (_seed, ())


def _seed() -> "_Seed":
    return SEED


SEED = _Seed()


def _token(value: Any, digest: "hashlib._Hash", budget: list[int]) -> None:
    """Feed a bounded, process-independent description of `value` to `digest`: the same value gives
    the same bytes in every worker process (no `hash()`, which is salted per process, no pickle,
    whose set order follows it). At most `budget[0]` leaves are read, so a large batch costs little."""
    if budget[0] <= 0:
        return
    budget[0] -= 1
    if value is None or isinstance(value, (bool, int, float, complex)):
        digest.update(repr(value).encode())
    elif isinstance(value, str):
        digest.update(value[:256].encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        digest.update(bytes(value[:256]))
    elif isinstance(value, (list, tuple)):
        digest.update(b"[%d" % len(value))
        for item in value[:4]:
            _token(item, digest, budget)
    elif isinstance(value, dict):
        digest.update(b"{%d" % len(value))
        for key in sorted(value, key=repr)[:8]:
            _token(key, digest, budget)
            _token(value[key], digest, budget)
    elif isinstance(value, (set, frozenset)):
        digest.update(b"(%d" % len(value))
        for item in sorted(map(repr, value))[:4]:
            _token(item, digest, budget)
    elif hasattr(value, "shape") and hasattr(value, "dtype"):  # an array: its shape and first bytes
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(value.reshape(-1)[:32].tobytes() if hasattr(value, "tobytes") else b"")
    elif hasattr(value, "__dict__") or hasattr(value, "__slots__"):
        digest.update(type(value).__qualname__.encode())
        if hasattr(value, "__dict__"):
            fields = dict(vars(value))
        else:
            slots = value.__slots__
            fields = {n: getattr(value, n, None) for n in ([slots] if isinstance(slots, str) else slots)}
        _token(fields, digest, budget)
    else:
        digest.update(type(value).__qualname__.encode())


def content_shard(element: Any, shards: int) -> int:
    """A shard in [0, shards) that depends only on `element`'s content."""
    digest = hashlib.blake2b(digest_size=8)
    _token(element, digest, [64])
    return int.from_bytes(digest.digest(), "little") % shards


class _AccumulateFn(beam.DoFn):
    """An element -> `(shard, accumulator of its inputs)`, the shard chosen once per bundle;
    without `inputs`, `(shard, element)`.

    One shard per bundle, not per element: a runner that lifts combiners then sends one
    accumulator per bundle through the shard grouping, not one per shard the bundle touched. Which
    shard a bundle takes changes only the order in which accumulators merge, but it must be the
    same when a bundle is computed again: Dask recomputes the tasks a killed worker held, and a
    shuffle whose outputs were partly made before and partly after would send some elements to
    neither side (lost) or both (counted twice) if the shard were drawn at random. So the shard
    is a hash of the bundle's first element (`content_shard`), which a recomputed bundle shares.
    """

    def __init__(self, fn: beam.CombineFn, inputs: Callable[[Any], Iterable[Any]] | None, shards: int):
        self.fn, self.inputs, self.shards = fn, inputs, shards

    def setup(self):
        self.fn.setup()

    def start_bundle(self):
        self.shard = None

    def process(self, element):
        if self.shard is None:
            self.shard = content_shard(element, self.shards)
        if self.inputs is None:
            yield self.shard, element
            return
        fn = self.fn
        accumulator = fn.create_accumulator()
        for value in self.inputs(element):
            accumulator = fn.add_input(accumulator, value)
        yield self.shard, fn.compact(accumulator)

    def teardown(self):
        self.fn.teardown()


class _PartialFn(beam.CombineFn):
    """`fn` that outputs its accumulator (compacted) instead of extracting the result."""

    def __init__(self, fn: beam.CombineFn):
        self.fn = fn

    def setup(self, *args, **kwargs):
        self.fn.setup(*args, **kwargs)

    def create_accumulator(self):
        return self.fn.create_accumulator()

    def add_input(self, accumulator, element):
        return self.fn.add_input(accumulator, element)

    def merge_accumulators(self, accumulators):
        return self.fn.merge_accumulators(accumulators)

    def compact(self, accumulator):
        return self.fn.compact(accumulator)

    def extract_output(self, accumulator):
        return self.fn.compact(accumulator)

    def teardown(self, *args, **kwargs):
        self.fn.teardown(*args, **kwargs)


class _MergeFn(beam.CombineFn):
    """Accumulators of `fn` (and the seed, ignored) -> their merge, or `fn`'s result when `extract`."""

    def __init__(self, fn: beam.CombineFn, *, extract: bool):
        self.fn, self.extract = fn, extract

    def setup(self, *args, **kwargs):
        self.fn.setup(*args, **kwargs)

    def create_accumulator(self):
        return self.fn.create_accumulator()

    def add_input(self, accumulator, element):
        if element is SEED or isinstance(element, _Seed):
            return accumulator
        return self.fn.merge_accumulators([accumulator, element])

    def merge_accumulators(self, accumulators):
        return self.fn.merge_accumulators(accumulators)

    def compact(self, accumulator):
        return self.fn.compact(accumulator)

    def extract_output(self, accumulator):
        return self.fn.extract_output(accumulator) if self.extract else self.fn.compact(accumulator)

    def teardown(self, *args, **kwargs):
        self.fn.teardown(*args, **kwargs)


class CombineToOne(beam.PTransform):
    """`pcoll` combined by `fn` into a PCollection of exactly one value, even when `pcoll` is empty.

    inputs: how an element gives `fn`'s inputs, for elements that are batches (`lambda rows: rows`
      for lists); the element folds into one accumulator in the step that makes it, and only
      accumulators are grouped. Applied to several PCollections, one callable for all or a
      sequence with one per PCollection. Without it each element is one input and goes to the
      first grouping as it is (an accumulator per element would cost more and ship no less):
      one accumulator per bundle on a runner that lifts combiners, the elements themselves, a
      bundle's under one shard, on one that does not. Summaries of the run pass `inputs`.

    Applied to several PCollections (a tuple or list), combines all their elements, as a Flatten
    of them would, without one: each input is folded and merged by shard on its own, and only the
    merged accumulators are brought together. That matters on FnApiRunner, where a Flatten of
    PCollections made by different stages is written out whole in the runner's (the launcher's)
    memory before anything reads it.
    """

    def __init__(self, fn: beam.CombineFn, *, inputs: Callable[[Any], Iterable[Any]] | Sequence | None = None,
                 shards: int = SHARDS):
        super().__init__()
        if shards <= 0:
            raise ValueError(f"shards must be positive, got {shards}")
        self.fn, self.inputs, self.shards = fn, inputs, shards

    def expand(self, pcolls):
        pcolls = list(pcolls) if isinstance(pcolls, (tuple, list)) else [pcolls]
        if not pcolls:
            raise ValueError("CombineToOne needs at least one PCollection")
        inputs = list(self.inputs) if isinstance(self.inputs, (tuple, list)) else [self.inputs] * len(pcolls)
        if len(inputs) != len(pcolls):
            raise ValueError(f"CombineToOne got {len(inputs)} inputs callables for {len(pcolls)} PCollections")
        names = [""] if len(pcolls) == 1 else [str(i) for i in range(len(pcolls))]
        merged = [
            pcoll
            | f"Accumulate{name}" >> beam.ParDo(_AccumulateFn(self.fn, how, self.shards))
            | f"MergeShards{name}" >> beam.CombinePerKey(_PartialFn(self.fn) if how is None else _MergeFn(self.fn, extract=False))
            | f"Key{name}" >> beam.Map(lambda shard_accumulator: (_KEY, shard_accumulator[1]))
            for name, pcoll, how in zip(names, pcolls, inputs)
        ]
        seed = pcolls[0].pipeline | "Seed" >> beam.Create([(_KEY, SEED)])
        return (
            (*merged, seed)
            | "WithSeed" >> beam.Flatten()
            | "Combine" >> beam.CombinePerKey(_MergeFn(self.fn, extract=True))
            | "Value" >> beam.Values()
        )


class JoinSingletons(beam.PTransform):
    """`{name: single-value PCollection}` -> one `{name: value}` dict (a value missing is None)."""

    def expand(self, singletons: dict[str, beam.PCollection]):
        keyed = {name: pcoll | f"Key{name}" >> beam.Map(lambda value: (_KEY, value)) for name, pcoll in singletons.items()}
        return keyed | "Join" >> beam.CoGroupByKey() | "Unpack" >> beam.Map(_unpack)


def _unpack(element: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    _, groups = element
    return {name: next(iter(values), None) for name, values in groups.items()}
