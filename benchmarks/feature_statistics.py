"""Cost of feature statistics: ComputeStatistics over synthetic rows against a pipeline that
only counts the same rows, on the default in-process runner.

    python benchmarks/feature_statistics.py [--records 2000] [--repeats 3] [--batch 64]

Rows are shaped like the sample run's (2 s at 16 kHz, hop 256: logmel [126, 64], mfcc [126, 20],
six per-frame spectral scalars, a clip-level [64] vector; five labels). Statistics run twice: over
rows one by one (the combiner lifted into one accumulator per bundle) and over lists of `--batch`
rows, one accumulator per list, as the pipeline folds each extraction batch. Prints each repeat,
the medians, records per second and the ratio to the counting pipeline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics as stat
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rows(n: int):
    import numpy as np

    from featurebeam.elements import FeatureRow

    rng = np.random.default_rng(0)
    for i in range(n):
        features = {"logmel": rng.normal(-40, 20, (126, 64)).astype(np.float32), "mfcc": rng.normal(0, 50, (126, 20)).astype(np.float32)}
        for name in ("centroid", "bandwidth", "rolloff", "flatness", "rms", "zcr"):
            features[f"spectral_{name}"] = rng.random(126).astype(np.float32)
        features["summary"] = rng.random(64).astype(np.float32)
        yield FeatureRow(
            key=f"k{i:07d}", item_key=f"k{i:07d}", uri=f"/a/{i}.wav", label=f"class{i % 5}", split="train", metadata=(),
            start_sample=0, segment_index=0, last_segment=True, silent=False, sample_rate=16000, source_sample_rate=44100,
            source_channels=2, source_duration_seconds=2.0, num_samples=32000, features=features,
        )


def _specs():
    from features.base import OutputSpec

    frame = dict(level="frame", hop_length=256, sample_rate=16000)
    specs = [OutputSpec(name="logmel", shape=(64,), **frame), OutputSpec(name="mfcc", shape=(20,), **frame)]
    specs += [OutputSpec(name=f"spectral_{n}", shape=(), **frame) for n in ("centroid", "bandwidth", "rolloff", "flatness", "rms", "zcr")]
    return tuple(specs + [OutputSpec(name="summary", level="clip", shape=(64,))])


def _time(n: int, with_statistics: bool, run_dir: str, batch: int = 0) -> float:
    import apache_beam as beam

    from export.statistics import ComputeStatistics

    specs = _specs()
    start = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as p:
        rows = p | beam.Create([0]) | beam.FlatMap(lambda _: _rows(n))  # rows made on the worker, not pickled by Create
        if with_statistics and batch:
            lists = rows | beam.BatchElements(min_batch_size=batch, max_batch_size=batch)
            lists | ComputeStatistics(specs=specs, run_dir=run_dir, rows_of=lambda rows: rows)
        elif with_statistics:
            rows | ComputeStatistics(specs=specs, run_dir=run_dir)
        else:
            rows | beam.combiners.Count.Globally()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="rows per list in the batched run")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as run_dir:
        base, stats, batched = [], [], []
        for _ in range(args.repeats):  # interleaved, so the machine's load falls on all three alike
            base.append(_time(args.records, False, run_dir))
            stats.append(_time(args.records, True, run_dir))
            batched.append(_time(args.records, True, run_dir, batch=args.batch))
        size = os.path.getsize(os.path.join(run_dir, "statistics", "statistics.pb"))
    names = ("count only", "statistics", f"stats/{args.batch}")
    for name, times in zip(names, (base, stats, batched)):
        print(f"{name:>11}: {', '.join(f'{t:.2f}' for t in times)} s; median {stat.median(times):.2f} s "
              f"({args.records / stat.median(times):.0f} records/s)")
    for name, times in zip(names[1:], (stats, batched)):
        extra = stat.median(times) - stat.median(base)
        print(f"{name} cost: {extra:.2f} s for {args.records} records ({1000 * extra / args.records:.2f} ms per record); "
              f"ratio {stat.median(times) / stat.median(base):.2f}")
    print(f"statistics.pb {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
