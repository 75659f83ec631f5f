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


class _SeededCombineFn(beam.CombineFn):
    """`fn` with the seed element ignored."""

    def __init__(self, fn: beam.CombineFn):
        self.fn = fn

    def create_accumulator(self):
        return self.fn.create_accumulator()

    def add_input(self, accumulator, element):
        if element is SEED or isinstance(element, _Seed):
            return accumulator
        return self.fn.add_input(accumulator, element)

    def merge_accumulators(self, accumulators):
        return self.fn.merge_accumulators(accumulators)

    def compact(self, accumulator):
        return self.fn.compact(accumulator)

    def extract_output(self, accumulator):
        return self.fn.extract_output(accumulator)


class CombineToOne(beam.PTransform):
    """`pcoll` combined by `fn` into a PCollection of exactly one value, even when `pcoll` is empty."""

    def __init__(self, fn: beam.CombineFn):
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        keyed = pcoll | "Key" >> beam.Map(lambda element: (_KEY, element))
        seed = pcoll.pipeline | "Seed" >> beam.Create([(_KEY, SEED)])
        return (
            (keyed, seed)
            | "WithSeed" >> beam.Flatten()
            | "Combine" >> beam.CombinePerKey(_SeededCombineFn(self.fn))
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
