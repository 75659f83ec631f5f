"""`tf_model`: a TensorFlow SavedModel (a folder) or a Keras `.keras` file as a feature extractor.

The batch goes to the model whole: `[B, n]` float32 waveforms (or `[B, T, n_mels]` log-mels with
`input: logmel`), plus `[B]` int32 `lengths` when the model has an input of that name, so a
model that masks its padding gives every item the output it would give it alone. A SavedModel
is called through its signature (`signature`, default `serving_default`), a Keras file through
the model itself (`training=False`); either runs on the CPU. TensorFlow is imported only when a
model is loaded (see features/model.py for the sharing, the fingerprint and the launch check).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from featurebeam.errors import ConfigError
from features.model import LoadedModel, ModelConfig, ModelExtractor, first_line
from features.registry import register_extractor


@dataclasses.dataclass(frozen=True)
class TFModelConfig(ModelConfig):
    """ModelConfig (path, input, output_key, name, level, hop_length, the log-mel keys and
    fingerprint; see features/model.py) plus signature: the SavedModel signature to call
    (ignored for `.keras` files)."""

    signature: str = "serving_default"


class _SavedModel(LoadedModel):
    def __init__(self, loaded, function):
        self._loaded = loaded  # the signature only holds weak references to the model's variables
        self._function = function
        _, kwargs = function.structured_input_signature
        self._specs = dict(kwargs)
        self.inputs = tuple(sorted(self._specs))
        self.outputs = tuple(sorted(function.structured_outputs))

    def static_dims(self, name: str) -> tuple[int | None, ...] | None:
        shape = self._specs[name].shape
        return None if shape.rank is None else tuple(None if d is None else int(d) for d in shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        with tf.device("/CPU:0"):
            out = self._function(**{k: tf.cast(v, self._specs[k].dtype) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in out.items()}


class _Keras(LoadedModel):
    def __init__(self, model):
        self._model = model
        self.inputs = tuple(t.name for t in model.inputs)
        self.outputs = tuple(getattr(model, "output_names", None) or [t.name for t in model.outputs])

    def static_dims(self, name: str) -> tuple[int | None, ...] | None:
        shape = self._model.inputs[self.inputs.index(name)].shape
        return tuple(None if d is None else int(d) for d in shape)

    def _arrange(self, feeds: dict[str, np.ndarray]):
        """Feeds in the structure the model was built with (one tensor, a list or a dict)."""
        structure = getattr(self._model, "input", None)
        if isinstance(structure, dict):
            return {k: feeds[t.name] for k, t in structure.items()}
        if isinstance(structure, (list, tuple)):
            return [feeds[t.name] for t in structure]
        return feeds[self.inputs[0]] if len(self.inputs) == 1 else [feeds[n] for n in self.inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        with tf.device("/CPU:0"):
            out = self._model(self._arrange(feeds), training=False)
        if isinstance(out, dict):
            return {k: np.asarray(v) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return {k: np.asarray(v) for k, v in zip(self.outputs, out)}
        return {self.outputs[0] if self.outputs else "output_0": np.asarray(out)}


@register_extractor
class TFModel(ModelExtractor):
    name = "tf_model"
    version = "1"
    config_type = TFModelConfig
    description = "a TensorFlow SavedModel or Keras .keras model's output (an embedding) per clip or frame"
    backend = "tensorflow"

    def load_model(self, local_path: str) -> LoadedModel:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        c = self.config
        if local_path.endswith(".keras"):
            import keras

            try:
                return _Keras(keras.saving.load_model(local_path, compile=False))
            except Exception as exc:
                raise ConfigError(
                    f"{self._where}: Keras cannot load it ({first_line(exc)}); save the model with model.save('x.keras')"
                ) from None
        if not os.path.isdir(local_path):
            raise ConfigError(
                f"{self._where}: not a SavedModel folder or a .keras file; point path: at the folder "
                "tf.saved_model.save or model.export wrote, or at a .keras file"
            )
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(local_path)
        except Exception as exc:
            raise ConfigError(f"{self._where}: not a loadable SavedModel ({first_line(exc)}); check path:") from None
        signatures = dict(loaded.signatures)
        if c.signature not in signatures:
            raise ConfigError(
                f"{self._where}: the SavedModel has no signature {c.signature!r}; its signatures are "
                f"{sorted(signatures) or 'none (save it with signatures=...)'}; fix signature:"
            )
        return _SavedModel(loaded, signatures[c.signature])
