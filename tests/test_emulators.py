"""The local GCS and BigQuery emulators, driven through the real clients and Beam IOs.

These tests pin down what the project may rely on when it tests cloud code locally, and pin
the gaps it must route around (each gap test says what to do instead). If a gap test starts
failing, the emulator or Beam improved: revisit the workaround it names.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from featurebeam import cloud
from featurebeam.errors import ConfigError

if TYPE_CHECKING:
    from tests.emulators import BigQueryEmulator, GcsEmulator

pytestmark = [
    pytest.mark.emulator,
    # google-cloud-bigquery-storage nudges towards pandas-gbq for Arrow decoding; not ours.
    pytest.mark.filterwarnings("ignore:Retrieving Arrow record batches:PendingDeprecationWarning"),
]

SCHEMA = [
    bigquery.SchemaField("key", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("n", "INT64"),
    bigquery.SchemaField("x", "FLOAT64"),
]
ROWS = [{"key": f"k{i}", "n": i, "x": i / 4} for i in range(6)]


def _pipeline(**extra: str) -> test_pipeline.TestPipeline:
    # FnApiRunner runs in this process; DirectRunner would try to download Prism.
    args = ["--runner=FnApiRunner", *(f"--{k}={v}" for k, v in extra.items())]
    return test_pipeline.TestPipeline(runner="FnApiRunner", options=PipelineOptions(args))


def _ndjson(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


@pytest.fixture
def dataset(bq_emulator: BigQueryEmulator, request: pytest.FixtureRequest) -> str:
    """A dataset named after the test (the emulator lives for the whole session)."""
    name = re.sub(r"\W", "_", request.node.name)
    bq_emulator.client().delete_dataset(name, delete_contents=True, not_found_ok=True)
    bq_emulator.make_dataset(name)
    return name


@pytest.fixture
def table(bq_emulator: BigQueryEmulator, dataset: str) -> str:
    """``dataset.t`` with SCHEMA, loaded with ROWS through a resumable NDJSON upload."""
    client = bq_emulator.client()
    client.create_table(bigquery.Table(f"{client.project}.{dataset}.t", schema=SCHEMA))
    config = bigquery.LoadJobConfig(source_format="NEWLINE_DELIMITED_JSON", schema=SCHEMA)
    data = io.BytesIO(_ndjson(ROWS))
    client.load_table_from_file(data, f"{dataset}.t", job_config=config).result()
    return f"{dataset}.t"


# --- fixtures themselves ------------------------------------------------------------------


def test_fixtures_start_quickly_and_export_endpoints(
    gcs_emulator: GcsEmulator, bq_emulator: BigQueryEmulator
) -> None:
    assert gcs_emulator.startup_s < 10, gcs_emulator
    assert bq_emulator.startup_s < 20, bq_emulator
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator.endpoint
    assert os.environ["BIGQUERY_EMULATOR_HOST"] == bq_emulator.endpoint
    assert os.environ["BIGQUERY_STORAGE_EMULATOR_HOST"] == bq_emulator.grpc_endpoint
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == bq_emulator.project


# --- GCS through Beam ------------------------------------------------------------------------


def test_beam_filesystems_read_and_match_objects_written_by_the_client(
    gcs_emulator: GcsEmulator,
) -> None:
    bucket = gcs_emulator.make_bucket("fb-read")
    bucket.blob("clips/a.wav").upload_from_string(b"RIFF" + b"\0" * 40)
    bucket.blob("clips/sub/b.wav").upload_from_string(b"RIFF" + b"\1" * 96)
    bucket.blob("other/c.wav").upload_from_string(b"x")

    with FileSystems.open("gs://fb-read/clips/sub/b.wav") as f:
        assert f.read() == b"RIFF" + b"\1" * 96

    (result,) = FileSystems.match(["gs://fb-read/clips/**"])
    sizes = {m.path: m.size_in_bytes for m in result.metadata_list}
    assert sizes == {"gs://fb-read/clips/a.wav": 44, "gs://fb-read/clips/sub/b.wav": 100}


def test_match_files_in_a_pipeline_reports_sizes(gcs_emulator: GcsEmulator) -> None:
    bucket = gcs_emulator.make_bucket("fb-match")
    for name, size in [("p/1.flac", 10), ("p/deep/2.flac", 20), ("q/3.flac", 30)]:
        bucket.blob(name).upload_from_string(b"\0" * size)

    with _pipeline() as p:
        found = (
            p
            | fileio.MatchFiles("gs://fb-match/p/**")
            | beam.Map(lambda m: (m.path, m.size_in_bytes))
        )
        assert_that(
            found, equal_to([("gs://fb-match/p/1.flac", 10), ("gs://fb-match/p/deep/2.flac", 20)])
        )


def test_write_to_text_on_gcs_round_trips_without_auth_delay(gcs_emulator: GcsEmulator) -> None:
    gcs_emulator.make_bucket("fb-write")
    lines = [f"line {i}" for i in range(100)]

    started = time.monotonic()
    with _pipeline() as p:
        _ = p | beam.Create(lines) | beam.io.WriteToText("gs://fb-write/out/part", num_shards=2)
    write_s = time.monotonic() - started

    (result,) = FileSystems.match(["gs://fb-write/out/part-*"])
    assert sorted(m.path for m in result.metadata_list) == [
        "gs://fb-write/out/part-00000-of-00002",
        "gs://fb-write/out/part-00001-of-00002",
    ]
    # No temp files left behind: Beam renames them into place, then deletes the temp dir.
    (everything,) = FileSystems.match(["gs://fb-write/**"])
    assert len(everything.metadata_list) == 2
    with _pipeline() as p:
        assert_that(p | beam.io.ReadFromText("gs://fb-write/out/part-*"), equal_to(lines))
    # Beam retries ADC discovery for ~20-26 s when it finds no credentials; the fake
    # credentials file must make that instant.
    assert write_s < 10, f"WriteToText took {write_s:.1f} s: is Beam waiting for credentials?"


_AUTH_PROBE = """
import time
t0 = time.monotonic()
from apache_beam.internal.gcp import auth
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
t1 = time.monotonic()
creds = auth.get_service_credentials(PipelineOptions())
t2 = time.monotonic()
n = len(FileSystems.match(["gs://fb-auth/**"])[0].metadata_list)
print(f"import_s={t1 - t0:.2f} auth_s={t2 - t1:.2f} creds={creds is not None} objects={n}")
"""


def test_a_fresh_beam_process_gets_credentials_at_once(gcs_emulator: GcsEmulator) -> None:
    """Each Beam worker process looks up credentials once; it must not stall."""
    gcs_emulator.make_bucket("fb-auth").blob("o").upload_from_string(b"1")

    out = subprocess.run(
        [sys.executable, "-c", _AUTH_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    fields = dict(kv.split("=") for kv in out.stdout.split())
    assert fields["creds"] == "True" and fields["objects"] == "1", out.stdout
    assert float(fields["auth_s"]) < 2, out.stdout


# --- BigQuery through google-cloud-bigquery ---------------------------------------------------


def test_resumable_ndjson_load_into_explicit_schema(
    bq_emulator: BigQueryEmulator, table: str
) -> None:
    client = bq_emulator.client()
    assert [f.name for f in client.get_table(table).schema] == ["key", "n", "x"]
    rows = client.query(f"SELECT key, n, x FROM {table} ORDER BY n").result()
    assert [dict(r) for r in rows] == ROWS


def test_parquet_load(bq_emulator: BigQueryEmulator, dataset: str) -> None:
    client = bq_emulator.client()
    client.create_table(bigquery.Table(f"{client.project}.{dataset}.p", schema=SCHEMA))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    buf.seek(0)

    job = client.load_table_from_file(
        buf, f"{dataset}.p", job_config=bigquery.LoadJobConfig(source_format="PARQUET")
    )
    job.result()

    rows = client.query(f"SELECT key, n, x FROM {dataset}.p ORDER BY n").result()
    assert [dict(r) for r in rows] == ROWS


def test_load_job_reads_gs_uris_written_through_the_gcs_emulator(
    bq_emulator: BigQueryEmulator, gcs_emulator: GcsEmulator, dataset: str
) -> None:
    """Works because the fixture points BQEMU_GCS_LOCAL_ROOT at the GCS emulator's files."""
    bucket = gcs_emulator.make_bucket("fb-loads")
    bucket.blob(f"{dataset}/a.json").upload_from_string(_ndjson(ROWS[:2]))
    bucket.blob(f"{dataset}/b.json").upload_from_string(_ndjson(ROWS[2:]))
    client = bq_emulator.client()
    client.create_table(bigquery.Table(f"{client.project}.{dataset}.g", schema=SCHEMA))

    client.load_table_from_uri(
        f"gs://fb-loads/{dataset}/*.json",
        f"{dataset}.g",
        job_config=bigquery.LoadJobConfig(source_format="NEWLINE_DELIMITED_JSON"),
    ).result()

    rows = client.query(f"SELECT key, n, x FROM {dataset}.g ORDER BY n").result()
    assert [dict(r) for r in rows] == ROWS


