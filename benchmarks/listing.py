"""Listing speed and launcher memory of the gs:// adapter, against a local GCS emulator.

    python benchmarks/listing.py [--objects 10000] [--threads 32] [--repeats 3]

Uploads `objects` small objects (plus 5% that are not audio) to an emulated bucket with a thread
pool, then, `repeats` times, runs the adapter's launcher check (`prepare()`) and a Beam pipeline
(FnApiRunner) that lists the objects through the adapter's listing transform and combines them
into the dataset fingerprint, as the extraction pipeline does; once for one tenth of the objects
(one prefix) and once for all of them. Each step runs in a fresh process, as a launch would, and
reports its wall time and peak resident memory (VmHWM from /proc/self/status) against its RSS
after the imports.

With the in-process FnApiRunner the launcher also runs the workers, so "pipeline" memory
includes MatchAll's list of matched objects; on Dataflow the launcher only runs `prepare()`.
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


def upload(n: int, threads: int) -> float:
    from featurebeam import cloud

    local = threading.local()

    def bucket():
        if not hasattr(local, "bucket"):  # one client (HTTP session) per thread
            local.bucket = cloud.storage_client(project=PROJECT).bucket(BUCKET)
        return local.bucket

    names = [f"bench/class_{i % 10}/clip_{i:05d}.wav" for i in range(n)]
    names += [f"bench/class_{i % 10}/notes_{i:05d}.txt" for i in range(n // 20)]
    payload = b"RIFF" + bytes(60)
    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda name: bucket().blob(name).upload_from_string(payload), names))
    return time.monotonic() - start


def measure(step: str, uri: str, out: str) -> dict:
    """Run one step in this (fresh) process: imports first, then the measured work."""
    import json

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from datasets import resolve
    from datasets.base import FingerprintFn
    from pipelines import extract  # noqa: F401  (the launcher's imports, as in a real run)

    rss = status_kib("VmRSS")
    start = time.monotonic()
    dataset = resolve(uri)
    dataset.prepare()
    listed = None
    if step == "pipeline":
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            (
                p
                | "List" >> dataset.listing()
                | "Fingerprint" >> beam.CombineGlobally(FingerprintFn())
                | "Json" >> beam.Map(json.dumps)
                | "Write" >> beam.io.WriteToText(out, shard_name_template="", num_shards=1)
            )
        listed = json.loads(Path(out).read_text())["listed"]
    return {"seconds": time.monotonic() - start, "rss_kib": rss, "hwm_kib": status_kib("VmHWM"), "listed": listed}


def run_child(step: str, uri: str, out: str) -> dict:
    import json

    result = subprocess.run(
        [sys.executable, __file__, "--child", step, "--uri", uri, "--out", out],
        check=True, capture_output=True, text=True, env=os.environ.copy(),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("prepare", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", PROJECT)
    if args.child:
        import json

        print(json.dumps(measure(args.child, args.uri, args.out)))
        return

    from featurebeam import cloud

    with emulator() as endpoint:
        client = cloud.storage_client(project=PROJECT)
        if not client.lookup_bucket(BUCKET):
            client.create_bucket(BUCKET)
        if not client.bucket(BUCKET).get_blob(f"bench/class_{(args.objects - 1) % 10}/clip_{args.objects - 1:05d}.wav"):
            seconds = upload(args.objects, args.threads)
            total = args.objects + args.objects // 20
            print(f"uploaded {total} objects ({args.objects} .wav, the rest .txt) in {seconds:.1f} s "
                  f"({total / seconds:.0f}/s, {args.threads} threads) to {endpoint}")
        page = next(client.list_blobs(BUCKET, prefix="bench/", page_size=1000).pages).num_items
        if page > 1000:
            print(f"note: this server ignores maxResults and answers a listing in one page ({page} objects); "
                  "Cloud Storage pages by at most 1000, so launcher memory here grows with the object count")
        print("each step runs in a fresh launcher process; peak = VmHWM at the end, "
              "+ = VmHWM minus VmRSS after the imports")
        # One class prefix holds a tenth of the objects: the same steps at a tenth of the size show
        # which memory grows with the listing and which is fixed (HTTP/TLS client set-up).
        targets = [(f"gs://{BUCKET}/bench/class_0/", args.objects // 10), (f"gs://{BUCKET}/bench/", args.objects)]
        with tempfile.TemporaryDirectory() as tmp:
            for uri, expected in targets:
                results = {}
                for step in ("prepare", "pipeline"):
                    results[step] = [run_child(step, uri, os.path.join(tmp, f"{step}-{expected}-{i}.json"))
                                     for i in range(args.repeats)]
                for r in results["pipeline"]:
                    if r["listed"] != expected:
                        raise SystemExit(f"listed {r['listed']} objects under {uri}, expected {expected}")

                def summary(rows):
                    seconds = statistics.median(r["seconds"] for r in rows)
                    peak = max(r["hwm_kib"] for r in rows) / 1024
                    grow = max(r["hwm_kib"] - r["rss_kib"] for r in rows) / 1024
                    return seconds, peak, grow

                p_s, p_peak, p_grow = summary(results["prepare"])
                l_s, l_peak, l_grow = summary(results["pipeline"])
                print(
                    f"{expected:>6} objects ({uri}), median of {args.repeats}:\n"
                    f"    launcher check only (prepare; all a Dataflow launch does): {p_s:.2f} s, "
                    f"peak {p_peak:.0f} MiB (+{p_grow:.1f})\n"
                    f"    prepare + listing pipeline on FnApiRunner (in-process workers): {l_s:.2f} s "
                    f"({expected / l_s:.0f} objects/s), peak {l_peak:.0f} MiB (+{l_grow:.1f})"
                )


if __name__ == "__main__":
    main()
