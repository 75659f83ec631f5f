"""Peak memory of streaming decode on a long file: it should not grow with the file's length.

    python benchmarks/memory.py [--minutes 60] [--format wav|flac] [--skip-isolated] [--legacy]

Writes `minutes` of 44.1 kHz stereo 16-bit audio (WAV by default, in 10 s blocks so writing it
costs no memory), then streams it with segment_samples = 10 s at 16 kHz through
`stream_conditioned` in this process and through `IsolatedDecoder` (a child process). Prints
the file size, wall time, and peak RSS (VmHWM) before and after each, for this process from
/proc/self/status and for the child from /proc/<pid>/status, beside the decoded size the
old whole-file path would have held. `--legacy` also measures that old path
(featurebeam.audio: read_bytes, decode, condition, segment), last, since it raises this
process's peak for good.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RATE, CHANNELS = 44100, 2


def vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process, MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def reset_hwm(pid: int | str = "self") -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to clear_refs); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def write_long_file(path: Path, *, minutes: float, fmt: str) -> None:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(RATE * 10) / RATE
    with soundfile.SoundFile(path, "w", RATE, CHANNELS, format=fmt.upper(), subtype="PCM_16") as out:
        for i in range(int(round(minutes * 6))):
            y = 0.3 * np.sin(2 * np.pi * (220 + i % 50) * t) + 0.02 * rng.standard_normal(len(t))
            out.write(np.stack([y, y[::-1]], axis=1).astype(np.float32))


def consume(stream) -> tuple[int, int]:
    segments = samples = 0
    for part in stream:
        if hasattr(part, "samples"):
            segments += 1
            samples += len(part.samples)
    return segments, samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--format", choices=("wav", "flac"), default="wav")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--segment-seconds", type=float, default=10.0)
    parser.add_argument("--skip-isolated", action="store_true", help="only measure in-process streaming")
    parser.add_argument("--legacy", action="store_true", help="also measure the whole-file path of featurebeam.audio")
    parser.add_argument("--dir", help="folder for the long file (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()

    from featurebeam.decoding import stream_conditioned

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="featurebeam-memory-") as tmp:
        path = Path(tmp) / f"long.{args.format}"
        start = time.monotonic()
        write_long_file(path, minutes=args.minutes, fmt=args.format)
        size_mib = path.stat().st_size / 2**20
        decoded_mib = args.minutes * 60 * RATE * CHANNELS * 4 / 2**20
        print(f"file: {args.minutes:g} min, {RATE} Hz, {CHANNELS} ch, 16-bit {args.format.upper()}: {size_mib:.0f} MiB "
              f"(written in {time.monotonic() - start:.1f} s); decoded as float32 it would be {decoded_mib:.0f} MiB")
        segment_samples = int(round(args.segment_seconds * args.sample_rate))
        settings = dict(sample_rate=args.sample_rate, segment_samples=segment_samples, max_seconds=None)

        import numpy  # noqa: F401 - imports before the baseline, so it measures decoding
        import soundfile  # noqa: F401
        import soxr  # noqa: F401
        from apache_beam.io.filesystems import FileSystems  # noqa: F401

        before = vm_hwm_mib()
        reset = reset_hwm()
        base = vm_hwm_mib() if reset else before
        start = time.monotonic()
        segments, samples = consume(stream_conditioned(str(path), **settings))
        wall = time.monotonic() - start
        after = vm_hwm_mib()
        print(f"in-process: {segments} segments, {samples / args.sample_rate:.0f} s at {args.sample_rate} Hz in {wall:.1f} s wall "
              f"({args.minutes * 60 / wall:.0f}x real time); peak RSS before {before:.0f} MiB"
              f"{f' (reset to {base:.0f} MiB)' if reset else ''}, after {after:.0f} MiB, growth {after - base:.1f} MiB")

        if not args.skip_isolated:
            measure_isolated(path, settings)
        if args.legacy:
            measure_legacy(path, settings)


def measure_isolated(path: Path, settings: dict) -> None:
    from featurebeam.isolation import IsolatedDecoder

    with IsolatedDecoder(timeout_seconds=600) as decoder:
        decoder.start()
        child_before = vm_hwm_mib(decoder.pid)
        start = time.monotonic()
        segments, samples = consume(decoder.stream(str(path), **settings))
        wall = time.monotonic() - start
        child_after = vm_hwm_mib(decoder.pid)
    parent_after = vm_hwm_mib()
    print(f"isolated: {segments} segments in {wall:.1f} s wall; child peak RSS before {child_before:.0f} MiB, "
          f"after {child_after:.0f} MiB, growth {child_after - child_before:.1f} MiB; "
          f"this process's peak RSS now {parent_after:.0f} MiB")


def measure_legacy(path: Path, settings: dict) -> None:
    from featurebeam import audio

    before = vm_hwm_mib()
    base = vm_hwm_mib() if reset_hwm() else before
    start = time.monotonic()
    decoded = audio.decode(audio.read_bytes(str(path)), uri=str(path))
    waveform = audio.condition(decoded, sample_rate=settings["sample_rate"], uri=str(path))
    windows = audio.segment(waveform, segment_samples=settings["segment_samples"])
    wall = time.monotonic() - start
    after = vm_hwm_mib()
    print(f"whole-file (featurebeam.audio): {len(windows)} segments in {wall:.1f} s wall; peak RSS {after:.0f} MiB, "
          f"growth {after - base:.0f} MiB")


if __name__ == "__main__":
    main()
