"""`onnx_model`: an ONNX model file run by onnxruntime (CPU) as a feature extractor.

The same keys and feeds as `tf_model` (see features/model.py) minus `signature`: the model's one
input besides an optional `lengths` gets the batch, and `output_key` picks among its outputs.
onnxruntime is imported only when a model is loaded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from featurebeam.errors import ConfigError
from features.model import LoadedModel, ModelConfig, ModelExtractor, first_line
from features.registry import register_extractor

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


@dataclasses.dataclass(frozen=True)
class ONNXModelConfig(ModelConfig):
    """ModelConfig: path, input, output_key, name, level, hop_length, the log-mel keys and
    fingerprint (see features/model.py)."""


class _Session(LoadedModel):
    def __init__(self, session):
        self._session = session
        self._inputs = {i.name: i for i in session.get_inputs()}
        self.inputs = tuple(self._inputs)
        self.outputs = tuple(o.name for o in session.get_outputs())

    def static_dims(self, name: str) -> tuple[int | None, ...] | None:
        shape = self._inputs[name].shape
        return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {k: v.astype(_NUMPY_TYPES.get(self._inputs[k].type, v.dtype), copy=False) for k, v in feeds.items()}
        return dict(zip(self.outputs, self._session.run(list(self.outputs), cast)))


@register_extractor
class ONNXModel(ModelExtractor):
    name = "onnx_model"
    version = "1"
    config_type = ONNXModelConfig
    description = "an ONNX model's output (an embedding) per clip or frame, run by onnxruntime on the CPU"
    backend = "onnxruntime"

    def load_model(self, local_path: str) -> LoadedModel:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(f"{self._where}: onnxruntime is not installed; pip install onnxruntime") from None
        try:
            session = onnxruntime.InferenceSession(local_path, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ConfigError(f"{self._where}: onnxruntime cannot load it ({first_line(exc)}); check path:") from None
        return _Session(session)
