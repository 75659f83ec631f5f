"""README.md and docs/ as a newcomer meets them: a README of at most 250 lines that opens with the
two set-up commands, links that resolve, and the sample's commands that still run.

Commands are taken from the ```bash and ```python blocks. Those that read a run (report, compare,
query, the readers' snippets) run against the session's sample run, under `runs/sample/<name>`
as the docs write it; those that extract the sample are planned (flags, config, dataset and
extractors resolved, as a launch does before anything runs); cloud ones are left to their own
emulator tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def _commands(path: Path) -> list[list[str]]:
    """Every shell command of the page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks(path, "bash"):
        if "<<" in block or "features new" in block:
            continue  # a recipe that first writes its own files (a model, a config, a plug-in): its own tests run it
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_short_and_opens_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first_block = _blocks(README, "bash")[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "sample"], ["make", "test"]]
    assert README.read_text().index("```bash") < README.read_text().index("\n## ")  # before any section
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^sample:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert not re.search(r"\b(commit|at) [0-9a-f]{7,40}\b", "\n".join(p.read_text() for p in PAGES))  # no history


def test_every_relative_link_in_readme_and_docs_resolves():
    anchors = {path.resolve(): {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)} for path in PAGES}
    broken = []
    for path in PAGES:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path.resolve()
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors.get(resolved, set()):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README.read_text()))
    assert {p.name for p in DOCS} <= linked, "every docs/ page is linked from the README"


@pytest.fixture
def runs_folder(sample_run, tmp_path, monkeypatch):
    """A working folder whose runs/sample/<any name> is the session's sample run."""
    run_dir = Path(sample_run["outputs"]["run_dir"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sample").symlink_to(run_dir.parent)
    monkeypatch.chdir(tmp_path)
    return run_dir.name


def _as_run(args: list[str], name: str) -> list[str]:
    out = []
    for arg in args:
        arg = re.sub(r"runs/sample/(<[a-z_]+>|demo|train)", f"runs/sample/{name}", arg)
        out.append(re.sub(r"run_id=(demo|demo2)$", f"run_id={name}", arg))
    return out


@pytest.mark.slow
def test_the_sample_commands_in_readme_and_docs_run(runs_folder, capsys):
    from pipelines import command, extract

    # A page's file blocks (```python opening with `# name.py`) are written first, as a reader
    # following the page would: the commands after them use them (docs/extractors.md's my_algos.py).
    for path in PAGES:
        for code in _blocks(path, "python"):
            first = code.splitlines()[0] if code.strip() else ""
            if re.fullmatch(r"# [A-Za-z_][A-Za-z0-9_]*\.py", first.strip()):
                Path(first[2:].strip()).write_text(code)
    Path("examples").symlink_to(ROOT / "examples")  # commands run from the checkout name its examples/
    ran, planned = [], []
    for path in PAGES:
        for args in _commands(path):
            if args[:2] in (["python", "-m"],):
                args = ["featurebeam", {"pipelines.extract": "extract", "pipelines.report": "report",
                                        "pipelines.compare": "compare", "export.query": "query",
                                        "features": "features"}.get(args[2], args[2]), *args[3:]]
            if not args or args[0] != "featurebeam" or any("gs://" in a or "bq://" in a or "bigquery" in a for a in args):
                continue
            name, flags = args[1], _as_run(args[2:], runs_folder)
            if any(f.startswith("--config=") and not (ROOT / f.split("=", 1)[1]).is_file() for f in flags):
                continue  # the user's own config (models.yaml for their models): nothing to plan it with
            if name == "extract" and "--dataset=sample" in flags and not any(f.startswith("--runner") for f in flags):
                flags = [f for f in flags if not f.startswith(("--output", "--run_id"))]
                extract.resolve_plan([*flags, "--output=planned", "--run_id=planned"])
                planned.append(" ".join(args))
            elif name in ("report", "compare", "query", "features"):
                assert command.main([name, *flags]) == 0, (path.name, args, capsys.readouterr().err)
                ran.append(" ".join(args))
    out = capsys.readouterr().out
    assert "chirp" in out  # the queries saw the sample's labels
    readme = [" ".join(a) for a in _commands(README)]
    assert {c for c in readme if c.startswith("featurebeam extract --dataset=sample")} <= set(planned)
    assert {c for c in readme if c.split()[:2] in (["featurebeam", "report"], ["featurebeam", "query"])} <= set(ran)


@pytest.mark.slow
def test_the_readers_snippets_in_readme_and_docs_run(runs_folder):
    pytest.importorskip("torch")
    snippets = [(path, code) for path in PAGES for code in _blocks(path, "python") if "runs/sample/" in code]
    assert any("load_torch" in code for _, code in snippets) and any("load_tfrecords" in code for _, code in snippets)
    for path, code in snippets:
        if "from datasets import" in code:  # Hugging Face's: tests/export/test_huggingface.py runs it in its own venv
            continue
        if "runs/sample/models" in code or "runs/sample/RUN_ID" in code:  # the user's own run  # a run of the user's models: test_windowed_model_extract reads the same way
            continue
        code = code.replace("range(10)", "range(2)")  # the epochs loop of docs/training.md, shortened
        exec(compile("\n".join(_as_run(code.splitlines(), runs_folder)), f"{path.name} snippet", "exec"), {})
