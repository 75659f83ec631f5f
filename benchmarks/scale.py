"""How the launcher's work grows with the dataset: it should not.

For each size (default 1,000, 10,000 and 100,000 items of 0.25 s, 8 kHz WAV, `--commit_records=16`
so shards are many), runs one extraction in a fresh launcher process with
`--direct_num_workers=2 --direct_running_mode=multi_processing` (workers are separate processes,
so the launcher's own memory is measurable) and prints:

- launcher s after job: from the pipeline's end (`Pipeline.run` returning) to `extract.run`
  returning; everything the launcher does once the workers are done;
- launcher peak RSS: `ru_maxrss` of the launcher process alone (workers are children);
- run.json bytes;
- items/s: items over the whole command's wall time.

`--runner dask` runs the same on a local Dask cluster (a scheduler and two single-threaded
workers, as the tests start them), where the launcher is only the cluster's client.

    python benchmarks/scale.py                      # 1k, 10k, 100k (the 100k corpus takes ~400 MB)
    python benchmarks/scale.py --sizes 1000,10000   # quicker
    python benchmarks/scale.py --code /path/to/checkout   # measure another checkout (before/after)

Corpora are generated once under --work (default /tmp/featurebeam-scale) and reused.
`python benchmarks/boundaries.py --items N` shows what the launcher's memory holds on this runner:
the bytes per item that cross each stage boundary of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Runs in the launcher process under test: times what happens after the pipeline returns.
CHILD = r"""
import json, resource, sys, time
from pipelines import extract  # first, as `python -m pipelines.extract` imports it (process settings)
import apache_beam as beam

marks = {}
original = beam.Pipeline.run
def timed_run(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    result.wait_until_finish()
    marks["job_done"] = time.monotonic()
    return result
beam.Pipeline.run = timed_run
start = time.monotonic()
run = extract.run(sys.argv[1:])
end = time.monotonic()
print(json.dumps({
    "after_job": end - marks["job_done"],
    "wall": end - start,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "records": run["counts"]["records"],
    "run_dir": run["outputs"]["run_dir"],
}))
"""


def corpus(root: Path, n: int) -> Path:
    """n clips of 0.25 s at 8 kHz in 10 labelled folders (made once)."""
    import soundfile

    folder = root / f"clips-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(n)
    t = np.arange(2000) / 8000
    for i in range(n):
        label = folder / f"class{i % 10}"
        label.mkdir(parents=True, exist_ok=True)
        y = 0.3 * np.sin(2 * np.pi * (200 + (i % 97) * 20) * t) + 0.01 * rng.standard_normal(2000)
        soundfile.write(label / f"{i:07d}.wav", y.astype(np.float32), 8000, subtype="PCM_16")
    done.write_text("ok")
    return folder


def measure(code: Path, data: Path, output: Path, run_id: str, runner_flags: list[str]) -> dict:
    argv = [
        f"--dataset={data}", "--features=logmel", "--sample_rate=8000", f"--output={output}", f"--run_id={run_id}",
        "--commit_records=16", "--decode_in_process", *runner_flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"extraction failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["run_json_bytes"] = (Path(result["run_dir"]) / "run.json").stat().st_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--work", default="/tmp/featurebeam-scale")
    parser.add_argument("--code", default=str(ROOT), help="featurebeam checkout to measure (default: this one)")
    parser.add_argument(
        "--runner", choices=("fnapi", "dask"), default="fnapi",
        help="fnapi: multi-process FnApiRunner (the launcher is also the runner, which holds what crosses a "
        "shuffle); dask: a local Dask cluster of one scheduler and two workers (the launcher is only a client)",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.runner == "dask":
            sys.path.insert(0, str(ROOT))
            from tests.dask_cluster import dask_cluster_at

            logs = Path(tempfile.mkdtemp(prefix="scale-dask-"))
            runner_flags = stack.enter_context(dask_cluster_at(logs)).flags
        else:
            runner_flags = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
        _run(args, runner_flags)


def _run(args, runner_flags: list[str]) -> None:
    work = Path(args.work)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; code: {args.code}; "
        f"runner: {' '.join(runner_flags)}"
    )
    print(f"{'items':>8} {'shards':>7} {'launcher s after job':>21} {'launcher peak RSS MiB':>22} {'run.json bytes':>15} {'items/s':>8}")
    rows = []
    for n in sizes:
        data = corpus(work, n)
        out = work / "runs"
        result = measure(Path(args.code), data, out, f"scale-{n}-{int(time.time())}", runner_flags)
        rows.append((n, result))
        print(
            f"{n:>8} {-(-n // 16):>7} {result['after_job']:>21.2f} {result['rss_mb']:>22.0f} "
            f"{result['run_json_bytes']:>15} {n / result['wall']:>8.0f}",
            flush=True,
        )
    if len(rows) > 1:
        (n0, a), (n1, b) = rows[0], rows[-1]
        print(
            f"{n1 // n0}x items: launcher after-job {a['after_job']:.2f} -> {b['after_job']:.2f} s, "
            f"peak RSS x{b['rss_mb'] / a['rss_mb']:.2f}, run.json x{b['run_json_bytes'] / a['run_json_bytes']:.2f}, "
            f"items/s x{(n1 / b['wall']) / (n0 / a['wall']):.2f}"
        )


if __name__ == "__main__":
    main()
