"""bench.py: every column of its tables is measured at a tiny size."""

import pytest

import bench
from helpers import ROOT, run_script


def cells(row):
    return [c.strip() for c in row.split("|")[1:-1]]


def is_number(text):
    try:
        float(text.lstrip(">= ").replace(",", ""))
    except ValueError:
        return False
    return True


@pytest.mark.slow
def test_bench_runs_at_a_tiny_size():
    """Every column at a tiny size, but ONNX Runtime's: --onnx_max_len 0 (its limit) leaves it out, as its
    export alone takes 13 s of the suite (the export itself is test_export's)."""
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    result = run_script("bench.py", "--lengths", 64, "--train", "--onnx_max_len", 0, "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before  # written only when asked (--append)
    rows = [cells(line) for line in result.stdout.splitlines() if line.startswith("| 64 |")]
    assert [r[1] for r in rows] == ["inference", "train step"]
    # length, mode, tinyhyena s and GB, floor s, ratio, attention s and GB, onnxruntime s and GB, note
    inference, train = rows
    assert all(is_number(c) for c in inference[2:8]) and inference[8:11] == ["-", "-", ""], inference
    assert all(is_number(train[i]) for i in (2, 3, 6, 7)) and train[4] == train[8] == "-", train  # no floor or ORT


@pytest.mark.slow
def test_bench_times_each_decoding_method():
    result = run_script("bench.py", "--generate", "--lengths", 40, "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [cells(line) for line in result.stdout.splitlines() if line.startswith("| 40 |")][-3:]  # the table
    assert [r[1] for r in rows] == ["online", "cache", "forward"]
    assert all(is_number(c) and not c.startswith(">=") for r in rows for c in r[2:5]), rows  # measured, no bound


def test_append_adds_the_table_at_the_end_and_keeps_the_rest(tmp_path, monkeypatch, capsys):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## History\n\nold table\n")
    monkeypatch.setattr(bench, "BENCHMARKS", str(path))
    bench.emit(["## new", "| a |"], append=False)
    assert path.read_text() == "# Benchmarks\n\n## History\n\nold table\n"
    bench.emit(["## new", "| a |"], append=True)
    assert path.read_text() == "# Benchmarks\n\n## History\n\nold table\n\n## new\n| a |\n"
    assert "| a |" in capsys.readouterr().out
