"""What reaches each grouping of a pipeline when no combiner is lifted, as on Beam's DaskRunner.

`unlifted_combiners()` makes FnApiRunner, inside the `with`, run every `CombinePerKey` as Beam's
DaskRunner does: a GroupByKey of the raw elements, then the combiner over each group (neither
combiner packing nor lifting). `unlifted_groupings()` also records every (key, value) each
GroupByKey receives, by the grouping's transform name, so a test can check what a shuffle carries
on a runner that lifts nothing, without a Dask cluster. Pipelines run in this process (the default
in-process FnApiRunner; the runner's side of a multi-process one), as does
benchmarks/boundaries.py --unlifted.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Iterator


@contextlib.contextmanager
def unlifted_combiners() -> Iterator[None]:
    """Inside the `with`, FnApiRunner runs every `CombinePerKey` as Beam's DaskRunner does: a
    GroupByKey of the raw elements, then the combiner over each group (no packing, no lifting)."""
    from apache_beam.portability import common_urns
    from apache_beam.runners.portability.fn_api_runner import translations

    def unlifted(stages, context):
        # translations.lift_combiners, taking its own branch for combiners it cannot lift.
        for stage in stages:
            transform = translations.only_transform(stage.transforms)
            if transform.spec.urn != common_urns.composites.COMBINE_PER_KEY.urn:
                yield stage
                continue
            for sub in transform.subtransforms:
                part = context.components.transforms[sub]
                yield translations.Stage(
                    part.unique_name, [part], downstream_side_inputs=stage.downstream_side_inputs,
                    must_follow=stage.must_follow, parent=stage.name, environment=stage.environment,
                )

    with _patched({(translations, "lift_combiners"): unlifted, (translations, "pack_combiners"): lambda stages, context: stages}):
        yield


@contextlib.contextmanager
def unlifted_groupings() -> Iterator[dict[str, list[tuple[Any, Any]]]]:
    """`unlifted_combiners()`, recording what every grouping receives: yields {grouping's full
    transform name: [(key, value) it received, ...]}, filled as pipelines run."""
    from apache_beam.coders.coder_impl import create_InputStream
    from apache_beam.runners.portability.fn_api_runner import execution

    received: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    original_get_buffer = execution.BundleContextManager.get_buffer

    def get_buffer(self, buffer_id, transform_id):
        buffer = original_get_buffer(self, buffer_id, transform_id)
        kind, name = execution.split_buffer_id(buffer_id)
        if kind == "group" and not hasattr(buffer, "grouping_name"):
            context = self.execution_context
            transform = context.pipeline_components.transforms[name]
            buffer.grouping_name = transform.unique_name
            # The SDK's own coder of the grouping's input (the runner's stands in bytes for Python objects).
            (pcoll,) = transform.inputs.values()
            buffer.sdk_coder = context.pipeline_context.coders[context.data_channel_coders[pcoll]].get_impl()
        return buffer

    original_append = execution.GroupingBuffer.append

    def append(self, elements_data: bytes) -> None:
        original_append(self, elements_data)
        name = getattr(self, "grouping_name", None)
        if name is None:
            return
        stream, coder = create_InputStream(elements_data), self.sdk_coder
        while stream.size() > 0:
            key, value = coder.decode_from_stream(stream, True).value
            received[name].append((key, value))

    patches = {(execution.BundleContextManager, "get_buffer"): get_buffer, (execution.GroupingBuffer, "append"): append}
    with unlifted_combiners(), _patched(patches):
        yield received


@contextlib.contextmanager
def _patched(patches: dict[tuple[Any, str], Any]) -> Iterator[None]:
    saved = {(owner, attribute): getattr(owner, attribute) for owner, attribute in patches}
    for (owner, attribute), value in patches.items():
        setattr(owner, attribute, value)
    try:
        yield
    finally:
        for (owner, attribute), value in saved.items():
            setattr(owner, attribute, value)
