"""The registry: duplicate names, unknown names, bad config keys and third-party entry points."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap

import numpy as np
import pytest

from featurebeam.errors import ConfigError, FeatureError
from features import Batch, Extractor, OutputSpec, registry
from features.registry import register_extractor
from tests.features.signals import SR

PLUGIN_MODULE = "featurebeam_test_plugin"

PLUGIN_SOURCE = '''
"""A third-party extractor, as a separate distribution would ship it."""
import dataclasses

import numpy as np

from features import Extractor, OutputSpec


@dataclasses.dataclass(frozen=True)
class PeakConfig:
    """scale: multiplies the peak (unitless)."""

    scale: float = 1.0


class Peak(Extractor):
    name = "plugpeak"
    version = "1"
    config_type = PeakConfig

    def output_specs(self):
        return (OutputSpec(name="plugpeak_abs", level="clip", shape=(), sample_rate=self.sample_rate),)

    def extract(self, batch):
        return {"plugpeak_abs": (self.config.scale * np.abs(batch.waveforms).max(axis=1)).astype(np.float32)}
'''


@dataclasses.dataclass(frozen=True)
class _Config:
    """No parameters."""


def _extractor_class(extractor_name: str, qualname: str) -> type[Extractor]:
    def output_specs(self):
        return (OutputSpec(name=extractor_name, level="clip", shape=(), sample_rate=self.sample_rate),)

    def extract(self, batch):
        return {extractor_name: np.zeros(len(batch), np.float32)}

    cls = type(
        qualname,
        (Extractor,),
        {
            "__module__": __name__,
            "name": extractor_name,
            "version": "1",
            "config_type": _Config,
            "output_specs": output_specs,
            "extract": extract,
        },
    )
    cls.__qualname__ = qualname
    return cls


@pytest.fixture
def scratch_registry(monkeypatch):
    """The loaded registry, restored after the test (so test registrations do not leak)."""
    registry.available()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def test_builtins_are_registered():
    assert set(registry.available()) >= {"logmel", "mfcc", "spectral", "chroma", "onset", "summary"}


def test_builtin_output_names_are_unique_and_prefixed():
    seen = {}
    for name in registry.BUILTIN_MODULES:
        for spec in registry.build(name, sample_rate=SR).output_specs():
            assert spec.name.startswith(name), f"{name} output {spec.name!r} must start with {name!r}"
            assert spec.name not in seen, f"{spec.name!r} from {name} and {seen.get(spec.name)}"
            seen[spec.name] = name


def test_builtins_record_name_version_and_config():
    for name in registry.BUILTIN_MODULES:
        cls = registry.get(name)
        assert cls.version == "1"
        assert dataclasses.is_dataclass(cls.config_type) and cls.config_type.__dataclass_params__.frozen
        assert cls.config_type.__doc__, f"{name} config needs a docstring with units"
        hash(cls.config_type())  # configs are cache keys


def test_duplicate_name_raises_naming_both_classes(scratch_registry):
    first = _extractor_class("duptest", "FirstDup")
    second = _extractor_class("duptest", "SecondDup")
    register_extractor(first)
    with pytest.raises(FeatureError) as excinfo:
        register_extractor(second)
    message = str(excinfo.value)
    assert f"{__name__}.FirstDup" in message and f"{__name__}.SecondDup" in message
    assert registry.get("duptest") is first


def test_duplicate_of_a_builtin_names_the_builtin(scratch_registry):
    with pytest.raises(FeatureError, match=r"features\.logmel\.LogMel .*ImpostorLogMel"):
        register_extractor(_extractor_class("logmel", "ImpostorLogMel"))


def test_unknown_feature_lists_the_available_ones():
    with pytest.raises(FeatureError) as excinfo:
        registry.get("logmell")
    message = str(excinfo.value)
    assert "'logmell'" in message
    for name in registry.available():
        assert name in message
    assert registry.ENTRY_POINT_GROUP in message


def test_bad_config_key_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=re.escape("features.logmel: unknown key 'n_ffts'; valid keys are amin, fmax")):
        registry.build("logmel", {"n_ffts": 512}, sample_rate=SR)


def test_bad_config_value_is_a_config_error():
    with pytest.raises(ConfigError, match="in configs/x.yaml: n_mels=0 must be positive"):
        registry.build("logmel", {"n_mels": 0}, sample_rate=SR, where="features.logmel in configs/x.yaml")


def _install_plugin(tmp_path, monkeypatch, request, entry_point_line: str) -> None:
    """A real distribution on sys.path: a module plus a dist-info folder with entry_points.txt."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist_info = tmp_path / "featurebeam_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: featurebeam-test-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{entry_point_line}\n")
    registry.available()  # built-ins first, so the reload below only adds the plug-in
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    request.addfinalizer(lambda: sys.modules.pop(PLUGIN_MODULE, None))


def test_entry_point_extractor_is_picked_up(tmp_path, monkeypatch, request):
    _install_plugin(tmp_path, monkeypatch, request, f"plugpeak = {PLUGIN_MODULE}:Peak")
    assert "plugpeak" in registry.available()
    assert "logmel" in registry.available()
    extractor = registry.build("plugpeak", {"scale": 2.0}, sample_rate=SR)
    batch = Batch.from_waveforms([np.array([0.1, -0.4], np.float32), np.array([0.25], np.float32)], sample_rate=SR)
    np.testing.assert_allclose(batch.outputs(extractor)["plugpeak_abs"], [0.8, 0.5])


def test_broken_entry_point_names_itself(tmp_path, monkeypatch, request):
    _install_plugin(tmp_path, monkeypatch, request, f"brokenpeak = {PLUGIN_MODULE}:NoSuchClass")
    with pytest.raises(FeatureError, match=rf"entry point 'brokenpeak' \({PLUGIN_MODULE}:NoSuchClass\).*failed to load"):
        registry.available()
