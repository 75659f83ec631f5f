"""The pipeline's runner-API proto uses only what every portable runner (Flink, Spark, Dataflow) runs.

A portable runner executes standard primitives itself and hands every ParDo to the Python SDK
harness, so the graph is portable when each leaf transform has a standard Beam URN and each
ParDo's DoFn is one the Python SDK harness runs. A leaf with an SDK-private URN (a Python-only
Read, a transform only the local runner understands) would be refused by a job server.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import extract
from pipelines import portable


def _standard_urns() -> set[str]:
    urns = set()
    for group in (common_urns.primitives, common_urns.composites, common_urns.combine_components,
                  common_urns.deprecated_primitives, common_urns.requirements):
        urns |= {v.urn for v in vars(group).values() if hasattr(v, "urn")}
    return urns


# DoFn payloads the Python SDK harness runs (the second marks CombineGlobally's keying step).
PYTHON_DOFNS = {"beam:dofn:pickled_python_info:v1", "beam:dofn:python_key_with_none:v1"}
PICKLED = "beam:transform:pickled_python:v1"


def problems(pipeline: beam.Pipeline) -> list[str]:
    """What in `pipeline`'s runner-API proto a portable runner could not run, one line each."""
    return problems_in(pipeline.to_runner_api())


def problems_in(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    """problems() of a runner-API Pipeline proto (e.g. one Dataflow staged)."""
    standard = _standard_urns()
    found = []
    for transform in proto.components.transforms.values():
        if transform.subtransforms:
            continue  # a composite: runners look inside
        urn = transform.spec.urn
        if urn == PICKLED and dict(transform.inputs) == dict(transform.outputs):
            continue  # a composite that expanded to nothing (Create's MaybeReshuffle of one value)
        if urn not in standard:
            found.append(f"{transform.unique_name}: non-standard URN {urn!r}")
        elif urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if payload.do_fn.urn not in PYTHON_DOFNS:
                found.append(f"{transform.unique_name}: DoFn {payload.do_fn.urn!r}")
    for env in proto.components.environments.values():
        if env.urn not in (common_urns.environments.DEFAULT.urn, common_urns.environments.DOCKER.urn):
            found.append(f"environment {env.urn!r}")
    return found


@pytest.mark.parametrize("extra", [[], ["--limit=5", "--segment_seconds=1"]], ids=["default", "limit+segments"])
def test_every_transform_is_standard_or_a_python_dofn(extra, tmp_path):
    plan = extract.plan(["--dataset=sample", f"--output={tmp_path}", "--run_id=p", *extra])
    pipeline = beam.Pipeline(options=plan.options)
    extract.build(pipeline, plan)
    assert problems(pipeline) == []
    # Beam's DaskRunner computes only the last step and what it depends on: Finalize depends on all.
    assert portable.dangling_transforms(pipeline) == []


class _LocalOnlyPrimitive(beam.PTransform):
    """A leaf no runner but the one it was written for could expand (like the DaskRunner's overrides)."""

    def expand(self, pcoll):
        return beam.pvalue.PCollection.from_(pcoll)


def test_a_local_only_primitive_is_reported():
    pipeline = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=FnApiRunner"]))
    _ = pipeline | beam.Create([1]) | "LocalOnly" >> _LocalOnlyPrimitive() | beam.Map(str)
    assert problems(pipeline) == [f"LocalOnly: non-standard URN {PICKLED!r}"]
