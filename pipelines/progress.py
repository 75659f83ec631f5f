"""Progress a person can watch while a run is going: `--progress=auto|bar|log|none`.

Workers may be other processes (FnApiRunner's multi_processing mode, Dask workers) or other
machines, and Beam metrics cannot carry the counts: FnApiRunner reports them only when the job
has ended, and Beam 2.77's DaskRunner not at all. So the pipeline carries `Tally` steps that
count what passes through them and rewrite a small JSON file of running totals under
`<run_dir>/_work/progress/<attempt>/` every few seconds (temp + rename, one file per DoFn
instance, so no two writers share a file; one folder per launch, so a resumed or overwritten
run's job counts only its own, and `RemoveStale` deletes the other launches' files on workers at
the end); the launcher sums the files while it waits for the job and prints items
done / listed, audio hours, records, failures, rate and ETA: in place on a terminal (`bar`), as
a log line every few seconds otherwise (`log`). `auto` picks `bar` on a TTY, else `log`.

On Dataflow nothing is polled: `watch` prints the job's monitoring page; the same totals are
the job's Beam counters in namespace `featurebeam` (DecodeFn's `items_failed`,
`decoded_audio_ms`; ExtractFn's `records_ok`, `records_failed`, `extracted_audio_ms`; the commit
step's `records_committed`).

The counts are for watching only: a retried bundle counts twice here. run.json's counts come
from the committed shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, TextIO

import apache_beam as beam

PROGRESS_DIR = "_work/progress"
MODES = ("auto", "bar", "log", "none")
KINDS = ("listed", "done", "failed")  # items listed; records committed; dead letters
_WRITE_EVERY_S = 2.0


def add_argument(parser) -> None:
    """Add `--progress` to the launcher's argparse parser."""
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="show progress while the job runs: bar (in place), log (a line every few seconds), "
        "none, or auto (bar on a terminal, else log)",
    )


class _TallyFn(beam.DoFn):
    """Counts elements (and audio seconds, finished items) and rewrites this instance's totals file."""

    def __init__(self, progress_dir: str, kind: str, every_s: float):
        self.progress_dir, self.kind, self.every_s = progress_dir, kind, every_s

    def setup(self):
        self.path = f"{self.progress_dir.rstrip('/')}/{self.kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}.json"
        self.totals = {"kind": self.kind, "elements": 0, "items": 0, "seconds": 0.0}
        self.written = 0.0
        self.dirty = False

    def process(self, element):
        if isinstance(element, dict) and ("rows" in element or "dead" in element):  # a commit's summary
            rows = element.get("rows", ())
            self.totals["elements"] += len(rows) + len(element.get("dead", ()))
            self.totals["items"] += sum(1 for row in rows if row["last"])
            self.totals["seconds"] += sum(float(row["seconds"]) for row in rows)
        else:
            self.totals["elements"] += 1
            # A record finishes its item when it is the item's last segment (whole items have one).
            self.totals["items"] += 1 if getattr(element, "last_segment", True) else 0
            seconds = getattr(element, "seconds", 0.0)
            self.totals["seconds"] += float(seconds) if isinstance(seconds, (int, float)) else 0.0
        self.dirty = True
        if time.monotonic() - self.written >= self.every_s:
            self._write()
        yield element

    def finish_bundle(self):  # a side effect only: Beam's DaskRunner drops finish_bundle output
        if self.dirty:
            self._write()

    def teardown(self):
        if getattr(self, "dirty", False):
            self._write()

    def _write(self):
        from export import metadata

        try:
            metadata.write_json(self.path, {**self.totals, "updated": time.time()})
        except Exception:  # progress must never fail the job
            return
        self.written = time.monotonic()
        self.dirty = False


class Tally(beam.PTransform):
    """Pass elements through unchanged, counting them as `kind` ("listed", "done" or "failed").

    progress_dir: where the totals files go (`attempt_dir(run_dir, attempt)`); None makes this a no-op
    that adds no step at all (e.g. for `--progress=none` or a Dataflow job).
    """

    def __init__(self, progress_dir: str | None, kind: str, *, every_s: float = _WRITE_EVERY_S):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.progress_dir, self.kind, self.every_s = progress_dir, kind, every_s

    def expand(self, pcoll):
        if self.progress_dir is None:
            return pcoll
        return pcoll | "Tally" >> beam.ParDo(_TallyFn(self.progress_dir, self.kind, self.every_s))


def attempt_dir(run_dir: str, attempt: str) -> str:
    """The folder one launch's (`attempt`'s) totals files go to: `<run_dir>/_work/progress/<tag>`."""
    from export import metadata

    tag = hashlib.sha256(attempt.encode("utf-8")).hexdigest()[:16]
    return metadata.join(run_dir, PROGRESS_DIR, tag)


