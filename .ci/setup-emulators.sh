#!/usr/bin/env bash
# Prepare the machine for the local GCS and BigQuery emulators used by the tests.
#
# bqemulator runs `INSTALL spatial; LOAD spatial` in DuckDB at startup and refuses to
# start without it. DuckDB would download the extension from extensions.duckdb.org, which
# this machine (and CI) cannot reach, so we link the copy shipped inside the
# duckdb-extension-spatial wheel into DuckDB's per-user extension directory:
#   $HOME/.duckdb/extensions/v<duckdb version>/<platform>/spatial.duckdb_extension
# The version and platform are asked of the installed duckdb, so a duckdb upgrade that the
# wheel does not match fails here, loudly, instead of at emulator startup.
#
# Usage: bash .ci/setup-emulators.sh [PYTHON]   (default: .venv/bin/python)
# Idempotent (re-run it after recreating the venv: the link points into it); runs under
# `set -euo pipefail` and fails with a message saying what to install.
set -euo pipefail

python="${1:-.venv/bin/python}"
if [[ ! -x "$python" ]] && ! command -v "$python" >/dev/null 2>&1; then
  echo "setup-emulators: python '$python' not found; pass the venv's python as the first argument" >&2
  exit 1
fi

# One python call prints: source file, duckdb version, platform (tab-separated).
info="$("$python" - <<'PY'
import pathlib
import sys

try:
    import duckdb
    import duckdb_extension_spatial
except ImportError as exc:
    sys.exit(f"setup-emulators: {exc}; install the dev extras: pip install -e '.[dev]'")

version = duckdb.__version__
platform = duckdb.connect().execute("PRAGMA platform").fetchone()[0]
root = pathlib.Path(duckdb_extension_spatial.__file__).parent / "extensions"
src = root / f"v{version}" / "spatial.duckdb_extension"
if not src.is_file():
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.duckdb_extension"))
    sys.exit(
        f"setup-emulators: duckdb {version} needs {src}, but the "
        f"duckdb-extension-spatial wheel ships {found or 'nothing'}; "
        f"pin duckdb-extension-spatial=={version}"
    )
print(f"{src}\t{version}\t{platform}")
PY
)"
IFS=$'\t' read -r src version platform <<<"$info"

dest_dir="${HOME:?HOME must be set: DuckDB looks for extensions under \$HOME/.duckdb}/.duckdb/extensions/v${version}/${platform}"
dest="${dest_dir}/spatial.duckdb_extension"
mkdir -p "$dest_dir"
# -f replaces a stale link or an old copy; -n keeps ln from descending into a link to a dir.
ln -sfn "$src" "$dest"

# Prove that DuckDB accepts it offline, the way bqemulator will use it.
"$python" -c 'import duckdb; c = duckdb.connect(); c.execute("INSTALL spatial"); c.execute("LOAD spatial"); c.execute("SELECT ST_AsText(ST_Point(1, 2))").fetchone()'
echo "setup-emulators: spatial extension for duckdb ${version} (${platform}) -> ${dest}"
