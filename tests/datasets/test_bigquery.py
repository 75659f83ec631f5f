"""The BigQuery adapter against the BigQuery emulator: a catalogue table pointing at audio in the
emulated bucket, column mapping, parameterised filters, ranges, failures, and a full run from bq://."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tests.beam_util import collect
from tests.datasets.conftest import AUDIO_BUCKET, counts

from datasets import registry
from datasets.base import AudioItem
from datasets.bigquery import BigQueryDataset
from featurebeam.deadletter import DeadLetter
from featurebeam.errors import ConfigError, DatasetError
from export.metadata import output_files


PROJECT = "featurebeam-test"
DATASET = "fb_catalogue"
CLIPS = f"{PROJECT}.{DATASET}.clips"
PLAIN = f"{PROJECT}.{DATASET}.plain"
GHOST = f"gs://{AUDIO_BUCKET}/corpus/crow/ghost.wav"  # a catalogue row whose object does not exist
FAMILY = {"crow": "corvidae", "wren": "troglodytidae"}


def _load(client, table: str, schema, rows: list[dict]) -> None:
    """Create `table` with `schema`, then load `rows` as NDJSON (the emulator needs both steps)."""
    from google.cloud import bigquery

    client.create_table(bigquery.Table(table, schema=schema), exists_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
        schema=schema,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
    )
    client.load_table_from_file(io.BytesIO(data), table, job_config=config, rewind=True).result()


@pytest.fixture(scope="session")
def catalogue(bq_emulator, gcs_audio) -> dict[str, dict]:
    """`clips`: one row per uploaded clip, plus a missing object and NULL/empty paths.
    `plain`: the manifest's column names (uri, label, split). Returns clip_id -> row."""
    from google.cloud import bigquery

    client = bq_emulator.client()
    bq_emulator.make_dataset(DATASET)
    rows = []
    for i, (uri, label) in enumerate(sorted(gcs_audio.clips.items())):
        rows.append({"clip_id": f"{label}-{i}", "path": uri, "family": FAMILY[label], "species": label,
                     "split": "test" if i % 3 == 2 else "train", "duration_s": 0.5, "recorder": f"r{i % 2}"})
    rows.append({"clip_id": "ghost", "path": GHOST, "family": "corvidae", "species": "crow", "split": "train",
                 "duration_s": 0.5, "recorder": "r0"})
    rows.append({"clip_id": "no-path", "path": None, "species": "wren", "split": "train", "duration_s": 1.0})
    rows.append({"clip_id": "blank-path", "path": "  ", "species": "wren", "split": "train", "duration_s": 1.0})
    string = ("clip_id", "path", "family", "species", "split", "recorder")
    schema = [bigquery.SchemaField(c, "STRING") for c in string] + [bigquery.SchemaField("duration_s", "FLOAT64")]
    _load(client, CLIPS, schema, rows)
    plain = [{"uri": r["path"], "label": r["species"], "split": r["split"]} for r in rows[: len(gcs_audio.clips)]]
    _load(client, PLAIN, [bigquery.SchemaField(c, "STRING") for c in ("uri", "label", "split")], plain)
    return {row["clip_id"]: row for row in rows}


def _list(dataset: BigQueryDataset) -> tuple[dict[str, AudioItem], dict[str, DeadLetter]]:
    dataset.prepare()
    out = collect(dataset.listing())
    items = {e.key: e for e in out if isinstance(e, AudioItem)}
    dead = {e.key: e for e in out if isinstance(e, DeadLetter)}
    assert len(items) + len(dead) == len(out)  # no key listed twice
    return items, dead


ALLOWED = (f"gs://{AUDIO_BUCKET}/",)  # a table lives in no bucket: its rows' bucket must be allowed


def _clips(**options) -> BigQueryDataset:
    return BigQueryDataset(table=CLIPS, uri_column="path", key_column="clip_id", allowed_uri_prefixes=ALLOWED, **options)


