"""`python -m pipelines.compare` on real sample runs: two runs of one command drift nowhere and
exit 0; n_mels 64 -> 32 flags the log-mel features (and only them) and exits 1 with
--fail_on_drift; a run with --statistics=off has none, and compare and the report say so.

The statistics come from `export.statistics.compute_for_run`, a separate small Beam pipeline over
each run's Parquet shards, so this test does not depend on how the extraction graph wires
ComputeStatistics in.
"""

from __future__ import annotations

import json
import os

import pytest

from export import statistics
from pipelines import compare, extract

pytestmark = pytest.mark.slow

FLAGS = ["--dataset=sample", "--features=logmel", "--limit=20", "--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("compare-runs")
    config = output / "mels32.yaml"
    config.write_text("features:\n  logmel: {n_mels: 32}\n")
    out = {}
    for name, extra in (("a", []), ("a_again", []), ("mels32", [f"--config={config}"]), ("off", ["--statistics=off"])):
        run = extract.run([*FLAGS, *extra, f"--output={output}", f"--run_id={name}"])
        if name != "off":
            statistics.compute_for_run(run["outputs"]["run_dir"])
        out[name] = run["outputs"]["run_dir"]
    return out


def test_statistics_off_skips_the_step_and_compare_and_the_report_say_they_are_absent(runs, capsys):
    from export import report

    off = runs["off"]
    run = json.loads(open(f"{off}/run.json").read())
    assert run["statistics"] == {"computed": False, "reason": "the run was extracted with --statistics=off"}
    assert run["counts"]["records"] == 20 and not os.path.exists(f"{off}/statistics")
    assert json.loads(open(f"{off}/_work/plan.json").read())["statistics"] == "off"

    assert compare.main([runs["a"], off, "--fail_on_drift"]) == 0
    text = capsys.readouterr().out
    assert "features: not compared" in text and "B: Feature statistics are absent: the run was extracted with --statistics=off" in text
    assert compare.main([off, runs["a"], "--format=json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["features"] == [] and result["statistics_absent"][0].startswith("A: Feature statistics are absent")

    page = open(report.write_report(off)).read()
    assert page.count("Feature statistics are absent: the run was extracted with --statistics=off") == 1
    assert f"featurebeam statistics {off}" in page


def test_two_runs_of_one_command_flag_nothing(runs, capsys):
    assert compare.main([runs["a"], runs["a_again"], "--fail_on_drift"]) == 0
    text = capsys.readouterr().out
    assert ", 0 flagged (threshold 0.1;" in text and "DRIFT" not in text


def test_changed_n_mels_flags_the_logmel_features_and_fails(runs, capsys):
    assert compare.main([runs["a"], runs["mels32"], "--fail_on_drift"]) == compare.EXIT_DRIFT
    text = capsys.readouterr().out
    assert "config.features.logmel.n_mels: 64 -> 32" in text
    assert "DRIFT logmel/frames/<d>:" in text and "32 dimensions only in A" in text
    assert compare.main([runs["a"], runs["mels32"], "--format=json"]) == 0  # without the gate: report only
    result = json.loads(capsys.readouterr().out)
    flagged = set(result["flagged"])
    assert flagged and all(path.startswith("logmel/") for path in flagged)
    assert "logmel/frames/40" in flagged and "duration_seconds" not in flagged and "label" not in flagged


def test_compare_errors_name_the_fix(runs, tmp_path, capsys):
    assert compare.main([runs["a"], str(tmp_path)]) == compare.EXIT_USAGE
    assert "has no readable run.json" in capsys.readouterr().err
    assert compare.main([runs["a"], runs["a"], "--threshold=2"]) == compare.EXIT_USAGE
