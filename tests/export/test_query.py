"""export/query.py: GoogleSQL over the run tables, in DuckDB locally and in BigQuery (emulator)."""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from export import bigquery, query, tables
from export.metadata import output_files



def _root(run) -> str:
    """The --output folder of a run: runs/<dataset>/<run_id> -> runs."""
    return str(Path(run["outputs"]["run_dir"]).parents[1])


def test_googlesql_is_translated_with_zero_based_offsets_and_named_parameters():
    sql, names = query.to_duckdb(
        "SELECT i, v, logmel.logmel_mean[OFFSET(2)] AS third FROM features, UNNEST(logmel.logmel_mean) AS v "
        "WITH OFFSET AS i WHERE run_id = @run_id GROUP BY i"
    )
    assert names == {"run_id"}
    assert "$run_id" in sql and "(i - 1) AS i" in sql and "GROUP BY (i - 1)" in sql
    assert "logmel.logmel_mean[3]" in sql  # BigQuery OFFSET(2) is DuckDB's 1-based [3]


def test_parameters_are_typed_by_declaration_or_flag():
    params = query.parse_params(["run_id=abc", "n:INT64=3", "x:FLOAT64=0.5", "on:BOOL=true", "d:DATE=2026-01-02"])
    assert [(p.name, p.type, p.value) for p in params] == [
        ("run_id", "STRING", "abc"), ("n", "INT64", 3), ("x", "FLOAT64", 0.5), ("on", "BOOL", True),
        ("d", "DATE", datetime.date(2026, 1, 2)),
    ]
    assert query.parse_params(["k=7"], {"k": ("INT64", "")})[0].value == 7
    with pytest.raises(query.QueryError, match="needs --param run_id="):
        query.parse_params([], {"run_id": ("STRING", "the run")})
    with pytest.raises(query.QueryError, match="not a valid INT64"):
        query.parse_params(["n:INT64=three"])


def test_saved_queries_declare_their_parameters(capsys):
    saved = query.saved_queries()
    assert {"runs", "label_means", "label_band_means", "failures", "config_diff"} <= set(saved)
    assert saved["label_means"].params == {"run_id": ("STRING", "the run to summarise (runs.run_id; see --saved runs)")}
    assert set(saved["config_diff"].params) == {"run_a", "run_b"}
    assert query.main(["--saved", "list"]) == 0
    assert "label_means: Per-label means" in capsys.readouterr().out


def _fail(argv, capsys) -> str:
    assert query.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurebeam: error: "), captured.err
    return lines[0]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert "is not a folder" in _fail(["SELECT 1", f"--runs={tmp_path / 'missing'}"], capsys)
    assert "no finished runs" in _fail(["SELECT 1", f"--runs={tmp_path}"], capsys)
    assert "either an SQL statement or --saved" in _fail([], capsys)
    assert "no saved query 'nope'" in _fail(["--saved", "nope"], capsys)
    assert "--max_bytes_billed='0' must be positive" in _fail(["SELECT 1", "--bigquery_dataset=p-123456.d", "--max_bytes_billed=0"], capsys)


# --- over the sample run -----------------------------------------------------------------------


@pytest.mark.slow
def test_local_views_have_the_bigquery_columns(sample_run):
    connection = query.duckdb_connection(_root(sample_run))
    for name, fields in (
        ("features", tables.features_schema(sample_run["extractors"])),
        ("runs", tables.RUNS_SCHEMA),
        ("errors", tables.ERRORS_SCHEMA),
    ):
        described = connection.execute(f"DESCRIBE {name}").fetchall()
        assert [row[0] for row in described] == [f.name for f in fields], name
    types = dict((row[0], row[1]) for row in connection.execute("DESCRIBE features").fetchall())
    assert types["run_date"] == "DATE" and types["silent"] == "BOOLEAN"
    assert types["logmel"] == "STRUCT(logmel_mean DOUBLE[], logmel_std DOUBLE[])"


