"""featurebeam's Dask runner: Beam's DaskRunner, with the partitioning and DoFn life cycle a cluster needs.

`--runner=DaskRunner` resolves to `DaskRunner` here (pipelines/runners.py). It runs the same graph
as Beam 2.77's `apache_beam.runners.dask.dask_runner.DaskRunner`, with the same results, including
what pipelines/portable.py works around (finish_bundle output dropped, tagged outputs reaching
every consumer, only the last step computed): the graph must stay valid on Beam's own runner. It
changes only how the graph becomes Dask tasks:

* **Partitions.** Beam turns a GroupByKey into `dask.bag.groupby(shuffle="tasks")`, which keeps (or
  rounds up) its input's partition count, and a Flatten into `dask.bag.concat`, which adds them
  up; each shuffle then costs about partitions x log(partitions) tasks. featurebeam's graph made
  34,754 tasks for 300 clips. Here every shuffle gives `parallelism` partitions (two per worker
  thread the scheduler has, or `--dask_npartitions`), from at most `parallelism` split tasks: a
  few hundred tasks for the whole run.
* **Reshuffle.** Beam's is a no-op, so work grouped onto one key (one item shard) stays in one
  task on one worker. Here it deals the elements round robin over `parallelism` partitions, and
  partition j of it and of the ParDos after it is meant for worker j mod workers (a loose
  restriction: another worker may take it when that one is gone or busy). Dask's scheduler
  would otherwise run them all where their input is and count on work stealing, which does not
  move tasks of unknown or short duration (8 of 8 stayed on one worker for 10 ms tasks).
* **DoFn set-up.** Beam sets up and tears down a DoFn for every partition (a decoder child process,
  extractors and filter banks per task). Here a set-up DoFn is kept per worker process and reused
  by the run's later partitions, one at a time per thread; it is torn down when the run ends (or
  after `_IDLE_RUN_S` unused, or when the worker exits).
* **Combiner lifting.** Beam's translation runs a CombinePerKey as a GroupByKey and then adds every
  value of a key in one task. Here each partition folds its values into one accumulator per key
  before the shuffle, as FnApiRunner and Dataflow do, so the task after it holds a few
  accumulators, not the run's values.
* **Streaming.** A step's outputs are yielded as each element is processed, so steps Dask fuses
  into one task pass elements along instead of each building a list of its partition's outputs.

Only Create, ParDo, GroupByKey, Flatten and Reshuffle are translated, as in Beam's runner.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import operator
import threading
import time
import pickle
import uuid
import zlib
from typing import Any, Callable, Iterable, Iterator

import apache_beam
from apache_beam import DoFn, pvalue
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import overrides as beam_overrides
from apache_beam.runners.dask import transform_evaluator as beam_ops
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.windowed_value import WindowedValue

# Partitions per worker thread after a shuffle: more than one, so that an uneven partition or a
# busy worker leaves others to steal.
PARTITIONS_PER_THREAD = 2
# A worker tears down the set-up DoFns of a run not heard of for this long (a launcher that died
# before its run's end could tear them down).
_IDLE_RUN_S = 600.0


# ---------------------------------------------------------------------------------------------
# set-up DoFns kept per worker process


class _Receivers(dict):
    """Tag -> receiver; every receiver appends to one list, which the bundle drains as it goes.

    What lands in `values` is what Beam's runner puts in a partition: a main output's value, a
    tagged output as `TaggedOutput(tag, WindowedValue)`."""

    def __init__(self):
        super().__init__()
        self.values: list[Any] = []

    def __missing__(self, tag):
        receiver = self[tag] = beam_ops.TaggingReceiver(tag, self.values)
        return receiver


class _SetUp:
    """One DoFn's invoker, set up, with the receivers it outputs to."""

    def __init__(self, step: "_Step"):
        from pipelines import runners

        # Beam inspects a DoFn's methods for state and timer parameters about 30 ms a DoFn, twice
        # here: 5.0 of 23.7 CPU s of a worker's tasks for 1,000 clips (cProfile), once per class.
        runners.cache_dofn_specs()
        self.receivers = _Receivers()
        handler = _OutputHandler(
            window_fn=step.window_fn,
            main_receivers=self.receivers[None],
            tagged_receivers=self.receivers,
            per_element_output_counter=None,
            output_batch_converter=None,
            process_yields_batches=False,
            process_batch_yields_elements=False,
        )
        self.invoker = DoFnInvoker.create_invoker(
            DoFnSignature(step.fn),
            handler,
            context=DoFnContext(step.label, state=None),
            side_inputs=step.side_inputs,
            input_args=step.args,
            input_kwargs=step.kwargs,
            user_state_context=None,
            bundle_finalizer_param=DoFn.BundleFinalizerParam(),
        )
        self.invoker.invoke_setup()

    def drain(self) -> list[Any]:
        values = self.receivers.values
        out = [value.value for value in values]  # as Beam's runner: main values unwrapped, tagged kept
        values.clear()
        return out

    def teardown(self) -> None:
        try:
            self.invoker.invoke_teardown()
        except Exception:  # teardown is best effort, as on every Beam runner
            pass


