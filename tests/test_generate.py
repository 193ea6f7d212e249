"""generate.py: exact decoding (the online convolution, the cache, the whole forward pass) and sampling."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import data
import decoding
import tinyhyena as th
from helpers import FIXTURE, assert_one_line_error, configs_and_lengths, random_model, run_script

# Block boundaries of the online convolution: powers of two, and one either side of them.
STEPS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.one_of(st.sampled_from(STEPS + [511, 512, 513]),
       st.integers(1, 600)), st.integers(0, 2**31 - 1))
def test_online_convolution_equals_the_direct_sum(B, C, P, steps, seed):
    """OnlineConv and ConvHistory after a prefill of P positions, then one position at a time:
    y[t] = sum_{s<=t} h[t-s] a[s] at every t, blocks summed directly and by FFT (past 64 positions) alike."""
    g = torch.Generator().manual_seed(seed)
    total = P + steps
    a = torch.randn(B, C, total, generator=g, dtype=torch.float64)
    h = torch.randn(C, total, generator=g, dtype=torch.float64)
    direct = torch.stack([(a[..., :t + 1] * h[:, :t + 1].flip(-1)).sum(-1) for t in range(total)], -1)
    for long_conv in (decoding.OnlineConv, th.ConvHistory):
        conv = long_conv(h)
        got = [conv.prefill(a[..., :P])] + [conv.step(a[..., t])[..., None] for t in range(P, total)]
        torch.testing.assert_close(torch.cat(got, -1), direct, rtol=1e-10, atol=1e-10)
        with pytest.raises(th.UserError, match=f"room for {total} positions, not {total + 1}"):
            conv.step(a[..., 0])


@given(configs_and_lengths(max_len=400), st.one_of(st.sampled_from(STEPS), st.integers(1, 140)))
def test_decoding_equals_the_full_forward_pass_at_every_step(case, steps):
    """The model's next-token logits from prefill(prompt, state) and after every step(token, state) equal a
    whole forward pass over the sequence so far, to 1e-9 in float64, with either long-convolution state
    (orders 2-4, short filters of 1-4 taps, 1-2 layers, any prompt length, steps across the online
    convolution's block boundaries, batches of 1-3)."""
    cfg, P, B, seed, _ = case
    P = min(P, 64)
    cfg = dataclasses.replace(cfg, l_max=max(cfg.l_max, P + steps))
    model = random_model(cfg, seed).double()
    total = P + steps
    ids = torch.randint(0, cfg.vocab_size, (B, total), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = [model(ids[:, :t])[:, -1] for t in range(P, total + 1)]
        for long_conv in (decoding.OnlineConv, th.ConvHistory):
            state = model.decoding_state(total, long_conv)
            logits = model.prefill(ids[:, :P], state)[:, -1]
            for t in range(P, total + 1):
                reference = full[t - P]
                assert (logits - reference).abs().max() <= 1e-9 * max(1.0, reference.abs().max()), (long_conv, t)
                if t < total:
                    logits = model.step(ids[:, t], state)
    with pytest.raises(th.UserError, match=f"decoding state for {cfg.l_max + 1} positions"):
        model.decoding_state(cfg.l_max + 1)


def test_sampling_is_the_same_with_every_method():
    cfg = th.HyenaConfig(d_model=16, n_layer=2, d_inner=32, filter_order=8, l_max=300, order=3)
    model = random_model(cfg, 0)
    online = decoding.generate(model, "ACGTTGCA", 120, num=3, temperature=1.0, seed=5)
    assert online.shape == (3, 120) and set(online.unique().tolist()) <= {7, 8, 9, 10}  # A, C, G, T only
    for method in ("cache", "forward"):
        assert torch.equal(online, decoding.generate(model, "ACGTTGCA", 120, num=3, seed=5, method=method)), method
    assert not torch.equal(online[0], online[1])  # rows are sampled, not copied
    assert not torch.equal(online, decoding.generate(model, "ACGTTGCA", 120, num=3, seed=6))  # the seed matters
    greedy = decoding.generate(model, "ACGTTGCA", 70, temperature=0)
    assert torch.equal(greedy, decoding.generate(model, "ACGTTGCA", 70, temperature=0, method="cache"))
    seq = torch.from_numpy(th.tokenize("ACGTTGCA"))[None]
    with torch.no_grad():
        for base in greedy[0]:  # temperature 0: the most probable base every time
            assert base == decoding.BASE_TOKENS[model(seq)[0, -1, decoding.BASE_TOKENS].argmax()]
            seq = torch.cat([seq, base.view(1, 1)], 1)
    top1 = decoding.generate(model, "ACGTTGCA", 70, temperature=1.5, top_k=1, seed=9)
    assert torch.equal(top1, greedy)
    with pytest.raises(th.UserError, match="over the model's l_max 300"):
        decoding.generate(model, "A" * 200, 101)
    with pytest.raises(th.UserError, match="over the model's l_max 300"):
        decoding.generate(model, "A" * 301, 1)
    with pytest.raises(th.UserError, match="method must be one of online, cache, forward"):
        decoding.generate(model, "A", 1, method="beam")


def test_generate_cli_writes_fasta_and_reports_bad_input(tmp_path):
    (tmp_path / "p.fa").write_text(">prompt\nACGTACGTAC\n")
    for method in ("online", "cache"):
        result = run_script("generate.py", "--checkpoint", FIXTURE, "--prompt_fasta", tmp_path / "p.fa", "--length",
                            150, "--num", 2, "--seed", 1, "--method", method, "--out", tmp_path / f"{method}.fa")
        assert result.returncode == 0, result.stderr[-2000:]
    records = data.read_fasta(str(tmp_path / "online.fa"))
    assert [name for name, _ in records] == ["sample1", "sample2"] and all(len(ids) == 150 for _, ids in records)
    expected = decoding.generate(th.from_pretrained(FIXTURE), "ACGTACGTAC", 150, num=2, seed=1).numpy()
    assert np.array_equal(np.stack([ids for _, ids in records]), expected)  # what the library call draws
    assert (tmp_path / "cache.fa").read_text() == (tmp_path / "online.fa").read_text()
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 1100),
                          "over the model's l_max 1026")
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 0),
                          "--length")
