"""--progress: workers in other processes write running totals, the launcher prints them while waiting."""

from __future__ import annotations

import io
import re
import time
import types

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import portable, progress

LINE = re.compile(
    r"^progress: (\d+)/(\d+) items(?: \([\d.]+%\))?, ([\d.]+) h audio, (\d+) records, (\d+) failed, [\d.]+ items/s(?:, ETA .+)?$"
)


def _slow_record(i: int):
    time.sleep(0.1)
    return types.SimpleNamespace(key=f"k{i}", last_segment=True, seconds=1.8)


def _run_watched(flags: list[str], progress_dir: str, n: int = 24, bad: int = 4) -> list[str]:
    p = beam.Pipeline(options=PipelineOptions(flags))
    items = p | beam.Create(list(range(n))) | "Listed" >> progress.Tally(progress_dir, "listed", every_s=0.1)
    done = (
        items
        | "Good" >> beam.Filter(lambda i: i >= bad)
        | "Decode" >> beam.Map(_slow_record)
        | "Done" >> progress.Tally(progress_dir, "done", every_s=0.1)
    )
    failed = items | "Bad" >> beam.Filter(lambda i: i < bad) | "Failed" >> progress.Tally(progress_dir, "failed", every_s=0.1)
    (done, failed) | portable.AfterAll()
    out = io.StringIO()
    state = progress.watch(p.run(), progress_dir=progress_dir, mode="log", interval_s=0.2, stream=out)
    assert state == "DONE"
    return out.getvalue().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fnapi-multiprocess", "dask"])
def test_log_form_counts_work_done_in_other_processes(engine, tmp_path, request):
    if engine == "dask":
        flags = request.getfixturevalue("dask_cluster").beam_flags
    else:
        flags = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    lines = _run_watched(flags, str(tmp_path / "_progress"))
    assert lines and all(LINE.match(line) for line in lines), lines
    parsed = [tuple(float(g) for g in LINE.match(line).groups()) for line in lines]
    assert parsed[-1] == (24, 24, round(20 * 1.8 / 3600, 4), 20, 4)  # every item finished, from worker files
    assert [row[0] for row in parsed] == sorted(row[0] for row in parsed)  # never goes backwards


def test_line_states_counts_rate_and_eta():
    snap = progress.Snapshot(listed=100, items_done=30, records=45, failed=10, audio_seconds=7200.0, elapsed=20.0)
    assert snap.line() == "40/100 items (40.0%), 2.0000 h audio, 45 records, 10 failed, 2.00 items/s, ETA 30 s"
    assert progress.Snapshot().line() == "0/0 items, 0.0000 h audio, 0 records, 0 failed, 0.00 items/s"


def test_auto_is_bar_on_a_terminal_and_log_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress.resolve_mode("auto", Terminal()) == "bar"
    assert progress.resolve_mode("auto", io.StringIO()) == "log"
    with pytest.raises(ValueError, match="--progress must be one of auto, bar, log, none"):
        progress.resolve_mode("loud", io.StringIO())


def test_none_adds_no_step():
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    pcoll = p | beam.Create([1])
    assert (pcoll | progress.Tally(None, "listed")) is pcoll
