"""The `featurebeam` command: one console script over every `python -m` entry point.

`featurebeam SUBCOMMAND [flags]` runs the named module's own `main(flags)`, so a subcommand has
exactly the flags, output and exit codes of its `python -m` form (`featurebeam extract ...` is
`python -m pipelines.extract ...`, which stays the project's front door). Only the chosen
subcommand's module is imported: `featurebeam --help` imports neither Beam nor TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module whose main(argv) it runs, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("pipelines.extract", "run an extraction: list, decode, extract features, write a run folder"),
    "finalize": ("pipelines.finalize", "rewrite a run's run.json and metadata from what its job left in _work/ (safe to repeat)"),
    "report": ("pipelines.report", "write a run's self-contained report.html"),
    "compare": ("pipelines.compare", "configuration differences and per-feature drift between two runs"),
    "query": ("export.query", "SQL over runs' features, runs and errors tables (DuckDB or BigQuery)"),
    "features": ("features.__main__", "list the registered extractors, or show one"),
    "statistics": ("export.statistics", "compute a finished run's feature statistics from its Parquet shards"),
    "tfds": ("export.tfds", "write a finished run's TensorFlow Datasets copy"),
    "bigquery": ("export.bigquery", "load a finished run's tables into BigQuery"),
    "template": ("pipelines.template", "launch a run as the Dataflow Flex Template launcher does (the image's entry point)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: featurebeam SUBCOMMAND [flags]",
        "",
        "Turn audio collections into training-ready features with one Apache Beam pipeline.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()),
        "",
        "`featurebeam SUBCOMMAND --help` lists a subcommand's flags; each is also `python -m MODULE`",
        "with the same flags and exit codes (0 ok, 2 usage or configuration, 3 failure budget, 4 job failed).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"featurebeam {version('featurebeam')}")
        except PackageNotFoundError:
            print("featurebeam (not installed as a package)")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"featurebeam: unknown subcommand {name!r}; run `featurebeam --help` for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # argparse's default prog is sys.argv[0]: the subcommand's own usage lines then read `featurebeam NAME`.
    sys.argv = [f"featurebeam {name}", *rest]
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
