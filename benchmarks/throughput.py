"""Throughput of the extraction pipeline: audio seconds per wall second.

    python benchmarks/throughput.py [--minutes 12] [--features logmel,mfcc] [--repeats 3]

Writes `minutes` of 30 s FLAC clips at 44.1 kHz stereo (so decode, mixdown and resampling are
included), runs the whole pipeline (listing to run.json) `repeats` times on the default
in-process runner, and prints each run and the median. Also times the sample run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_corpus(root: Path, minutes: float) -> float:
    import numpy as np
    import soundfile

    rate, clip = 44100, 30
    n = int(np.ceil(minutes * 60 / clip))
    rng = np.random.default_rng(0)
    t = np.arange(rate * clip) / rate
    for i in range(n):
        y = 0.2 * np.sin(2 * np.pi * (200 + 20 * i) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(root / f"clip_{i:03d}.flac", np.stack([y, y[::-1]], axis=1).astype(np.float32), rate)
    return n * clip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--features", default="logmel,mfcc")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", nargs="*", default=[], help="extra pipeline flags, e.g. --direct_num_workers=2")
    args = parser.parse_args()

    from pipelines import extract

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.monotonic()
        run = extract.run(["--dataset=sample", "--features=logmel,mfcc,spectral", f"--output={tmp / 'out'}", "--run_id=sample"])
        print(f"sample run (logmel,mfcc,spectral): {time.monotonic() - start:.1f} s wall, "
              f"{run['counts']['ok']} items, {run['audio_seconds']:.0f} s audio")
        corpus = tmp / "corpus"
        corpus.mkdir()
        seconds = make_corpus(corpus, args.minutes)
        rates = []
        for i in range(args.repeats):
            start = time.monotonic()
            run = extract.run([f"--dataset={corpus}", f"--features={args.features}", f"--output={tmp / 'out'}",
                               f"--run_id=bench{i}", *args.extra])
            wall = time.monotonic() - start
            if run["counts"]["failed"]:
                raise SystemExit(f"benchmark run had failures: {run['failures']}")
            rates.append(run["audio_seconds"] / wall)
            print(f"run {i}: {run['audio_seconds']:.0f} s of audio in {wall:.1f} s wall = {rates[-1]:.1f} audio s / wall s")
        print(f"median throughput --features={args.features} {' '.join(args.extra)}: "
              f"{statistics.median(rates):.1f} audio seconds per wall second ({seconds / 60:.0f} min of audio)")


if __name__ == "__main__":
    main()
