"""Exports: TFRecords, Parquet, run metadata, and the training readers.

`export.load_tfrecords` (tf.data) and `export.load_torch` (PyTorch, over the Parquet shards) are
imported lazily, so importing `export` imports neither TensorFlow nor PyTorch.
"""

__all__ = ["load_tfrecords", "load_torch"]


def __getattr__(name):
    if name == "load_tfrecords":
        from export.loader import load_tfrecords

        return load_tfrecords
    if name == "load_torch":
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError as e:
            from featurebeam.errors import ConfigError

            raise ConfigError("export.load_torch needs PyTorch: pip install 'featurebeam[torch]'") from e
        from export.torch_loader import load_torch

        return load_torch
    raise AttributeError(f"module 'export' has no attribute {name!r}")
