"""`python -m pipelines.report` on the real sample run: a self-contained report.html whose
embedded PNGs are real pictures (waveform + log-mel per example, per-label distributions, input
histograms), reading only run.json, statistics/ and a bounded sample of records."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest

from export import report, statistics
from pipelines import report as report_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    statistics.compute_for_run(run_dir)
    return run_dir


def _images(text: str) -> dict[str, np.ndarray]:
    import matplotlib.image

    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)
    return {alt: matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png") for alt, data in found}


def _non_trivial(image: np.ndarray) -> bool:
    rgb = image[..., :3]
    colours = len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    return image.shape[0] > 100 and image.shape[1] > 200 and rgb.std() > 0.05 and colours > 50


def test_report_renders_the_sample_run_with_real_pictures(run_dir, sample_run, capsys):
    assert report_cli.main([run_dir, "--items_per_label=1"]) == 0
    assert "report written to" in capsys.readouterr().out
    text = (Path(run_dir) / report.REPORT_HTML).read_text()
    assert "src=\"http" not in text and "<script" not in text  # self-contained, nothing to fetch
    assert f"Run {sample_run['run_id']}" in text and "No item failed." in text
    images = _images(text)
    examples = [alt for alt in images if alt.startswith("sample/")]
    assert len(examples) == len(sample_run["labels"])  # one item per label, as asked
    assert {alt.split("/")[1] for alt in examples} == set(sample_run["labels"])
    for alt in [*examples, "spectral_centroid/clip_mean", "logmel/clip_mean", "input duration", "input sample rate"]:
        assert alt in images, alt
        assert _non_trivial(images[alt]), f"{alt} looks blank"
    assert "source not readable" not in text  # every sample item's waveform was decoded again


def test_report_reads_a_bounded_sample(run_dir):
    records = report.sample_records(run_dir, feature="logmel", labels=["chirp", "tone"], items_per_label=3, max_rows=1000)
    assert sorted(r["label"] for r in records) == ["chirp"] * 3 + ["tone"] * 3
    assert len(report.sample_records(run_dir, feature=None, labels=["chirp", "tone"], items_per_label=3, max_rows=2)) <= 2


def test_report_errors_name_the_fix(tmp_path, capsys):
    assert report_cli.main([str(tmp_path)]) == 2
    assert "has no run.json" in capsys.readouterr().err