def test_parameterised_query(bq_emulator: BigQueryEmulator, table: str) -> None:
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter("lo", "INT64", 2),
            bigquery.ArrayQueryParameter("keys", "STRING", ["k2", "k3", "k5", "nope"]),
        ]
    )
    rows = bq_emulator.client().query(
        f"SELECT key FROM {table} WHERE n >= @lo AND key IN UNNEST(@keys) ORDER BY key",
        job_config=config,
    )
    assert [r.key for r in rows.result()] == ["k2", "k3", "k5"]


def test_syntax_error_is_bad_request_with_position(bq_emulator: BigQueryEmulator) -> None:
    with pytest.raises(gexc.BadRequest) as info:
        bq_emulator.client().query("SELEC 1").result()
    assert info.value.errors[0]["reason"] == "invalidQuery"
    assert "Syntax error" in str(info.value) and "[1:" in str(info.value)


def test_missing_column_is_bad_request_naming_it(bq_emulator: BigQueryEmulator, table: str) -> None:
    # Real BigQuery says "Unrecognized name: nope at [1:8]"; the emulator passes DuckDB's
    # binder message through. Match on the column name only.
    with pytest.raises(gexc.BadRequest) as info:
        bq_emulator.client().query(f"SELECT nope FROM {table}").result()
    assert info.value.errors[0]["reason"] == "invalidQuery"
    assert "nope" in str(info.value)


