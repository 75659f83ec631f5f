"""Audio items listed by a BigQuery table or query: one row per item, columns mapped to fields.

Read path. The launcher only checks: it reads the table's schema (or dry-runs the query), checks
that the named columns exist, and dry-runs the final SQL, so a typo or a syntax error stops the
launch with BigQuery's own message. Inside the pipeline one worker runs the query (a
parameterised `SELECT <columns> FROM <table or (query)> [WHERE (<where>)]`) and emits row ranges
of its result; after a reshuffle, workers page through their ranges with `jobs.getQueryResults`
(`startIndex`/`maxResults`). So the listing is read in parallel, streamed page by page, and never
collected in the launcher, and the result is a snapshot: the query's result table does not change
while the ranges are read.

Why not `beam.io.ReadFromBigQuery`: its BigQuery calls go through Beam's own API client, which is
wired to bigquery.googleapis.com and ignores `BIGQUERY_EMULATOR_HOST`; its EXPORT method then
reads Avro files that an emulator's extract job cannot put in an emulated bucket, and DIRECT_READ
builds its own TLS Storage API client. Neither can run against a local emulator, so the production
path would be untested. google-cloud-bigquery (`featurebeam.cloud.bigquery_client`) runs the same
calls against BigQuery and the emulator, so the tests exercise the code Dataflow runs.

Bills. Every query (the schema dry run of a `query:`, the final dry run, the listing query on the
worker) carries `maximum_bytes_billed` (`max_bytes_billed:` or `--max_bytes_billed`, default
featurebeam.billing.DEFAULT_MAX_BYTES_BILLED); the launcher prints the final query's dry-run
estimate and refuses to start when it is above the limit, naming the estimate and the flag.

Lanes. A row's URI is data, so it must fall under `allowed_uri_prefixes:` or
`--allowed_uri_prefixes` (a table lives in no bucket, so by default nothing is allowed); other rows
become list-stage dead letters with reason `uri_not_allowed` (datasets/allowlist.py).

Safety. Table and column names are checked against strict patterns and quoted; values never enter
SQL text, they travel as query parameters (`parameters:`). `query:` and `where:` are SQL written
by whoever owns the dataset config and are trusted as such: never build them from untrusted input.

Credentials: Application Default Credentials; `BIGQUERY_EMULATOR_HOST` selects an emulator.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import re
import urllib.parse
from typing import Any, Iterable, Iterator, Mapping

import apache_beam as beam

from datasets.allowlist import parse_prefixes
from datasets.base import AudioItem, Dataset
from featurebeam import billing, faults, stages
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import DatasetError

_LOG = logging.getLogger("featurebeam")
SCHEME = "bq://"
# Strict subsets of BigQuery's naming rules: enough for real catalogues, and nothing that could
# close a backtick quote. Projects may carry a domain scope (example.com:project).
PROJECT_RE = r"(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]"
DATASET_RE = r"[A-Za-z0-9_]{1,1024}"
TABLE_ID_RE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,1023}"
TABLE_RE = re.compile(rf"^(?P<project>{PROJECT_RE})\.(?P<dataset>{DATASET_RE})\.(?P<table>{TABLE_ID_RE})$")
COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
PARAMETER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Unset column options fall back to the manifest's column names when the source has them.
DEFAULT_COLUMNS = {"key_column": "key", "label_columns": "label", "split_column": "split"}
URI_OPTIONS = ("uri_column", "key_column", "label_columns", "split_column", "metadata_columns", "project", "location")
ROWS_PER_READ = 50_000  # rows per parallel range read
PAGE_ROWS = 10_000  # rows per getQueryResults page (bounds a reader's memory)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _api_message(exc: Exception) -> str:
    """BigQuery's own message from a google.api_core error (the first of its `errors`), on one line."""
    errors = getattr(exc, "errors", None) or []
    if errors and isinstance(errors[0], Mapping) and errors[0].get("message"):
        return _one_line(errors[0]["message"])
    return _one_line(getattr(exc, "message", None) or exc)


