"""`tf_model` and `onnx_model` read models from gs:// (the real GCS emulator through Beam's
file system): the same files give the same fingerprint and the same outputs as the local copy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from featurebeam.errors import ConfigError
from features import Batch, registry
from tests.features.models import tiny_models  # noqa: F401  (fixture)
from tests.features.signals import SR

pytestmark = pytest.mark.emulator

BUCKET = "featurebeam-models"


@pytest.fixture(scope="module")
def gcs_models(gcs_emulator, tiny_models):
    bucket = gcs_emulator.make_bucket(BUCKET)
    uris = {}
    for kind, path in tiny_models.items():
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                for name in names:
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, os.path.dirname(path)).replace(os.sep, "/")
                    bucket.blob(f"models/{rel}").upload_from_filename(full)
            uris[kind] = f"gs://{BUCKET}/models/{os.path.basename(path)}"
        else:
            bucket.blob(f"models/{os.path.basename(path)}").upload_from_filename(path)
            uris[kind] = f"gs://{BUCKET}/models/{os.path.basename(path)}"
    return uris


@pytest.mark.parametrize(
    "kind, name, values",
    [("savedmodel", "tf_model", {"output_key": "embedding"}), ("keras", "tf_model", {}), ("onnx", "onnx_model", {})],
)
def test_gs_model_matches_the_local_one(gcs_models, tiny_models, mixed_waveforms, kind, name, values):
    remote = registry.build(name, {"path": gcs_models[kind], **values}, sample_rate=SR)
    local = registry.build(name, {"path": tiny_models[kind], **values}, sample_rate=SR)
    assert remote.config.fingerprint == local.config.fingerprint
    batch = Batch.from_waveforms(mixed_waveforms, sample_rate=SR)
    np.testing.assert_array_equal(batch.outputs(remote)["embedding"], batch.outputs(local)["embedding"])


def test_missing_gs_model_is_a_config_error(gcs_models):
    with pytest.raises(ConfigError, match=rf"model path gs://{BUCKET}/models/nope.keras: no such file or folder"):
        registry.build("tf_model", {"path": f"gs://{BUCKET}/models/nope.keras"}, sample_rate=SR)