@pytest.mark.slow
def test_saved_label_means_equal_numpy_over_the_shards(sample_run):
    expected: dict[str, dict[str, list[float]]] = {}
    for shard in pq.read_table(output_files(sample_run, "parquet")).to_pylist():
        frames = np.asarray(shard["logmel"], dtype=np.float64).reshape(shard["logmel_shape"])
        values = expected.setdefault(shard["label"], {"centroid_hz": [], "rms": [], "logmel_db": []})
        values["centroid_hz"].append(np.mean(np.asarray(shard["spectral_centroid"], dtype=np.float64)))
        values["rms"].append(np.mean(np.asarray(shard["spectral_rms"], dtype=np.float64)))
        values["logmel_db"].append(frames.mean(axis=0).mean())
    saved = query.saved_queries()["label_means"]
    columns, rows = query.query(saved.sql, params=query.parse_params(["run_id=session"], saved.params), runs=_root(sample_run))
    assert [r[0] for r in rows] == sorted(expected)
    for row in rows:
        got = dict(zip(columns, row))
        assert got["records"] == 12
        for name, values in expected[got["label"]].items():
            assert got[name] == pytest.approx(np.mean(values), rel=1e-9), (got["label"], name)


@pytest.mark.slow
def test_with_offset_counts_bands_from_zero(sample_run):
    sql = (
        "SELECT i, v, logmel.logmel_mean[OFFSET(0)] AS first, logmel.logmel_mean[OFFSET(63)] AS last "
        "FROM features, UNNEST(logmel.logmel_mean) AS v WITH OFFSET AS i WHERE key = @key AND i IN (0, 63) ORDER BY i"
    )
    key = pq.read_table(output_files(sample_run, "parquet"), columns=["key"]).column("key")[0].as_py()
    columns, rows = query.query(sql, params=query.parse_params([f"key={key}"]), runs=_root(sample_run))
    (i0, v0, first, last0), (i63, v63, _, last) = rows
    assert (i0, i63) == (0, 63) and v0 == first and v63 == last


