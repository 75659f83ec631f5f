"""The same extraction on FnApiRunner, on a shared-nothing Dask cluster and on Beam's portable runner.

The corpus (default: `--items` clips of 0.25 s at 8 kHz in 10 labelled folders, as
benchmarks/scale.py makes them; or every file under `--corpus DIR`) is uploaded to a bucket of a
local GCS emulator, and each engine runs `pipelines.extract` from gs:// to gs://
(`--features=logmel --sample_rate=8000 --commit_records=16`, defaults otherwise):

- fnapi: Beam's FnApiRunner in the launcher process (featurebeam's default runner);
- dask: a scheduler and two single-threaded `dask worker`s, each in its own mount namespace
  (tests/shared_nothing.py: private /tmp and ~/.cache, own HOME), `--runner=DaskRunner`;
- portable: `--runner=PortableRunner --job_endpoint=embed --environment_type=EXTERNAL` on an
  isolated `worker_pool_main`, as Flink and Spark run Python: the job service (and its shuffles)
  in the launcher, every DoFn in SDK harness processes the pool starts (`--portable_flags` adds
  flags, e.g. `--sdk_worker_parallelism=2`).

Each run gets a fresh cluster or pool and a fresh launcher process (the script runs itself with
`--_launch`), runs are interleaved engine by engine, and the table shows medians over `--repeats`:

- wall s: `extract.run` in the launcher, submit to run.json (not the cluster's start-up);
- per worker, CPU s and peak RSS: the worker process and its descendants (the isolated decoder
  child) from /proc, sampled every 0.2 s: CPU is utime+stime of the process plus its reaped
  children (cutime+cstime) plus any live descendant, less what the worker had spent before the
  launch; peak RSS is the kernel's high-water mark (VmHWM) of the worker process, and "child" the
  largest among its descendants. For dask a worker is a `dask worker` process (the scheduler is
  shown too, in parentheses); for portable an SDK harness the pool started (they exit with the
  job; the pool row is the pool's whole tree, exact from its cutime); for fnapi the launcher is
  the worker (the launcher's own getrusage, self and children, during `extract.run`).
- launcher: CPU s and peak RSS (`ru_maxrss`, so including its imports) of the launcher process.

Bytes through each shuffle come from one more, untimed run per engine (benchmarks/shuffle_bytes.py):
on fnapi and portable the runner's grouping buffers in the launcher are wrapped (what it really
groups, after combiner lifting); on dask a counting step is put before every GroupByKey and the
workers' totals are collected with `client.run` (Dask lifts no combiner and drops Reshuffle).
Both count each element's (key, value) encoded with the coder Beam gives the shuffled PCollection.

    python benchmarks/scale_out.py                          # 400 clips, 3 repeats
    python benchmarks/scale_out.py --items 100 --repeats 1  # quick
    python benchmarks/scale_out.py --corpus ~/audio --engines dask,portable

Needs root (mount namespaces), like the tests that use tests/shared_nothing.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("fnapi", "dask", "portable")
BUCKET = "scale-out"
EXTRACT_ARGS = ["--features=logmel", "--sample_rate=8000", "--commit_records=16", "--progress=none"]
_TICK = os.sysconf("SC_CLK_TCK")


# --- the launcher process (`--_launch`) ---------------------------------------------------------

def _cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def launch(request: dict) -> dict:
    """One extraction in this process; its wall time, this process's usage, and shuffle bytes."""
    import resource

    from benchmarks import shuffle_bytes
    from pipelines import extract

    if request["count"] == "buffers":
        shuffle_bytes.instrument_fn_api_runner()
    elif request["count"] == "dask":
        shuffle_bytes.count_before_group_by_key()
    self0, children0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    run = extract.run(request["argv"])
    wall = time.monotonic() - start
    self1, children1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    shuffles = shuffle_bytes.totals()
    if request["count"] == "dask":
        from distributed import Client

        with Client(request["dask_address"], timeout=30) as client:
            shuffles = shuffle_bytes.merge(*client.run(shuffle_bytes.totals).values())
    return {
        "wall": wall,
        "cpu": _cpu(self1) - _cpu(self0),
        "children_cpu": _cpu(children1) - _cpu(children0),
        "rss_mb": self1.ru_maxrss / 1024,
        "children_rss_mb": children1.ru_maxrss / 1024,
        "counts": run["counts"],
        "shuffles": shuffles,
    }


