"""schema.pbtxt on a real run: both tfx-bsl readers parse the run's TFRecords with it, its own
TensorFlow reader through the schema's tensor representations, and the Beam source into Arrow
record batches that its TensorAdapter turns into the same tensors."""

from __future__ import annotations

import numpy as np
import pytest

import export
from export import metadata
from export.schema import from_pbtxt

pytestmark = pytest.mark.slow


def _source(run_dir: str):
    from tfx_bsl.public import tfxio

    schema = from_pbtxt(metadata.read_text(f"{run_dir}/{metadata.SCHEMA_PBTXT}"))
    return tfxio.TFSequenceExampleRecord(
        file_pattern=f"{run_dir}/tfrecords/part-*.tfrecord*", schema=schema, telemetry_descriptors=["featurebeam"]
    )


@pytest.fixture(scope="module")
def reference(sample_run):
    """key -> logmel [frames, 64] as featurebeam's own loader reads it."""
    ds = export.load_tfrecords(sample_run["outputs"]["run_dir"], features=["logmel"], batch_size=None)
    return {x["key"].numpy().decode(): x["logmel"].numpy() for x, _ in ds}


def test_schema_has_a_tensor_representation_per_feature(sample_run):
    schema = from_pbtxt(metadata.read_text(f"{sample_run['outputs']['run_dir']}/{metadata.SCHEMA_PBTXT}"))
    group = schema.tensor_representation_group[""].tensor_representation
    assert list(group["logmel"].ragged_tensor.feature_path.step) == ["##SEQUENCE##", "logmel"]
    assert [d.size for d in group["summary_logmel_mean"].dense_tensor.shape.dim] == [64]
    assert group["key"].dense_tensor.column_name == "key"


def test_tfx_tensorflow_dataset_reads_the_run(sample_run, reference):
    from tfx_bsl.public import tfxio

    ds = _source(sample_run["outputs"]["run_dir"]).TensorFlowDataset(
        tfxio.TensorFlowDatasetOptions(batch_size=8, num_epochs=1, shuffle=False)
    )
    seen = 0
    for batch in ds:
        logmel = batch["logmel"].to_tensor().numpy()  # [batch, frames, 64]
        assert logmel.shape[1:] == (126, 64)
        assert batch["summary_logmel_mean"].shape[1:] == (64,) and batch["spectral_centroid"].to_tensor().shape[1:] == (126, 1)
        for key, value in zip(batch["key"].numpy(), logmel):
            np.testing.assert_array_equal(value, reference[key.decode()])
            seen += 1
    assert seen == sample_run["counts"]["records"]


def test_tfx_beam_source_and_tensor_adapter_read_the_run(sample_run, reference, tmp_path):
    import apache_beam as beam
    from tfx_bsl.public import tfxio

    from tests.beam_util import collect

    source = _source(sample_run["outputs"]["run_dir"])
    config = source.TensorAdapterConfig()

    def to_tensors(record_batch):
        tensors = tfxio.TensorAdapter(config).ToBatchTensors(record_batch, produce_eager_tensors=True)
        logmel = tensors["logmel"].to_tensor().numpy()
        return [(key.decode(), value) for key, value in zip(tensors["key"].numpy().ravel(), logmel)]

    rows = collect(source.BeamSource(batch_size=16) | beam.FlatMap(to_tensors))
    assert len(rows) == sample_run["counts"]["records"]
    for key, value in rows:
        np.testing.assert_array_equal(value, reference[key])
