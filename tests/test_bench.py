"""bench"""

from helpers import assert_one_line_error, run_script


def test_bench_runs_at_a_tiny_size():
    result = run_script("bench.py", "--lengths", 64, "--train", "--no_append", "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2 and "inference" in rows[0] and "train step" in rows[1]
    assert "-" not in rows[0].split("|")[3]  # tinyhyena was timed
    assert_one_line_error(run_script("bench.py", "--lengths", "12,x"), "comma-separated")
    assert_one_line_error(run_script("bench.py", "--published", "missing.py"), "missing.py: file not found")
