"""BigQuery load time: the sample run, and 100,000 synthetic feature rows, into the local emulator.

    python benchmarks/bigquery_load.py [--rows 100000] [--repeats 3]

Uses the emulator at BIGQUERY_EMULATOR_HOST when set, else starts one (bqemulator, in memory)
for the duration of the script. For each case it times `export.bigquery.load_run` into a fresh
dataset (tables created, three load jobs), then a second `load_run` of the same run (the
idempotent no-op: one COUNT query per table), and, for comparison, the same per-label query in
DuckDB over the local Parquet tables. The synthetic rows have the sample run's columns
(logmel, mfcc, spectral summaries: 232 FLOAT64 values per row) with random values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROJECT = "featurebeam-bench"
FEATURES = "logmel,mfcc,spectral"
LABEL_MEANS = "SELECT label, COUNT(*) AS n, AVG(spectral.spectral_centroid_mean) AS centroid FROM features GROUP BY label"


def start_emulator(workdir: Path) -> subprocess.Popen | None:
    """Start bqemulator on free ports unless BIGQUERY_EMULATOR_HOST is set; sets the variable."""
    if os.environ.get("BIGQUERY_EMULATOR_HOST"):
        return None
    log = workdir / "bqemulator.log"
    env = {**os.environ, "BQEMU_REST_PORT": "0", "BQEMU_GRPC_PORT": "0", "BQEMU_LOG_FORMAT": "json",
           "BQEMU_DEFAULT_PROJECT_ID": PROJECT, "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",
           "BQEMU_UPLOAD_STAGING_DIR": str(workdir / "uploads")}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "bqemulator"), "start", "--ephemeral"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ports = {}
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") in ("rest.listen", "grpc.listen"):
                    ports[event["event"]] = event["port"]
        if len(ports) == 2:
            os.environ["BIGQUERY_EMULATOR_HOST"] = f"http://127.0.0.1:{ports['rest.listen']}"
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    sys.exit(f"bqemulator did not start; see {log} (run: bash .ci/setup-emulators.sh .venv/bin/python)")


def stop_emulator(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def synthetic_run(sample_run_dir: Path, target: Path, rows: int) -> Path:
    """A run folder whose tables hold `rows` random feature rows with the sample run's columns."""
    import numpy as np
    import pyarrow as pa

    from export import tables

    run = json.loads((sample_run_dir / "run.json").read_text())
    run.update(run_id=f"synthetic-{rows}", config_hash=f"synthetic:{rows}")
    run["counts"] = {**run["counts"], "records": rows, "ok": rows, "listed": rows}
    empty = {"files": 0, "bytes": 0}
    run["outputs"] = {
        **run["outputs"],
        "run_dir": str(target),
        **{kind: {"pattern": f"{target}/{kind}/part-*", **empty} for kind in ("parquet", "tfrecords", "errors")},
    }
    target.mkdir(parents=True)
    (target / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    schema = tables.features_schema(run["extractors"])
    arrow = tables.arrow_schema(schema)
    rng = np.random.default_rng(0)
    labels = np.array(["chirp", "chord", "clicks", "noise", "tone"])
    columns = {
        "key": pa.array([f"synthetic/{i:07d}" for i in range(rows)]),
        "run_id": pa.array([run["run_id"]] * rows),
        "run_date": pa.array([tables.run_date(run)] * rows, type=pa.date32()),
        "label": pa.array(labels[rng.integers(0, len(labels), rows)]),
        "silent": pa.array(np.zeros(rows, dtype=bool)),
    }
    for field in arrow:
        if field.name in columns:
            continue
        if field.name == "item_key":
            columns[field.name] = columns["key"]
        elif pa.types.is_struct(field.type):
            children = []
            for child in field.type:
                if pa.types.is_list(child.type):
                    width = 64 if child.name.startswith("logmel") else 20 if child.name.startswith("mfcc") else 7
                    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
                    children.append(pa.ListArray.from_arrays(offsets, pa.array(rng.normal(size=rows * width))))
                else:
                    children.append(pa.array(rng.normal(size=rows)))
            columns[field.name] = pa.StructArray.from_arrays(children, fields=list(field.type))
        else:
            columns[field.name] = pa.nulls(rows, type=field.type) if field.nullable else pa.array([""] * rows)
    table = pa.Table.from_arrays([columns[f.name] for f in arrow], schema=arrow)
    from export import metadata

    # One features shard and the runs row, as the pipeline's workers and final step lay them out.
    shard = metadata.join(tables.folder(str(target), tables.FEATURES), "part-synthetic.parquet")
    metadata.write_atomic(shard, tables.table_bytes(table, schema, run_id=run["run_id"], extractors=run["extractors"]))
    metadata.write_atomic(tables.runs_file(str(target)), tables.runs_table_bytes(run, run_json=json.dumps(run), run_dir=str(target)))
    return target


def measure(run_dir: Path, name: str, repeats: int) -> None:
    from export import bigquery, query
    from featurebeam import cloud

    client = cloud.bigquery_client(project=PROJECT)
    size = (run_dir / "tables" / "features.parquet").stat().st_size
    first, again = [], []
    for i in range(repeats):
        dataset = f"{PROJECT}.bench_{name}_{i}_{int(time.time())}"
        start = time.monotonic()
        report = bigquery.load_run(str(run_dir), dataset=dataset, client=client)
        first.append(time.monotonic() - start)
        start = time.monotonic()
        bigquery.load_run(str(run_dir), dataset=dataset, client=client)
        again.append(time.monotonic() - start)
        client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
    rows = report["features"]["rows"]
    start = time.monotonic()
    query.query(LABEL_MEANS, runs=str(run_dir))
    local = time.monotonic() - start
    print(f"{name}: {rows} feature rows, features.parquet {size / 1e6:.1f} MB")
    print(f"  load_run into a new dataset (create 3 tables, 3 load jobs): median {statistics.median(first):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in first)}); features load job alone {report['features']['seconds']:.2f} s "
          f"= {rows / max(report['features']['seconds'], 1e-9):,.0f} rows/s")
    print(f"  load_run again (already loaded, skipped): median {statistics.median(again):.2f} s")
    print(f"  DuckDB per-label query over the local tables: {local:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipelines import extract

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc = start_emulator(tmp)
        try:
            print(f"emulator: {os.environ['BIGQUERY_EMULATOR_HOST']}")
            run = extract.run(["--dataset=sample", f"--features={FEATURES}", f"--output={tmp / 'runs'}", "--run_id=sample"])
            sample_dir = Path(run["outputs"]["run_dir"])
            from export import tables

            start = time.monotonic()
            tables.rebuild(str(sample_dir))
            print(f"sample run tables rebuilt from the shards in {time.monotonic() - start:.2f} s")
            measure(sample_dir, "sample", args.repeats)
            start = time.monotonic()
            synthetic = synthetic_run(sample_dir, tmp / "runs" / "synthetic" / f"synthetic-{args.rows}", args.rows)
            print(f"synthetic tables of {args.rows} rows written in {time.monotonic() - start:.1f} s")
            measure(synthetic, "synthetic", args.repeats)
        finally:
            stop_emulator(proc)
            shutil.rmtree(tmp / "uploads", ignore_errors=True)


if __name__ == "__main__":
    main()