_LOCK = threading.Lock()
_IDLE: dict[tuple[str, str], list[_SetUp]] = collections.defaultdict(list)  # (run, step) -> idle set-ups
_LAST_SEEN: dict[str, float] = {}  # run -> when one of its bundles last started here
SETUPS = collections.Counter()  # (run, step) -> set-ups made in this process (read by tests)


def _checkout(step: "_Step") -> _SetUp:
    now = time.monotonic()
    stale: list[_SetUp] = []
    with _LOCK:
        _LAST_SEEN[step.run] = now
        for run, seen in list(_LAST_SEEN.items()):
            if now - seen > _IDLE_RUN_S:
                stale.extend(_forget(run))
        idle = _IDLE.get((step.run, step.key))
        found = idle.pop() if idle else None
    for setup in stale:
        setup.teardown()
    if found is not None:
        return found
    made = _SetUp(step)
    with _LOCK:
        SETUPS[(step.run, step.key)] += 1
    return made


def _checkin(step: "_Step", setup: _SetUp) -> None:
    with _LOCK:
        if step.run in _LAST_SEEN:  # else the run ended while this bundle ran
            _IDLE[(step.run, step.key)].append(setup)
            return
    setup.teardown()


def _forget(run: str) -> list[_SetUp]:
    """Drop `run`'s idle set-ups from the pool (the caller tears them down, outside the lock)."""
    _LAST_SEEN.pop(run, None)
    found: list[_SetUp] = []
    for key in [key for key in _IDLE if key[0] == run]:
        found.extend(_IDLE.pop(key))
    return found


def end_run(run: str) -> int:
    """Tear down every idle DoFn of `run` in this process; returns how many. Run on each worker
    (`Client.run`) when the run is over."""
    with _LOCK:
        found = _forget(run)
    for setup in found:
        setup.teardown()
    return len(found)


def _end_all() -> None:
    with _LOCK:
        found = [setup for run in list(_LAST_SEEN) for setup in _forget(run)]
    for setup in found:
        setup.teardown()


atexit.register(_end_all)


class _Step:
    """What a ParDo's tasks carry: the DoFn and how to invoke it, named by run and step."""

    def __init__(self, *, run: str, key: str, label: str, fn: DoFn, window_fn, side_inputs, args, kwargs):
        self.run, self.key, self.label = run, key, label
        self.fn, self.window_fn, self.side_inputs, self.args, self.kwargs = fn, window_fn, side_inputs, args, kwargs


_GLOBAL_WINDOWS = (GlobalWindow(),)


