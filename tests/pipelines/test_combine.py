"""pipelines/combine.py: CombineToOne of one or several PCollections, on FnApiRunner and Dask."""

from __future__ import annotations

import apache_beam as beam
import pytest

from datasets.base import FingerprintFn
from pipelines import combine
from pipelines.combine import CombineToOne, JoinSingletons
from tests.beam_util import run_and_collect

FNAPI = ["--runner=FnApiRunner"]


@pytest.fixture(params=["fnapi", pytest.param("dask", marks=pytest.mark.slow)])
def flags(request):
    if request.param == "fnapi":
        return FNAPI
    return request.getfixturevalue("dask_cluster").beam_flags


def _sum():
    return beam.transforms.core.CallableWrapperCombineFn(sum)


def test_combines_one_input_and_gives_the_default_for_an_empty_one(flags):
    def build(p):
        numbers = p | "Numbers" >> beam.Create([1, 2, 3, 4])
        empty = p | "Empty" >> beam.Create([]) | "Odd" >> beam.Filter(lambda x: x % 2)
        return {"sum": numbers | "Sum" >> CombineToOne(_sum()), "empty": empty | "SumEmpty" >> CombineToOne(_sum())}

    got = run_and_collect(build, flags)
    assert got == {"sum": [10], "empty": [0]}


def test_several_inputs_combine_as_their_flatten_would(flags):
    def build(p):
        a = p | "A" >> beam.Create(list(range(10)))
        b = p | "B" >> beam.Create(list(range(100, 103)))
        none = p | "None" >> beam.Create([0]) | "Drop" >> beam.Filter(lambda x: x > 0)
        return {
            "sum": (a, b, none) | "Sum" >> CombineToOne(_sum()),
            "flat": (a, b, none) | "Flat" >> beam.Flatten() | "SumFlat" >> CombineToOne(_sum()),
            "none": (none, none) | "SumNone" >> CombineToOne(_sum()),
        }

    got = run_and_collect(build, flags)
    assert got == {"sum": [45 + 303], "flat": [45 + 303], "none": [0]}


def test_a_fingerprint_of_two_inputs_equals_that_of_their_union():
    from datasets.base import AudioItem

    items = [AudioItem(key=f"k{i}", uri=f"/a/{i}.wav", label="x") for i in range(6)]

    def build(p):
        first = p | "First" >> beam.Create(items[:4])
        second = p | "Second" >> beam.Create(items[4:])
        whole = p | "Whole" >> beam.Create(items)
        return {
            "joined": {
                "parts": (first, second) | "Parts" >> CombineToOne(FingerprintFn()),
                "whole": whole | "All" >> CombineToOne(FingerprintFn()),
            } | JoinSingletons()
        }

    (joined,) = run_and_collect(build, FNAPI)["joined"]
    assert joined["parts"] == joined["whole"] and joined["whole"]["listed"] == 6


def test_elements_meet_the_combiner_before_any_flatten():
    """Only merged accumulators and the seed are flattened: a Flatten of the elements themselves
    would be held whole in the launcher by FnApiRunner."""
    p = beam.Pipeline()
    a = p | "A" >> beam.Create([1, 2])
    b = p | "B" >> beam.Create([3])
    (a, b) | "Sum" >> CombineToOne(_sum())
    flattens = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.Flatten):
                flattens.append(node)

    p.visit(Visitor())
    assert len(flattens) == 1
    producers = sorted(pc.producer.full_label for pc in flattens[0].inputs)
    assert [label.split("/")[1] for label in producers] == ["Key0", "Key1", "Seed"], producers
    merged = sorted(pc.producer.inputs[0].producer.full_label for pc in flattens[0].inputs if "/Key" in pc.producer.full_label)
    assert [label.split("/")[1] for label in merged] == ["MergeShards0", "MergeShards1"], merged


class _Batch:
    """A batch of numbers (a type no combiner accumulates, so a test can tell it from an accumulator)."""

    def __init__(self, numbers):
        self.numbers = list(numbers)


def test_without_combiner_lifting_only_accumulators_are_grouped():
    """As on Beam's DaskRunner, which lifts no combiner: every grouping of CombineToOne receives
    accumulators, one per input batch at the first level, at most one per shard at the last."""
    from tests.groupings import unlifted_groupings

    batches = [_Batch(range(i * 10, i * 10 + 10)) for i in range(12)]

    def build(p):
        first = p | "First" >> beam.Create(batches[:8])
        second = p | "Second" >> beam.Create(batches[8:])
        return {
            "sum": (first, second) | "Sum" >> CombineToOne(_sum(), inputs=lambda batch: batch.numbers),
            "fingerprint": first | "Fingerprint" >> CombineToOne(FingerprintFn(), inputs=lambda batch: ()),
        }

    with unlifted_groupings() as received:
        got = run_and_collect(build, FNAPI)
    assert got == {"sum": [sum(range(120))], "fingerprint": [FingerprintFn().extract_output((0, 0))]}
    sum_groupings = {name: pairs for name, pairs in received.items() if name.startswith("Sum/")}
    assert sorted(sum_groupings) == ["Sum/Combine/GroupByKey", "Sum/MergeShards0/GroupByKey", "Sum/MergeShards1/GroupByKey"]
    # One accumulator per batch (the sum combiner's is a one-number list), never a batch or a
    # number of it: each batch's own total.
    firsts = sorted(v for _, v in sum_groupings["Sum/MergeShards0/GroupByKey"])
    assert firsts == sorted([sum(b.numbers)] for b in batches[:8])
    assert sorted(v for _, v in sum_groupings["Sum/MergeShards1/GroupByKey"]) == sorted([sum(b.numbers)] for b in batches[8:])
    last = sum_groupings["Sum/Combine/GroupByKey"]
    assert len(last) <= 2 * combine.SHARDS + 1
    assert sum(v[0] for _, v in last if not isinstance(v, combine._Seed)) == sum(range(120))
    for name, pairs in received.items():
        assert not any(isinstance(v, _Batch) for _, v in pairs), name


def test_a_bundles_shard_is_the_same_in_every_process():
    """Dask recomputes the tasks of a killed worker; a shard drawn afresh there would send part of
    a shuffle's elements elsewhere (lost or counted twice). The shard depends on content only, not
    on the process's salted `hash()`."""
    import subprocess
    import sys

    import numpy as np

    from datasets.base import AudioItem

    element = ("bucket", [AudioItem(key=f"k{i}", uri=f"gs://b/{i}.wav") for i in range(3)], {"tags": {"x", "y", "z"}},
               np.arange(5, dtype=np.float32))
    here = combine.content_shard(element, 1 << 30)
    code = (
        "import numpy as np; from datasets.base import AudioItem; from pipelines import combine; "
        "e = ('bucket', [AudioItem(key=f'k{i}', uri=f'gs://b/{i}.wav') for i in range(3)], {'tags': {'x', 'y', 'z'}}, "
        "np.arange(5, dtype=np.float32)); print(combine.content_shard(e, 1 << 30))"
    )
    for seed in ("1", "2", "3"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        assert int(done.stdout) == here
    assert combine.content_shard(("bucket", [AudioItem(key="other", uri="gs://b/o.wav")]), 1 << 30) != here
    assert {combine.content_shard(i, 16) for i in range(200)} == set(range(16))
