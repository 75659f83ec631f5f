"""Listing in tasks: task count, speed and memory of the gs:// and local listings.

    python benchmarks/listing.py [--objects 10000] [--local_files 20000] [--threads 32] [--repeats 3]

Bucket: uploads `objects` small objects in `bench/class_<c>/spk_<s>/clip_<i>.wav` (10 classes of
10 speakers, plus 5% that are not audio) to an emulated bucket with a thread pool. Local: writes
`local_files` small files in the same layout to a temporary folder, plus two flat folders (a
tenth of `local_files` and all of it in one folder: one task that pages). Then, for one tenth of the
items (one class) and for all of them, each step in a fresh process (as a launch would):

- prepare: the launcher's check alone (all a Dataflow launch does), wall time and peak RSS;
- pipeline: prepare plus a Beam pipeline (FnApiRunner) that lists through the adapter's listing
  transform and combines the dataset fingerprint, as the extraction pipeline does; wall time,
  peak RSS, and the listing's `listing_tasks` / `listing_pages` counters;
- tasks: every listing task run alone, one after another, in one process as a worker runs it
  (its outputs consumed as they come, as a runner streams them on), with tracemalloc: the
  largest task's item count and the highest per-task peak of Python heap.

Per-task memory is bounded by a page (1,000 objects on Cloud Storage, one folder's 1,000 entries
locally), not by the task's size. gcp-storage-emulator ignores maxResults and answers a listing in
one page, so on the emulator a task's peak grows with its prefix's size (the script says so when
it sees it); the local listing pages as Cloud Storage does.
Uses $STORAGE_EMULATOR_HOST if set, else starts gcp-storage-emulator (in memory, see
EMULATOR_SHIM) from this virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "featurebeam-bench"
# gcp-storage-emulator rewrites one JSON file with every object's metadata after each write
# (O(n) per upload, so O(n^2) for n uploads: about 17 minutes for 10,000) and serves one request
# at a time. For the benchmark it runs with in-memory state, no metadata file, and a threaded
# HTTP server; its listing code, which is what is measured, is unchanged.
EMULATOR_SHIM = """
import sys
from http import server
import gcp_storage_emulator.storage as storage
from gcp_storage_emulator.__main__ import main
storage.Storage._write_config_to_file = lambda self: None
server.ThreadingHTTPServer.request_queue_size = 256
server.HTTPServer = server.ThreadingHTTPServer
sys.exit(main(sys.argv[1:]))
"""
PROJECT = "featurebeam-bench"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def emulator():
    """STORAGE_EMULATOR_HOST, starting gcp-storage-emulator on a free port if it is not set."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        yield os.environ["STORAGE_EMULATOR_HOST"]
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", EMULATOR_SHIM, "start", "--in-memory", "--quiet", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            if proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with code {proc.returncode}")
            time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def layout(i: int, ext: str) -> str:
    """The i-th item's relative name: 10 classes of 10 speakers."""
    return f"bench/class_{i % 10}/spk_{i // 10 % 10}/clip_{i:06d}{ext}"


