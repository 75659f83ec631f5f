"""Per-stage time: Beam counters `featurebeam/stage_<stage>_us`, summed over workers.

Every stage adds the wall microseconds it spends to its counter, so any run can say where its
time went: `benchmarks/compare.py` prints the counters, and the launcher copies them into
run.json's `stage_seconds` (which the report shows) once the job is done. Stages, in pipeline
order: `list` (listing the dataset), `decode` (read + decode + resample of each item, the
decoder child's round trip included: they interleave in one stream, so they are timed together),
`dsp` (batching, extractors, row checks), `statistics` (the feature statistics' combiner:
adding rows, merging and compacting accumulators, the final proto), `encode` (rows to TFRecord
and Parquet bytes, codecs included), `write` (the shard files) and `commit` (the commit records).

A stage's time is the time spent producing its outputs, never the time a fused downstream step
runs inside its `yield`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

NAMESPACE = "featurebeam"
STAGES = ("list", "decode", "dsp", "statistics", "encode", "write", "commit")


def counter_name(stage: str) -> str:
    return f"stage_{stage}_us"


def counter(stage: str):
    """The Beam counter of `stage` (create it in a DoFn's `__init__`)."""
    from apache_beam.metrics import Metrics

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return Metrics.counter(NAMESPACE, counter_name(stage))


@contextlib.contextmanager
def timer(stage_counter) -> Iterator[None]:
    """Add the wall microseconds of the `with` body to `stage_counter` (None: time nothing)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if stage_counter is not None:
            stage_counter.inc(int(1e6 * (time.perf_counter() - start)))


def timed(events: Iterator[Any], stage_counter) -> Iterator[Any]:
    """`events`, adding the microseconds spent producing each one to `stage_counter`. Only the
    producing is timed: a fused downstream stage runs inside the `yield`."""
    try:
        while True:
            start = time.perf_counter()
            try:
                event = next(events)
            except StopIteration:
                return
            finally:
                stage_counter.inc(int(1e6 * (time.perf_counter() - start)))
            yield event
    finally:
        getattr(events, "close", lambda: None)()  # a consumer that stops early still closes the stream


def seconds(counters: dict[str, int]) -> dict[str, float]:
    """`{stage: seconds}` from `{counter name: microseconds}` (Beam counters of the namespace),
    in pipeline order; stages without a counter are left out."""
    out = {}
    for stage in STAGES:
        value = counters.get(counter_name(stage))
        if value is not None:
            out[stage] = round(value / 1e6, 6)  # to the microsecond: a short stage still shows it ran
    return out


def from_result(result: Any) -> dict[str, float] | None:
    """`{stage: seconds}` from a finished PipelineResult's counters, or None when the runner
    reports no metrics."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # a runner without metrics support: the run is fine, its stage times unknown
        return None
    counters: dict[str, int] = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        if value is not None:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value)
    return seconds(counters) or None
