"""What crosses each stage boundary of the extraction graph, per listed item, on FnApiRunner.

With FnApiRunner the launcher process is also the runner: every PCollection that leaves a fused
stage (the input of a GroupByKey, or a PCollection read by a later stage) is held there, encoded,
until the stages that read it have run. That is what makes the launcher's memory grow with the
dataset (benchmarks/scale.py), so this counts it: it runs one extraction in this process with
`--direct_num_workers=2 --direct_running_mode=multi_processing` on the scale benchmark's corpus
(0.25 s clips, `--commit_records=16`), records every byte the runner's buffers receive, and prints
per buffer (named by the transform that reads it): elements, bytes, bytes per listed item, and
which buffers were alive together at the largest moment. For each buffer it also prints the
largest single element it received (`largest B`) and that per item of the run.

`--unlifted` runs every combine as Beam's DaskRunner does, which lifts no combiner: a grouping
then receives what its combiner's input is, not one accumulator per bundle. So it shows what each
shuffle carries on such a runner, where the whole graph's summaries must still be accumulators.

    python benchmarks/boundaries.py                 # 10,000 items
    python benchmarks/boundaries.py --items 1000 --top 40
    python benchmarks/boundaries.py --items 1000 --unlifted
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Census:
    """Bytes and elements each runner buffer received, and the live total's peak."""

    def __init__(self):
        self.stats: dict[str, list[int]] = {}  # name -> [elements, bytes, largest element's bytes]
        self.live: dict[int, tuple[str, int]] = {}  # id(buffer) -> (name, bytes held)
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.stage: str | None = None
        self.rss_peak = 0.0
        self.rss_steps: list[tuple[float, str | None, int]] = []

    def add(self, buffer, name: str, elements: int, size: int, largest: int = 0) -> None:
        entry = self.stats.setdefault(name, [0, 0, 0])
        entry[0] += elements
        entry[1] += size
        entry[2] = max(entry[2], largest)
        key = id(buffer)
        if key not in self.live:
            weakref.finalize(buffer, self.live.pop, key, None)
        held = self.live.get(key, (name, 0))[1] + size
        self.live[key] = (name, held)
        total = sum(b for _, b in self.live.values())
        if total > self.peak:
            self.peak = total
            parts: dict[str, int] = {}
            for n, b in self.live.values():
                parts[n] = parts.get(n, 0) + b
            self.peak_parts = parts

    def drop(self, buffer) -> None:
        if id(buffer) in self.live:
            name, _ = self.live[id(buffer)]
            self.live[id(buffer)] = (name, 0)


def _instrument(census: _Census) -> None:
    from apache_beam.coders.coder_impl import create_InputStream
    from apache_beam.runners.portability.fn_api_runner import execution

    def name_of(context, buffer_id: bytes) -> str:
        kind, name = execution.split_buffer_id(buffer_id)
        components = context.execution_context.pipeline_components
        if kind == "group":
            return "shuffle " + components.transforms[name].unique_name
        readers = [
            t.unique_name for t in components.transforms.values() if name in t.inputs.values() and t.unique_name
        ]
        producer = next((t.unique_name for t in components.transforms.values() if name in t.outputs.values()), name)
        return f"from {producer}" + (f" to {readers[0]}" if len(readers) == 1 else f" to {len(readers)} readers")

    original_get_buffer = execution.BundleContextManager.get_buffer

    def get_buffer(self, buffer_id, transform_id):
        buffer = original_get_buffer(self, buffer_id, transform_id)
        if not hasattr(buffer, "census_name") and not buffer_id.startswith(b"timers"):
            buffer.census_name = name_of(self, buffer_id)
        return buffer

    execution.BundleContextManager.get_buffer = get_buffer

    def sizes(coder_impl, data: bytes) -> list[int]:
        """The encoded size of each element in `data`."""
        stream, out = create_InputStream(data), []
        while stream.size() > 0:
            before = stream.size()
            coder_impl.decode_from_stream(stream, True)
            out.append(before - stream.size())
        return out

    original_list_append = execution.ListBuffer.append

    def list_append(self, element: bytes) -> None:
        original_list_append(self, element)
        name = getattr(self, "census_name", None)
        if name is not None:
            each = sizes(self._coder_impl, element)
            census.add(self, name, len(each), len(element), max(each, default=0))

    execution.ListBuffer.append = list_append

    original_list_clear = execution.ListBuffer.clear

    def list_clear(self) -> None:
        census.drop(self)
        original_list_clear(self)

    execution.ListBuffer.clear = list_clear

    original_group_append = execution.GroupingBuffer.append

    def group_append(self, elements_data: bytes) -> None:
        name = getattr(self, "census_name", None)
        original_group_append(self, elements_data)
        if name is not None:
            each = sizes(self._pre_grouped_coder.get_impl(), elements_data)
            census.add(self, name, len(each), len(elements_data), max(each, default=0))

    execution.GroupingBuffer.append = group_append

    from apache_beam.runners.portability.fn_api_runner import fn_runner

    original_execute = fn_runner.FnApiRunner._execute_bundle

    def execute_bundle(self, runner_context, bundle_context_manager, bundle_input):
        census.stage = bundle_context_manager.stage.name
        try:
            return original_execute(self, runner_context, bundle_context_manager, bundle_input)
        finally:
            census.stage = None

    fn_runner.FnApiRunner._execute_bundle = execute_bundle


