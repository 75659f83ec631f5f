"""Collecting a PCollection's elements in a test: Beam runners pickle DoFns, so appending to a
Python list from inside a pipeline never reaches the test; each bundle writes a pickle file."""

from __future__ import annotations

import pickle
import tempfile
import uuid
from pathlib import Path

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline


class _Dump(beam.DoFn):
    def __init__(self, folder: str):
        self.folder = folder

    def start_bundle(self):
        self.buffer = []

    def process(self, element):
        self.buffer.append(element)

    def finish_bundle(self):
        if self.buffer:
            (Path(self.folder) / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(self.buffer))


def collect(transform: beam.PTransform) -> list:
    """Run `transform` from the pipeline root on the FnApiRunner; return every element it emits."""
    with tempfile.TemporaryDirectory() as folder:
        with TestPipeline(runner="FnApiRunner") as p:
            p | transform | beam.ParDo(_Dump(folder))
        return [e for path in sorted(Path(folder).glob("*.pkl")) for e in pickle.loads(path.read_bytes())]


class _DumpEach(beam.DoFn):
    """One pickle file per element, written in process(): Beam's DaskRunner drops finish_bundle output
    but also cannot be trusted with finish_bundle-only work in a shared collector."""

    def __init__(self, folder: str):
        self.folder = folder

    def process(self, element):
        (Path(self.folder) / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(element))


def run_and_collect(build, flags: list[str]) -> dict[str, list]:
    """Build a pipeline with `build(p) -> {name: PCollection}`, run it with Beam `flags`, and
    return each named PCollection's elements, sorted by repr.

    All outputs go through one Flatten into one last collecting step, so runners that compute
    only the last step of a graph (Beam's DaskRunner) still see every output.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    with tempfile.TemporaryDirectory() as folder:
        p = beam.Pipeline(options=PipelineOptions(flags))
        outputs = build(p)
        named = [pc | f"Name_{name}" >> beam.Map(lambda e, name: (name, e), name) for name, pc in outputs.items()]
        named | "AllOutputs" >> beam.Flatten() | "Collect" >> beam.ParDo(_DumpEach(folder))
        result = p.run()
        try:
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # DaskRunner's result leaves its Client open
            if client is not None:
                client.close()
        got: dict[str, list] = {name: [] for name in outputs}
        for path in Path(folder).glob("*.pkl"):
            name, element = pickle.loads(path.read_bytes())
            got[name].append(element)
        return {name: sorted(values, key=repr) for name, values in got.items()}