def _windowed(item: Any, window_fn) -> WindowedValue:
    """Beam's runner's `get_windowed_value`, without making a GlobalWindow (and its timestamp
    from a proto) for every element: 2.2 of 23.7 CPU s of a worker's tasks for 1,000 clips."""
    if isinstance(item, TaggedOutput):
        item = item.value
    if isinstance(item, WindowedValue):
        return item
    if isinstance(item, TimestampedValue):
        return beam_ops.get_windowed_value(item, window_fn)
    return WindowedValue(item, 0, _GLOBAL_WINDOWS)


def _bundle(items: Iterable[Any], step: _Step) -> Iterator[Any]:
    """One partition through one ParDo, as a bundle: outputs streamed as they are made.

    finish_bundle's outputs are dropped, as Beam's DaskRunner drops them (see the module
    docstring); its side effects happen. A DoFn that raised is torn down, not reused."""
    setup = _checkout(step)
    invoker = setup.invoker
    try:
        invoker.invoke_start_bundle()
        for item in items:
            invoker.invoke_process(_windowed(item, step.window_fn))
            if setup.receivers.values:
                yield from setup.drain()
        invoker.invoke_finish_bundle()
        setup.receivers.values.clear()
    except BaseException:
        setup.teardown()
        raise
    _checkin(step, setup)


# ---------------------------------------------------------------------------------------------
# shuffles


def partition_of(key: Any, n: int) -> int:
    """A partition in [0, n) for a grouping key, the same in every process (unlike hash() of a str)."""
    if type(key) is int:
        return key % n
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        data = key
    else:  # tuples and the like: Beam requires keys whose encoding is deterministic
        data = pickle.dumps(key, protocol=4)
    return zlib.crc32(data) % n


def _split_by_key(partitions: list[Iterable[Any]], n: int, _: int) -> list[list[Any]]:
    pieces: list[list[Any]] = [[] for _ in range(n)]
    for partition in partitions:
        for item in partition:
            pieces[partition_of(item[0], n)].append(item)
    return pieces


def _split_round_robin(partitions: list[Iterable[Any]], n: int, start: int) -> list[list[Any]]:
    pieces: list[list[Any]] = [[] for _ in range(n)]
    index = start
    for partition in partitions:
        for item in partition:
            pieces[index % n].append(item)
            index += 1
    return pieces


def _join_groups(pieces: list[list[Any]]) -> list[tuple[Any, list[Any]]]:
    """One partition of a GroupByKey: (key, values) as Beam's runner gives them (windows dropped)."""
    groups: dict[Any, list[Any]] = {}
    for piece in pieces:
        for key, value in piece:
            found = groups.get(key)
            if found is None:
                found = groups[key] = []
            found.append(beam_ops.defenestrate(value))
    return list(groups.items())


def _join_all(pieces: list[list[Any]]) -> list[Any]:
    return list(itertools.chain.from_iterable(pieces))


def _shuffle(bag, n: int, *, split: Callable, join: Callable, name: str):
    """A bag of `n` partitions: `split(input partitions, n, start)` deals each group of input
    partitions into n pieces, `join(pieces)` makes output partition j of the j-th pieces.

    At most n split tasks (neighbouring input partitions share one), n x splits piece
    selections and n joins: Dask's own task shuffle needs about p x log(p) tasks for p
    partitions, and never fewer output partitions than input ones."""
    import dask.bag as db
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    token = tokenize(bag.name, n, name)
    split_name, piece_name, join_name = f"{name}-split-{token}", f"{name}-piece-{token}", f"{name}-{token}"
    inputs = bag.npartitions
    splits = max(1, min(inputs, n))
    bounds = [round(i * inputs / splits) for i in range(splits + 1)]
    dsk: dict[Any, Any] = {}
    for s in range(splits):
        parts = [(bag.name, i) for i in range(bounds[s], bounds[s + 1])]
        dsk[(split_name, s)] = (split, parts, n, s)
        for j in range(n):
            dsk[(piece_name, s, j)] = (operator.getitem, (split_name, s), j)
    for j in range(n):
        dsk[(join_name, j)] = (join, [(piece_name, s, j) for s in range(splits)])
    graph = HighLevelGraph.from_collections(join_name, dsk, dependencies=[bag])
    return db.Bag(graph, join_name, n)