def write_local(root: Path, n: int) -> float:
    """`n` items (plus 5% text files) in the benchmark layout, and `flat_<k>/`: k files in one folder,
    for k of n / 10 and n (one task that must page through its folder)."""
    start = time.monotonic()
    names = [layout(i, ".wav") for i in range(n)] + [layout(i, ".txt") for i in range(n // 20)]
    names += [f"flat_{k}/clip_{i:06d}.wav" for k in (n // 10, n) for i in range(k)]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF" + bytes(60))
    return time.monotonic() - start


def upload(n: int, threads: int) -> float:
    from featurebeam import cloud

    local = threading.local()

    def bucket():
        if not hasattr(local, "bucket"):  # one client (HTTP session) per thread
            local.bucket = cloud.storage_client(project=PROJECT).bucket(BUCKET)
        return local.bucket

    names = [layout(i, ".wav") for i in range(n)] + [layout(i, ".txt") for i in range(n // 20)]
    payload = b"RIFF" + bytes(60)
    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda name: bucket().blob(name).upload_from_string(payload), names))
    return time.monotonic() - start


def measure(step: str, uri: str, out: str) -> dict:
    """Run one step in this (fresh) process: imports first, then the measured work."""
    import json

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from datasets import resolve
    from datasets.base import FingerprintFn
    from pipelines import extract  # noqa: F401  (the launcher's imports, as in a real run)

    rss = status_kib("VmRSS")
    start = time.monotonic()
    dataset = resolve(uri)
    dataset.prepare()
    result = {"listed": None}
    if step == "pipeline":
        p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
        (
            p
            | "List" >> dataset.listing()
            | "Fingerprint" >> beam.CombineGlobally(FingerprintFn())
            | "Json" >> beam.Map(json.dumps)
            | "Write" >> beam.io.WriteToText(out, shard_name_template="", num_shards=1)
        )
        outcome = p.run()
        outcome.wait_until_finish()
        result["listed"] = json.loads(Path(out).read_text())["listed"]
        for counter in outcome.metrics().query(MetricsFilter())["counters"]:
            name = counter.key.metric.name
            if name.startswith("listing_"):
                result[name] = result.get(name, 0) + counter.committed
    elif step == "tasks":
        result.update(run_tasks(dataset))
    return {"seconds": time.monotonic() - start, "rss_kib": rss, "hwm_kib": status_kib("VmHWM"), **result}


def run_tasks(dataset) -> dict:
    """Every listing task alone, depth first, as a worker runs it; per-task item count and heap peak."""
    import tracemalloc

    import apache_beam as beam

    from datasets.files import _ListTaskFn

    fn = _ListTaskFn(dataset, tries=5, base_delay=0.5)
    fn.setup()
    pending, tasks, listed, largest, peak = list(dataset.tasks()), 0, 0, 0, 0
    tracemalloc.start()
    while pending:
        task = pending.pop()
        tasks += 1
        tracemalloc.reset_peak()
        base, items = tracemalloc.get_traced_memory()[0], 0
        for out in fn.process(task):
            if isinstance(out, beam.pvalue.TaggedOutput):
                pending.append(out.value)
            else:
                items += 1
            del out
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        listed, largest = listed + items, max(largest, items)
    tracemalloc.stop()
    return {"listed": listed, "tasks": tasks, "largest_task": largest, "task_peak_kib": peak // 1024}


def run_child(step: str, uri: str, out: str) -> dict:
    import json

    result = subprocess.run(
        [sys.executable, __file__, "--child", step, "--uri", uri, "--out", out],
        check=True, capture_output=True, text=True, env=os.environ.copy(),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(kind: str, uri: str, expected: int, repeats: int, tmp: str) -> None:
    results = {}
    for step in ("prepare", "pipeline", "tasks"):
        results[step] = [run_child(step, uri, os.path.join(tmp, f"{kind}-{step}-{expected}-{i}.json")) for i in range(repeats)]
    for r in results["pipeline"] + results["tasks"]:
        if r["listed"] != expected:
            raise SystemExit(f"listed {r['listed']} items under {uri}, expected {expected}")

    def summary(rows):
        seconds = statistics.median(r["seconds"] for r in rows)
        peak = max(r["hwm_kib"] for r in rows) / 1024
        grow = max(r["hwm_kib"] - r["rss_kib"] for r in rows) / 1024
        return seconds, peak, grow

    p_s, p_peak, p_grow = summary(results["prepare"])
    l_s, l_peak, l_grow = summary(results["pipeline"])
    pipe, tasks = results["pipeline"][0], results["tasks"][0]
    print(
        f"{kind} {expected:>6} items ({uri}), median of {repeats}:\n"
        f"    launcher check only (prepare): {p_s:.2f} s, peak {p_peak:.0f} MiB (+{p_grow:.1f})\n"
        f"    prepare + listing pipeline on FnApiRunner: {l_s:.2f} s ({expected / l_s:.0f} items/s), "
        f"peak {l_peak:.0f} MiB (+{l_grow:.1f}); {pipe.get('listing_tasks', 0)} tasks, "
        f"{pipe.get('listing_pages', 0)} pages\n"
        f"    tasks alone: {tasks['tasks']} tasks, largest {tasks['largest_task']} items, "
        f"highest per-task heap peak {max(r['task_peak_kib'] for r in results['tasks']) / 1024:.2f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--local_files", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("prepare", "pipeline", "tasks"), help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", PROJECT)
    if args.child:
        import json

        print(json.dumps(measure(args.child, args.uri, args.out)))
        return

    import platform

    # A timeout's SIGTERM must still stop the emulator this script started (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}")
    print("each step runs in a fresh launcher process; peak = VmHWM at the end, "
          "+ = VmHWM minus VmRSS after the imports")
    with tempfile.TemporaryDirectory() as tmp:
        if args.local_files:
            root = Path(tmp) / "local"
            n = args.local_files
            seconds = write_local(root, n)
            print(f"wrote {n + n // 20 + n // 10 + n} local files in {seconds:.1f} s")
            # One class folder holds a tenth of the items: the same steps at a tenth of the size
            # show which figures grow with the listing and which stay flat. The flat folders are
            # the worst case for one task: everything in one folder, so it pages.
            for uri, expected in [(f"{root}/bench/class_0", n // 10), (f"{root}/bench", n),
                                  (f"{root}/flat_{n // 10}", n // 10), (f"{root}/flat_{n}", n)]:
                report("local", uri, expected, args.repeats, tmp)
        if not args.objects:
            return
        from featurebeam import cloud

        with emulator() as endpoint:
            client = cloud.storage_client(project=PROJECT)
            if not client.lookup_bucket(BUCKET):
                client.create_bucket(BUCKET)
            if not client.bucket(BUCKET).get_blob(layout(args.objects - 1, ".wav")):
                seconds = upload(args.objects, args.threads)
                total = args.objects + args.objects // 20
                print(f"uploaded {total} objects ({args.objects} .wav, the rest .txt) in {seconds:.1f} s "
                      f"({total / seconds:.0f}/s, {args.threads} threads) to {endpoint}")
            page = next(client.list_blobs(BUCKET, prefix="bench/", page_size=1000).pages).num_items
            if page > 1000:
                print(f"note: this server ignores maxResults and answers a listing in one page ({page} objects); "
                      "Cloud Storage pages by at most 1000, so per-task memory here grows with the task's size")
            for uri, expected in [(f"gs://{BUCKET}/bench/class_0/", args.objects // 10), (f"gs://{BUCKET}/bench/", args.objects)]:
                report("gcs", uri, expected, args.repeats, tmp)


if __name__ == "__main__":
    main()
