"""Resolving --dataset: config names, paths, manifests; config files checked with clear errors."""

from __future__ import annotations

import pytest

from datasets import registry
from datasets.files import FilesDataset
from datasets.manifest import ManifestDataset
from datasets.sample import SampleDataset
from featurebeam.errors import ConfigError, DatasetError


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    d = tmp_path / "configs"
    d.mkdir()
    monkeypatch.setenv("FEATUREBEAM_DATASETS_DIR", str(d))
    return d


def test_named_sample_and_paths(tmp_path):
    assert isinstance(registry.resolve("sample"), SampleDataset)
    assert isinstance(registry.resolve(str(tmp_path)), FilesDataset)
    assert isinstance(registry.resolve(f"{tmp_path}/**.wav"), FilesDataset)
    assert isinstance(registry.resolve(str(tmp_path / "m.jsonl")), ManifestDataset)


def test_named_config(config_dir, tmp_path):
    (config_dir / "birds.yaml").write_text(f"type: files\nuri: {tmp_path}\nlabel_from: none\ndescription: birds\n")
    dataset = registry.resolve("birds")
    assert isinstance(dataset, FilesDataset) and dataset.name == "birds" and dataset.label_from == "none"


@pytest.mark.parametrize(
    "text, match",
    [
        ("type: files\nuri: /x\nlabels: parent\n", r"birds.yaml: unknown key 'labels' for a FilesDataset; valid keys are"),
        ("type: ftp\n", r"birds.yaml: unknown dataset type 'ftp'; use one of"),
        ("uri: /x\n", r"birds.yaml: a dataset config is a mapping with a 'type' key"),
        ("type: files\n", r"birds.yaml: missing required key 'uri'"),
        ("type: [files\n", r"birds.yaml: not valid YAML"),
    ],
)
def test_bad_configs_name_file_and_key(config_dir, text, match):
    (config_dir / "birds.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        registry.resolve("birds")


def test_unknown_dataset_lists_names():
    with pytest.raises(DatasetError, match=r"not a name in configs/datasets \(.*sample.*\)"):
        registry.resolve("no-such-thing")


def test_every_repo_config_loads_without_touching_its_source():
    """The shipped configs (sample and the gcs/bigquery examples) are valid; loading does no I/O."""
    names = sorted(path.stem for path in registry.REPO_CONFIGS.glob("*.yaml"))
    assert {"sample", "example-gcs", "example-bigquery"} <= set(names)
    for name in names:
        dataset = registry.load_named(name, registry.REPO_CONFIGS / f"{name}.yaml")
        assert dataset.name == name
    gcs = registry.resolve("example-gcs")
    assert gcs.patterns == ["gs://my-audio-bucket/field-recordings/**"] and gcs.extensions == (".wav", ".flac", ".ogg")
    bq = registry.resolve("example-bigquery")
    assert bq.label_columns == ("family", "species") and bq.parameters["sites"] == ["north", "south"]
    assert isinstance(registry.resolve("sample"), SampleDataset)