# --- process trees from /proc -------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU s, reaped children's CPU s) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK, (int(fields[13]) + int(fields[14])) / _TICK


def _hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0) / 1024
    except OSError:
        return 0.0


class TreeSampler:
    """Samples the process trees below some root pids every `every` s, in a thread."""

    def __init__(self, roots: list[int], every: float = 0.2):
        self.roots = roots
        self.every = every
        self.seen: dict[int, dict] = {}  # pid -> {"ppid", "cpu" (own + reaped), "hwm", "order"}
        self._stop = threading.Event()
        self.sample()
        self.baseline = {root: self.tree_cpu(root) for root in roots}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        parents: dict[int, int] = {}
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                found = _stat(int(entry))
                if found:
                    parents[int(entry)] = found[0]
                    stats[int(entry)] = found
        inside = set(self.roots) | set(self.seen)
        changed = True
        while changed:  # descendants of the roots (and of anything seen before, for late reparenting)
            changed = False
            for pid, ppid in parents.items():
                if pid not in inside and ppid in inside:
                    inside.add(pid)
                    changed = True
        self.alive = {pid for pid in inside if pid in stats}
        for pid in self.alive:
            ppid, own, reaped = stats[pid]
            entry = self.seen.setdefault(pid, {"ppid": ppid, "order": len(self.seen), "hwm": 0.0})
            entry["cpu"] = own + reaped
            entry["hwm"] = max(entry["hwm"], _hwm_mb(pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def descendants(self, pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            parent = todo.pop()
            kids = sorted((p for p, e in self.seen.items() if e["ppid"] == parent and p != parent), key=lambda p: self.seen[p]["order"])
            out.extend(kids)
            todo.extend(kids)
        return out

    def tree_cpu(self, pid: int) -> float:
        """CPU s of `pid` and every descendant: its own and reaped children's, plus live descendants'
        (a live process's CPU is not yet in any parent's cutime)."""
        alive = getattr(self, "alive", set())
        return self.seen.get(pid, {}).get("cpu", 0.0) + sum(self.seen[d]["cpu"] for d in self.descendants(pid) if d in alive)

    def worker(self, pid: int, *, name: str, baseline: float = 0.0, cpu: float | None = None) -> dict:
        children = self.descendants(pid)
        return {
            "name": name,
            "cpu": (self.tree_cpu(pid) if cpu is None else cpu) - baseline,
            "rss_mb": self.seen.get(pid, {}).get("hwm", 0.0),
            "child_rss_mb": max((self.seen[c]["hwm"] for c in children), default=0.0),
        }


# --- one run ------------------------------------------------------------------------------------

@contextlib.contextmanager
def engine(name: str, log_dir: Path, portable_flags: list[str]):
    """(Beam flags, root pids of its workers, the Dask address or None) of a fresh engine."""
    from tests.shared_nothing import isolated_dask_cluster_at, isolated_worker_pool_at

    if name == "fnapi":
        yield ["--runner=FnApiRunner"], [], None
    elif name == "dask":
        with isolated_dask_cluster_at(log_dir) as cluster:
            yield cluster.flags, [w.pid for w in cluster.workers] + [cluster.scheduler.pid], cluster.address
    elif name == "portable":
        with isolated_worker_pool_at(log_dir) as pool:
            yield [*pool.flags, *portable_flags], [pool.proc.pid], None
    else:
        raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


def measure(name: str, *, dataset: str, output: str, work: Path, count: bool, portable_flags: list[str]) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    with engine(name, log_dir, portable_flags) as (flags, roots, address):
        request = {
            "argv": [f"--dataset={dataset}", f"--output={output}", "--run_id=r", *EXTRACT_ARGS, *flags],
            "count": None if not count else ("dask" if name == "dask" else "buffers"),
            "dask_address": address,
        }
        sampler = TreeSampler(roots)
        done = subprocess.run([sys.executable, __file__, "--_launch", json.dumps(request)], cwd=ROOT,
                              capture_output=True, text=True)
        sampler.stop()
        if done.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if name == "fnapi":
            result["workers"] = [{"name": "launcher", "cpu": result["cpu"] + result["children_cpu"],
                                  "rss_mb": result["rss_mb"], "child_rss_mb": result["children_rss_mb"]}]
        elif name == "dask":
            *workers, scheduler = roots
            result["workers"] = [sampler.worker(pid, name=f"worker {i}", baseline=sampler.baseline[pid])
                                 for i, pid in enumerate(workers)]
            result["workers"].append(sampler.worker(scheduler, name="(scheduler)", baseline=sampler.baseline[scheduler]))
        else:
            (pool,) = roots
            harnesses = [p for p in sampler.descendants(pool) if sampler.seen[p]["ppid"] == pool]
            result["workers"] = [sampler.worker(pid, name=f"sdk harness {i}") for i, pid in enumerate(harnesses)]
            result["workers"].append({**sampler.worker(pool, name="pool, whole tree", baseline=sampler.baseline[pool]),
                                      "rss_mb": sampler.seen[pool]["hwm"]})
    return result


# --- the table ----------------------------------------------------------------------------------

def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    with open("/proc/meminfo") as f:
        ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) / 1024**2
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({model or platform.machine()}), {ram:.0f} GiB RAM, load average at start {load} (1, 5, 15 min)"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _shuffle_name(label: str) -> str:
    """A GroupByKey's label without the steps runners name differently (lifted Group, ReshufflePerKey)."""
    return re.sub(r"/(GroupByKey|Group|ReshufflePerKey)(/.*)?$", "", label)


def print_tables(results: dict[str, list[dict]], shuffles: dict[str, dict], *, items: int, machine: str, repeats: int,
                 corpus: str) -> None:
    results = {name: runs for name, runs in results.items() if runs}
    print(f"machine: {machine}")
    print(f"corpus: {corpus}, through the GCS emulator; medians of {repeats} run(s) per engine")
    print()
    print(f"{'engine':<9} {'wall s':>7} {'items/s':>8} {'launcher CPU s':>14} {'launcher peak MiB':>17}   "
          f"{'worker':<17} {'CPU s':>7} {'peak MiB':>9} {'child peak MiB':>14}")
    for name, runs in results.items():
        wall = _median([r["wall"] for r in runs])
        head = (f"{name:<9} {wall:>7.1f} {items / wall:>8.1f} {_median([r['cpu'] for r in runs]):>14.1f} "
                f"{_median([r['rss_mb'] for r in runs]):>17.0f}")
        width = max(len(r["workers"]) for r in runs)
        for i in range(width):
            rows = [r["workers"][i] for r in runs if i < len(r["workers"])]
            print(f"{head if i == 0 else '':<58}   {rows[0]['name']:<17} {_median([w['cpu'] for w in rows]):>7.1f} "
                  f"{_median([w['rss_mb'] for w in rows]):>9.0f} {_median([w['child_rss_mb'] for w in rows]):>14.0f}")
    if not shuffles:
        return
    print()
    print("bytes through each shuffle (encoded (key, value)s entering each GroupByKey; B/item per listed item; max: largest element)")
    names = sorted({_shuffle_name(label) for found in shuffles.values() for label in found})
    print(f"{'':<64}" + "".join(f"{engine_name:>30}" for engine_name in shuffles))
    print(f"{'shuffle':<64}" + "".join(f"{'elements':>9} {'B/item':>9} {'max B':>10}" for _ in shuffles))
    for shuffle in names:
        cells = ""
        for found in shuffles.values():
            mine = [v for label, v in found.items() if _shuffle_name(label) == shuffle]
            if mine:
                elements, size, largest = (sum(v[0] for v in mine), sum(v[1] for v in mine), max(v[2] for v in mine))
                cells += f"{elements:>9} {size / items:>9.1f} {largest:>10}"
            else:
                cells += f"{'-':>9} {'-':>9} {'-':>10}"
        print(f"{shuffle[-64:]:<64}{cells}")
    totals = "".join(f"{sum(v[0] for v in found.values()):>9} {sum(v[1] for v in found.values()) / items:>9.1f} "
                     f"{max((v[2] for v in found.values()), default=0):>10}" for found in shuffles.values())
    print(f"{'all shuffles':<64}{totals}")


def upload(root: Path, gcs, prefix: str) -> int:
    from concurrent.futures import ThreadPoolExecutor

    bucket = gcs.make_bucket(BUCKET)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: bucket.blob(f"{prefix}/{p.relative_to(root).as_posix()}").upload_from_filename(str(p)), files))
    return len(files)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_launch":
        print(json.dumps(launch(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="clips of the generated corpus (default 400)")
    parser.add_argument("--corpus", help="a folder of audio to use instead of the generated clips")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--portable_flags", default="", help="extra Beam flags for the portable runner, space-separated")
    parser.add_argument("--no_shuffle_bytes", action="store_true", help="skip the extra counting run per engine")
    parser.add_argument("--work", help="folder for the corpus, the emulator's data and logs (default: a temp folder)")
    parser.add_argument("--table_from", help="print the tables of an earlier invocation's WORK/scale_out.json and exit")
    args = parser.parse_args()
    if args.table_from:
        print_saved(json.loads(Path(args.table_from).read_text()))
        return

    from tests.shared_nothing import gcs_emulator_at, unavailable

    reason = unavailable()
    if reason:
        raise SystemExit(reason)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every cluster, pool and emulator is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    machine = _machine()
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-out-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.corpus:
            root, corpus = Path(args.corpus).expanduser(), f"{args.corpus}"
        else:
            from benchmarks.scale import corpus as make_corpus

            root, corpus = make_corpus(work, args.items), f"{args.items} clips of 0.25 s at 8 kHz"
        gcs_dir = Path(tempfile.mkdtemp(prefix="gcs-", dir=work))  # a fresh emulator: it does not reload old objects well
        gcs = stack.enter_context(gcs_emulator_at(gcs_dir))
        items = upload(root, gcs, "corpus")
        dataset = f"gs://{BUCKET}/corpus/"
        saved = {"machine": machine, "corpus": corpus, "repeats": args.repeats, "items": items,
                 "results": {e: [] for e in engines}, "shuffles": {}}
        results, shuffles = saved["results"], saved["shuffles"]
        record = work / "scale_out.json"  # after every run, for --table_from should a later run not finish
        portable_flags = args.portable_flags.split()
        for repeat in range(args.repeats):
            for name in engines:
                result = measure(name, dataset=dataset, output=f"gs://{BUCKET}/runs/{name}-{repeat}", work=work, count=False,
                                 portable_flags=portable_flags)
                results[name].append(result)
                saved["items"] = result["counts"]["listed"]
                record.write_text(json.dumps(saved, indent=1))
                print(f"# {name} run {repeat + 1}: {result['wall']:.1f} s, {result['counts']}", file=sys.stderr, flush=True)
        if not args.no_shuffle_bytes:
            for name in engines:
                shuffles[name] = measure(name, dataset=dataset, output=f"gs://{BUCKET}/runs/{name}-bytes", work=work, count=True,
                                         portable_flags=portable_flags)["shuffles"]
                record.write_text(json.dumps(saved, indent=1))
        print_saved(saved)


def print_saved(saved: dict) -> None:
    print_tables(saved["results"], saved["shuffles"], items=saved["items"], machine=saved["machine"],
                 repeats=saved["repeats"], corpus=saved["corpus"])


if __name__ == "__main__":
    main()
