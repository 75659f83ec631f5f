"""Does one item shard's work spread over a two-worker Dask cluster? CPU seconds per worker.

    python benchmarks/dask_balance.py [--clips 1000] [--repeats 3] [--beam_too]

Runs the extraction of benchmarks/compare.py's one-second clips (log-mel + MFCC, its parameters)
with `--item_shards=1`, so every item is on one shuffle key and only the Reshuffle after the
batching (pipelines/extract.py, "SpreadBatches") can spread the work, on a real cluster of two
single-threaded workers (tests/dask_cluster.py). For each run it prints each worker's CPU
seconds (user + system of the worker process and of its reaped children, the decoder child
included; `resource.getrusage` through `Client.run`), the larger over the smaller, and the
medians over repeats. Target (issue 23): within 25% of each other (ratio <= 1.25).
`--beam_too` interleaves the same runs on Beam's own DaskRunner, whose Reshuffle does nothing.
CPU seconds, not wall time: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATUREBEAM = "featurebeam's DaskRunner"
BEAM = "Beam's DaskRunner"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the children it has reaped."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_once(cluster, *, corpus: Path, config: Path, output: Path, run_id: str, runner: str) -> tuple[dict[str, float], float]:
    """One extraction; ({worker name: CPU s it spent}, wall s)."""
    from pipelines import extract, runners

    with cluster.client() as client:
        names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
        before = client.run(cpu_seconds)
        flags = ["--runner=" + (runners.BEAM_DASK_RUNNER if runner == BEAM else "DaskRunner"), f"--dask_client_address={cluster.address}"]
        start = time.perf_counter()
        extract.run([f"--dataset={corpus}", f"--config={config}", "--features=logmel,mfcc", f"--output={output}",
                     f"--run_id={run_id}", "--item_shards=1", "--progress=none", "--no_report", *flags])
        wall = time.perf_counter() - start
        after = client.run(cpu_seconds)
    return {names[address]: after[address] - before[address] for address in after}, wall


def main() -> None:
    from benchmarks.compare import FEATURES_YAML, make_corpora
    from tests.dask_cluster import dask_cluster_at

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000, help="one-second clips (default 1000: four batches of 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam_too", action="store_true", help="also run on Beam's own DaskRunner (slow: ~30,000 tasks)")
    parser.add_argument("--corpus_dir", default=os.path.join(tempfile.gettempdir(), "featurebeam-bench-corpora"))
    args = parser.parse_args()

    corpus = make_corpora(Path(args.corpus_dir), long_files=4, long_minutes=0.25, clips=args.clips)["clips"]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start (a shared machine: CPU seconds, not wall)")
    print(f"corpus: {args.clips} one-second clips, --item_shards=1, two single-threaded Dask workers")
    contenders = [FEATUREBEAM, BEAM] if args.beam_too else [FEATUREBEAM]
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as work, dask_cluster_at(Path(work)) as cluster:
        config = Path(work) / "features.yaml"
        config.write_text(FEATURES_YAML)
        for repeat in range(args.repeats):
            for name in contenders:  # interleaved, so drifting load hits both alike
                cpu, wall = run_once(cluster, corpus=corpus, config=config, output=Path(work) / "runs",
                                     run_id=f"{'b' if name == BEAM else 'f'}{repeat}", runner=name)
                ratio = max(cpu.values()) / max(1e-9, min(cpu.values()))
                ratios[name].append(ratio)
                shown = ", ".join(f"{worker} {seconds:.1f} s" for worker, seconds in sorted(cpu.items()))
                print(f"  #{repeat} {name}: CPU {shown}; larger/smaller {ratio:.2f}; wall {wall:.1f} s", flush=True)
    for name, found in ratios.items():
        print(f"{name}: median larger/smaller worker CPU {statistics.median(found):.2f} over {len(found)} run(s) "
              f"(spread {min(found):.2f} to {max(found):.2f}; target <= 1.25)")


if __name__ == "__main__":
    main()
