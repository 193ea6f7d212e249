"""README.md and BENCHMARKS.md agree with the code: the README's size, its quick start run as written, the names
both documents give, and the README's figures found in BENCHMARKS.md's current ones."""

import contextlib
import importlib
import io
import re
import runpy
import shlex
import shutil

import pytest

from helpers import ROOT, run_script

README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()
MODULES = {p.stem for p in ROOT.glob("*.py")}
FILE_SUFFIXES = {"py", "md", "pt", "json", "jsonl", "bin", "ckpt", "safetensors", "npy", "npz", "fa", "tsv", "onnx",
                 "bedGraph", "gz", "txt", "csv", "tinyhyena"}
OUTSIDE = {"standalone_hyenadna.py", "bench_published.py"}  # the published code, in shared/reference


def section(text, title):
    """The text under the heading `title` (at any level), up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    rest = text[match.end():]
    following = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, re.M)
    return rest[:following.start()] if following else rest


def named_objects(text):
    """Backticked dotted names whose first part is one of our modules (th is tinyhyena) or a name one defines:
    (the name as written, the module, the attribute path)."""
    found = []
    for name in re.findall(r"`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)", text):
        head, *rest = name.split(".")
        if rest[-1] in FILE_SUFFIXES:
            continue
        if head == "th":
            head = "tinyhyena"
        if head in MODULES:
            found.append((name, head, rest))
            continue
        owners = [m for m in sorted(MODULES) if hasattr(importlib.import_module(m), head)]
        if owners:
            found.append((name, owners[0], [head, *rest]))
        elif head[0].isupper():  # a class name that no module defines
            found.append((name, None, rest))
    return found


@pytest.mark.parametrize("document", ["README.md", "BENCHMARKS.md"])
def test_every_name_in_the_documents_exists(document):
    text = README if document == "README.md" else BENCHMARKS
    missing = []
    for name, module, path in named_objects(text):
        obj = importlib.import_module(module) if module else None
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(name)
    for script in set(re.findall(r"\b(\w+\.py)\b", text)) - OUTSIDE:
        if not (ROOT / script).exists():
            missing.append(script)
    assert not missing, missing


def test_readme_is_a_guide_and_its_figures_are_current_benchmarks():
    assert len(README.encode()) <= 20_000
    current = section(BENCHMARKS, "Current figures")
    measured = section(README, "Measured")
    figures = re.findall(r"\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+", measured)
    assert len(figures) > 20
    assert [f for f in figures if f not in current] == []
    dates = set(re.findall(r"2026-\d\d-\d\d", measured))
    assert dates and all(d in current for d in dates)


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    """The quick start's commands, in a fresh folder holding the repository's fixtures, and its Python."""
    quick = section(README, "Quick start")
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    commands = quick.split("```bash")[1].split("```")[0].replace("\\\n", " ").strip().splitlines()
    assert len(commands) == 4
    for command in commands:
        python, script, *args = shlex.split(command)
        assert python == "python"
        result = run_script(script, *args, cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        if script == "export.py":  # the graph checked against torch by export.py itself
            assert "max relative error" in result.stdout, result.stdout
    assert (tmp_path / "scores.tsv").read_text().count("\n") == 4  # a header and three records
    assert (tmp_path / "gen.fa").read_text().count(">") == 2 and (tmp_path / "tinyhyena.onnx").exists()
    losses = [line for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines() if '"test"' in line]
    assert losses and float(re.search(r'"loss": ([\d.]+)', losses[-1]).group(1)) < 1.386  # below ln 4
    for title, expected in (("Quick start", "nats/base"), ("The Python API", "")):
        snippet = section(README, title).split("```python")[1].split("```")[0]
        (tmp_path / "snippet.py").write_text(snippet)
        printed = io.StringIO()  # run in this process, where the modules are imported already
        with contextlib.chdir(tmp_path), contextlib.redirect_stdout(printed):
            runpy.run_path(str(tmp_path / "snippet.py"), run_name="__main__")
        assert expected in printed.getvalue(), title