# ---------------------------------------------------------------------------------------------
# translations


def _name(label: str) -> str:
    """A Dask key prefix from a Beam label (key_split keeps letters, digits and '.')."""
    return "".join(c if c.isalnum() else "." for c in label).strip(".") or "step"


class _ParDo(beam_ops.DaskBagOp):
    """A ParDo as one bundle per partition, with set-up DoFns kept per worker process."""

    def apply(self, input_bag, side_inputs=None):
        transform = self.transform
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(self.applied.main_inputs.values()))
        step = _Step(
            run=self.bag_kwargs["run"],
            key=self.applied.full_label,
            label=transform.label,
            fn=transform.fn,
            window_fn=main_input.windowing.windowfn if hasattr(main_input, "windowing") else None,
            side_inputs=side_inputs,
            args=list(args),
            kwargs=kwargs,
        )
        if input_bag is None:  # no translation for Impulse / Read: fail as Beam's runner does
            return input_bag.map(None)
        import dask.bag as db
        from dask.bag.core import reify
        from dask.highlevelgraph import HighLevelGraph

        # reify makes a task's result a list; Dask's bag optimisation drops the inner ones where it
        # fuses steps into one task, so fused steps pass elements along as generators.
        name = f"{_name(self.applied.full_label)}-{uuid.uuid4().hex}"
        dsk = {(name, i): (reify, (_bundle, (input_bag.name, i), step)) for i in range(input_bag.npartitions)}
        bag = db.Bag(HighLevelGraph.from_collections(name, dsk, dependencies=[input_bag]), name, input_bag.npartitions)
        for i in range(bag.npartitions):
            self.bag_kwargs["placement"].follow((name, i), (input_bag.name, i))
        return bag


class _Flatten(beam_ops.Flatten):
    def apply(self, input_bag, side_inputs=None):
        bag = super().apply(input_bag, side_inputs)
        sources = [key for part in input_bag for key in part.__dask_keys__()]
        for i, source in enumerate(sources):  # dask.bag.concat numbers its inputs' partitions in order
            self.bag_kwargs["placement"].follow((bag.name, i), source)
        return bag


class _GroupByKey(beam_ops.DaskBagOp):
    def apply(self, input_bag, side_inputs=None):
        return _shuffle(input_bag, self.bag_kwargs["parallelism"], split=_split_by_key, join=_join_groups,
                        name=_name(self.applied.full_label))


class _Reshuffle(beam_ops.DaskBagOp):
    """Deals the elements round robin over `parallelism` partitions (Beam's runner: a no-op), each
    meant for one worker."""

    def apply(self, input_bag, side_inputs=None):
        bag = _shuffle(input_bag, self.bag_kwargs["parallelism"], split=_split_round_robin, join=_join_all,
                       name=_name(self.applied.full_label))
        placement: Placement = self.bag_kwargs["placement"]
        for j in range(bag.npartitions):
            placement.place((bag.name, j), j)
        return bag


# ---------------------------------------------------------------------------------------------
# combiner lifting


class _PartialCombine(apache_beam.PTransform):
    """The lifted half of a CombinePerKey: each partition's `(key, value)`s folded into one
    `(key, accumulator)` per key, before the shuffle. A primitive here (`_PartialCombineOp`)."""

    def __init__(self, fn: apache_beam.CombineFn):
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)