def test_missing_table_is_not_found(bq_emulator: BigQueryEmulator, dataset: str) -> None:
    with pytest.raises(gexc.NotFound, match="missing"):
        bq_emulator.client().query(f"SELECT 1 FROM {dataset}.missing").result()


# --- BigQuery Storage Read API (gRPC) -------------------------------------------------------


def test_storage_read_api_reads_a_table_in_streams(
    bq_emulator: BigQueryEmulator, table: str
) -> None:
    from google.cloud.bigquery_storage import types

    reader = cloud.bigquery_read_client()  # from BIGQUERY_STORAGE_EMULATOR_HOST
    dataset, name = table.split(".")
    session = reader.create_read_session(
        parent=f"projects/{bq_emulator.project}",
        read_session=types.ReadSession(
            table=f"projects/{bq_emulator.project}/datasets/{dataset}/tables/{name}",
            data_format=types.DataFormat.ARROW,
            read_options=types.ReadSession.TableReadOptions(
                selected_fields=["key", "n"], row_restriction="n >= 3"
            ),
        ),
        max_stream_count=2,
    )
    batches = [reader.read_rows(s.name).to_arrow(session) for s in session.streams]
    got = pa.concat_tables(batches).sort_by("n").to_pylist()
    assert got == [{"key": r["key"], "n": r["n"]} for r in ROWS if r["n"] >= 3]


def test_list_rows_to_arrow_through_the_storage_read_api(
    bq_emulator: BigQueryEmulator, table: str
) -> None:
    arrow = (
        cloud.bigquery_client()
        .list_rows(table)
        .to_arrow(bqstorage_client=cloud.bigquery_read_client())
    )
    assert arrow.sort_by("n").to_pylist() == ROWS


def test_gap_query_results_are_not_readable_through_the_storage_read_api(
    bq_emulator: BigQueryEmulator, table: str
) -> None:
    """Read query results over REST (create_bqstorage_client=False), or CTAS then Storage Read.

    The emulator answers jobs.getQueryResults but has no DuckDB table behind the anonymous
    destination it reports, and it ignores QueryJobConfig(destination=...). Note: a bare
    .to_arrow()/.to_dataframe() on a large result tries bigquerystorage.googleapis.com.
    """
    client = bq_emulator.client()
    job = client.query(f"SELECT * FROM {table} WHERE n > 1")
    with pytest.raises(gexc.NotFound, match="_bqemu_anonymous"):
        job.result().to_arrow(bqstorage_client=bq_emulator.read_client())
    assert job.result().to_arrow(create_bqstorage_client=False).num_rows == 4

    dataset = table.split(".")[0]
    client.query(f"CREATE TABLE {dataset}.ctas AS SELECT * FROM {table} WHERE n > 1").result()
    arrow = client.list_rows(f"{dataset}.ctas").to_arrow(bqstorage_client=bq_emulator.read_client())
    assert arrow.num_rows == 4


