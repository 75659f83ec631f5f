"""`python -m export.query`: SQL over runs' features, runs and errors tables, locally or in BigQuery.

One dialect, GoogleSQL (BigQuery's), and one set of table names, `features`, `runs`, `errors`:

- by default the query runs in-process in DuckDB over every run's `tables/*.parquet` under
  `--runs` (views with BigQuery's column names and types; runs missing their tables, made before
  tables existed, get them built first). The SQL is translated to DuckDB's dialect by sqlglot, with
  `UNNEST(...) WITH OFFSET` kept 0-based. `--dialect=duckdb` passes DuckDB SQL through untouched;
- with `--bigquery_dataset=project.dataset` the same SQL runs in BigQuery, with that dataset as
  the default, so `features` means `project.dataset.features`.

Named parameters are written `@name` in both (DuckDB receives them as `$name`), given as
`--param name=value`; a value is a STRING unless the saved query declares a type or the flag does
(`--param limit:INT64=10`). Saved queries live in `export/queries/<name>.sql`, run with
`--saved <name>`; `--saved list` prints them. Known differences: functions sqlglot cannot map
(FORMAT's printf patterns, some JSON and geography functions) fail locally with DuckDB's
message; unnamed computed columns get engine-specific names (name them with AS); ordering of
ties and float round-off in the last digits can differ.

Read-only by construction. Only one SELECT (or WITH ... SELECT) statement is answered; COPY,
ATTACH, INSTALL/LOAD, CREATE/DROP/ALTER, INSERT/UPDATE/DELETE, PRAGMA/SET, EXPORT and the rest are
refused with one line. The statement kind is checked twice (sqlglot's tree for GoogleSQL, DuckDB's
own parser for what it is about to run), and DuckDB itself enforces it: after the views are made
the connection is locked with `enable_external_access=false`, `allowed_directories` set to the
`--runs` folder and `lock_configuration=true`, so no file outside the runs folder can be read (no
`read_csv('/etc/passwd')`), nothing written or attached, no extension loaded and no setting changed
back, whatever the SQL text says.

In BigQuery the same kinds are refused, by sqlglot's tree before anything is sent and by the
statement type BigQuery's dry run reports (a script such as `SELECT 1; DROP TABLE x` is a SCRIPT). Every query is dry-run first
(the estimate is printed on stderr) and runs with
`maximum_bytes_billed` (`--max_bytes_billed`, default featurebeam.billing.DEFAULT_MAX_BYTES_BILLED);
one whose estimate is above it is refused before it runs.

Exit codes: 0 ok, 2 bad or refused SQL, flags or parameters (one line on stderr).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import decimal
import glob
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from featurebeam import billing
from featurebeam.errors import FeaturebeamError

QUERIES_DIR = Path(__file__).with_name("queries")
TABLES = ("features", "runs", "errors")
PARAM_TYPES = ("STRING", "INT64", "FLOAT64", "BOOL", "DATE", "TIMESTAMP")
EXIT_USAGE = 2
# Statements refused by their first word (before any parser, so the message names the kind even
# where sqlglot cannot parse them, e.g. DuckDB's ATTACH or INSTALL). The parsers' checks below
# catch whatever this list misses.
_REFUSED_WORDS = frozenset(
    "ABORT ALTER ANALYZE ATTACH BEGIN CALL CHECKPOINT COMMENT COMMIT COPY CREATE DEALLOCATE DECLARE DELETE DESC "
    "DESCRIBE DETACH DROP EXECUTE EXPLAIN EXPORT FORCE GRANT IMPORT INSERT INSTALL LOAD MERGE PIVOT PRAGMA PREPARE "
    "RESET REVOKE ROLLBACK SET SHOW START SUMMARIZE TRUNCATE UNPIVOT UPDATE UPSERT USE VACUUM".split()
)
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.DOTALL)


class QueryError(FeaturebeamError):
    """SQL that does not parse or run, or a missing or malformed parameter."""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Saved:
    name: str
    sql: str
    description: str
    params: dict[str, tuple[str, str]]  # name -> (type, description)


_PARAM_LINE = re.compile(r"^--\s*@param\s+(\w+)\s+(\w+)\s*(.*)$")


def saved_queries() -> dict[str, Saved]:
    """Every `export/queries/*.sql`: leading `--` lines describe it, `-- @param name TYPE text` declares a parameter."""
    out = {}
    for path in sorted(QUERIES_DIR.glob("*.sql")):
        text = path.read_text()
        description, params = [], {}
        for line in text.splitlines():
            if not line.startswith("--"):
                break
            match = _PARAM_LINE.match(line)
            if match:
                params[match[1]] = (match[2].upper(), match[3].strip())
            else:
                description.append(line.lstrip("-").strip())
        out[path.stem] = Saved(path.stem, text, " ".join(d for d in description if d), params)
    return out


def _convert(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "STRING":
            return text
        if kind == "INT64":
            return int(text)
        if kind == "FLOAT64":
            return float(text)
        if kind == "BOOL":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind == "DATE":
            return datetime.date.fromisoformat(text)
        if kind == "TIMESTAMP":
            return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"--param {name}={text!r} is not a valid {kind}") from None
    raise QueryError(f"--param {name}: unknown type {kind}; use one of {', '.join(PARAM_TYPES)}")


def parse_params(values: Sequence[str], declared: dict[str, tuple[str, str]] | None = None) -> list[Param]:
    """`name=value` or `name:TYPE=value` flags as typed parameters (declared types win over STRING)."""
    declared = declared or {}
    params = {}
    for item in values:
        head, sep, text = item.partition("=")
        if not sep or not head:
            raise QueryError(f"--param {item!r} must be name=value (or name:TYPE=value)")
        name, _, kind = head.partition(":")
        kind = (kind or declared.get(name, ("STRING", ""))[0]).upper()
        params[name] = Param(name, kind, _convert(name, kind, text))
    missing = [n for n in declared if n not in params]
    if missing:
        raise QueryError(
            f"this query needs --param {missing[0]}=... ({declared[missing[0]][0]}: {declared[missing[0]][1]})"
        )
    return list(params.values())


# --- GoogleSQL -> DuckDB -----------------------------------------------------------------------


def parse_query(sql: str, *, unparsable_ok: bool = False):
    """The sqlglot tree of one GoogleSQL SELECT (or WITH ... SELECT); QueryError for anything else.

    unparsable_ok: return None for text sqlglot cannot parse (BigQuery, which parses more than
    sqlglot, then judges it by the statement type of its dry run).
    """
    try:
        import sqlglot
        from sqlglot import exp
        from sqlglot.errors import SqlglotError
    except ImportError:
        raise QueryError(
            "running GoogleSQL locally needs sqlglot (pip install sqlglot); or pass DuckDB SQL with --dialect=duckdb"
        ) from None
    _check_first_word(sql)
    # sqlglot warns on the root logger's last-resort handler when it falls back to a Command,
    # which would add a second line to a one-line error.
    quiet = logging.getLogger("sqlglot")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        statements = [s for s in sqlglot.parse(sql, read="bigquery") if s is not None]
    except SqlglotError as exc:
        if unparsable_ok:
            return None
        raise QueryError(f"SQL does not parse: {_one_line(exc)}") from None
    finally:
        quiet.level = level
    if len(statements) != 1:
        raise QueryError(f"give exactly one SQL statement, got {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        raise QueryError(_read_only(tree.key.upper()))
    return tree


def to_duckdb(sql: str) -> tuple[str, set[str]]:
    """Translate one GoogleSQL statement to DuckDB SQL (sqlglot), keeping WITH OFFSET 0-based.

    Returns the DuckDB SQL and the names of its `@name` parameters (`$name` in DuckDB).
    """
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    tree = parse_query(sql)
    # BigQuery's WITH OFFSET counts from 0; DuckDB's WITH ORDINALITY, which sqlglot emits, from 1.
    offsets = set()
    for unnest in tree.find_all(exp.Unnest):
        offset = unnest.args.get("offset")
        if isinstance(offset, exp.Identifier):
            offsets.add(offset.name)
        elif offset is True:
            offsets.add("offset")
    if offsets:
        for column in list(tree.find_all(exp.Column)):
            if column.name in offsets and not column.table and column.find_ancestor(exp.Unnest) is None:
                rebased = exp.Paren(this=exp.Sub(this=column.copy(), expression=exp.Literal.number(1)))
                if isinstance(column.parent, exp.Select):  # a bare projection keeps its name
                    rebased = exp.alias_(rebased, column.name)
                column.replace(rebased)
    names = {p.name for p in tree.find_all(exp.Parameter)}
    try:
        return tree.sql(dialect="duckdb"), names
    except SqlglotError as exc:
        raise QueryError(f"cannot translate to DuckDB: {_one_line(exc)}") from None


def _read_only(kind: str) -> str:
    return (
        f"export.query is read-only and answers one SELECT (or WITH ... SELECT) over the features, runs "
        f"and errors tables; a {kind} statement is refused"
    )


def _first_word(sql: str) -> str:
    rest = _LEADING_COMMENTS.sub("", sql, count=1)
    match = re.match(r"[A-Za-z_]+", rest)
    return match[0].upper() if match else ""


def _check_first_word(sql: str) -> None:
    """Refuse by name a statement that does not start like a query (PRAGMA, ATTACH, COPY, ...)."""
    word = _first_word(sql)
    if word in _REFUSED_WORDS:
        raise QueryError(_read_only(word))


def _check_statement_kind(connection, text: str) -> None:
    """DuckDB's own parser must see exactly one SELECT (a PIVOT, say, hides a CREATE)."""
    import duckdb

    try:
        statements = connection.extract_statements(text)
    except duckdb.Error as exc:
        raise QueryError(f"DuckDB: {_one_line(exc)}") from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(_read_only(kind.name))


