"""Shared fixtures (session-scoped where several test files read them) and the hypothesis profiles.

Profiles: "ci" (the default: what CI and `python -m pytest -q` run) and "dev" (fewer examples, for a quick loop:
`python -m pytest -q --hypothesis-profile dev -m "not slow"`). Tests that set max_examples keep their own.
"""

import gzip

import pytest
from hypothesis import HealthCheck, settings

import data
from helpers import FIT, FIXTURE, labelled, markov_genome, run_script, write_table


settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.register_profile("dev", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

FASTA = ">chr1 some description\nACGTacgtNR\nAC\n>chr2\n" + "ACGT" * 30 + "\n\n>chr3\nGGGGCCCC\n"


@pytest.fixture()
def genome(tmp_path):
    path = tmp_path / "g.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(FASTA)
    return data.Genome(data.prepare(str(path), quiet=True))


@pytest.fixture(scope="session")
def markov(tmp_path_factory):
    path = tmp_path_factory.mktemp("markov") / "markov.fa"
    return str(path), markov_genome(path)


@pytest.fixture(scope="session")
def markov_model(markov, tmp_path_factory):
    """A tiny model trained on the Markov genome to near its entropy rate: train.py's own test, and a known
    source for score.py and finetune.py."""
    out = tmp_path_factory.mktemp("markov_model") / "run"
    result = run_script("train.py", "--fasta", markov[0], "--preset", "tiny", "--seq_len", 256, "--min_seq_len", 128,
                        "--batch_size", 8, "--max_steps", 72, "--lr", 3e-3, "--warmup_steps", 10,
                        "--eval_interval", 36, "--eval_batches", 8, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def fixture_classifier(tmp_path_factory):
    """A classifier fine-tuned a few steps from the published-format fixture."""
    root = tmp_path_factory.mktemp("fixture_classifier")
    write_table(root / "train.csv", labelled(64, 0))
    result = run_script(*FIT, "--checkpoint", FIXTURE, "--data", root / "train.csv", "--max_steps", 3,
                        "--out", root / "clf")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "clf"
