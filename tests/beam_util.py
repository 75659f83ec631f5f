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
