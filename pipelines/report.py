"""`python -m pipelines.report RUN_DIR`: write the run's self-contained report.html.

See export/report.py for what it shows and what it reads (run.json, statistics/ and a bounded
sample of records, never the whole run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from export import metadata, report
from featurebeam.errors import FeaturebeamError, OutputError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("run_dir", help="a finished run folder (<output>/<dataset>/<run_id>)")
    parser.add_argument("--items_per_label", type=int, default=2, help="example items drawn per label (default 2)")
    parser.add_argument("--max_rows", type=int, default=5000, help="most Parquet rows read to find them (default 5000)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.exists(metadata.join(args.run_dir, metadata.RUN_JSON)):
            raise OutputError(f"{args.run_dir} has no run.json: pass a finished featurebeam run folder")
        if args.items_per_label < 0 or args.max_rows <= 0:
            raise OutputError("--items_per_label must be >= 0 and --max_rows > 0")
        path = report.write_report(args.run_dir, items_per_label=args.items_per_label, max_rows=args.max_rows)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
