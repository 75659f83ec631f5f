"""pipelines/portable.py on FnApiRunner and on a real two-worker Dask cluster.

Each workaround must give the same, right answer on both runners. The `test_dask_gap_*` tests
pin down what Beam 2.77's DaskRunner gets wrong with the plain construct; when one starts to
fail, Beam fixed that gap and the workaround (and its line in portable.py) can go.
"""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pytest

from pipelines import portable
from tests.beam_util import run_and_collect

pytestmark = pytest.mark.slow

FNAPI = ["--runner=FnApiRunner"]


@pytest.fixture(params=["fnapi", "dask"])
def flags(request):
    if request.param == "fnapi":
        return FNAPI
    return request.getfixturevalue("dask_cluster").beam_flags


class _Parity(beam.DoFn):
    def process(self, x):
        if x % 2:
            yield beam.pvalue.TaggedOutput("odd", x)
        else:
            yield x


class _CountInFinishBundle(beam.DoFn):
    def start_bundle(self):
        self.n = 0

    def process(self, x):
        self.n += 1

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        yield WindowedValue(self.n, 0, [GlobalWindow()])


def test_par_do_with_outputs_splits_tags(flags):
    def build(p):
        out = p | beam.Create(range(7)) | portable.ParDoWithOutputs(_Parity(), "odd", main="even")
        return {"even": out["even"], "odd": out["odd"]}

    assert run_and_collect(build, flags) == {"even": [0, 2, 4, 6], "odd": [1, 3, 5]}


def test_partition(flags):
    def build(p):
        parts = p | beam.Create(range(7)) | portable.Partition(lambda x, n: x % n, 3)
        return {f"p{i}": part for i, part in enumerate(parts)}

    assert run_and_collect(build, flags) == {"p0": [0, 3, 6], "p1": [1, 4], "p2": [2, 5]}


@pytest.mark.parametrize("encoded", [False, True])
def test_batch_by_size_keeps_every_element_and_bounds_batches(flags, encoded):
    sizes = {f"k{i:03d}": 1 + i % 5 for i in range(300)}  # > 128 elements: several Dask partitions

    def build(p):
        batches = (
            p
            | beam.Create(sorted(sizes.items()))
            | portable.BatchBySize(max_size=10, size_fn=lambda kv: kv[1], key_fn=lambda kv: kv[0], shards=4, encoded=encoded)
        )
        return {"batches": batches}

    batches = run_and_collect(build, flags)["batches"]
    assert sorted(kv for batch in batches for kv in batch) == sorted(sizes.items())
    assert all(sum(s for _, s in batch) <= 10 for batch in batches)
    assert sum(1 for batch in batches if sum(s for _, s in batch) <= 5) <= 4  # only each shard's last can be small


def test_group_encoded_gives_what_co_group_by_key_gives(flags):
    import numpy as np

    # Keys a bucket's records must keep apart: non-ASCII, one that prefixes another, the empty key;
    # and an empty value.
    odd = ["k\u00e9\u6f22", "k\u00e9", ""]
    words = [(f"k{i % 7}", f"w{i}") for i in range(200)] + [(key, f"o{i}") for i, key in enumerate(odd)] + [("k1", "")]
    arrays = [(f"k{i % 5}", np.arange(i, dtype=np.float32)) for i in range(0, 40, 3)]
    upper = (lambda s: s.upper().encode(), lambda b: b.decode().lower())  # a codec of one tag's own

    def build(p):
        inputs = {"words": p | "Words" >> beam.Create(words), "arrays": p | "Arrays" >> beam.Create(arrays),
                  "none": p | "None" >> beam.Create([]).with_output_types(tuple[str, int])}
        mine = inputs | "Mine" >> portable.GroupEncoded({"words": upper})
        theirs = inputs | "Theirs" >> beam.CoGroupByKey()
        # A tag naming several PCollections groups them as their Flatten would.
        halves = (p | "Early" >> beam.Create(words[:90]), p | "Late" >> beam.Create(words[90:]))
        parts = {**inputs, "words": halves} | "Parts" >> portable.GroupEncoded({"words": upper})
        # Few buckets: most buckets hold several keys, which the step after the shuffle parts.
        crowded = inputs | "Crowded" >> portable.GroupEncoded({"words": upper}, buckets=2)

        def canonical(kv):
            key, groups = kv
            return json.dumps([key, sorted(groups["words"]), sorted(a.tolist() for a in groups["arrays"]), list(groups["none"])])

        return {"mine": mine | "M" >> beam.Map(canonical), "theirs": theirs | "T" >> beam.Map(canonical),
                "parts": parts | "P" >> beam.Map(canonical), "crowded": crowded | "C" >> beam.Map(canonical)}

    out = run_and_collect(build, flags)
    assert out["mine"] == out["theirs"] == out["parts"] == out["crowded"]
    assert len(out["mine"]) == 10  # k0..k6 and the odd keys; k0..k4 also have arrays


