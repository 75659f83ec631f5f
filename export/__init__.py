"""Exports: TFRecords, Parquet, run metadata, and the training loader.

`export.load_tfrecords` is imported lazily so that importing `export` does not import TensorFlow.
"""

__all__ = ["load_tfrecords"]


def __getattr__(name):
    if name == "load_tfrecords":
        from export.loader import load_tfrecords

        return load_tfrecords
    raise AttributeError(f"module 'export' has no attribute {name!r}")