class _MergeAccumulatorsFn(DoFn):
    """`(key, [accumulators])` -> `(key, fn's output)`: the combine's half after the shuffle."""

    def __init__(self, fn: apache_beam.CombineFn):
        self.fn = fn

    def setup(self):
        self.fn.setup()

    def process(self, element):
        key, accumulators = element
        yield key, self.fn.extract_output(self.fn.merge_accumulators(accumulators))

    def teardown(self):
        self.fn.teardown()


class _LiftedCombinePerKey(apache_beam.PTransform):
    """CombinePerKey as Dataflow and FnApiRunner run it: partial combine, shuffle, merge."""

    def __init__(self, fn: apache_beam.CombineFn):
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        return (
            pcoll
            | "Partial" >> _PartialCombine(self.fn)
            | "Group" >> apache_beam.GroupByKey()
            | "Merge" >> apache_beam.ParDo(_MergeAccumulatorsFn(self.fn))
        )


def _lift_combiners():
    """The override that lifts every CombinePerKey without side inputs.

    Beam's DaskRunner expands a CombinePerKey into GroupByKey + CombineValues, so the task after the
    shuffle holds every value of its keys at once (the run's per-batch statistics accumulators,
    say: a worker's memory grew with the dataset). Lifted, each partition sends at most one
    accumulator per key through the shuffle. The graph is unchanged: this is how the runner
    executes it, as FnApiRunner and Dataflow do."""
    from apache_beam.pipeline import PTransformOverride

    class LiftCombinePerKey(PTransformOverride):
        def matches(self, applied_ptransform: AppliedPTransform) -> bool:
            transform = applied_ptransform.transform
            return (
                transform.__class__ == apache_beam.CombinePerKey
                and not transform.args and not transform.kwargs and not transform.side_inputs
            )

        def get_replacement_transform_for_applied_ptransform(self, applied_ptransform: AppliedPTransform):
            return _LiftedCombinePerKey(applied_ptransform.transform.fn)

    return LiftCombinePerKey()


_MISSING = object()


def _partial_combine(items: Iterable[Any], fn: apache_beam.CombineFn) -> list[tuple[Any, Any]]:
    fn.setup()
    try:
        accumulators: dict[Any, Any] = {}
        for key, value in items:
            found = accumulators.get(key, _MISSING)
            if found is _MISSING:
                found = fn.create_accumulator()
            accumulators[key] = fn.add_input(found, beam_ops.defenestrate(value))
        return [(key, fn.compact(accumulator)) for key, accumulator in accumulators.items()]
    finally:
        fn.teardown()


class _PartialCombineOp(beam_ops.DaskBagOp):
    def apply(self, input_bag, side_inputs=None):
        bag = input_bag.map_partitions(_partial_combine, self.transform.fn)
        for i in range(bag.npartitions):
            self.bag_kwargs["placement"].follow((bag.name, i), (input_bag.name, i))
        return bag


class Placement:
    """Which worker each placed task is meant for: partition j of a Reshuffle goes to worker
    j mod workers, and the partitions made from it step by step (ParDos, Flattens) follow it up
    to the next shuffle.

    Sent to the scheduler as the `workers` annotation, which it calls with each task's key
    (a task Dask fuses from several steps has the key of the last one, placed too);
    `allow_other_workers` makes it a preference."""

    def __init__(self, workers: list[str]):
        self.workers = workers
        self.by_key: collections.defaultdict = collections.defaultdict(list)  # key -> [address]; [] for the rest

    def place(self, key: tuple, partition: int) -> None:
        if self.workers:
            self.by_key[key] = [self.workers[partition % len(self.workers)]]

    def follow(self, key: tuple, source: tuple) -> None:
        """Place `key` where `source` is placed, if it is."""
        found = self.by_key.get(source)
        if found:
            self.by_key[key] = found

    def follow_fusion(self, collections_: Iterable[Any]) -> None:
        """Place the tasks Dask's optimisation fused: a chain of steps becomes one task under a new
        key, and the last step's key an alias of it; the new task goes where the last step was meant
        to."""
        from dask._task_spec import Alias

        for collection in collections_:
            for key, task in dict(collection.__dask_graph__()).items():
                if isinstance(task, Alias):
                    self.follow(task.target, key)

    def annotation(self):
        # A bound method of a plain dict: the scheduler unpickles it without importing featurebeam.
        return self.by_key.__getitem__


