"""generate.py: incremental decoding and sampling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import generate
import tinyhyena as th
from helpers import FIXTURE, assert_one_line_error, configs_and_lengths, random_model, rel_err, run_script


@settings(max_examples=10, deadline=None)
@given(configs_and_lengths(max_len=400), st.integers(1, 40))
def test_incremental_decoding_equals_the_full_forward_pass(case, steps):
    """The decoder's next-base log-probabilities after the prompt and after every token it takes agree with a
    whole forward pass over the sequence so far (orders 2-4, short filters of 1-4 taps, any prompt length)."""
    cfg, P, B, seed, _ = case
    model = random_model(cfg, seed).double()
    total = min(cfg.l_max, P + steps)
    ids = torch.randint(0, cfg.vocab_size, (B, total), generator=torch.Generator().manual_seed(seed))
    decoder = generate.Decoder(model, total)
    with torch.no_grad():
        logits = decoder.prefill(ids[:, :P])
        for t in range(P, total + 1):
            full = model(ids[:, :t])[:, -1]
            assert rel_err(torch.log_softmax(logits, -1), torch.log_softmax(full, -1)) <= 1e-9, t
            if t < total:
                logits = decoder.step(ids[:, t])


def test_sampling_incremental_and_full_forward_agree():
    cfg = th.HyenaConfig(d_model=16, n_layer=2, d_inner=32, filter_order=8, l_max=300, order=3)
    model = random_model(cfg, 0)
    incremental = generate.generate(model, "ACGTTGCA", 120, num=3, temperature=1.0, seed=5)
    assert incremental.shape == (3, 120) and set(incremental.unique().tolist()) <= {7, 8, 9, 10}  # A, C, G, T only
    assert torch.equal(incremental, generate.generate(model, "ACGTTGCA", 120, num=3, seed=5, incremental=False))
    assert not torch.equal(incremental[0], incremental[1])  # rows are sampled, not copied
    greedy = generate.generate(model, "ACGTTGCA", 40, temperature=0)
    seq = torch.from_numpy(th.tokenize("ACGTTGCA"))[None]
    with torch.no_grad():
        for base in greedy[0]:  # temperature 0: the most probable base every time
            assert base == generate.BASE_TOKENS[model(seq)[0, -1, generate.BASE_TOKENS].argmax()]
            seq = torch.cat([seq, base.view(1, 1)], 1)
    top1 = generate.generate(model, "ACGTTGCA", 40, temperature=1.5, top_k=1, seed=9)
    assert torch.equal(top1, greedy)
    with pytest.raises(th.UserError, match="over the model's l_max 300"):
        generate.generate(model, "A" * 200, 101)
    with pytest.raises(th.UserError, match="over the model's l_max 300"):
        generate.generate(model, "A" * 301, 1)


def test_generate_cli_writes_fasta_and_reports_bad_input(tmp_path):
    (tmp_path / "p.fa").write_text(">prompt\nACGTACGTAC\n")
    result = run_script("generate.py", "--checkpoint", FIXTURE, "--prompt_fasta", tmp_path / "p.fa", "--length", 150,
                        "--num", 2, "--seed", 1, "--out", tmp_path / "gen.fa")
    assert result.returncode == 0, result.stderr[-2000:]
    records = data.read_fasta(str(tmp_path / "gen.fa"))
    assert [name for name, _ in records] == ["sample1", "sample2"] and all(len(ids) == 150 for _, ids in records)
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 1100),
                          "over the model's l_max 1026")
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 0),
                          "--length")