def test_gap_multipart_load_is_rejected(bq_emulator: BigQueryEmulator, dataset: str) -> None:
    """Use load_table_from_file (resumable) instead of load_table_from_json (multipart)."""
    client = bq_emulator.client()
    client.create_table(bigquery.Table(f"{client.project}.{dataset}.j", schema=SCHEMA))
    with pytest.raises(gexc.BadRequest, match="multipart"):
        client.load_table_from_json(ROWS, f"{dataset}.j").result()


# --- Beam's BigQuery IO ---------------------------------------------------------------------


def test_write_to_bigquery_streaming_inserts_reaches_the_emulator(
    bq_emulator: BigQueryEmulator, dataset: str
) -> None:
    """STREAMING_INSERTS uses google-cloud-bigquery's insert_rows_json, which honours
    BIGQUERY_EMULATOR_HOST; the table must exist (table metadata calls would go to Google)."""
    client = bq_emulator.client()
    client.create_table(bigquery.Table(f"{client.project}.{dataset}.s", schema=SCHEMA))

    with _pipeline(project=bq_emulator.project) as p:
        _ = p | beam.Create(ROWS) | beam.io.WriteToBigQuery(
            f"{client.project}:{dataset}.s",
            method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
            create_disposition=beam.io.BigQueryDisposition.CREATE_NEVER,
            write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        )

    rows = client.query(f"SELECT key, n, x FROM {dataset}.s ORDER BY n").result()
    assert [dict(r) for r in rows] == ROWS


def test_gap_beam_bigquery_io_always_calls_the_production_endpoint(
    bq_emulator: BigQueryEmulator,
) -> None:
    """Why ReadFromBigQuery (DIRECT_READ, EXPORT) and WriteToBigQuery(FILE_LOADS) cannot be
    used against the emulator: Beam's table/job/dataset calls go through its apitools
    BigqueryV2 client, whose URL is fixed to bigquery.googleapis.com (no option or env var
    changes it), and DIRECT_READ builds BigQueryReadClient() with default endpoint. Against
    the emulator they fail after ~140 s of retries with httplib2 ServerNotFoundError
    "Unable to find the server at bigquery.googleapis.com". Read with google-cloud-bigquery
    and its Storage Read API instead (featurebeam.cloud).
    """
    from apache_beam.io.gcp.bigquery_tools import BigQueryWrapper

    wrapper = BigQueryWrapper()  # as WriteToBigQuery and ReadFromBigQuery build it
    assert wrapper.client.url.startswith("https://bigquery.googleapis.com/")
    # ...while the google-cloud-bigquery client beside it (used only for insertAll) does
    # follow BIGQUERY_EMULATOR_HOST: hence STREAMING_INSERTS works.
    assert wrapper.gcp_bq_client._connection.API_BASE_URL == bq_emulator.endpoint


def test_gap_list_datasets_ignores_the_label_filter(
    bq_emulator: BigQueryEmulator, dataset: str
) -> None:
    """Beam's DIRECT_READ cleanup lists datasets by label filter and deletes what comes back.

    The emulator ignores the filter, so (with endpoint patching) that cleanup deleted the
    user's own dataset. Never point Beam's ReadFromBigQuery at the emulator.
    """
    listed = [d.dataset_id for d in bq_emulator.client().list_datasets(filter="labels.no:match")]
    assert dataset in listed


# --- featurebeam.cloud ----------------------------------------------------------------------


def test_cloud_clients_follow_the_emulator_variables(
    gcs_emulator: GcsEmulator, bq_emulator: BigQueryEmulator, table: str
) -> None:
    gcs = cloud.storage_client()
    gcs.create_bucket("fb-cloud")
    gcs.bucket("fb-cloud").blob("k").upload_from_string(b"v")
    assert gcs_emulator.client().bucket("fb-cloud").blob("k").download_as_bytes() == b"v"

    bq = cloud.bigquery_client()
    assert bq.project == bq_emulator.project
    assert bq.query(f"SELECT COUNT(*) AS c FROM {table}").result().to_arrow(
        create_bqstorage_client=False
    ).to_pylist() == [{"c": len(ROWS)}]


def test_cloud_bigquery_client_accepts_host_port_without_scheme(
    bq_emulator: BigQueryEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", bq_emulator.endpoint.removeprefix("http://"))
    assert [r.one for r in cloud.bigquery_client().query("SELECT 1 AS one").result()] == [1]


def test_cloud_emulator_without_project_is_a_config_error(
    bq_emulator: BigQueryEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT"):
        cloud.bigquery_client()
    assert cloud.bigquery_client(project="explicit").project == "explicit"