# -- without the emulator ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"table": "featurebeam-test.fb.clips` WHERE TRUE; DROP TABLE x --"}, r"is not a table name this adapter accepts"),
        ({"table": "fb.clips"}, r"write project.dataset.table"),
        ({"table": CLIPS, "uri_column": "path` FROM x --"}, r"uri_column 'path` FROM x --' is not a column name"),
        ({"table": CLIPS, "label_columns": ["species", "a.b"]}, r"label_columns 'a.b' is not a column name"),
        ({"table": CLIPS, "where": "x = @p", "parameters": {"p-1": 1}}, r"query parameter name 'p-1'"),
        ({"table": CLIPS, "where": "x = @p", "parameters": {"p": {"a": 1}}}, r"query parameter 'p' has a value of type dict"),
        ({"table": CLIPS, "where": "x IN UNNEST(@p)", "parameters": {"p": [1, "a"]}}, r"list of values of one type"),
        ({"table": CLIPS, "query": "SELECT 1"}, r"exactly one of table .* or query"),
        ({}, r"exactly one of table .* or query"),
        ({"query": " ; "}, r"query is empty"),
    ],
)
def test_identifiers_and_parameters_are_checked_before_any_sql(options, match):
    with pytest.raises(DatasetError, match=match):
        BigQueryDataset(**options)


def test_bq_uris_and_configs(tmp_path, monkeypatch):
    plain = registry.resolve(f"bq://{PLAIN}")
    assert isinstance(plain, BigQueryDataset)
    assert (plain.table, plain.name, plain.uri, plain.uri_column) == (PLAIN, "plain", f"bq://{PLAIN}", "uri")
    mapped = BigQueryDataset.from_uri(f"bq://{CLIPS}?uri_column=path&label_columns=family,species&project=p-123456")
    assert (mapped.uri_column, mapped.label_columns, mapped.project) == ("path", ("family", "species"), "p-123456")
    with pytest.raises(DatasetError, match=r"unknown option 'where' in bq://.*; valid options are uri_column"):
        BigQueryDataset.from_uri(f"bq://{CLIPS}?where=1=1")
    monkeypatch.setenv("FEATUREBEAM_DATASETS_DIR", str(tmp_path))
    (tmp_path / "birds.yaml").write_text(
        f"type: bigquery\ntable: {CLIPS}\nuri_column: path\nlabel_columns: [family, species]\n"
        "where: duration_s >= @min_s\nparameters: {min_s: 0.25}\n"
    )
    birds = registry.resolve("birds")
    assert (birds.name, birds.where, birds.parameters) == ("birds", "duration_s >= @min_s", {"min_s": 0.25})
    (tmp_path / "birds.yaml").write_text(f"type: bigquery\ntable: {CLIPS}\nuri_colum: path\n")
    with pytest.raises(ConfigError, match=r"birds.yaml: unknown key 'uri_colum' for a BigQueryDataset; valid keys are"):
        registry.resolve("birds")
    (tmp_path / "birds.yaml").write_text("type: bigquery\nuri_column: path\n")
    with pytest.raises(ConfigError, match=r"birds.yaml: a bigquery dataset needs exactly one of table"):
        registry.resolve("birds")


# -- listing against the emulator --------------------------------------------------------------


@pytest.mark.emulator
def test_table_rows_become_items_and_rows_without_uri_dead_letters(catalogue, gcs_audio):
    items, dead = _list(_clips(label_columns=["family", "species"], split_column="split", metadata_columns=["recorder"]))
    good = {k: r for k, r in catalogue.items() if r["path"] and r["path"].strip()}
    assert sorted(items) == sorted(good)
    for key, item in items.items():
        row = catalogue[key]
        assert (item.uri, item.label, item.split) == (row["path"], f"{row['family']}/{row['species']}", row["split"])
        assert item.metadata == (("recorder", row["recorder"]),)
    assert items["ghost"].uri == GHOST  # listed; reading it fails later, in the pipeline's read stage
    assert sorted(dead) == ["blank-path", "no-path"]
    for letter in dead.values():
        assert (letter.stage, letter.reason, letter.uri) == ("list", "no_uri", f"bq://{CLIPS}")
        assert "column 'path' is NULL or empty" in letter.message and letter.key in letter.message


@pytest.mark.emulator
def test_small_ranges_read_every_row_exactly_once(catalogue):
    whole, whole_dead = _list(_clips())
    ranged, ranged_dead = _list(_clips(rows_per_read=2))
    assert ranged == whole and ranged_dead == whole_dead
    assert len(whole) + len(whole_dead) == len(catalogue)


