"""The worker image's Dockerfile builds on Beam's SDK image at the Beam and Python versions pinned here.

`docker` is not available on this machine, so the image is not built; what can be checked is
that its base tag matches pyproject.toml's Beam pin, the installed Beam, and the Python the
project runs on, that it installs featurebeam without replacing the SDK image's entrypoint, and
that it carries the Flex Template launcher for that Python and points it at the launch file.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import apache_beam

ROOT = Path(__file__).resolve().parents[1]


def _base_image() -> tuple[str, str]:
    froms = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    assert len(froms) == 1, f"expected one FROM line, found {froms}"
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", froms[0])
    assert match, f"base image {froms[0]!r} is not apache/beam_pythonX.Y_sdk:VERSION"
    return match.group(1), match.group(2)


def test_base_tag_matches_pinned_beam_and_python():
    python, beam_version = _base_image()
    assert beam_version == apache_beam.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if d.startswith("apache-beam")]
    wanted = pin.split("==")[1]
    assert re.fullmatch(wanted.replace(".", r"\.").replace("*", r"\d+"), beam_version), (pin, beam_version)
    # Workers must run the launcher's Python minor version: Beam pickles DoFns across them.
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"
    low, high = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", project["requires-python"]).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(python) < as_tuple(high)


def test_installs_featurebeam_and_keeps_the_sdk_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install .*/src", text, re.M)
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_carries_the_flex_template_launcher_and_its_launch_file():
    text = (ROOT / "Dockerfile").read_text()
    python, _ = _base_image()
    launcher = re.search(r"^COPY --from=(\S+) \\\n\s+(\S+) (\S+)$", text, re.M)
    assert launcher, "no COPY --from=<launcher base image> of the python_template_launcher binary"
    image, source, target = launcher.groups()
    # Google's launcher base images are per Python minor version: the same as the SDK image's.
    assert re.fullmatch(rf"gcr\.io/dataflow-templates-base/python{python.replace('.', '')}-template-launcher-base:\S+", image)
    assert source == target == "/opt/google/dataflow/python_template_launcher"
    (py_file,) = re.findall(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", text, re.M)
    (copied,) = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and line.split()[-1] == py_file]
    assert (ROOT / copied).is_file() and copied == "docker/flex_launch.py"