def test_group_encoded_refuses_keys_it_cannot_record():
    with pytest.raises(TypeError, match="str keys; 'numbers' has a int key"):
        with beam.Pipeline("FnApiRunner") as p:
            _ = {"numbers": p | beam.Create([(1, "a")])} | portable.GroupEncoded()
    with pytest.raises(ValueError, match="buckets must be positive"):
        portable.GroupEncoded(buckets=0)
    with pytest.raises(ValueError, match="str or bytes keys, not int"):
        portable.GroupEncoded(key_type=int)


def test_group_encoded_by_bytes_keys(flags):
    pairs = [(bytes([i % 5, 0, 255]), i) for i in range(60)] + [(b"", -1)]

    def build(p):
        grouped = {"n": p | beam.Create(pairs)} | portable.GroupEncoded(key_type=bytes, buckets=3)
        return {"out": grouped | beam.Map(lambda kv: (kv[0].hex(), sorted(kv[1]["n"])))}

    expected = {}
    for key, n in pairs:
        expected.setdefault(key.hex(), []).append(n)
    assert sorted(run_and_collect(build, flags)["out"]) == sorted(expected.items())


def test_group_encoded_per_bucket_gives_buckets_of_the_same_groups(flags):
    """per_bucket=True: one element per bucket, iterating to the groups the default gives one by
    one; `values(tag)` gives a tag's values of every key of the bucket (how a summary folds them)."""
    pairs = [(f"k{i % 9}", i) for i in range(50)]

    def build(p):
        inputs = {"n": p | "N" >> beam.Create(pairs), "m": p | "M" >> beam.Create([("k1", "x")])}
        buckets = inputs | "Buckets" >> portable.GroupEncoded(buckets=4, per_bucket=True)
        one_by_one = inputs | "Groups" >> portable.GroupEncoded(buckets=4)

        def canonical(kv):
            return kv[0], sorted(kv[1]["n"]), kv[1]["m"]

        return {
            "from_buckets": buckets | "Each" >> beam.FlatMap(lambda bucket: bucket) | "C1" >> beam.Map(canonical),
            "groups": one_by_one | "C2" >> beam.Map(canonical),
            "buckets": buckets | "Sizes" >> beam.Map(lambda bucket: (len(bucket), sorted(bucket.values("n")))),
        }

    out = run_and_collect(build, flags)
    assert out["from_buckets"] == out["groups"]
    assert [key for key, _, _ in out["groups"]] == [f"k{i}" for i in range(9)]
    assert 1 <= len(out["buckets"]) <= 4 and sum(keys for keys, _ in out["buckets"]) == 9
    assert sorted(n for _, values in out["buckets"] for n in values) == list(range(50))


def test_group_encoded_and_encoded_batches_shuffle_bytes():
    """What the runner holds between the steps is bytes values, whatever the elements are."""
    p = beam.Pipeline()
    keyed = p | "Create" >> beam.Create([("a", {"x": 1})])
    _ = {"one": keyed} | "G" >> portable.GroupEncoded()
    _ = keyed | "B" >> portable.BatchBySize(max_size=2, size_fn=lambda e: 1, key_fn=lambda e: e[0], encoded=True)
    grouped = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.GroupByKey):
                grouped[node.full_label] = node.inputs[0].element_type

    p.visit(Visitor())
    from apache_beam.typehints import typehints as th

    # Values reach a grouping as bytes records keyed by bucket or shard (and, on runners that lift
    # combiners, packed into one blob per key and bundle before the shuffle); GroupEncoded's final
    # grouping takes each input's packed blobs.
    assert grouped == {"G/Pack[one]/GroupByKey": th.Tuple[int, bytes], "G/Group": th.Tuple[int, th.List[bytes]],
                       "B/Group/GroupByKey": th.Tuple[int, bytes]}