class RemoveStale(beam.PTransform):
    """Delete every totals file under `<run_dir>/_work/progress/` but those in `keep` (this
    launch's folder, or None to keep none): what earlier launches of the run, or a run that
    `--mode=overwrite` replaced, left. Applied to a one-element PCollection (the run's summary),
    it lists and deletes on workers once that element exists; returns 1 per file removed."""

    def __init__(self, run_dir: str, *, keep: str | None):
        super().__init__()
        from export import metadata

        self.root = metadata.join(run_dir, PROGRESS_DIR)
        self.keep = None if keep is None else keep.rstrip("/") + "/"

    def expand(self, after):
        from export import metadata

        # `*` does not cross a '/': the launches' folders, and files of runs made before them.
        patterns = [metadata.join(self.root, "*"), metadata.join(self.root, "*", "*")]
        keep = self.keep
        return (
            after
            | "Patterns" >> beam.FlatMap(lambda _: patterns)
            | "Match" >> beam.ParDo(metadata.MatchFn())
            | "Stale" >> beam.Filter(lambda path: keep is None or not path.startswith(keep))
            | "Spread" >> beam.Reshuffle()
            | "Delete" >> beam.Map(lambda path: metadata.delete_present([path]))
        )


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Totals summed over every worker's file, `elapsed` seconds after the watch began."""

    listed: int = 0
    items_done: int = 0
    records: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    elapsed: float = 0.0

    @property
    def finished_items(self) -> int:
        return self.items_done + self.failed

    def line(self) -> str:
        """One line: items done / listed, audio hours, records, failures, rate, ETA."""
        done, listed = self.finished_items, self.listed
        rate = done / self.elapsed if self.elapsed > 0 else 0.0
        parts = [f"{done}/{listed} items" + (f" ({100 * done / listed:.1f}%)" if listed else "")]
        parts += [f"{self.audio_seconds / 3600:.4f} h audio", f"{self.records} records", f"{self.failed} failed"]
        parts.append(f"{rate:.2f} items/s")
        if rate > 0 and listed > done:
            parts.append(f"ETA {_duration((listed - done) / rate)}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def read(progress_dir: str, *, elapsed: float = 0.0) -> Snapshot:
    """Sum every totals file under `progress_dir` (a file being replaced is read whole or skipped)."""
    from apache_beam.io.filesystems import FileSystems

    sums: dict[str, dict[str, float]] = {kind: {"elements": 0, "items": 0, "seconds": 0.0} for kind in KINDS}
    try:
        matched = FileSystems.match([f"{progress_dir.rstrip('/')}/*.json"])[0].metadata_list
    except Exception:
        matched = []
    for meta in matched:
        try:
            with FileSystems.open(meta.path, compression_type="uncompressed") as handle:
                totals = json.loads(handle.read())
        except Exception:  # renamed away between listing and reading
            continue
        for key in ("elements", "items", "seconds"):
            sums[totals["kind"]][key] += totals[key]
    return Snapshot(
        listed=int(sums["listed"]["elements"]),
        items_done=int(sums["done"]["items"]),
        records=int(sums["done"]["elements"]),
        failed=int(sums["failed"]["elements"]),
        audio_seconds=float(sums["done"]["seconds"]),
        elapsed=elapsed,
    )


def resolve_mode(mode: str, stream: TextIO) -> str:
    if mode not in MODES:
        raise ValueError(f"--progress must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "bar" if getattr(stream, "isatty", lambda: False)() else "log"
    return mode


def dataflow_hint(result: Any, options: Any) -> str | None:
    """Where to watch a Dataflow job, or None for other runners."""
    job_id = getattr(result, "job_id", None)
    if not callable(job_id):
        return None
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    gcp = options.view_as(GoogleCloudOptions)
    return (
        f"progress: https://console.cloud.google.com/dataflow/jobs/{gcp.region}/{job_id()}?project={gcp.project} "
        "(counters in namespace 'featurebeam': records_ok, records_failed, items_failed, extracted_audio_ms)"
    )


def watch(
    result: Any,
    *,
    progress_dir: str | None,
    mode: str = "auto",
    options: Any = None,
    interval_s: float = 5.0,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Wait for `result` (a PipelineResult, or a callable that submits the job and returns one)
    while showing progress; returns the final state.

    The launcher's one call around running: `progress.watch(p.run, progress_dir=..., mode=args.progress,
    options=plan.options)`. It also closes the Dask client Beam's DaskRunner leaves open.
    """
    stream = stream or sys.stderr
    mode = resolve_mode(mode, stream)
    started = clock()
    stop = threading.Event()
    thread = None
    if mode != "none" and progress_dir is not None:

        def show(final: bool = False) -> None:
            line = read(progress_dir, elapsed=clock() - started).line()
            if mode == "bar":
                stream.write(f"\r\033[Kprogress: {line}" + ("\n" if final else ""))
            else:
                stream.write(f"progress: {line}\n")
            stream.flush()

        def loop() -> None:
            while not stop.wait(interval_s):
                show()

        thread = threading.Thread(target=loop, name="featurebeam-progress", daemon=True)
        thread.start()
    submit, result = (result, None) if callable(result) else (None, result)
    try:
        # FnApiRunner runs the whole job inside run(): submit after the watcher has started.
        if submit is not None:
            result = submit()
        hint = dataflow_hint(result, options) if options is not None else None
        if hint and mode != "none":
            print(hint, file=stream, flush=True)
        state = result.wait_until_finish()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
            show(final=True)
        client = getattr(result, "client", None)  # Beam's DaskRunnerResult keeps its Client open
        if client is not None and hasattr(client, "close"):
            client.close()
    return state