@pytest.mark.emulator
def test_where_takes_values_only_as_parameters(catalogue):
    dataset = _clips(
        where="species IN UNNEST(@species) AND split = @split AND duration_s >= @min_s",
        parameters={"species": ["wren"], "split": "train", "min_s": 0.5},
    )
    items, dead = _list(dataset)
    expected = {k for k, r in catalogue.items() if r["species"] == "wren" and r["split"] == "train" and r["duration_s"] >= 0.5}
    assert sorted(items) == sorted(k for k in expected if (catalogue[k]["path"] or "").strip())
    assert sorted(dead) == ["blank-path", "no-path"]
    assert "@species" in dataset.sql and "wren" not in dataset.sql
    assert dataset.describe()["parameters"] == {"min_s": 0.5, "species": ["wren"], "split": "train"}


@pytest.mark.emulator
def test_query_and_manifest_named_columns_are_used_by_default(catalogue):
    query = BigQueryDataset(
        query=f"SELECT path AS uri, clip_id AS key, species AS label, split FROM `{CLIPS}` WHERE path LIKE @suffix;",
        parameters={"suffix": "%.flac"},
        allowed_uri_prefixes=ALLOWED,
    )
    items, dead = _list(query)
    flac = {k: r for k, r in catalogue.items() if (r["path"] or "").endswith(".flac")}
    assert {k: (i.uri, i.label, i.split) for k, i in items.items()} == {
        k: (r["path"], r["species"], r["split"]) for k, r in flac.items()
    }
    assert not dead and query.name == "query"
    plain, _ = _list(registry.resolve(f"bq://{PLAIN}", allowed_uri_prefixes=",".join(ALLOWED)))  # uri, label, split; keys are the URIs
    assert {k: (i.uri, i.label) for k, i in plain.items()} == {
        r["path"]: (r["path"], r["species"]) for r in catalogue.values() if r["path"] and r["path"] != GHOST and r["path"].strip()
    }


@pytest.mark.emulator
@pytest.mark.parametrize(
    "options, match",
    [
        ({"table": CLIPS, "uri_column": "audio_path"},
         rf"BigQuery table {CLIPS} has no column 'audio_path' \(named by uri_column\); its columns are: "
         "clip_id, path, family, species, split, recorder, duration_s"),
        ({"table": CLIPS, "uri_column": "path", "split_column": "fold"}, r"has no column 'fold' \(named by split_column\)"),
        ({"table": CLIPS, "uri_column": "duration_s"}, r"uri_column 'duration_s' .* is FLOAT(64)?, not STRING"),
        ({"table": f"{PROJECT}.{DATASET}.no_such_table"}, rf"BigQuery table {PROJECT}.{DATASET}.no_such_table not found"),
        ({"query": f"SELEC path FROM `{CLIPS}`"}, r"BigQuery rejected the query of dataset 'query': .*SELEC"),
        ({"table": CLIPS, "uri_column": "path", "where": "species = = @s", "parameters": {"s": "wren"}},
         rf"BigQuery rejected table {CLIPS}: .*[Ss]yntax"),
    ],
)
def test_failures_are_one_line_dataset_errors(catalogue, options, match):
    with pytest.raises(DatasetError, match=match) as info:
        BigQueryDataset(**options).prepare()
    assert "\n" not in str(info.value)


@pytest.mark.emulator
def test_catalogue_rows_outside_the_allowed_prefixes_are_dead_letters(catalogue, gcs_audio):
    from google.cloud import bigquery

    from tests.emulators import _LIVE

    client = _LIVE["bq"].client()
    inside = sorted(gcs_audio.clips)[0]
    rows = [{"uri": inside, "key": "inside"}, {"uri": "gs://other-team/x.wav", "key": "other-bucket"},
            {"uri": "/etc/passwd", "key": "local-path"}, {"uri": "file:///root/.config/gcloud/credentials.db", "key": "file-uri"}]
    table = f"{PROJECT}.{DATASET}.lanes"
    _load(client, table, [bigquery.SchemaField(c, "STRING") for c in ("uri", "key")], rows)
    # By default a catalogue may point nowhere: a table lives in no bucket of its own.
    items, dead = _list(registry.resolve(f"bq://{table}"))
    assert not items and sorted(dead) == ["file-uri", "inside", "local-path", "other-bucket"]
    for letter in dead.values():
        row = next(r for r in rows if r["key"] == letter.key)
        assert (letter.stage, letter.reason, letter.uri) == ("list", "uri_not_allowed", row["uri"])
        assert row["uri"] in letter.message and "--allowed_uri_prefixes=" in letter.message
    assert "--allowed_uri_prefixes=gs://other-team/" in dead["other-bucket"].message
    # The flag opens exactly the buckets it names; local paths stay refused.
    items, dead = _list(registry.resolve(f"bq://{table}", allowed_uri_prefixes=",".join(ALLOWED)))
    assert sorted(items) == ["inside"] and sorted(dead) == ["file-uri", "local-path", "other-bucket"]


