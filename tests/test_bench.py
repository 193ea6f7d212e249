"""bench.py: every column of its tables is measured at a tiny size."""

import pytest

from helpers import run_script


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
    result = run_script("bench.py", "--lengths", 64, "--train", "--no_append", "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [cells(line) for line in result.stdout.splitlines() if line.startswith("| 64 |")]
    assert [r[1] for r in rows] == ["inference", "train step"]
    # length, mode, tinyhyena s and GB, floor s, ratio, attention s and GB, onnxruntime s and GB, note
    inference, train = rows
    assert all(is_number(c) for c in inference[2:10]) and inference[10] == "", inference
    assert all(is_number(train[i]) for i in (2, 3, 6, 7)) and train[4] == train[8] == "-", train  # no floor or ORT


@pytest.mark.slow
def test_bench_times_each_decoding_method():
    result = run_script("bench.py", "--generate", "--lengths", 40, "--no_append", "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [cells(line) for line in result.stdout.splitlines() if line.startswith("| 40 |")][-3:]  # the table
    assert [r[1] for r in rows] == ["online", "cache", "forward"]
    assert all(is_number(c) and not c.startswith(">=") for r in rows for c in r[2:5]), rows  # measured, no bound
