"""Bytes through each shuffle (GroupByKey) of a pipeline, measured where the runner does its grouping.

Two instruments, one measure: per GroupByKey, the elements that enter it and the bytes of each
element's (key, value) encoded with the coder Beam gives that PCollection (the coder a runner's
shuffle carries it in), and the largest such element.

- `instrument_fn_api_runner()`: FnApiRunner groups in the runner process (the launcher itself, or,
  for `--runner=PortableRunner --job_endpoint=embed`, the embedded job service in the launcher).
  Its `GroupingBuffer.append` receives every bundle's encoded output for a GroupByKey; this wraps
  it, so it sees what the runner really groups: after combiner lifting (a lifted CombinePerKey
  shuffles accumulators, not its input), with Reshuffles as they run there.
- `count_before_group_by_key()`: Beam's DaskRunner groups in Dask (partitions of Python objects,
  moved between workers by Dask's own pickling), so nothing in Beam sees encoded bytes. This makes
  every GroupByKey applied afterwards read through a ParDo that encodes each element with the
  input's coder and adds it to this process's `totals()`; on Dask call `totals` on every worker
  (`client.run`) and add them up. DaskRunner lifts no combiner and replaces Reshuffle with a no-op
  (the counting step inside it goes too), so this too is what its shuffles carry, in Beam's encoding.

`totals()`: {GroupByKey's full label: [elements, bytes, largest element bytes]}.
The counting costs an extra encode (or decode) per shuffled element: use it in runs you don't time.
"""

from __future__ import annotations

import threading
from typing import Any

_TOTALS: dict[str, list[int]] = {}
_LOCK = threading.Lock()


def _add(name: str, elements: int, size: int, largest: int) -> None:
    with _LOCK:
        entry = _TOTALS.setdefault(name, [0, 0, 0])
        entry[0] += elements
        entry[1] += size
        entry[2] = max(entry[2], largest)


def totals() -> dict[str, list[int]]:
    """This process's counts so far (a copy)."""
    with _LOCK:
        return {name: list(entry) for name, entry in _TOTALS.items()}


def merge(*parts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Add up `totals()` of several processes."""
    out: dict[str, list[int]] = {}
    for part in parts:
        for name, (elements, size, largest) in part.items():
            entry = out.setdefault(name, [0, 0, 0])
            entry[0] += elements
            entry[1] += size
            entry[2] = max(entry[2], largest)
    return out


def instrument_fn_api_runner() -> None:
    """Count what FnApiRunner's grouping buffers receive, per GroupByKey (this process only)."""
    from apache_beam.coders.coder_impl import create_InputStream
    from apache_beam.runners.portability.fn_api_runner import execution

    original_get_buffer = execution.BundleContextManager.get_buffer

    def get_buffer(self, buffer_id, transform_id):
        buffer = original_get_buffer(self, buffer_id, transform_id)
        if isinstance(buffer, execution.GroupingBuffer) and not hasattr(buffer, "shuffle_name"):
            _, name = execution.split_buffer_id(buffer_id)
            buffer.shuffle_name = self.execution_context.pipeline_components.transforms[name].unique_name
        return buffer

    original_append = execution.GroupingBuffer.append

    def append(self, elements_data: bytes) -> None:
        original_append(self, elements_data)
        name = getattr(self, "shuffle_name", None)
        if name is None:
            return
        windowed = self._pre_grouped_coder.get_impl()
        kv = self._pre_grouped_coder.wrapped_value_coder.get_impl()
        stream, elements, size, largest = create_InputStream(elements_data), 0, 0, 0
        while stream.size() > 0:
            n = len(kv.encode(windowed.decode_from_stream(stream, True).value))
            elements, size, largest = elements + 1, size + n, max(largest, n)
        _add(name, elements, size, largest)

    execution.BundleContextManager.get_buffer = get_buffer
    execution.GroupingBuffer.append = append


class _CountBytes:
    """DoFn body: passes elements through, counting their encoded size under `name`."""

    def __init__(self, name: str, coder: Any):
        self.name = name
        self.coder = coder

    def __call__(self, element):
        n = len(self.coder.encode(element))
        _add(self.name, 1, n, n)
        return element


def count_before_group_by_key() -> None:
    """Make every GroupByKey applied from now on in this process count its input (see module doc)."""
    import apache_beam as beam
    from apache_beam import coders, pvalue
    from apache_beam.pipeline import Pipeline
    from apache_beam.transforms import core

    original = Pipeline._apply_internal

    def apply_internal(self, transform, pvalueish=None, label=None):
        if label or not isinstance(transform, core.GroupByKey) or not isinstance(pvalueish, pvalue.PCollection):
            return original(self, transform, pvalueish, label)
        name = "/".join([self._current_transform().full_label, transform.label]).lstrip("/")
        element_type = pvalueish.element_type
        counting = beam.Map(_CountBytes(name, coders.registry.get_coder(element_type)))
        if element_type is not None:
            counting = counting.with_output_types(element_type)
        counted = original(self, counting, pvalueish, f"{transform.label}Bytes")
        return original(self, transform, counted, None)

    Pipeline._apply_internal = apply_internal
