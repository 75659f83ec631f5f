"""The final step runs in the pipeline and alone (`python -m pipelines.finalize`), and the launcher
reads nothing that grows with the run: measured with an audit hook on every file it opens or lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from export import commit
from pipelines import extract, finalize
from tests import faultinject

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 tiny clips in two classes, a duplicate-free corrupt file, and a manifest-free layout."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(11)
    for i in range(N_ITEMS):
        label = "a" if i % 2 else "b"
        (root / label).mkdir(exist_ok=True)
        soundfile.write(root / label / f"{i:03d}.wav", (0.3 * rng.standard_normal(1100 + 3 * i)).astype(np.float32), 8000)
    (root / "b" / "broken.wav").write_bytes(b"RIFF" + rng.bytes(300))
    return root


def _argv(corpus, output, run_id, *extra):
    return [f"--dataset={corpus}", "--features=logmel", f"--output={output}", f"--run_id={run_id}", "--sample_rate=8000",
            "--commit_records=4", "--max_failure_ratio=0.5", *extra]


# Every file the launcher process opens or lists, recorded by one audit hook for the session.
_EVENTS: list[tuple[str, str]] = []
_RECORDING = [False]


def _hook(event, args):
    if not _RECORDING[0] or event not in ("open", "os.listdir", "os.scandir", "glob.glob", "os.remove", "os.rename"):
        return
    path = args[0] if args else None
    if isinstance(path, (str, bytes, os.PathLike)):
        _EVENTS.append((event, os.fsdecode(path)))


sys.addaudithook(_hook)


def _run_recording(argv) -> tuple[dict, list[tuple[str, str]]]:
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        run = extract.run(argv)
    finally:
        _RECORDING[0] = False
    return run, list(_EVENTS)


# After the job the launcher adds the job's stage times (its Beam counters) to run.json and to the
# runs table's one row (pipelines/finalize.py add_stage_seconds): constant-size writes.
RUNS_TABLE = "tables/runs/"


def _grown(events, run_dir: Path) -> list[tuple[str, str]]:
    """Events on anything below the run folder that grows with the run (shards, commits, tables)."""
    grown = ("tfrecords", "parquet", "errors", commit.COMMITS, "tables")
    out = []
    for event, path in events:
        if path.startswith(str(run_dir) + "/"):
            relative = path[len(str(run_dir)) + 1 :]
            if relative.split("/", 1)[0] in grown and not relative.startswith(RUNS_TABLE):
                out.append((event, relative))
    return out


MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def test_the_launcher_reads_no_shard_or_commit_in_a_multi_process_run(corpus, tmp_path):
    run, events = _run_recording(_argv(corpus, tmp_path, "m", *MULTI))
    run_dir = Path(run["outputs"]["run_dir"])
    assert run["counts"] == {"listed": N_ITEMS + 1, "ok": N_ITEMS, "failed": 1, "partial": 0, "records": N_ITEMS}
    assert run["outputs"]["parquet"]["files"] >= N_ITEMS // 4 and len(list((run_dir / commit.COMMITS).glob("*.json"))) > 50
    assert _grown(events, run_dir) == []
    opened = sorted({p[len(str(run_dir)) + 1 :] for e, p in events if e == "open" and p.startswith(str(run_dir))})
    metadata_writes = [p for p in opened if p.startswith((".run.json.", RUNS_TABLE))]
    assert metadata_writes and all(p.endswith(".tmp") for p in metadata_writes), metadata_writes
    opened = [p for p in opened if p not in metadata_writes]
    assert opened[-1] == "run.json" and all(p.startswith("_work/") for p in opened[:-1]), opened
    # run.json names outputs by pattern and count: its size does not grow with the shards.
    assert len((run_dir / "run.json").read_bytes()) < 12_000


def test_resume_reads_commits_in_the_pipeline_not_in_the_launcher(corpus, tmp_path):
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", *_argv(corpus, tmp_path, "k")],
        cwd=ROOT, env={**os.environ, **faultinject.environment("kill:commit:20")}, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / corpus.name / "k"
    assert len(list((run_dir / commit.COMMITS).glob("*.json"))) >= 19 and not (run_dir / "run.json").exists()
    resumed, events = _run_recording(_argv(corpus, tmp_path, "k", "--mode=resume", *MULTI))
    assert _grown(events, run_dir) == []
    assert resumed["counts"]["records"] == N_ITEMS and resumed["counts"]["failed"] == 1


def test_finalize_redoes_the_last_step_alone_and_byte_identically(corpus, tmp_path, capsys):
    run = extract.run(_argv(corpus, tmp_path, "f"))
    run_dir = Path(run["outputs"]["run_dir"])
    written = {name: (run_dir / name).read_bytes() for name in ("run.json", "features.json", "schema.pbtxt")}
    runs_table = (run_dir / "tables" / "runs" / "part-00000.parquet").read_bytes()
    for name in written:
        (run_dir / name).unlink()
    (run_dir / "tables" / "runs" / "part-00000.parquet").unlink()
    for _ in range(2):  # idempotent
        assert finalize.main([str(run_dir)]) == 0
        assert {name: (run_dir / name).read_bytes() for name in written} == written
        assert (run_dir / "tables" / "runs" / "part-00000.parquet").read_bytes() == runs_table
    assert "200 ok, 1 failed" in capsys.readouterr().out


def test_finalize_of_a_run_that_did_not_reach_its_summary_names_the_fix(corpus, tmp_path, capsys):
    run_dir = tmp_path / "ds" / "r"
    (run_dir / "_work").mkdir(parents=True)
    assert finalize.main([str(run_dir)]) == 2
    assert "not a featurebeam run folder" in capsys.readouterr().err
    (run_dir / "_work" / "plan.json").write_text(json.dumps({"run_dir": str(run_dir)}))
    assert finalize.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "did not reach the final step" in err and "--mode=resume" in err


def test_dead_letters_are_committed_once_per_key_and_stage_across_resumes(tmp_path):
    """A manifest's bad rows are dead letters of the listing, which every resume lists again."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(6):
        soundfile.write(audio / f"{i}.wav", np.full(1200, 0.1 * (i + 1), np.float32), 8000)
    manifest = tmp_path / "list.csv"
    rows = ["uri,key"] + [f"{audio / f'{i}.wav'},k{i}" for i in range(6)] + [",nouri", f"{audio / '0.wav'},k0"]
    manifest.write_text("\n".join(rows) + "\n")
    argv = [f"--dataset={manifest}", "--features=logmel", f"--output={tmp_path / 'out'}", "--run_id=d", "--sample_rate=8000",
            "--commit_records=2", "--max_failure_ratio=0.9"]
    first = extract.run(argv)
    run_dir = Path(first["outputs"]["run_dir"])
    (run_dir / "run.json").unlink()  # as if killed after the commits, before the final step
    again = extract.run([*argv, "--mode=resume"])
    assert again["counts"] == first["counts"] and again["failures"] == first["failures"]
    errors = [json.loads(line) for p in sorted((run_dir / "errors").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(errors) == 2 and sorted(e["stage"] for e in errors) == ["list", "list"]
    assert [e["key"] for e in errors if e["reason"] == "duplicate_key"] == ["k0"]
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(map(str, (run_dir / "tables" / "errors").glob("*.parquet"))))
    assert sorted(table.column("key").to_pylist()) == sorted(e["key"] for e in errors)
