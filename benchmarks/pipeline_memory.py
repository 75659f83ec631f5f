"""Peak memory of the whole extraction pipeline on one long file.

    python benchmarks/pipeline_memory.py [--minutes 60] [--segment_seconds 10] [--batch_seconds 240]
        [--features logmel,mfcc]

Writes `minutes` of 44.1 kHz stereo 16-bit WAV (in blocks), runs `python -m pipelines.extract`
on it in a subprocess, and prints wall time and the peak RSS of the pipeline process and of its
decoder child (ru_maxrss of waited-for descendants: the larger of the two), beside the file's
decoded size. With segmentation the peak must stay far below that size.

`--segment_seconds 0` runs the file unsegmented: one item of `minutes` at the run's 16 kHz,
which the pipeline extracts in windows of `--batch_seconds`, so extraction holds the item's
waveform and frame-level outputs plus one window's STFT, not an STFT of the whole item. The
pipeline's peak then also holds one record of the whole item being encoded and summarised, so
this mode also measures extraction alone, in a fresh process each: the item in windows of
`--batch_seconds` (as `ExtractFn` runs it) and as one whole-item batch (as before windowing).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE, CHANNELS = 44100, 2


def write_long_wav(path: Path, minutes: float) -> None:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    block = RATE * 10
    with soundfile.SoundFile(path, "w", RATE, CHANNELS, subtype="PCM_16") as out:
        for i in range(int(minutes * 6)):
            t = (np.arange(block) + i * block) / RATE
            y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(block)
            out.write(np.stack([y, y], axis=1).astype(np.float32))


def extraction_peak(*, minutes: float, window_seconds: float, features: list[str]) -> None:
    """Print the peak RSS (MiB) of extracting `features` from one synthetic 16 kHz item of
    `minutes`, in windows of `window_seconds` (0: one whole-item batch), in this process."""
    import numpy as np

    from featurebeam.threads import single_threaded_blas
    from features import Batch, build

    single_threaded_blas()
    sr = 16000
    extractors = [build(name, {}, sample_rate=sr) for name in features]
    for extractor in extractors:
        extractor.setup()
    rng = np.random.default_rng(0)
    n = int(minutes * 60 * sr)
    waveform = np.empty(n, dtype=np.float32)
    for start in range(0, n, 10 * sr):  # in blocks: no float64 copy of the whole item
        t = np.arange(start, min(n, start + 10 * sr)) / sr
        waveform[start : start + len(t)] = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    window = int(window_seconds * sr) if window_seconds > 0 else None
    batch = Batch.from_waveforms([waveform], sample_rate=sr, window_samples=window)
    batch.prepare(extractors)
    outputs = [batch.outputs(extractor) for extractor in extractors]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(v.nbytes for out in outputs for v in out.values()) / 2**20
    print(f"{peak:.0f} {before:.0f} {waveform.nbytes / 2**20:.0f} {size:.0f}")


def _extraction(args, window_seconds: float) -> str:
    result = subprocess.run(
        [sys.executable, __file__, f"--minutes={args.minutes}", f"--features={args.features}",
         f"--extraction_window_seconds={window_seconds}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    peak, before, waveform, outputs = result.stdout.split()
    return (f"peak RSS {peak} MiB (before extracting {before} MiB: interpreter, libraries, "
            f"the {waveform} MiB waveform; frame-level outputs {outputs} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--segment_seconds", type=float, default=10.0, help="0: unsegmented, one long item")
    parser.add_argument("--batch_seconds", type=float, default=None, help="the pipeline's --batch_seconds (default 240)")
    parser.add_argument("--features", default="logmel,mfcc")
    parser.add_argument("--extraction_window_seconds", type=float, default=None,
                        help="only measure extraction in this process (0: one whole-item batch); used by the 0 mode")
    args = parser.parse_args()
    if args.extraction_window_seconds is not None:
        extraction_peak(minutes=args.minutes, window_seconds=args.extraction_window_seconds, features=args.features.split(","))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "long").mkdir()
        wav = tmp / "long" / "long.wav"
        write_long_wav(wav, args.minutes)
        decoded_mib = args.minutes * 60 * RATE * CHANNELS * 4 / 2**20
        print(f"file: {args.minutes:g} min, {RATE} Hz, {CHANNELS} ch, {wav.stat().st_size / 2**20:.0f} MiB on disk, "
              f"{decoded_mib:.0f} MiB decoded as float32")
        command = [sys.executable, "-m", "pipelines.extract", f"--dataset={wav.parent}", f"--features={args.features}",
                   f"--output={tmp / 'out'}", "--run_id=mem"]
        if args.segment_seconds > 0:
            command.append(f"--segment_seconds={args.segment_seconds}")
        if args.batch_seconds is not None:
            command.append(f"--batch_seconds={args.batch_seconds}")
        print("segments:", f"{args.segment_seconds:g} s" if args.segment_seconds > 0 else "none (one item)",
              "| batch_seconds:", args.batch_seconds or "default")
        start = time.monotonic()
        result = subprocess.run(
            command,
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        wall = time.monotonic() - start
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(result.stdout.strip())
        print(f"pipeline wall time: {wall:.1f} s; peak RSS of the pipeline or its decoder child: {peak:.0f} MiB "
              f"({peak / decoded_mib:.2f} x the decoded size)")
    if args.segment_seconds <= 0:
        batch_seconds = args.batch_seconds or 240.0
        print(f"extraction alone, windows of {batch_seconds:g} s: {_extraction(args, batch_seconds)}")
        print(f"extraction alone, one whole-item batch: {_extraction(args, 0)}")


if __name__ == "__main__":
    main()