TRANSLATIONS = {
    **beam_ops.TRANSLATIONS,
    apache_beam.ParDo: _ParDo,
    beam_overrides._Flatten: _Flatten,
    beam_overrides._GroupByKeyOnly: _GroupByKey,
    beam_overrides._Reshuffle: _Reshuffle,
    _PartialCombine: _PartialCombineOp,
}


class _BagVisitor(PipelineVisitor):
    """Beam's DaskBagVisitor with featurebeam's translations (and the run's settings for them)."""

    def __init__(self, bag_kwargs: dict):
        self.bag_kwargs = bag_kwargs
        self.bags: dict[AppliedPTransform, Any] = collections.OrderedDict()

    def visit_transform(self, transform_node: AppliedPTransform) -> None:
        op = TRANSLATIONS.get(transform_node.transform.__class__, beam_ops.NoOp)(transform_node, bag_kwargs=self.bag_kwargs)
        kwargs: dict[str, Any] = {"input_bag": None, "side_inputs": None}
        inputs = list(transform_node.inputs)
        if inputs:
            bags = []
            for value in inputs:
                if isinstance(value, pvalue.PBegin):
                    bags.append(None)
                if value.producer in self.bags:
                    bags.append(self.bags[value.producer])
            kwargs["input_bag"] = bags[0] if len(bags) == 1 and not isinstance(op, beam_ops.Flatten) else bags
        if transform_node.side_inputs:
            kwargs["side_inputs"] = [
                SideInputMap(type(si), si._view_options(),
                             beam_ops.DaskBagWindowedIterator(self.bags.get(si.pvalue.producer), si._window_mapping_fn))
                for si in transform_node.side_inputs
            ]
        self.bags[transform_node] = op.apply(**kwargs)


class DaskRunnerResult(beam_dask.DaskRunnerResult):
    """Beam's result; when the run is over (done, failed or cancelled), each worker tears down its
    set-up DoFns of the run."""

    def __init__(self, client, futures, run: str):
        super().__init__(client, futures)
        self.run = run

    def _end(self) -> None:
        try:
            self.client.run(end_run, self.run)
        except Exception:  # a worker gone or a client closed: its DoFns went with it
            pass

    def wait_until_finish(self, duration=None):
        try:
            state = super().wait_until_finish(duration)
        except BaseException:
            self._end()
            raise
        if self.state == beam_dask.PipelineState.DONE:
            self._end()
        return state

    def cancel(self):
        state = super().cancel()
        self._end()
        return state


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner with featurebeam's translations (see the module docstring).

    Flags as Beam's: `--dask_client_address` (else a LocalCluster in this process), and
    `--dask_npartitions`, which here also sets the partitions after every shuffle."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        threads = client.ncores()
        parallelism = bag_kwargs.get("npartitions") or PARTITIONS_PER_THREAD * max(1, sum(threads.values()))
        run = uuid.uuid4().hex
        placement = Placement(sorted(threads))
        pipeline.replace_all([_lift_combiners(), *beam_overrides.dask_overrides()])
        visitor = _BagVisitor({**bag_kwargs, "parallelism": parallelism, "run": run, "placement": placement})
        pipeline.visit(visitor)
        # As Beam's runner: only the last bag is computed (with what it depends on).
        graph = dask.optimize(list(visitor.bags.values())[-1])
        placement.follow_fusion(graph)
        with dask.annotate(workers=placement.annotation(), allow_other_workers=True):
            futures = client.compute(graph, optimize_graph=False)  # optimised above
        return DaskRunnerResult(client, futures, run)
