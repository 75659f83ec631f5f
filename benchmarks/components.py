"""Per-component timings: record encoding, DSP and decoding, each as audio seconds per CPU second.

    python benchmarks/components.py [--only encode,dsp,decode,isolation] [--repeats 7]

Times one component at a time in this process on fixed synthetic inputs (fixed seeds), and
prints the median of `repeats` over interleaved repeats, so a before/after comparison is
    PYTHONPATH=<old checkout> python benchmarks/components.py   # before
    PYTHONPATH=$PWD          python benchmarks/components.py   # after
with the same input on both sides. On a shared machine run the two alternately a few times
and compare medians; process CPU time is printed next to wall time for that reason.
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
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RATE = 16000


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _report(name: str, audio_seconds: float, wall: float, cpu: float):
    print(f"{name:<44} {wall * 1000:9.2f} ms wall {cpu * 1000:9.2f} ms cpu  "
          f"{audio_seconds / wall:9.0f}x real time (wall) {audio_seconds / max(cpu, 1e-9):9.0f}x (cpu)")


def _waveforms(seconds: float, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    return [(0.3 * np.sin(2 * np.pi * (220 + 30 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
            for i in range(count)]


def bench_encode(repeats: int):
    from export import example_proto

    rng = np.random.default_rng(0)
    for seconds, hop in ((60.0, 160), (1.0, 160)):
        frames = 1 + int(seconds * RATE) // hop
        lists = {"logmel": rng.standard_normal((frames, 64)).astype(np.float32),
                 "mfcc": rng.standard_normal((frames, 20)).astype(np.float32),
                 **{f"spectral_{n}": rng.standard_normal(frames).astype(np.float32)
                    for n in ("centroid", "bandwidth", "rolloff", "flatness", "zcr", "rms")}}
        context = {"key": b"some/key.wav", "num_samples": [int(seconds * RATE)], "x": np.ones(1, np.float32)}
        count = max(1, int(60 / seconds))
        wall, cpu = _timed(lambda: [example_proto.sequence_example(context, lists) for _ in range(count)], repeats)
        _report(f"encode SequenceExample, {count} x {seconds:g} s", count * seconds, wall, cpu)


def bench_dsp(repeats: int):
    from features import registry
    from features.base import Batch

    cases = {
        "logmel+mfcc (n_fft 512, hop 160, 64 mels)": {"logmel": {"n_fft": 512, "hop_length": 160, "n_mels": 64},
                                                       "mfcc": {"n_fft": 512, "hop_length": 160, "n_mels": 64}},
        "spectral (n_fft 1024, hop 256)": {"spectral": {}},
        "chroma (n_fft 1024, hop 256)": {"chroma": {}},
    }
    for seconds, count in ((60.0, 4), (1.0, 64)):
        waves = _waveforms(seconds, count)
        for name, features in cases.items():
            extractors = [registry.build(n, v, sample_rate=RATE) for n, v in features.items()]
            for e in extractors:
                e.setup()

            def run():
                batch = Batch.from_waveforms(waves, sample_rate=RATE)
                for e in extractors:
                    batch.outputs(e)

            wall, cpu = _timed(run, repeats)
            _report(f"{name}, {count} x {seconds:g} s", count * seconds, wall, cpu)


def _corpus(root: Path) -> dict[str, tuple[Path, float]]:
    import soundfile

    rng = np.random.default_rng(0)
    files = {}
    for fmt, ext, rate, subtype in (("WAV", "wav", 44100, "PCM_16"), ("FLAC", "flac", 44100, "PCM_16"),
                                    ("OGG", "ogg", 44100, "VORBIS"), ("MP3", "mp3", 44100, "MPEG_LAYER_III")):
        seconds = 30.0
        t = np.arange(int(seconds * rate)) / rate
        y = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))
        path = root / f"x.{ext}"
        soundfile.write(path, np.stack([y, y[::-1]], axis=1).astype(np.float32), rate, format=fmt, subtype=subtype)
        files[ext] = (path, seconds)
    return files


def bench_decode(repeats: int):
    from featurebeam.decoding import stream_conditioned

    with tempfile.TemporaryDirectory() as tmp:
        for ext, (path, seconds) in _corpus(Path(tmp)).items():
            wall, cpu = _timed(lambda: list(stream_conditioned(str(path), sample_rate=RATE, segment_samples=None)), repeats)
            _report(f"decode+mono+soxr {ext} 44.1 kHz stereo -> 16 kHz, {seconds:g} s", seconds, wall, cpu)


def bench_isolation(repeats: int):
    """Per-item round trip through the crash-isolated decoder child, on one-second WAV clips."""
    import soundfile

    from featurebeam.isolation import IsolatedDecoder

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, y in enumerate(_waveforms(1.0, 200)):
            paths.append(str(Path(tmp) / f"c{i}.wav"))
            soundfile.write(paths[-1], y, RATE)
        with IsolatedDecoder() as decoder:
            def isolated():
                for p in paths:
                    list(decoder.stream(p, sample_rate=RATE, segment_samples=None))

            wall, cpu = _timed(isolated, repeats)
        _report("isolated decode, 200 x 1 s WAV (parent cpu only)", 200.0, wall, cpu)
        from featurebeam.decoding import stream_conditioned

        wall, cpu = _timed(lambda: [list(stream_conditioned(p, sample_rate=RATE, segment_samples=None)) for p in paths], repeats)
        _report("in-process decode, 200 x 1 s WAV", 200.0, wall, cpu)


BENCHES = {"encode": bench_encode, "dsp": bench_dsp, "decode": bench_decode, "isolation": bench_isolation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import features

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
          f"code from {Path(features.__file__).resolve().parents[1]}")
    for name in args.only.split(","):
        BENCHES[name](args.repeats)


if __name__ == "__main__":
    main()