@pytest.mark.emulator
def test_every_dataset_query_carries_the_bytes_ceiling_after_a_dry_run(catalogue, capsys, bq_jobs):
    dataset = registry.resolve(f"bq://{CLIPS}?uri_column=path&key_column=clip_id", max_bytes_billed="2GiB")
    assert dataset.bytes_limit == 2 * 2**30
    assert BigQueryDataset(table=CLIPS).bytes_limit == 10 * 2**30  # the stated default
    dataset.restrict(allowed_uri_prefixes=",".join(ALLOWED))
    items, dead = _list(dataset)
    assert len(items) == len(catalogue) - 2 and sorted(dead) == ["blank-path", "no-path"]
    # As sent to BigQuery, by the launcher (its dry run) and by the pipeline's worker (a dry run
    # again, then the listing job): every job carries the ceiling.
    assert [(job.kind, job.dry_run, job.maximum_bytes_billed) for job in bq_jobs] == [
        ("query", True, 2 * 2**30), ("query", True, 2 * 2**30), ("query", False, 2 * 2**30)]
    assert len({job.sql for job in bq_jobs}) == 1
    # A query: source is dry-run once more first, for its columns.
    del bq_jobs[:]
    _list(BigQueryDataset(query=f"SELECT path, clip_id FROM `{CLIPS}`", uri_column="path", key_column="clip_id",
                          allowed_uri_prefixes=ALLOWED, max_bytes_billed="2GiB"))
    assert [job.dry_run for job in bq_jobs] == [True, True, True, False]
    assert {job.maximum_bytes_billed for job in bq_jobs} == {2 * 2**30}
    err = capsys.readouterr().err
    assert f"BigQuery dry run: the listing query of table {CLIPS} will process 0 B (0 bytes) (--max_bytes_billed={2 * 2**30})" in err
    for dry_run in (True, False):  # the schema check of a query:, the final dry run and the listing job alike
        assert dataset._job_config(dry_run=dry_run).maximum_bytes_billed == 2 * 2**30
    # A YAML config may set it too; the flag wins.
    configured = BigQueryDataset(table=CLIPS, max_bytes_billed="1GB")
    configured.restrict(max_bytes_billed=4096)
    assert configured.bytes_limit == 4096


# -- a whole run -------------------------------------------------------------------------------


@pytest.mark.emulator
@pytest.mark.slow
def test_extract_from_bq_uri(catalogue, tmp_path):
    from pipelines import extract

    spec = f"bq://{CLIPS}?uri_column=path&key_column=clip_id&label_columns=species&split_column=split"
    run = extract.run([f"--dataset={spec}", "--features=logmel", f"--output={tmp_path}", "--run_id=bq", "--max_failure_ratio=1",
                       f"--allowed_uri_prefixes={ALLOWED[0]}", "--max_bytes_billed=1GB"])
    good = {k: r for k, r in catalogue.items() if r["path"] and r["path"].strip() and r["path"] != GHOST}
    # listed: the good rows, the ghost object and the two rows without a uri (which fail at listing)
    assert counts(run) == {"listed": len(good) + 3, "ok": len(good), "failed": 3, "records": len(good)}
    assert run["dataset"]["type"] == "BigQueryDataset" and run["dataset"]["table"] == CLIPS
    assert run["dataset"]["fingerprint"].startswith("sha256sum:")
    assert run["split_counts"] == {"test": 2, "train": 4}
    rows = {r["key"]: r for r in pq.read_table(os.path.join(run["outputs"]["run_dir"], "parquet")).to_pylist()}
    assert {k: (r["uri"], r["label"], r["split"]) for k, r in rows.items()} == {
        k: (r["path"], r["species"], r["split"]) for k, r in good.items()
    }
    errors = [json.loads(line) for path in output_files(run, "errors") for line in Path(path).read_text().splitlines()]
    by_key = {e["key"]: e for e in errors}
    assert sorted(by_key) == ["blank-path", "ghost", "no-path"]
    assert (by_key["ghost"]["stage"], by_key["ghost"]["uri"]) == ("read", GHOST)
    assert by_key["ghost"]["reason"] and GHOST in by_key["ghost"]["message"]
    assert {(by_key[k]["stage"], by_key[k]["reason"]) for k in ("no-path", "blank-path")} == {("list", "no_uri")}