def test_smallest_by_key(flags):
    def build(p):
        items = p | beam.Create(["d", "a", "c", "b", "e"])
        return {"first3": items | "Three" >> portable.SmallestByKey(3, key=lambda s: s),
                "none": items | "Empty" >> beam.Filter(lambda s: False) | "OfEmpty" >> portable.SmallestByKey(3, key=lambda s: s)}

    assert run_and_collect(build, flags) == {"first3": ["a", "b", "c"], "none": []}


def test_after_all_waits_for_every_branch_and_write_json(flags, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    def touch(x):
        (marks / str(x)).write_text("done")
        return x

    def build(p):
        a = p | "A" >> beam.Create([1, 2]) | "SinkA" >> beam.Map(touch)
        b = p | "B" >> beam.Create([3]) | "SinkB" >> beam.Map(touch)
        empty = p | "C" >> beam.Create([])
        count = (a, b, empty) | portable.AfterAll()
        written = count | portable.WriteJson(str(tmp_path / "count.json"))
        return {"count": count, "written": written}

    got = run_and_collect(build, flags)
    assert got["count"] == [3]
    assert sorted(p.name for p in marks.iterdir()) == ["1", "2", "3"]
    assert json.loads((tmp_path / "count.json").read_text()) == 3
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("beam-temp*"))


def test_dangling_transforms_names_unjoined_sinks():
    p = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(FNAPI))
    x = p | beam.Create([1])
    x | "SideSink" >> beam.Map(lambda v: v)
    x | "Last" >> beam.Map(lambda v: v)
    assert portable.dangling_transforms(p) == ["SideSink"]
    q = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(FNAPI))
    y = q | beam.Create([1])
    (y | "S1" >> beam.Map(lambda v: v), y | "S2" >> beam.Map(lambda v: v)) | portable.AfterAll()
    assert portable.dangling_transforms(q) == []


def test_finish_bundle_output_is_refused():
    fn = portable._TagAsValueFn(_CountInFinishBundle(), "main")
    fn.start_bundle()
    with pytest.raises(ValueError, match="finish_bundle"):
        fn.finish_bundle()


# What Beam 2.77's DaskRunner does with the plain constructs (canaries: see the module docstring).


def test_dask_gap_tagged_outputs_reach_every_consumer(dask_cluster):
    def build(p):
        out = p | beam.Create(range(4)) | beam.ParDo(_Parity()).with_outputs("odd", main="even")
        return {"even": out.even}

    assert run_and_collect(build, FNAPI) == {"even": [0, 2]}
    assert run_and_collect(build, dask_cluster.beam_flags) == {"even": [0, 1, 2, 3]}


def test_dask_gap_finish_bundle_output_is_dropped(dask_cluster):
    def build(p):
        items = p | beam.Create(range(5))
        return {"counted": items | beam.ParDo(_CountInFinishBundle()),
                "batched": items | beam.BatchElements(min_batch_size=2, max_batch_size=2) | beam.Map(sorted)}

    assert run_and_collect(build, FNAPI) == {"counted": [5], "batched": [[0, 1], [2, 3], [4]]}
    assert run_and_collect(build, dask_cluster.beam_flags) == {"counted": [], "batched": [[0, 1], [2, 3]]}


def test_dask_gap_only_the_last_step_runs(dask_cluster, tmp_path):
    def build(p):
        p | "Early" >> beam.Create(["x"]) | "EarlySink" >> beam.io.WriteToText(str(tmp_path / "early"))
        return {"last": p | "Late" >> beam.Create([1])}

    assert run_and_collect(build, dask_cluster.beam_flags) == {"last": [1]}
    assert list(tmp_path.iterdir()) == []


def test_dask_gap_impulse_and_read_do_not_translate(dask_cluster, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("a\nb\n")
    try:
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'map'"):
            run_and_collect(lambda p: {"lines": p | beam.io.ReadFromText(str(path))}, dask_cluster.beam_flags)
    finally:  # the runner made its Client before failing and kept it
        import distributed

        distributed.default_client().close()
    # The runner-neutral form: the paths as a Create, then a ReadAll transform.
    got = run_and_collect(lambda p: {"lines": p | beam.Create([str(path)]) | beam.io.ReadAllFromText()}, dask_cluster.beam_flags)
    assert got == {"lines": ["a", "b"]}
