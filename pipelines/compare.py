"""`python -m pipelines.compare RUN_A RUN_B`: configuration differences and per-feature drift.

Reads only the two runs' run.json and statistics/ (see export/drift.py for the distances).
Exit codes: 0 when no feature is flagged, or when one is without --fail_on_drift; 1 when one is
and --fail_on_drift is given (a CI gate); 2 for a usage error such as a folder that is not a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from export import drift
from featurebeam.errors import FeaturebeamError

EXIT_DRIFT = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("run_a", help="the reference run folder (<output>/<dataset>/<run_id>)")
    parser.add_argument("run_b", help="the run compared with it")
    parser.add_argument(
        "--threshold",
        type=float,
        default=drift.DEFAULT_THRESHOLD,
        help=f"flag a feature whose distance exceeds this, in [0, 1] (default {drift.DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--fail_on_drift", action="store_true", help="exit 1 when any feature is flagged")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text for people, json for tools")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        comparison = drift.compare(args.run_a, args.run_b, threshold=args.threshold)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(drift.to_json(comparison), indent=2, default=str) if args.format == "json" else drift.render(comparison))
    return EXIT_DRIFT if args.fail_on_drift and comparison.flagged else 0


if __name__ == "__main__":
    sys.exit(main())
