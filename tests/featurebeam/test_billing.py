"""featurebeam/billing.py: the bytes-billed ceiling, its flag, the dry-run estimate check, and the
dry-run-then-bounded run against the BigQuery emulator (which estimates 0 bytes and echoes the
ceiling back but does not bill, so the over-limit path is tested on the estimate logic itself)."""

from __future__ import annotations

import pytest

from featurebeam import billing
from featurebeam.errors import ConfigError


def test_limit_flag_takes_bytes_or_units():
    assert billing.parse_bytes(None) == billing.DEFAULT_MAX_BYTES_BILLED == 10 * 1024**3
    assert billing.parse_bytes("1000") == billing.parse_bytes(1000) == 1000
    assert billing.parse_bytes("500MB") == 500 * 10**6
    assert billing.parse_bytes("10GiB") == 10 * 2**30
    assert billing.parse_bytes("1.5 tb") == 1_500_000_000_000
    for bad in ("ten", "10XB", "-5", "0", "1e9"):
        with pytest.raises(ConfigError, match=r"--max_bytes_billed="):
            billing.parse_bytes(bad)


def test_an_estimate_above_the_limit_is_refused_with_the_estimate_and_the_flag():
    billing.check_estimate(estimate=10**9, limit=10**9, what="the query")  # at the limit: runs
    billing.check_estimate(estimate=None, limit=1, what="the query")  # no estimate: the ceiling still holds
    with pytest.raises(billing.BillingLimitError) as info:
        billing.check_estimate(estimate=3 * 2**40, limit=10 * 2**30, what="the listing query of table p.d.t")
    message = str(info.value)
    assert message.startswith("the listing query of table p.d.t would process 3.0 TiB (3298534883328 bytes)")
    assert "above --max_bytes_billed=10737418240 (10.0 GiB)" in message and message.endswith("or raise --max_bytes_billed")
    assert "\n" not in message
    assert isinstance(info.value, ConfigError)  # the command lines print it on one line and exit 2


def test_configs_are_copied_not_changed():
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(use_legacy_sql=False, query_parameters=[bigquery.ScalarQueryParameter("a", "INT64", 1)])
    dry, bounded = billing.dry_run_config(config), billing.bounded_config(config, limit=123)
    assert (dry.dry_run, dry.use_query_cache, dry.query_parameters[0].value) == (True, False, 1)
    assert (bounded.maximum_bytes_billed, bounded.dry_run) == (123, None)
    assert config.dry_run is None and config.maximum_bytes_billed is None


@pytest.mark.emulator
def test_queries_run_after_a_printed_dry_run_with_the_ceiling(bq_emulator):
    lines, planned = [], []
    client = bq_emulator.client()
    job = billing.run_query(client, "SELECT 1 AS x", limit=4096, what="the probe", report=lines.append, inspect=planned.append)
    assert lines == ["BigQuery dry run: the probe will process 0 B (0 bytes) (--max_bytes_billed=4096)"]
    assert [(p.dry_run, p.statement_type, p.job_id != job.job_id) for p in planned] == [(True, "SELECT", True)]
    assert job.maximum_bytes_billed == 4096  # as the service recorded the job
    assert [tuple(row.values()) for row in job.result()] == [(1,)]
