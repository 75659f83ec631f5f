"""The TensorFlow-free record encoder produces exactly TensorFlow's own bytes: the same message,
and the same serialization as `SerializeToString(deterministic=True)` (maps in sorted key order)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from export import example_proto


def _tf_feature(value):
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, np.ndarray):
        return tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel()))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(value)))


# No key is a prefix of another: for those, TensorFlow's Python protos (upb) put the longer key
# first when serializing deterministically, where C++'s std::map order (and ours) puts it last;
# both orders parse to the same message.
CONTEXT = {
    "key": "gs://b/caf\u00e9.wav#16000".encode(),
    "empty": b"",
    "ints": [0, 1, 127, 128, 300, 2**40, -1, -(2**63)],
    "none": [],
    "x": np.array([1.5, -0.0, np.float32(3.4e38), 1e-45], dtype=np.float32),
    "no_floats": np.zeros(0, dtype=np.float32),
}


def test_example_matches_tensorflow():
    ours = tf.train.Example.FromString(example_proto.example(CONTEXT))
    theirs = tf.train.Example(features=tf.train.Features(feature={k: _tf_feature(v) for k, v in CONTEXT.items()}))
    assert ours == theirs
    assert example_proto.example(CONTEXT) == theirs.SerializeToString(deterministic=True)


# (1000, 64): frame and list lengths above one varint byte; (3, 0): frames without values;
# (2, 2, 3): per-frame shapes are flattened.
@pytest.mark.parametrize("shape", [(5, 3), (4,), (0, 7), (1, 1), (1000, 64), (3, 0), (2, 2, 3)])
def test_sequence_example_matches_tensorflow(shape):
    rng = np.random.default_rng(0)
    frames = rng.standard_normal(shape).astype(np.float32)
    encoded = example_proto.sequence_example(CONTEXT, {"f": frames, "g": frames[:2]})
    ours = tf.train.SequenceExample.FromString(encoded)
    lists = {
        name: tf.train.FeatureList(feature=[_tf_feature(row) for row in arr.reshape(len(arr), int(np.prod(arr.shape[1:])))])
        for name, arr in {"f": frames, "g": frames[:2]}.items()
    }
    theirs = tf.train.SequenceExample(
        context=tf.train.Features(feature={k: _tf_feature(v) for k, v in CONTEXT.items()}),
        feature_lists=tf.train.FeatureLists(feature_list=lists),
    )
    assert ours == theirs
    assert encoded == theirs.SerializeToString(deterministic=True)