def _parameter(name: str, value: Any):
    """A google-cloud-bigquery query parameter for a YAML value (scalar or list of scalars)."""
    from google.cloud import bigquery

    def scalar_type(v: Any) -> str:
        if isinstance(v, bool):
            return "BOOL"
        if isinstance(v, int):
            return "INT64"
        if isinstance(v, float):
            return "FLOAT64"
        if isinstance(v, str):
            return "STRING"
        if isinstance(v, datetime.datetime):
            return "TIMESTAMP"
        if isinstance(v, datetime.date):
            return "DATE"
        raise DatasetError(
            f"query parameter {name!r} has a value of type {type(v).__name__} ({v!r}); use a string, "
            "number, boolean, date, timestamp, or a list of one of these"
        )

    if isinstance(value, (list, tuple)):
        types = {scalar_type(v) for v in value}
        if len(types) != 1:
            raise DatasetError(f"query parameter {name!r} must be a non-empty list of values of one type, got {value!r}")
        return bigquery.ArrayQueryParameter(name, types.pop(), list(value))
    return bigquery.ScalarQueryParameter(name, scalar_type(value), value)


def _json_value(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class BigQueryDataset(Dataset):
    """Items listed by the rows of a BigQuery table or query.

    table: `project.dataset.table` to read; or query: a GoogleSQL query whose rows are the items
      (exactly one of the two).
    uri_column: the STRING column holding each item's URI (`gs://...` or a local path).
    key_column: a column with stable item keys (default `key` if the source has one, else the URI:
      a table lives in no folder, so each uri is its own key, as a manifest's uris outside the
      manifest's folder are; give a key column to keep keys when the audio moves).
    label_columns: one column, or several whose values are joined with '/' (`[family, species]`
      -> `corvidae/pica_pica`); default `label` if the source has one. NULL in any -> no label.
    split_column: the train/valid/test column (default `split` if present).
    metadata_columns: further columns kept as item metadata (as strings).
    where: a GoogleSQL boolean expression over the source's columns, e.g. `duration_s > @min_s`.
      It is trusted config text; values belong in `parameters`.
    parameters: name -> value (string, number, boolean, date, timestamp or a list of one of
      these) for the `@name` parameters in `where` or `query`.
    project: the project that runs (and pays for) the query job; default the client's
      (GOOGLE_CLOUD_PROJECT or Application Default Credentials).
    location: the jobs' location, when BigQuery cannot infer it from the table.
    rows_per_read: rows per parallel range of the listing.
    allowed_uri_prefixes: buckets or folders (`gs://audio/`) the rows' URIs may point at; rows
      elsewhere become `uri_not_allowed` dead letters. `--allowed_uri_prefixes` adds to them.
    max_bytes_billed: the ceiling on bytes billed per query (an integer or `10GiB`);
      `--max_bytes_billed` overrides it.
    """

    def __init__(
        self,
        *,
        table: str | None = None,
        query: str | None = None,
        uri_column: str = "uri",
        key_column: str | None = None,
        label_columns: str | Iterable[str] | None = None,
        split_column: str | None = None,
        metadata_columns: str | Iterable[str] = (),
        where: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        project: str | None = None,
        location: str | None = None,
        name: str | None = None,
        rows_per_read: int = ROWS_PER_READ,
        allowed_uri_prefixes: Iterable[str] = (),
        max_bytes_billed: int | str | None = None,
    ):
        if (table is None) == (query is None):
            raise DatasetError("a bigquery dataset needs exactly one of table (project.dataset.table) or query")
        if table is not None:
            match = TABLE_RE.match(str(table))
            if not match:
                raise DatasetError(
                    f"{table!r} is not a table name this adapter accepts: write project.dataset.table with a "
                    "project id (6-30 of a-z, 0-9, '-'), a dataset of letters, digits and '_', and a table of "
                    "letters, digits, '_' and '-'"
                )
            self.table_parts = (match["project"], match["dataset"], match["table"])
        else:
            if not str(query).strip().rstrip(";").strip():
                raise DatasetError("query is empty; write a GoogleSQL SELECT, or name a table instead")
            self.table_parts = None
        self.table = table
        self.query = str(query).strip().rstrip(";").rstrip() if query is not None else None
        self.where = str(where).strip() if where is not None and str(where).strip() else None
        self.uri_column = self._column(uri_column, "uri_column")
        self.key_column = self._column(key_column, "key_column") if key_column is not None else None
        self.label_columns = self._columns(label_columns, "label_columns") if label_columns is not None else None
        self.split_column = self._column(split_column, "split_column") if split_column is not None else None
        self.metadata_columns = self._columns(metadata_columns, "metadata_columns")
        self.parameters = dict(parameters or {})
        for key, value in self.parameters.items():
            if not PARAMETER_RE.match(str(key)):
                raise DatasetError(f"query parameter name {key!r} must be letters, digits and '_', not starting with a digit")
            _parameter(key, value)  # type check now, not on a worker
        if not isinstance(rows_per_read, int) or rows_per_read <= 0:
            raise DatasetError(f"rows_per_read must be a positive integer, got {rows_per_read!r}")
        self.rows_per_read = rows_per_read
        self.project = project
        self.location = location
        self.allowed_uri_prefixes = parse_prefixes(allowed_uri_prefixes)
        self.max_bytes_billed = billing.parse_bytes(max_bytes_billed) if max_bytes_billed is not None else None
        if table is not None:
            self.uri = f"{SCHEME}{table}"
            self.name = name or self.table_parts[2]
        else:
            self.uri = f"{SCHEME}query/{hashlib.sha256(self.query.encode()).hexdigest()[:12]}"
            self.name = name or "query"
        self.sql: str | None = None  # the final SELECT, once prepare() has resolved the columns

    @classmethod
    def from_uri(cls, uri: str) -> "BigQueryDataset":
        """`bq://project.dataset.table[?uri_column=path&label_columns=family,species&...]`."""
        if not uri.startswith(SCHEME):
            raise DatasetError(f"{uri!r} is not a bq:// URI; write bq://project.dataset.table")
        table, _, query = uri[len(SCHEME):].partition("?")
        options: dict[str, Any] = {}
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise DatasetError(
                f"cannot read the options of {uri}; write bq://project.dataset.table?uri_column=path&..."
            ) from None
        for key, value in pairs:
            if key not in URI_OPTIONS:
                raise DatasetError(f"unknown option {key!r} in {uri}; valid options are {', '.join(URI_OPTIONS)}")
            options[key] = [v for v in value.split(",") if v] if key.endswith("_columns") else value
        return cls(table=table, **options)

    @staticmethod
    def _column(value: Any, option: str) -> str:
        if not isinstance(value, str) or not COLUMN_RE.match(value):
            raise DatasetError(
                f"{option} {value!r} is not a column name this adapter accepts: letters, digits and '_', "
                "not starting with a digit (top-level columns only)"
            )
        return value

    @classmethod
    def _columns(cls, value: Any, option: str) -> tuple[str, ...]:
        values = [value] if isinstance(value, str) else list(value or ())
        return tuple(cls._column(v, option) for v in values)

    # -- launcher side ------------------------------------------------------------------------

    def _client(self):
        from google.auth.exceptions import DefaultCredentialsError

        from featurebeam import cloud

        try:
            return cloud.bigquery_client(project=self.project, location=self.location)
        except DefaultCredentialsError:
            raise DatasetError(
                f"no Google credentials to query {self._source()}: run 'gcloud auth application-default login', "
                "set GOOGLE_APPLICATION_CREDENTIALS, or BIGQUERY_EMULATOR_HOST for a local emulator"
            ) from None

    @property
    def bytes_limit(self) -> int:
        """The ceiling on bytes billed of every query this dataset runs."""
        return self.max_bytes_billed if self.max_bytes_billed is not None else billing.DEFAULT_MAX_BYTES_BILLED

    def _job_config(self, *, dry_run: bool = False):
        from google.cloud import bigquery

        return bigquery.QueryJobConfig(
            dry_run=dry_run,
            use_query_cache=not dry_run,
            use_legacy_sql=False,
            maximum_bytes_billed=self.bytes_limit,
            query_parameters=[_parameter(k, v) for k, v in sorted(self.parameters.items())],
        )

    def _source(self) -> str:
        return f"table {self.table}" if self.table else f"the query of dataset {self.name!r}"

    def _dry_run(self, client, sql: str, *, check: bool = False):
        """A dry run of `sql`; with `check`, its estimate is printed and held to the limit."""
        from google.api_core import exceptions

        try:
            if check:
                return billing.dry_run(
                    client, sql, self._job_config(), limit=self.bytes_limit,
                    what=f"the listing query of {self._source()}", location=self.location,
                )
            return client.query(sql, job_config=self._job_config(dry_run=True), location=self.location)
        except exceptions.Forbidden as exc:
            raise DatasetError(f"not allowed to query {self._source()}: {_api_message(exc)}") from None
        except exceptions.GoogleAPICallError as exc:
            raise DatasetError(f"BigQuery rejected {self._source()}: {_api_message(exc)}") from None
        except (exceptions.RetryError, OSError) as exc:
            raise DatasetError(f"cannot reach BigQuery to check {self._source()}: {_one_line(exc)}") from None

    def _source_schema(self, client) -> list:
        from google.api_core import exceptions

        if self.table is None:
            return list(self._dry_run(client, self.query).schema or [])
        try:
            table = client.get_table(self.table)
        except exceptions.NotFound:
            raise DatasetError(
                f"BigQuery table {self.table} not found; check the project, dataset and table names, "
                "and that the credentials can see it"
            ) from None
        except exceptions.GoogleAPICallError as exc:
            raise DatasetError(f"cannot read the schema of BigQuery table {self.table}: {_api_message(exc)}") from None
        except (exceptions.RetryError, OSError) as exc:
            raise DatasetError(f"cannot reach BigQuery to read table {self.table}: {_one_line(exc)}") from None
        if table.table_type == "TABLE" and table.num_rows == 0:
            raise DatasetError(f"BigQuery table {self.table} has no rows")
        return list(table.schema)

    def _resolve_columns(self, schema: list) -> None:
        types = {field.name: field.field_type for field in schema}
        found = ", ".join(types) or "none"
        where = f"BigQuery table {self.table}" if self.table else f"the query of dataset {self.name!r}"

        def check(column: str, option: str) -> None:
            if column not in types:
                raise DatasetError(
                    f"{where} has no column {column!r} (named by {option}); its columns are: {found}"
                )

        check(self.uri_column, "uri_column")
        if types[self.uri_column] != "STRING":
            raise DatasetError(f"uri_column {self.uri_column!r} of {where} is {types[self.uri_column]}, not STRING")
        if self.key_column is None:
            self.key_column = DEFAULT_COLUMNS["key_column"] if DEFAULT_COLUMNS["key_column"] in types else None
        if self.label_columns is None:
            default = DEFAULT_COLUMNS["label_columns"]
            self.label_columns = (default,) if default in types else ()
        if self.split_column is None:
            self.split_column = DEFAULT_COLUMNS["split_column"] if DEFAULT_COLUMNS["split_column"] in types else None
        if self.key_column:
            check(self.key_column, "key_column")
        for column in self.label_columns:
            check(column, "label_columns")
        if self.split_column:
            check(self.split_column, "split_column")
        for column in self.metadata_columns:
            check(column, "metadata_columns")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the listing reads, once, in a fixed order."""
        named = [self.uri_column, self.key_column, *(self.label_columns or ()), self.split_column, *self.metadata_columns]
        return tuple(dict.fromkeys(c for c in named if c))

    def _build_sql(self) -> str:
        # Identifiers were checked against COLUMN_RE / TABLE_RE, so backtick quoting is safe.
        select = ", ".join(f"`{c}`" for c in self.columns)
        source = f"`{self.table}`" if self.table else f"(\n{self.query}\n)"
        sql = f"SELECT {select}\nFROM {source}"
        if self.where:
            # On lines of their own, so a trailing '--' comment in `where` cannot swallow the ')'.
            sql += f"\nWHERE (\n{self.where}\n)"
        return sql

    def prepare(self) -> None:
        """Check the source exists, the named columns exist, and the final SQL is valid (dry run)."""
        client = self._client()
        self._resolve_columns(self._source_schema(client))
        sql = self._build_sql()
        self._dry_run(client, sql, check=True)
        self.sql = sql

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "table": self.table,
            "query": self.query,
            "where": self.where,
            "parameters": {k: _json_value(v) for k, v in sorted(self.parameters.items())},
            "columns": {
                "uri": self.uri_column,
                "key": self.key_column,
                "label": list(self.label_columns or ()),
                "split": self.split_column,
                "metadata": list(self.metadata_columns),
            },
            "sql": self.sql,
            "allowed_uri_prefixes": list(self.allow_list.prefixes),
        }

    # -- pipeline side ------------------------------------------------------------------------

    def listing(self) -> beam.PTransform:
        if self.sql is None:
            self.prepare()
        return _ReadBigQuery(self)

    def row_key(self, row: Mapping[str, Any]) -> str:
        """A stable stand-in key for a row without a usable key: a hash of its values."""
        text = json.dumps({c: _json_value(row.get(c)) for c in self.columns}, sort_keys=True, default=str)
        return f"{self.uri}#row-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def item(self, row: Mapping[str, Any]) -> AudioItem | DeadLetter:
        """The AudioItem for one result row, or a list-stage DeadLetter if its URI or key is missing."""
        faults.point("list")
        uri = row.get(self.uri_column)
        uri = uri.strip() if isinstance(uri, str) else None
        key = row.get(self.key_column) if self.key_column else uri
        if not uri or key is None or str(key) == "":
            missing, column = ("uri", self.uri_column) if not uri else ("key", self.key_column)
            text = json.dumps({c: _json_value(row.get(c)) for c in self.columns}, default=str)[:300]
            return DeadLetter(
                key=str(key) if key not in (None, "") else self.row_key(row),
                uri=self.uri,
                stage="list",
                error_type="MissingValue",
                reason=f"no_{missing}",
                message=f"row of {self.uri} has no {missing} (column {column!r} is NULL or empty): {text}",
            )
        allow = self.allow_list  # a table lives in no bucket: only the allowed prefixes
        if not allow.allows(uri):
            return allow.refusal(key=str(key), uri=uri, source=f"{self.uri} (column {self.uri_column!r})")
        labels = [row.get(c) for c in self.label_columns or ()]
        split = row.get(self.split_column) if self.split_column else None
        return AudioItem(
            key=str(key),
            uri=uri,
            label="/".join(str(v) for v in labels) if labels and all(v is not None for v in labels) else None,
            split=str(split) if split not in (None, "") else None,
            metadata=tuple(sorted((c, str(_json_value(row.get(c)))) for c in self.metadata_columns if row.get(c) is not None)),
        )


@dataclasses.dataclass(frozen=True)
class RowRange:
    """Rows [start, start + count) of a finished query job's result."""

    project: str
    location: str | None
    job_id: str
    start: int
    count: int


class _RunQueryFn(beam.DoFn):
    """Runs the listing query once and emits the row ranges of its result."""

    def __init__(self, dataset: BigQueryDataset):
        self.dataset = dataset
        self.list_us = stages.counter("list")

    def setup(self):
        self.client = self.dataset._client()

    def process(self, sql: str) -> Iterator[RowRange]:
        return stages.timed(self._query(sql), self.list_us)

    def _query(self, sql: str) -> Iterator[RowRange]:
        from google.api_core import exceptions

        dataset = self.dataset
        try:
            # Dry-run again here: on Dataflow the table may have grown since the launcher checked.
            job = billing.run_query(
                self.client, sql, dataset._job_config(), limit=dataset.bytes_limit,
                what=f"the listing query of {dataset._source()}", location=dataset.location, report=_LOG.info,
            )
            total = job.result(max_results=0).total_rows or 0
        except exceptions.GoogleAPICallError as exc:
            raise DatasetError(f"listing query of {dataset._source()} failed: {_api_message(exc)}") from None
        for start in range(0, total, dataset.rows_per_read):
            yield RowRange(job.project, job.location, job.job_id, start, min(dataset.rows_per_read, total - start))


class _ReadRowsFn(beam.DoFn):
    """Pages through one range of the query result, turning rows into items (or dead letters)."""

    def __init__(self, dataset: BigQueryDataset):
        self.dataset = dataset
        self.list_us = stages.counter("list")

    def setup(self):
        self.client = self.dataset._client()

    def process(self, rows: RowRange) -> Iterator[AudioItem | DeadLetter]:
        return stages.timed(self._rows(rows), self.list_us)

    def _rows(self, rows: RowRange) -> Iterator[AudioItem | DeadLetter]:
        # A fresh job object per range: QueryJob caches its first page, and a reused one would
        # hand a later range the rows of an earlier one.
        job = self.client.get_job(rows.job_id, project=rows.project, location=rows.location)
        for row in job.result(start_index=rows.start, max_results=rows.count, page_size=PAGE_ROWS):
            yield self.dataset.item(row)


class _ReadBigQuery(beam.PTransform):
    def __init__(self, dataset: BigQueryDataset):
        super().__init__()
        self.dataset = dataset

    def expand(self, pbegin):
        dataset = self.dataset
        return (
            pbegin
            | "Query" >> beam.Create([dataset.sql])
            | "RunQuery" >> beam.ParDo(_RunQueryFn(dataset))
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRows" >> beam.ParDo(_ReadRowsFn(dataset))
        )
