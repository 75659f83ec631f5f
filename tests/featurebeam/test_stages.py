"""featurebeam/stages.py: stage counters, timers, and counters to run.json's stage_seconds."""

from __future__ import annotations

import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from featurebeam import stages


def test_seconds_are_in_pipeline_order_and_leave_out_missing_stages():
    counters = {"stage_commit_us": 2_000, "stage_list_us": 1_500_000, "records_ok": 7, "stage_dsp_us": 250_000,
                "stage_write_us": 40}
    assert list(stages.seconds(counters).items()) == [("list", 1.5), ("dsp", 0.25), ("write", 4e-05), ("commit", 0.002)]


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage 'resample'"):
        stages.counter("resample")


class _Counter:
    def __init__(self):
        self.value = 0

    def inc(self, n):
        self.value += n


def test_timed_counts_producing_not_consuming():
    counter = _Counter()

    def slow():
        time.sleep(0.02)
        yield 1
        time.sleep(0.02)
        yield 2

    for _ in stages.timed(slow(), counter):
        time.sleep(0.05)  # the consumer's time is not the stage's
    assert 35_000 <= counter.value < 80_000
    with stages.timer(counter):
        time.sleep(0.01)
    assert counter.value >= 45_000


class _Sleep(beam.DoFn):
    def __init__(self):
        self.us = stages.counter("encode")

    def process(self, x):
        with stages.timer(self.us):
            time.sleep(0.01)
        yield x


def test_from_result_reads_a_finished_pipelines_counters():
    p = TestPipeline(runner="FnApiRunner")
    _ = p | beam.Create([1, 2, 3]) | beam.ParDo(_Sleep())
    result = p.run()
    result.wait_until_finish()
    found = stages.from_result(result)
    assert list(found) == ["encode"] and found["encode"] >= 0.03
    assert stages.from_result(object()) is None  # a result without metrics
