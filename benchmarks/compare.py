"""featurebeam against a bare soundfile + soxr + librosa loop, on the same files and parameters.

    python benchmarks/compare.py [--quick] [--repeats 3] [--corpus_dir DIR] [--dask] [--only NAMES]      (make bench)

Generates two deterministic corpora (fixed seeds; cached in --corpus_dir, rebuilt when absent):
- long: mixed-format recordings (WAV, FLAC, OGG/Vorbis, MP3) at 8 to 48 kHz, mono and stereo,
  several minutes each;
- clips: one-second clips, half 16 kHz mono WAV and half 44.1 kHz stereo FLAC.
Then runs, interleaved `repeats` times, each as its own command as a user would time it
(start-up included): the bare loop in 1 process and in 2 (multiprocessing.Pool), and featurebeam
with default flags (1 worker) and with the documented two-worker flags `--direct_num_workers=2
--direct_running_mode=multi_threading` (`--processes_too` adds `multi_processing`).
Both sides do the same work: decode, mix to mono, soxr HQ resampling to 16 kHz, log-mel (64
bands) and MFCC (20) at n_fft 512, hop 160. featurebeam also writes its TFRecords, Parquet,
tables and run.json; the loop keeps its arrays in memory (a loop that saved them would be slower).

Prints medians of audio seconds per wall second and per CPU second (user + system of the
command and every process it started), the wall ratios the issue's targets are stated in, and
featurebeam's per-stage times from its Beam counters (`featurebeam` namespace, names
`stage_<stage>_us`, summed over workers: list, decode, dsp, encode, write, commit; see
featurebeam/stages.py) for the median run.

`--dask` adds the per-core comparisons with Dask (issue 27): featurebeam on FnApiRunner with its
whole process tree pinned to core 0 (`taskset -c 0`), against a real Dask cluster
(tests/dask_cluster.py) of one single-threaded worker pinned to core 0, and of two pinned to
cores 0 and 1. The clusters start before the runs and stay up (their start is not timed); the
launcher of each Dask run is pinned to core 0 like the FnApiRunner run, its scheduler is not.
A Dask run's CPU seconds are the launcher's plus what the workers (and their decoder children)
and the scheduler spent during it. `--only` picks contenders by short name (loop1, loop2, fb1,
fb2, fb2p, pinned, dask1, dask2). `--quick` uses small corpora and
one repeat and only the one-process contenders, to check the script quickly (well under a minute
on an idle machine); its numbers are dominated by start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE, N_FFT, HOP, N_MELS, N_MFCC = 16000, 512, 160, 64, 20
FEATURES_YAML = f"""# benchmarks/compare.py: the bare loop's parameters
sample_rate: {RATE}
segment_seconds: null
features:
  logmel: {{n_fft: {N_FFT}, hop_length: {HOP}, n_mels: {N_MELS}}}
  mfcc: {{n_fft: {N_FFT}, hop_length: {HOP}, n_mels: {N_MELS}, n_mfcc: {N_MFCC}}}
