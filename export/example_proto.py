"""tf.train.Example and tf.train.SequenceExample wire encoding without importing TensorFlow.

Workers only write records; importing TensorFlow for its protobuf classes cost each worker about
700 MiB of memory and seconds of start-up. The messages are small and their wire format is
fixed (tensorflow/core/example/{example,feature}.proto), so they are encoded here directly:
maps in sorted key order and floats packed from numpy's little-endian bytes, which also makes
the bytes deterministic. tests/export/test_example_proto.py checks every case against
TensorFlow's own classes.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np

class BytesList(tuple):
    """A BytesList of any number of values (plain `bytes` is a BytesList of one)."""


Value = Union[bytes, BytesList, np.ndarray, Sequence[int]]  # bytes: BytesList of one; float32 array; ints


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf does: two's complement, 10 bytes when negative
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def feature(value: Value) -> bytes:
    """A serialized tf.train.Feature: bytes -> bytes_list, float array -> float_list, ints -> int64_list."""
    if isinstance(value, bytes):
        return _field(1, _field(1, value))
    if isinstance(value, BytesList):
        return _field(1, b"".join(_field(1, item) for item in value))
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        data = np.ascontiguousarray(value, dtype="<f4").tobytes()
        return _field(2, _field(1, data) if data else b"")
    ints = b"".join(_varint(int(v)) for v in value)
    return _field(3, _field(1, ints) if ints else b"")


def _map(entries: Mapping[str, bytes]) -> bytes:
    return b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, entries[key])) for key in sorted(entries))


def features(values: Mapping[str, Value]) -> bytes:
    """A serialized tf.train.Features."""
    return _map({key: feature(value) for key, value in values.items()})


def example(values: Mapping[str, Value]) -> bytes:
    """A serialized tf.train.Example."""
    return _field(1, features(values))


def _feature_list(frames: np.ndarray) -> bytes:
    """A serialized tf.train.FeatureList of `[frames, ...]` float32, one FloatList per frame.

    Every frame has the same width, so every frame's Feature has the same header bytes: the
    frames are laid out as one `[frames, header + 4 * width]` byte array by NumPy (header columns
    broadcast, float bytes copied in one go) instead of one Python call chain per frame.
    """
    frames = np.ascontiguousarray(frames, dtype="<f4")
    count = len(frames)
    width = int(np.prod(frames.shape[1:], dtype=np.int64))
    data = width * 4
    # One frame's bytes up to its floats: Feature { float_list { value (packed) } }, as a field of
    # the FeatureList; the same for every frame.
    one = _field(1, _field(2, _field(1, bytes(data)) if data else b""))
    header = np.frombuffer(one[: len(one) - data], dtype=np.uint8)
    out = np.empty((count, len(header) + data), dtype=np.uint8)
    out[:, : len(header)] = header
    out[:, len(header) :] = frames.reshape(count, width).view(np.uint8)
    return out.tobytes()


def _int_feature_list(frames: np.ndarray) -> bytes:
    """A serialized tf.train.FeatureList of `[frames, ...]` integers, one Int64List per frame."""
    flat = frames.reshape(len(frames), -1)
    return b"".join(_field(1, feature(row)) for row in flat)


def sequence_example(context: Mapping[str, Value], lists: Mapping[str, np.ndarray]) -> bytes:
    """A serialized tf.train.SequenceExample; each `lists` value is `[frames, ...]` float32, one
    FloatList (the frame's values, flattened) per frame, or integers, one Int64List per frame."""
    encoded = {
        key: _feature_list(frames) if frames.dtype.kind == "f" else _int_feature_list(frames) for key, frames in lists.items()
    }
    return _field(1, features(context)) + _field(2, _map(encoded))