def _one_line(exc: BaseException | str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())


# --- engines -----------------------------------------------------------------------------------


def run_dirs(runs: str) -> list[str]:
    """Every finished run folder under `runs`, building the SQL tables of runs that lack them."""
    from export import tables

    if "://" in runs:
        raise QueryError(f"--runs={runs}: local DuckDB reads local folders; copy the runs down or use --bigquery_dataset")
    if not os.path.isdir(runs):
        raise QueryError(f"--runs={runs} is not a folder; point it at the --output of your extractions (default runs/)")
    found = sorted(glob.glob(os.path.join(glob.escape(runs), "**", "run.json"), recursive=True))
    dirs = [os.path.dirname(p) for p in found if "/_work/" not in p]
    if not dirs:
        raise QueryError(
            f"no finished runs under {runs}; run an extraction first "
            "(python -m pipelines.extract --dataset=sample --output=runs) or pass --runs=FOLDER"
        )
    for run_dir in dirs:
        if not table_files(run_dir, tables.RUNS):  # a run made before tables existed
            print(f"building SQL tables of {run_dir}", file=sys.stderr)
            tables.rebuild(run_dir)
    return dirs


def table_files(run_dir: str, name: str) -> list[str]:
    """The Parquet files of table `name` in one run folder ([] when it has none yet).

    A table is a folder of shards (`tables/<name>/part-*.parquet`) or, in runs written before
    shards, one file (`tables/<name>.parquet`).
    """
    from export import tables

    shards = sorted(glob.glob(os.path.join(glob.escape(os.path.join(run_dir, tables.TABLES_DIR, name)), "part-*.parquet")))
    if shards:
        return shards
    single = os.path.join(run_dir, tables.TABLES_DIR, f"{name}.parquet")
    return [single] if os.path.exists(single) else []


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def duckdb_connection(runs: str):
    """An in-memory DuckDB with views `features`, `runs` and `errors` over every run under `runs`,
    locked read-only: only files under `runs` can be read, and no setting can be changed."""
    import duckdb
    import pyarrow as pa

    from export import tables

    root = os.path.abspath(runs)
    connection = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    dirs = [os.path.abspath(d) for d in run_dirs(runs)]
    for name in TABLES:
        files = [f for run_dir in dirs for f in table_files(run_dir, name)]
        if not files:  # no run has a shard of this table (say, no dead letters anywhere): an empty table
            empty = pa.Table.from_pylist([], schema=tables.arrow_schema(tables.table_schema({}, name)))
            connection.register(f"_{name}_empty", empty)
            connection.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_empty")
            continue
        listed = ", ".join(_quote(f) for f in files)
        # union_by_name: runs with different extractors have different STRUCT columns.
        connection.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], union_by_name = true)")
    # The views read their files when queried, so the runs folder itself stays readable (the
    # whole folder, so new shard files and the runs table's folder are covered); nothing else is.
    # A run folder linked into --runs is read where it really is (DuckDB resolves links), so each
    # found run folder's real location is allowed too, and nothing else.
    allowed = sorted({root.rstrip("/") + "/", *(os.path.realpath(d).rstrip("/") + "/" for d in dirs)})
    connection.execute(f"SET allowed_directories = [{', '.join(_quote(a) for a in allowed)}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def run_duckdb(sql: str, params: Sequence[Param], *, runs: str, dialect: str = "bigquery") -> tuple[list[str], list[tuple]]:
    import duckdb

    if dialect == "bigquery":
        text, wanted = to_duckdb(sql)
    else:  # $name outside string literals
        _check_first_word(sql)
        text, wanted = sql, set(re.findall(r"\$([A-Za-z_]\w*)", re.sub(r"'(?:[^']|'')*'", "''", sql)))
    connection = duckdb_connection(runs)
    _check_statement_kind(connection, text)
    values = {p.name: p.value for p in params if p.name in wanted}
    missing = sorted(wanted - set(values))
    if missing:
        raise QueryError(f"the query uses @{missing[0]}; pass --param {missing[0]}=...")
    try:
        cursor = connection.execute(text, values) if values else connection.execute(text)
        columns = [d[0] for d in cursor.description or []]
        return columns, cursor.fetchall()
    except duckdb.PermissionException as exc:
        raise QueryError(
            f"DuckDB refused: {_one_line(exc)}; local queries read only the runs' tables under --runs={runs}"
        ) from None
    except duckdb.Error as exc:
        raise QueryError(f"DuckDB: {_one_line(exc)}") from None


def run_bigquery(
    sql: str, params: Sequence[Param], *, dataset: str, client=None, max_bytes_billed: int | None = None
) -> tuple[list[str], list[tuple]]:
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud import bigquery

    from export.bigquery import parse_dataset
    from featurebeam import cloud

    project, name = parse_dataset(dataset)
    client = client or cloud.bigquery_client(project=project)
    config = bigquery.QueryJobConfig(
        default_dataset=f"{project}.{name}",
        query_parameters=[bigquery.ScalarQueryParameter(p.name, p.type, p.value) for p in params],
    )
    limit = max_bytes_billed or billing.DEFAULT_MAX_BYTES_BILLED
    parse_query(sql, unparsable_ok=True)  # one SELECT, before BigQuery sees it

    def only_select(planned) -> None:
        # BigQuery's own parser, through the dry run: a script (SELECT 1; DROP TABLE ...) or DML
        # never runs with the caller's credentials through this door either.
        if planned.statement_type not in (None, "SELECT"):
            raise QueryError(_read_only(planned.statement_type))

    try:
        job = billing.run_query(client, sql, config, limit=limit, what="the query", inspect=only_select)
        result = job.result()
    except GoogleAPICallError as exc:
        raise QueryError(f"BigQuery: {_one_line(exc.message if hasattr(exc, 'message') else exc)}") from None
    columns = [f.name for f in result.schema]
    return columns, [tuple(row.values()) for row in result]


# --- output ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def render(columns: Sequence[str], rows: Sequence[tuple], *, fmt: str) -> str:
    if fmt == "json":
        return "\n".join(json.dumps(dict(zip(columns, (_plain(v) for v in row))), default=str) for row in rows)
    if fmt == "csv":
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(v) if isinstance(v, (list, dict)) else v for v in map(_plain, row)])
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def query(
    sql: str,
    *,
    params: Sequence[Param] = (),
    runs: str = "runs",
    bigquery_dataset: str | None = None,
    dialect: str = "bigquery",
    client=None,
    max_bytes_billed: int | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; returns (column names, rows).

    Raises QueryError for bad or refused SQL or parameters, billing.BillingLimitError when a
    BigQuery dry run estimates more than `max_bytes_billed` bytes (default 10 GiB).
    """
    if bigquery_dataset:
        if dialect != "bigquery":
            raise QueryError("--dialect=duckdb is for local queries; BigQuery takes GoogleSQL")
        return run_bigquery(sql, params, dataset=bigquery_dataset, client=client, max_bytes_billed=max_bytes_billed)
    return run_duckdb(sql, params, runs=runs, dialect=dialect)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.query",
        description="Run GoogleSQL over the features, runs and errors tables: locally with DuckDB over run "
        "folders (default), or in BigQuery with --bigquery_dataset.",
        allow_abbrev=False,
    )
    parser.add_argument("sql", nargs="?", help="one SQL statement (GoogleSQL); or use --saved NAME")
    parser.add_argument("--saved", help="a saved query in export/queries/ by name; 'list' shows them")
    parser.add_argument("--param", action="append", default=[], help="name=value or name:TYPE=value for @name (repeatable)")
    parser.add_argument("--runs", default="runs", help="folder searched for runs' tables/ (default: runs)")
    parser.add_argument("--bigquery_dataset", help="project.dataset: run in BigQuery instead of DuckDB")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (json: one object per line)")
    parser.add_argument("--dialect", choices=("bigquery", "duckdb"), default="bigquery", help="dialect of local SQL (default bigquery)")
    parser.add_argument(
        "--max_bytes_billed", help="BigQuery: refuse queries whose dry run estimates more bytes (bytes, or 500MB, 10GiB; default 10GiB)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.saved == "list":
            for saved in saved_queries().values():
                params = " ".join(f"--param {n}=..." for n in saved.params)
                print(f"{saved.name}: {saved.description}" + (f"  [{params}]" if params else ""))
            return 0
        if bool(args.saved) == bool(args.sql):
            raise QueryError("give either an SQL statement or --saved NAME (see --saved list)")
        declared: dict[str, tuple[str, str]] = {}
        sql = args.sql
        if args.saved:
            queries = saved_queries()
            if args.saved not in queries:
                raise QueryError(f"no saved query {args.saved!r}; saved queries: {', '.join(queries)}")
            sql, declared = queries[args.saved].sql, queries[args.saved].params
        params = parse_params(args.param, declared)
        columns, rows = query(
            sql, params=params, runs=args.runs, bigquery_dataset=args.bigquery_dataset, dialect=args.dialect,
            max_bytes_billed=billing.parse_bytes(args.max_bytes_billed),
        )
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    output = render(columns, rows, fmt=args.format)
    if output:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
