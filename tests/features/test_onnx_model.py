"""`onnx_model` on a real ONNX graph (built with onnx's helpers, run by onnxruntime): each item's
output equals the model applied to it alone."""

from __future__ import annotations

import numpy as np

from features import Batch, registry
from tests.features.models import tiny_models  # noqa: F401  (fixture)
from tests.features.signals import SR


def test_onnx_embeddings_match_the_session_on_each_item(tiny_models, mixed_waveforms):
    import onnxruntime

    extractor = registry.build("onnx_model", {"path": tiny_models["onnx"]}, sample_rate=SR)
    (spec,) = extractor.output_specs()
    assert (spec.name, spec.level, spec.shape) == ("embedding", "clip", (2,))
    assert extractor.version.startswith("1+") and extractor.config.fingerprint.startswith("sha256:")
    batched = Batch.from_waveforms(mixed_waveforms, sample_rate=SR).outputs(extractor)["embedding"]
    session = onnxruntime.InferenceSession(tiny_models["onnx"], providers=["CPUExecutionProvider"])
    for i, w in enumerate(mixed_waveforms):
        (alone,) = session.run(["embedding"], {"waveform": w[None], "lengths": np.array([len(w)], np.int32)})
        np.testing.assert_allclose(batched[i], alone[0], rtol=1e-5)
        np.testing.assert_allclose(batched[i], [np.abs(w).max(), np.mean(w.astype(np.float64) ** 2)], rtol=1e-4)
