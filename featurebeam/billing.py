"""Bounded BigQuery bills: every query featurebeam runs is dry-run first, then run with a ceiling.

On-demand BigQuery bills the bytes a query scans, and a catalogue query or an ad hoc SELECT over a
partitioned features table can scan far more than its author expects. So each query goes through
`run_query`: a dry run (free) reports the bytes it will process, which are printed; a query whose
estimate is above the limit stops there with the estimate and the flag in the message; otherwise
the query runs with `maximum_bytes_billed` set, so BigQuery itself refuses to bill more even if the
estimate was low (estimates of queries over external or clustered tables are upper or lower bounds).

The limit is `DEFAULT_MAX_BYTES_BILLED` (10 GiB, about 0.06 USD on demand) unless
`--max_bytes_billed` says otherwise (`pipelines.extract`, `export.query`).
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any, Callable

from featurebeam.errors import ConfigError

DEFAULT_MAX_BYTES_BILLED = 10 * 1024**3
FLAG = "--max_bytes_billed"
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class BillingLimitError(ConfigError):
    """A query's dry-run estimate is above `--max_bytes_billed`; nothing was run or billed."""


def parse_bytes(text: str | int | None) -> int:
    """`--max_bytes_billed` as bytes: an integer, or a number with a unit (`500MB`, `10GiB`, `1TB`).

    None gives DEFAULT_MAX_BYTES_BILLED. Raises ConfigError naming the flag for anything else.
    """
    if text is None:
        return DEFAULT_MAX_BYTES_BILLED
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match or match[2].lower() not in _UNITS:
            raise ConfigError(
                f"{FLAG}={text!r} is not a size; write bytes (10737418240) or a number with a unit "
                "(500MB, 10GiB, 1TB)"
            )
        value = int(float(match[1]) * _UNITS[match[2].lower()])
    if value <= 0:
        raise ConfigError(f"{FLAG}={text!r} must be positive (BigQuery's ceiling on billed bytes)")
    return value


def human(n: int) -> str:
    """`n` bytes as a short binary size: 0 B, 512 B, 1.5 KiB, 10.0 GiB."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def check_estimate(*, estimate: int | None, limit: int, what: str) -> None:
    """Raise BillingLimitError when a dry run's `estimate` (bytes) is above `limit`.

    what: names the query in the message ("the listing query of table p.d.t").
    """
    if estimate is not None and estimate > limit:
        raise BillingLimitError(
            f"{what} would process {human(estimate)} ({estimate} bytes), above {FLAG}={limit} "
            f"({human(limit)}); select fewer columns or rows (a WHERE on the partition column), "
            f"or raise {FLAG}"
        )


def dry_run_config(config):
    """A copy of a QueryJobConfig that only estimates: dry_run on, cache off (a cache hit reports 0)."""
    config = copy.deepcopy(config) if config is not None else _new_config()
    config.dry_run = True
    config.use_query_cache = False
    return config


def bounded_config(config, *, limit: int):
    """A copy of a QueryJobConfig with `maximum_bytes_billed=limit`."""
    config = copy.deepcopy(config) if config is not None else _new_config()
    config.maximum_bytes_billed = limit
    return config


def _new_config():
    from google.cloud import bigquery

    return bigquery.QueryJobConfig()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def dry_run(
    client, sql: str, config=None, *, limit: int, what: str, location: str | None = None,
    report: Callable[[str], Any] | None = _stderr, inspect: Callable[[Any], None] | None = None,
):
    """Dry-run `sql` (nothing is billed), print its estimate (`report`), and raise
    BillingLimitError above `limit`. Returns the dry-run QueryJob (its `statement_type`, `schema`);
    API errors (a syntax error, a missing table) propagate.

    inspect: called with the dry-run job first (to refuse, say, a statement type).
    """
    job = client.query(sql, job_config=bounded_config(dry_run_config(config), limit=limit), location=location)
    if inspect is not None:
        inspect(job)
    found = job.total_bytes_processed
    if report is not None:
        shown = "an unknown number of bytes" if found is None else f"{human(found)} ({found} bytes)"
        report(f"BigQuery dry run: {what} will process {shown} ({FLAG}={limit})")
    check_estimate(estimate=found, limit=limit, what=what)
    return job


def run_query(
    client, sql: str, config=None, *, limit: int, what: str, location: str | None = None,
    report: Callable[[str], Any] | None = _stderr, inspect: Callable[[Any], None] | None = None, **kwargs: Any,
):
    """Dry-run `sql`, refuse it above `limit`, else start it with `maximum_bytes_billed=limit`.

    inspect: as for `dry_run`. Returns the started QueryJob. `kwargs` go to `client.query` (job_id_prefix, ...).
    """
    dry_run(client, sql, config, limit=limit, what=what, location=location, report=report, inspect=inspect)
    return client.query(sql, job_config=bounded_config(config, limit=limit), location=location, **kwargs)