def _sample_rss(census: _Census, stop: threading.Event) -> None:
    """Every 0.1 s: this process's RSS and the stage the runner is running, kept when RSS grows."""
    while not stop.wait(0.1):
        with open("/proc/self/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        if rss > census.rss_peak:
            census.rss_peak = rss
            census.rss_steps.append((rss, census.stage, sum(b for _, b in census.live.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--work", default="/tmp/featurebeam-scale")
    parser.add_argument("--top", type=int, default=25, help="buffers to print, largest first")
    parser.add_argument("--rss_step", type=float, default=5, help="print the launcher's RSS each time it has grown this many MiB")
    parser.add_argument("--unlifted", action="store_true", help="lift no combiner, as Beam's DaskRunner (see the module doc)")
    args = parser.parse_args()

    from benchmarks.scale import corpus

    data = corpus(Path(args.work), args.items)
    census = _Census()
    _instrument(census)
    from pipelines import extract

    unlifted = contextlib.nullcontext()
    if args.unlifted:
        from tests.groupings import unlifted_combiners

        unlifted = unlifted_combiners()

    out = tempfile.mkdtemp(prefix="boundaries-")
    stop = threading.Event()
    threading.Thread(target=_sample_rss, args=(census, stop), daemon=True).start()
    start = time.monotonic()
    with unlifted:
        extract.run([
            f"--dataset={data}", "--features=logmel", "--sample_rate=8000", f"--output={out}", f"--run_id=b{os.getpid()}",
            "--commit_records=16", "--decode_in_process", "--progress=none", "--no_report",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing",
        ])
    seconds = time.monotonic() - start
    stop.set()
    n = args.items
    rows = sorted(census.stats.items(), key=lambda kv: -kv[1][1])
    total = sum(entry[1] for entry in census.stats.values())
    print(
        f"{n} items in {seconds:.0f} s; launcher peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        + ("; combiners unlifted (as on Beam's DaskRunner)" if args.unlifted else "")
    )
    print(f"{'elements':>9} {'bytes':>11} {'B/item':>7} {'largest B':>10}  buffer (what crosses a stage boundary)")
    for name, (elements, size, largest) in rows[: args.top]:
        print(f"{elements:>9} {size:>11} {size / n:>7.0f} {largest:>10}  {name}")
    print(f"{'':>9} {total:>11} {total / n:>7.0f}  all buffers together ({len(rows)})")
    print(f"largest held at once: {census.peak} bytes ({census.peak / n:.0f} B/item), of which:")
    for name, size in sorted(census.peak_parts.items(), key=lambda kv: -kv[1])[:10]:
        if size:
            print(f"{'':>9} {size:>11} {size / n:>7.0f}  {name}")

    print("launcher RSS as it grew (MiB, the stage running, bytes in the runner's buffers):")
    last = 0.0
    for rss, stage, held in census.rss_steps:
        if rss - last >= args.rss_step:
            print(f"{rss:>9.0f} {held:>11}  {stage or '-'}")
            last = rss


if __name__ == "__main__":
    main()

