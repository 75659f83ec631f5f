"""Peak memory of the busiest Dask worker as the dataset grows: it should stay flat.

For each size (default 1,000 and 8,000 clips of 0.25 s at 8 kHz, benchmarks/scale.py's corpus),
starts a fresh two-worker Dask cluster (tests/dask_cluster.py's `dask_cluster_at`: one scheduler,
two single-threaded workers without nanny), runs one extraction on it from a launcher process,
then asks every worker (`client.run`) for `resource.getrusage`'s `ru_maxrss` of itself
(RUSAGE_SELF) and of its waited-for children (RUSAGE_CHILDREN: the decoder child), and prints
them, the launcher's peak RSS and the wall time. A fresh cluster per size, because ru_maxrss is
a peak over the process's life.

    python benchmarks/dask_memory.py                          # 1,000 and 8,000 clips
    python benchmarks/dask_memory.py --sizes 1000,8000 --code /path/to/checkout   # another checkout (before/after)
    python benchmarks/dask_memory.py --repeat 2               # each size twice, interleaved; medians

`--code` runs the launcher and the workers on another checkout (its tests/dask_cluster.py starts
the cluster with that checkout on PYTHONPATH). Corpora are generated once under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The launcher under test, in its own process: prints its peak RSS and the run's record count.
CHILD = r"""
import json, resource, sys
from pipelines import extract
run = extract.run(sys.argv[1:])
print(json.dumps({
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "records": run["counts"]["records"],
    "listed": run["counts"]["listed"],
    "run_dir": run["outputs"]["run_dir"],
}))
"""


def _worker_rss() -> dict[str, float]:
    import resource

    return {
        "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure(code: Path, data: Path, output: Path, n: int, extra: list[str]) -> dict:
    """One extraction of `data` on a fresh two-worker cluster running `code`; the workers' peaks."""
    sys.path.insert(0, str(code))
    try:
        from tests.dask_cluster import dask_cluster_at
    finally:
        sys.path.remove(str(code))
    logs = Path(tempfile.mkdtemp(prefix="dask-memory-"))
    with dask_cluster_at(logs) as cluster:
        argv = [
            f"--dataset={data}", "--features=logmel", "--sample_rate=8000", f"--output={output}",
            f"--run_id=mem-{n}-{int(time.time() * 1000)}", "--progress=none", "--no_report", *extra, *cluster.flags,
        ]
        env = {**os.environ, "PYTHONPATH": str(code)}
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=code, env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        if done.returncode != 0:
            raise SystemExit(f"extraction failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        with cluster.client() as client:
            workers = client.run(_worker_rss)
    result["wall"] = wall
    result["workers"] = sorted(workers.values(), key=lambda w: -w["self_mb"])
    if result["records"] != n:
        raise SystemExit(f"expected {n} records, the run wrote {result['records']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,8000")
    parser.add_argument("--work", default="/tmp/featurebeam-scale")
    parser.add_argument("--code", default=str(ROOT), help="featurebeam checkout to measure (default: this one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (interleaved); medians are printed")
    parser.add_argument("--decode_in_process", action="store_true", help="pass --decode_in_process (no decoder child)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from benchmarks.scale import corpus

    code = Path(args.code).resolve()
    work = Path(args.work)
    sizes = [int(s) for s in args.sizes.split(",")]
    extra = ["--decode_in_process"] if args.decode_in_process else []
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), Python {platform.python_version()}; "
        f"code: {code}; 2 Dask workers (1 thread each); clips of 0.25 s at 8 kHz; --features=logmel {' '.join(extra)}"
    )
    print(f"{'clips':>7} {'busiest worker MiB':>19} {'other worker MiB':>17} {'decoder child MiB':>18} {'launcher MiB':>13} {'wall s':>7}")
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(args.repeat):
        for n in sizes:
            data = corpus(work, n)
            result = measure(code, data, work / "runs", n, extra)
            runs[n].append(result)
            busiest, other = result["workers"][0], result["workers"][-1]
            print(
                f"{n:>7} {busiest['self_mb']:>19.0f} {other['self_mb']:>17.0f} "
                f"{max(w['children_mb'] for w in result['workers']):>18.0f} {result['rss_mb']:>13.0f} {result['wall']:>7.0f}",
                flush=True,
            )
    peaks = {n: statistics.median(r["workers"][0]["self_mb"] for r in rs) for n, rs in runs.items()}
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        print(
            f"median busiest-worker peak RSS: {first} clips {peaks[first]:.0f} MiB, {last} clips {peaks[last]:.0f} MiB: "
            f"x{peaks[last] / peaks[first]:.2f} for x{last / first:.0f} clips"
        )


if __name__ == "__main__":
    main()
