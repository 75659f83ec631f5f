"""Runner-neutral singletons: combine a PCollection to exactly one value, and join several of them.

`beam.CombineGlobally` produces its value for an empty input through a side input, and
summaries travel to the final step most simply as side inputs too; not every runner has side
inputs (Beam's DaskRunner does not). Here a seed element keyed like the data makes every
combine a `CombinePerKey` with exactly one output, and singletons meet in one `CoGroupByKey`,
so the same graph runs on FnApiRunner, Dask and Dataflow.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

_KEY = "run"


class _Seed:
    """The placeholder element that makes an empty input produce its combiner's default."""

    def __reduce__(self):  # one identity across pickling, so `is SEED` holds on every worker
        return (_seed, ())


def _seed() -> "_Seed":
    return SEED


SEED = _Seed()


class _PartialFn(beam.CombineFn):
    """`fn` that outputs its accumulator (compacted) instead of extracting the result."""

    def __init__(self, fn: beam.CombineFn):
        self.fn = fn

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


class _MergeFn(beam.CombineFn):
    """Accumulators of `fn` (and the seed, ignored) -> `fn`'s result."""

    def __init__(self, fn: beam.CombineFn):
        self.fn = fn

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
        return self.fn.extract_output(accumulator)


class CombineToOne(beam.PTransform):
    """`pcoll` combined by `fn` into a PCollection of exactly one value, even when `pcoll` is empty.

    Applied to several PCollections (a tuple or list), combines all their elements, as a Flatten
    of them would, without one: each input is combined on its own (so its elements meet `fn`
    where they are made) and only the accumulators are brought together. That matters on
    FnApiRunner, where a Flatten of PCollections made by different stages, like the one that
    adds the seed, is written out whole in the runner's (the launcher's) memory before anything
    reads it; a `CombinePerKey` right after the step that makes its input adds every element to
    an accumulator in the same stage, so only accumulators cross.
    """

    def __init__(self, fn: beam.CombineFn):
        super().__init__()
        self.fn = fn

    def expand(self, pcolls):
        inputs = list(pcolls) if isinstance(pcolls, (tuple, list)) else [pcolls]
        if not inputs:
            raise ValueError("CombineToOne needs at least one PCollection")
        names = [""] if len(inputs) == 1 else [str(i) for i in range(len(inputs))]
        partials = [
            pcoll
            | f"Key{name}" >> beam.Map(lambda element: (_KEY, element))
            | f"Accumulate{name}" >> beam.CombinePerKey(_PartialFn(self.fn))
            for name, pcoll in zip(names, inputs)
        ]
        seed = inputs[0].pipeline | "Seed" >> beam.Create([(_KEY, SEED)])
        return (
            (*partials, seed)
            | "WithSeed" >> beam.Flatten()
            | "Combine" >> beam.CombinePerKey(_MergeFn(self.fn))
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
