"""`python -m features list` and `python -m features show NAME`: browse the registered extractors;
`python -m features new NAME [--dir D]`: write a plug-in package for a new one (features/scaffold.py).

`list` prints every extractor (built-ins and installed plug-ins) with its version, the package
that provides it, its outputs at the default config and one line of description; `show NAME`
prints its config keys with types, defaults and meanings (taken from the config's docstring,
where every key is described as `key: meaning`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Sequence

from featurebeam.errors import FeaturebeamError
from features import registry


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape else "scalar"


def outputs_text(name: str, *, sample_rate: int) -> str:
    """`name level shape, ...` at the default config, or how a config decides them."""
    cls = registry.get(name)
    try:
        extractor = registry.build(name, sample_rate=sample_rate)
    except FeaturebeamError:  # no default config (a model extractor needs its path)
        fields = {f.name for f in dataclasses.fields(cls.config_type)}
        if {"name", "level"} <= fields:
            return "set by the model: `name` (clip [D] or frame [D] per `level`; one frame per window with window_*)"
        return "set by the config"
    return ", ".join(f"{s.name} {s.level} {_shape(s.shape)}" for s in extractor.output_specs())


def _owner(config_type: type, key: str) -> type:
    """The class in the config's MRO that declares `key` first (its docstring describes it)."""
    for cls in reversed(config_type.__mro__):
        if key in cls.__dict__.get("__annotations__", {}):
            return cls
    return config_type


def _meaning(config_type: type, key: str) -> str:
    """The key's description in the config docstrings: an explicit `key: meaning` (the most
    specific class first), else the sentence of the declaring class's docstring naming it."""

    def doc(cls: type) -> str:
        return " ".join((cls.__dict__.get("__doc__") or "").split())

    pattern = rf"(?:^|[\s(;,])(?:\w+, )*{re.escape(key)}(?:, \w+)*: (.+?)(?=; |\. [A-Z]|\.$| plus \w+: |$)"
    for cls in config_type.__mro__:
        found = re.search(pattern, doc(cls))
        if found:
            text = found.group(1).strip().rstrip(".")
            return text[:-1] if text.endswith(")") and text.count(")") > text.count("(") else text
    owner = _owner(config_type, key)
    for cls in (owner, *config_type.__mro__):
        for clause in re.split(r"; |\. ", doc(cls)):
            if re.search(rf"\b{re.escape(key)}\b", clause):
                return clause.strip().rstrip(".")
    return ""


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value in ("", None) and field.name == "path":
        return "(required)"
    return repr(value)


def _table(rows: list[tuple[str, ...]], *, wrap: int = 72) -> str:
    """Aligned columns under a header; the last column wraps at `wrap` characters."""
    import textwrap

    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    last = min(wrap, max(len(r[-1]) for r in rows))
    lines = []
    for n, row in enumerate(rows):
        chunks = textwrap.wrap(row[-1], last) or [""]
        lead = "  ".join(cell.ljust(w) for cell, w in zip(row, widths))
        lines.append(f"{lead}  {chunks[0]}".rstrip())
        lines.extend(f"{' ' * len(lead)}  {chunk}" for chunk in chunks[1:])
        if n == 0:
            lines.append("  ".join("-" * w for w in (*widths, last)))
    return "\n".join(lines)


def list_text(*, sample_rate: int = 16000) -> str:
    rows = [("name", "version", "package", "description", "outputs")]
    for name in registry.available():
        cls = registry.get(name)
        source = registry.source(name)
        rows.append(
            (
                name,
                str(cls.version),
                f"{source['name']} {source['version']}".strip(),
                (cls.description or (cls.__doc__ or "").strip()).splitlines()[0] if (cls.description or cls.__doc__) else "",
                outputs_text(name, sample_rate=sample_rate),
            )
        )
    return _table(rows, wrap=60)


def show_text(name: str, *, sample_rate: int = 16000) -> str:
    cls = registry.get(name)
    source = registry.source(name)
    head = [
        f"{name} {cls.version} ({source['name']} {source['version']}): {cls.description}".rstrip(": "),
        f"  class:   {cls.__module__}.{cls.__qualname__}",
        f"  outputs: {outputs_text(name, sample_rate=sample_rate)}",
        "",
    ]
    rows = [("key", "type", "default", "meaning")]
    for field in dataclasses.fields(cls.config_type):
        rows.append((field.name, str(field.type), _default(field), _meaning(cls.config_type, field.name)))
    example = f"features: {{{name}: {{key: value}}}} in a --config YAML"
    return "\n".join(head) + _table(rows) + f"\n\nSet keys with {example}."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features", description="Browse the registered feature extractors.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every registered extractor: version, package, outputs, description")
    show = commands.add_parser("show", help="one extractor's config keys: types, defaults, meanings")
    show.add_argument("name")
    for sub in (listing, show):
        sub.add_argument("--sample_rate", type=int, default=16000, help="Hz the output shapes are given at (default 16000)")
    new = commands.add_parser(
        "new", help="write a plug-in package for extractor NAME: pyproject with the entry point, the class, a pipeline test"
    )
    new.add_argument("name", help="the extractor's name: lowercase letters, digits and underscores")
    new.add_argument("--dir", help="the folder to write (default ./featurebeam-NAME); must not exist or be empty")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "new":
            from features import scaffold

            root = scaffold.write_package(name=args.name, directory=args.dir)
            text = (
                f"wrote {root}/ (the {args.name} extractor, its entry point and a pipeline test); next:\n"
                f"  pip install --no-build-isolation -e {root}\n"
                f"  python -m features list          # shows {args.name}\n"
                f"  cd {root} && python -m pytest    # runs it through a real pipeline"
            )
        elif args.command == "list":
            text = list_text(sample_rate=args.sample_rate)
        else:
            text = show_text(args.name, sample_rate=args.sample_rate)
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