"""
# The documented multi-worker flags (README, Extract): two worker threads in one process, each
# with its own decoder child. Worker processes are measured beside them, as the other choice.
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
TWO_PROCESSES = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

# (format, subtype, extension, sample rate, channels) of the long recordings, cycled.
LONG_FORMATS = (
    ("OGG", "VORBIS", "ogg", 44100, 2),
    ("MP3", "MPEG_LAYER_III", "mp3", 44100, 2),
    ("WAV", "PCM_16", "wav", 16000, 1),
    ("FLAC", "PCM_16", "flac", 48000, 2),
    ("OGG", "VORBIS", "ogg", 22050, 1),
    ("MP3", "MPEG_LAYER_III", "mp3", 32000, 1),
    ("WAV", "PCM_16", "wav", 8000, 1),
    ("FLAC", "PCM_24", "flac", 24000, 1),
)


# ---------------------------------------------------------------------------------------------
# corpora


def _signal(rng, seconds: float, rate: int, channels: int):
    """Tones that move, bursts and noise: enough structure that codecs do real work."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(110, 880)
    y = 0.25 * np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * rng.uniform(0.1, 2) * t))
    y += 0.1 * np.sin(2 * np.pi * 3 * f0 * t) * (np.sin(2 * np.pi * rng.uniform(0.5, 4) * t) > 0)
    y += 0.03 * rng.standard_normal(len(t))
    if channels == 2:
        y = np.stack([y, np.roll(y, rate // 100) * 0.8], axis=1)
    return y.astype(np.float32)


def make_corpora(root: Path, *, long_files: int, long_minutes: float, clips: int) -> dict[str, Path]:
    """Write (or reuse) the two corpora under root; returns {"long": dir, "clips": dir}."""
    import numpy as np
    import soundfile

    dirs = {"long": root / f"long-{long_files}x{long_minutes:g}min", "clips": root / f"clips-{clips}x1s"}
    if not (dirs["long"] / "DONE").exists():
        dirs["long"].mkdir(parents=True, exist_ok=True)
        for i in range(long_files):
            fmt, subtype, ext, rate, channels = LONG_FORMATS[i % len(LONG_FORMATS)]
            rng = np.random.default_rng(i)
            seconds = long_minutes * 60 * (0.8 + 0.4 * rng.random())  # several lengths
            y = _signal(rng, seconds, rate, channels)
            path = dirs["long"] / f"rec{i:03d}_{rate}_{channels}ch.{ext}"
            with soundfile.SoundFile(path, "w", rate, channels, format=fmt, subtype=subtype) as f:
                for start in range(0, len(y), 1 << 16):  # libsndfile's Vorbis encoder crashes on one huge write
                    f.write(y[start : start + (1 << 16)])
        (dirs["long"] / "DONE").touch()
    if not (dirs["clips"] / "DONE").exists():
        dirs["clips"].mkdir(parents=True, exist_ok=True)
        for i in range(clips):
            rng = np.random.default_rng(100_000 + i)
            rate, channels, ext = (16000, 1, "wav") if i % 2 == 0 else (44100, 2, "flac")
            soundfile.write(dirs["clips"] / f"clip{i:05d}.{ext}", _signal(rng, 1.0, rate, channels), rate)
        (dirs["clips"] / "DONE").touch()
    return dirs


def corpus_files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.iterdir() if p.suffix in AUDIO_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# the bare loop, as a user would write it


def loop_item(path: str) -> float:
    """Decode, mix down, resample and compute log-mel + MFCC for one file; returns its seconds."""
    import librosa
    import soundfile
    import soxr

    y, rate = soundfile.read(path, dtype="float32", always_2d=True)
    y = soxr.resample(y.mean(axis=1), rate, RATE, quality="HQ")
    mel = librosa.feature.melspectrogram(y=y, sr=RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    logmel = librosa.power_to_db(mel)
    mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=N_MFCC)
    del logmel, mfcc
    return len(y) / RATE


def run_loop(directory: str, processes: int) -> float:
    files = corpus_files(Path(directory))
    if processes == 1:
        return sum(loop_item(f) for f in files)
    import multiprocessing

    with multiprocessing.Pool(processes) as pool:
        return sum(pool.imap_unordered(loop_item, files, chunksize=max(1, len(files) // (8 * processes))))


# ---------------------------------------------------------------------------------------------
# featurebeam, through its command-line entry point


def run_featurebeam(argv: list[str]) -> dict:
    """`pipelines.extract.run(argv)`, keeping the job's Beam counters (run() returns run.json only)."""
    import apache_beam as beam

    from pipelines import extract

    results = []

    class RecordingPipeline(beam.Pipeline):
        def run(self, *args, **kwargs):
            results.append(super().run(*args, **kwargs))
            return results[-1]

    # extract.run builds `beam.Pipeline(options=...)` from the flags; have it build this subclass
    # instead, so the job's result (and its counters) can be read afterwards.
    original, beam.Pipeline = beam.Pipeline, RecordingPipeline
    try:
        run = extract.run(argv)
    finally:
        beam.Pipeline = original
    counters: dict[str, int] = {}
    for result in results:
        try:
            found = result.metrics().query()["counters"]
        except NotImplementedError:  # Beam's Dask runner keeps no metrics
            found = []
        for counter in found:
            if counter.key.metric.namespace == "featurebeam":
                name = counter.key.metric.name
                counters[name] = counters.get(name, 0) + counter.committed
    return {"audio_seconds": run["audio_seconds"], "counts": run["counts"], "counters": counters}


# ---------------------------------------------------------------------------------------------
# measurement


def cpu_seconds() -> float:
    """User + system CPU s of this process and the children it reaped (run in Dask workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(command: list[str], cluster=None) -> tuple[float, float, dict]:
    """Run `command` to completion; (wall s, CPU s of it and its descendants, its JSON result).

    command: `[*prefix, python, script, *arguments]` (a prefix such as `taskset -c 0`).
    cluster: a Dask cluster the command runs on: the CPU s its workers and scheduler spend meanwhile count too.
    """
    at = command.index(sys.executable) + 2
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        client = cluster.client() if cluster is not None else None
        far = (client.run(cpu_seconds), client.run_on_scheduler(cpu_seconds)) if client else None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run([*command[:at], f"--result={out.name}", *command[at:]], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if client is not None:
            workers, scheduler = client.run(cpu_seconds), client.run_on_scheduler(cpu_seconds)
            cpu += sum(workers[w] - far[0][w] for w in workers) + scheduler - far[1]
            client.close()
        return wall, cpu, json.loads(Path(out.name).read_text())


LOOP1, LOOP2 = "bare loop, 1 process", "bare loop, 2 processes"
FB1, FB2 = "featurebeam, default flags (1 worker)", "featurebeam, 2 workers (threads)"
FB2P = "featurebeam, 2 worker processes"
PINNED = "featurebeam, FnApiRunner pinned to core 0"
DASK1 = "featurebeam, Dask: 1 worker pinned to core 0"
DASK2 = "featurebeam, Dask: 2 workers pinned to cores 0, 1"
SHORT = {"loop1": LOOP1, "loop2": LOOP2, "fb1": FB1, "fb2": FB2, "fb2p": FB2P, "pinned": PINNED, "dask1": DASK1, "dask2": DASK2}
DASK_WORKERS = {DASK1: 1, DASK2: 2}
CORE0 = ["taskset", "-c", "0"]


def contenders(corpus: Path, work: Path, *, repeat: int, wanted: tuple[str, ...],
               clusters: dict | None = None) -> dict[str, list[str]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    config = work / "features.yaml"
    config.write_text(FEATURES_YAML)

    def fb(name: str, flags: list[str]) -> list[str]:
        return [*me, "--featurebeam", "--", f"--dataset={corpus}", f"--config={config}", "--features=logmel,mfcc",
                f"--output={work / 'runs'}", f"--run_id={corpus.name}-{name}-{repeat}", *flags]

    every = {
        LOOP1: [*me, "--loop", str(corpus), "--processes=1"],
        LOOP2: [*me, "--loop", str(corpus), "--processes=2"],
        FB1: fb("w1", []),
        FB2: fb("w2", TWO_WORKERS),
        FB2P: fb("p2", TWO_PROCESSES),
        PINNED: [*CORE0, *fb("pin", [])],
    }
    for name, cluster in (clusters or {}).items():
        every[name] = [*CORE0, *fb(f"dask{DASK_WORKERS[name]}", ["--runner=DaskRunner", f"--dask_client_address={cluster.address}"])]
    return {name: command for name, command in every.items() if name in wanted}


def _stages(counters: dict) -> str:
    """The stage counters in pipeline order (list, decode, dsp, encode, write, commit)."""
    sys.path.insert(0, str(ROOT))  # this process runs no pipeline; it only needs the stage names
    from featurebeam import stages

    found = stages.seconds(counters)
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in found.items()) or "(no stage counters)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora, one repeat: checks the script in < 1 min")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per contender (default 3, quick 1)")
    parser.add_argument("--corpus_dir", default=os.path.join(tempfile.gettempdir(), "featurebeam-bench-corpora"))
    parser.add_argument("--corpora", default="long,clips", help="which corpora to run: long, clips or both")
    parser.add_argument("--long_files", type=int, help="recordings in the long corpus (default 16, quick 4)")
    parser.add_argument("--long_minutes", type=float, help="mean minutes per recording (default 5, quick 0.25)")
    parser.add_argument("--clips", type=int, help="one-second clips (default 3000, quick 100)")
    parser.add_argument("--processes_too", action="store_true", help="also run featurebeam with 2 worker processes (multi_processing)")
    parser.add_argument("--dask", action="store_true",
                        help="also run one pinned FnApiRunner, and Dask clusters of 1 and 2 pinned workers (see the docstring)")
    parser.add_argument("--only", help=f"comma-separated contenders to run, of {', '.join(SHORT)}")
    # internal: one contender's run, in its own process
    parser.add_argument("--loop", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--featurebeam", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()

    if args.loop:
        Path(args.result).write_text(json.dumps({"audio_seconds": run_loop(args.loop, args.processes)}))
        return
    if args.featurebeam:
        Path(args.result).write_text(json.dumps(run_featurebeam([a for a in rest if a != "--"])))
        return

    repeats = args.repeats or (1 if args.quick else 3)
    # --quick checks the script end to end: one process each side (each command's start-up is
    # seconds of CPU, and a 2-worker run starts three interpreters).
    wanted = (LOOP1, FB1) if args.quick else (LOOP1, LOOP2, FB1, FB2, *((FB2P,) if args.processes_too else ()))
    if args.dask:
        wanted = (*wanted, PINNED, DASK1, DASK2)
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in SHORT]
        if unknown:
            raise SystemExit(f"--only: unknown contender {unknown[0]!r}; one of {', '.join(SHORT)}")
        wanted = tuple(SHORT[n] for n in args.only.split(","))
    corpora = make_corpora(
        Path(args.corpus_dir),
        long_files=args.long_files or (4 if args.quick else 16),
        long_minutes=args.long_minutes or (0.25 if args.quick else 5.0),
        clips=args.clips or (100 if args.quick else 3000),
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
          f"load average before start {os.getloadavg()[0]:.1f} (a shared machine makes wall times noisy)")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    spreads: dict[str, dict[str, tuple[float, float, float, float]]] = {}  # wall s min, max; CPU s per audio s min, max
    audio: dict[str, float] = {}
    stage_lines = []
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name in wanted:
            if name in DASK_WORKERS:
                sys.path.insert(0, str(ROOT))  # this checkout's tests package (site-packages may hold another)
                from tests.dask_cluster import dask_cluster_at

                logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                clusters[name] = stack.enter_context(
                    dask_cluster_at(logs, workers=DASK_WORKERS[name], pin=[str(i) for i in range(DASK_WORKERS[name])])
                )
        for corpus_name in args.corpora.split(","):
            corpus = corpora[corpus_name]
            runs: dict[str, list[tuple[float, float, dict]]] = {}
            with tempfile.TemporaryDirectory() as work:
                for repeat in range(repeats):  # interleaved, so drifting load hits every contender alike
                    for name, command in contenders(corpus, Path(work), repeat=repeat, wanted=wanted, clusters=clusters).items():
                        runs.setdefault(name, []).append(measure(command, clusters.get(name)))
                        wall, cpu, result = runs[name][-1]
                        print(f"  {corpus_name} #{repeat} {name}: {wall:.1f} s wall, {cpu:.1f} s cpu", flush=True)
            _tabulate(corpus_name, runs, table, spreads, audio, stage_lines)
    _report(args, corpora, repeats, table, spreads, audio, stage_lines)


def _tabulate(corpus_name, runs, table, spreads, audio, stage_lines) -> None:
    """One corpus's runs into the table: medians (and spreads) of audio s per wall s and per CPU s."""
    reference = LOOP1 if LOOP1 in runs else next(iter(runs))
    audio[corpus_name] = runs[reference][0][2]["audio_seconds"]
    for name, results in runs.items():
        seconds = results[0][2]["audio_seconds"]
        if abs(seconds - audio[corpus_name]) > 1.0:
            raise SystemExit(f"{name} saw {seconds:.1f} s of audio in {corpus_name}, {reference} {audio[corpus_name]:.1f} s")
        wall = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        table.setdefault(name, {})[corpus_name] = (seconds / wall, seconds / cpu)
        spreads.setdefault(name, {})[corpus_name] = (
            min(r[0] for r in results), max(r[0] for r in results), min(r[1] for r in results) / seconds,
            max(r[1] for r in results) / seconds,
        )
        if name.startswith("featurebeam") and results[0][2]["counters"]:
            middle = sorted(results, key=lambda r: r[0])[len(results) // 2]
            stage_lines.append(f"  {corpus_name}, {name}: {_stages(middle[2]['counters'])}")


def _report(args, corpora, repeats, table, spreads, audio, stage_lines) -> None:
    names = list(corpora) if args.corpora == "long,clips" else args.corpora.split(",")
    header = " | ".join(f"{n}: {len(corpus_files(corpora[n]))} files, {audio[n] / 60:.0f} min" for n in names)
    print(f"\nmedians of {repeats} interleaved run(s); audio seconds per wall second (per CPU second)\n")
    print(f"| | {header} |")
    print("| --- |" + " --- |" * len(names))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n][0]:.0f}x ({row[n][1]:.0f}x per CPU s)" for n in names) + " |")
    print("\nratios (wall):")
    for n in names:
        rate = {name: row[n][0] for name, row in table.items()}
        if LOOP1 in rate and FB1 in rate:
            print(f"  {n}: featurebeam 1 worker / loop 1 process = {rate[LOOP1] / rate[FB1]:.2f} "
                  f"(target <= {1.0 if n == 'long' else 1.2})")
        for name in (PINNED, DASK1, DASK2):
            if name in rate:
                low, high, cpu, cpu_high = spreads[name][n]
                print(f"  {n}: {name}: median {audio[n] / rate[name]:.1f} s wall (spread {low:.1f} to {high:.1f}), "
                      f"{1 / table[name][n][1]:.4f} CPU s per audio s (spread {cpu:.4f} to {cpu_high:.4f})")
        if PINNED in rate and DASK1 in rate:
            print(f"  {n}: one pinned Dask worker / one pinned FnApiRunner = {rate[PINNED] / rate[DASK1]:.2f} (wall; target <= 1.3), "
                  f"{table[PINNED][n][1] / table[DASK1][n][1]:.2f} (CPU s)")
        if DASK1 in rate and DASK2 in rate:
            print(f"  {n}: two pinned Dask workers vs one = {rate[DASK2] / rate[DASK1]:.2f}x as fast (wall; target >= 1.8)")
        if FB2 in rate and FB1 in rate and LOOP2 in rate:
            print(f"  {n}: featurebeam 2 workers / loop 2 processes = {rate[LOOP2] / rate[FB2]:.2f}; "
                  f"featurebeam 2 workers vs 1 = {rate[FB2] / rate[FB1]:.2f}x as fast (target >= 1.7); "
                  f"loop 2 processes vs 1 = {rate[LOOP2] / rate[LOOP1]:.2f}x")
        if FB2P in rate and FB1 in rate:
            print(f"  {n}: featurebeam 2 worker processes vs 1 worker = {rate[FB2P] / rate[FB1]:.2f}x as fast")
    print("\nfeaturebeam per-stage time (Beam counters, summed over workers, median run):")
    print("\n".join(stage_lines))


if __name__ == "__main__":
    main()