@pytest.mark.slow
def test_csv_and_json_output(sample_run, capsys):
    argv = ["SELECT label, COUNT(*) AS n FROM features GROUP BY label ORDER BY label", f"--runs={_root(sample_run)}"]
    assert query.main(argv + ["--format=csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["label"], r["n"]) for r in rows] == [(label, "12") for label in sorted(sample_run["labels"])]
    assert query.main(argv + ["--format=json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"label": sorted(sample_run["labels"])[0], "n": 12}
    assert query.main(["SELECT 1 AS x", "--dialect=duckdb", f"--runs={_root(sample_run)}"]) == 0
    assert "(1 row)" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_sql_is_one_line_and_exit_2(sample_run, capsys):
    runs = f"--runs={_root(sample_run)}"
    assert "does not parse" in _fail(["SELEC 1", runs], capsys)
    assert 'column "nope" not found' in _fail(["SELECT nope FROM features", runs], capsys)
    assert "needs --param run_id" in _fail(["--saved", "label_means", runs], capsys)
    assert "pass --param key" in _fail(["SELECT * FROM features WHERE key = @key", runs], capsys)


@pytest.mark.emulator
@pytest.mark.slow
def test_saved_queries_give_the_same_answers_in_duckdb_and_bigquery(sample_run, bq_emulator, capsys):
    client = bq_emulator.client()
    dataset = f"{bq_emulator.project}.fb_query"
    bigquery.load_run(sample_run["outputs"]["run_dir"], dataset=dataset, client=client)
    saved = query.saved_queries()
    params = {"label_means": ["run_id=session"], "label_band_means": ["run_id=session"],
              "config_diff": ["run_a=session", "run_b=session"]}
    for name in ("label_means", "label_band_means", "runs", "failures", "config_diff"):
        typed = query.parse_params(params.get(name, []), saved[name].params)
        local_columns, local = query.query(saved[name].sql, params=typed, runs=_root(sample_run))
        remote_columns, remote = query.query(saved[name].sql, params=typed, bigquery_dataset=dataset, client=client)
        assert local_columns == remote_columns, name
        assert len(local) == len(remote), name
        for a, b in zip(local, remote):
            for x, y in zip(a, b):
                if isinstance(x, datetime.datetime):
                    assert x.astimezone(datetime.timezone.utc) == y.astimezone(datetime.timezone.utc)
                elif isinstance(x, float):
                    assert x == pytest.approx(y, rel=1e-12), name
                else:
                    assert x == y, name
    assert len(query.query(saved["label_band_means"].sql, params=query.parse_params(["run_id=session"]),
                           bigquery_dataset=dataset, client=client)[1]) == 5 * 64
    # The command line in BigQuery mode, with the emulator as the endpoint.
    assert query.main(["--saved", "label_means", "--param", "run_id=session", f"--bigquery_dataset={dataset}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["label", "records", "centroid_hz", "bandwidth_hz", "rms", "flatness", "logmel_db"]
    assert query.main(["SELEC 1", f"--bigquery_dataset={dataset}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.emulator
def test_bigquery_queries_are_dry_run_then_bounded(bq_emulator, capsys, bq_jobs):
    dataset = f"{bq_emulator.project}.fb_query_bills"
    bq_emulator.make_dataset("fb_query_bills")
    assert query.main(["SELECT 40 + @n AS x", "--param", "n:INT64=2", f"--bigquery_dataset={dataset}",
                       "--max_bytes_billed=1MB", "--format=csv"]) == 0
    # As sent to BigQuery: the dry run and the query, both with the ceiling.
    assert [(job.sql, job.dry_run, job.maximum_bytes_billed) for job in bq_jobs] == [
        ("SELECT 40 + @n AS x", True, 1_000_000), ("SELECT 40 + @n AS x", False, 1_000_000)]
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["x", "42"]
    assert captured.err.splitlines() == ["BigQuery dry run: the query will process 0 B (0 bytes) (--max_bytes_billed=1000000)"]
    # Only queries run there too. (Refused before BigQuery sees them: the emulator, unlike
    # BigQuery, executes a script it is asked to dry-run.)
    client = bq_emulator.client()
    client.query(f"CREATE TABLE `{dataset}.keep` AS SELECT 1 AS x").result()
    for sql, match in ((f"DROP TABLE `{dataset}.keep`", "a DROP statement is refused"),
                       (f"SELECT 1 AS x; DROP TABLE `{dataset}.keep`", "exactly one SQL statement, got 2"),
                       (f"INSERT INTO `{dataset}.keep` (x) VALUES (2)", "a INSERT statement is refused"),
                       (f"MERGE `{dataset}.keep` t USING `{dataset}.keep` s ON TRUE WHEN MATCHED THEN DELETE",
                        "a MERGE statement is refused")):
        assert match in _fail([sql, f"--bigquery_dataset={dataset}"], capsys)
    assert [tuple(r.values()) for r in client.query(f"SELECT x FROM `{dataset}.keep`").result()] == [(1,)]


# -- read-only by construction ---------------------------------------------------------------------


REFUSED = [
    ("COPY (SELECT 1) TO '{out}/x.csv'", "a COPY statement is refused"),
    ("COPY (SELECT 1) TO '{runs}/x.csv'", "a COPY statement is refused"),
    ("ATTACH '{out}/x.db' AS other", "a ATTACH statement is refused"),
    ("INSTALL httpfs", "a INSTALL statement is refused"),
    ("LOAD httpfs", "a LOAD statement is refused"),
    ("CREATE TABLE t AS SELECT 1 AS x", "a CREATE statement is refused"),
    ("CREATE TEMP FUNCTION f() AS (1)", "a CREATE statement is refused"),
    ("DROP VIEW features", "a DROP statement is refused"),
    ("ALTER VIEW features RENAME TO f", "a ALTER statement is refused"),
    ("INSERT INTO runs SELECT * FROM runs", "a INSERT statement is refused"),
    ("DELETE FROM errors WHERE TRUE", "a DELETE statement is refused"),
    ("PRAGMA version", "a PRAGMA statement is refused"),
    ("SET enable_external_access = true", "a SET statement is refused"),
    ("-- a comment first\n  EXPORT DATABASE '{out}/db'", "a EXPORT statement is refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Cannot access file \"/etc/passwd\""),
    ("SELECT * FROM read_text('{runs}/../../../../etc/passwd')", "Cannot access file"),
    ("SELECT * FROM read_parquet('{out}/*.parquet')", "Cannot access file"),
    ("SELECT 1 AS a; SELECT 2 AS b", "exactly one SQL statement, got 2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["bigquery", "duckdb"])
def test_only_queries_over_the_runs_are_answered(sample_run, tmp_path, capsys, dialect):
    runs = _root(sample_run)
    for template, match in REFUSED:
        sql = template.format(out=tmp_path, runs=runs)
        message = _fail([sql, f"--runs={runs}", f"--dialect={dialect}"], capsys)
        assert match in message, (dialect, sql, message)
        if "Cannot access" in match:
            assert f"local queries read only the runs' tables under --runs={runs}" in message
    assert not list(tmp_path.iterdir()) and not (Path(runs) / "x.csv").exists()  # nothing was written
    assert query.main(["SELECT COUNT(*) AS n FROM features", f"--runs={runs}", f"--dialect={dialect}"]) == 0  # views intact
    assert "60" in capsys.readouterr().out


@pytest.mark.slow
def test_duckdb_itself_refuses_files_outside_the_runs_folder_and_setting_changes(sample_run, tmp_path):
    import duckdb

    runs = _root(sample_run)
    connection = query.duckdb_connection(runs)
    # The whole runs folder stays readable (any table shard, the runs table's folder included) ...
    files = [row[0] for row in connection.execute(f"SELECT file FROM glob('{runs}/**/*.parquet')").fetchall()]
    assert any("/tables/" in f for f in files) and any("/parquet/" in f for f in files)
    assert '"run_id": "session"' in connection.execute(f"SELECT content FROM read_text('{runs}/*/session/run.json')").fetchone()[0]
    # ... and nothing else, whatever text reaches DuckDB past the statement checks.
    for sql in (f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", "SELECT * FROM read_csv('/etc/passwd')",
                f"ATTACH '{tmp_path}/x.db' AS other", "SELECT * FROM glob('/etc/*')", "LOAD httpfs"):
        with pytest.raises(duckdb.PermissionException):
            connection.execute(sql)
    for setting in ("enable_external_access = true", "lock_configuration = false", f"allowed_directories = ['{tmp_path}/']"):
        with pytest.raises(duckdb.InvalidInputException, match="the configuration has been locked"):
            connection.execute(f"SET {setting}")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_every_saved_query_still_runs(sample_run, capsys):
    params = {"label_means": ["run_id=session"], "label_band_means": ["run_id=session"],
              "config_diff": ["run_a=session", "run_b=session"]}
    for name in query.saved_queries():
        argv = ["--saved", name, f"--runs={_root(sample_run)}", "--format=json"]
        for value in params.get(name, []):
            argv += ["--param", value]
        assert query.main(argv) == 0, (name, capsys.readouterr().err)
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        if name in ("label_means", "runs"):
            assert len(rows) == (5 if name == "label_means" else 1), name
        if name == "label_band_means":
            assert len(rows) == 5 * 64


def test_tables_are_read_as_shard_folders_or_single_files(tmp_path):
    import pyarrow as pa

    run_dir = tmp_path / "ds" / "r1"
    (run_dir / "tables" / "features").mkdir(parents=True)
    for i in (1, 0):
        pq.write_table(pa.table({"x": [i]}), run_dir / "tables" / "features" / f"part-{i:05d}.parquet")
    pq.write_table(pa.table({"x": [9]}), run_dir / "tables" / "errors.parquet")
    assert query.table_files(str(run_dir), "features") == [
        str(run_dir / "tables" / "features" / f"part-{i:05d}.parquet") for i in (0, 1)
    ]
    assert query.table_files(str(run_dir), "errors") == [str(run_dir / "tables" / "errors.parquet")]
    assert query.table_files(str(run_dir), "runs") == []
