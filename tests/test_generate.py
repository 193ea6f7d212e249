"""generate.py: exact decoding (the online convolution, the cache, the whole forward pass) and sampling."""

import dataclasses
from functools import partial

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
       st.integers(1, 600)), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 16, 64]))
def test_online_convolution_equals_the_direct_sum(B, C, P, steps, seed, window):
    """OnlineConv (lags below `window` summed directly: 1, 2, the default 16, 64) and ConvHistory after a prefill of
    P positions, then one position at a time: y[t] = sum_{s<=t} h[t-s] a[s] at every t, blocks summed directly
    and by FFT (past 64 positions) alike; and OnlineConv with a skip term added part way (add_skip)."""
    g = torch.Generator().manual_seed(seed)
    total = P + steps
    a = torch.randn(B, C, total, generator=g, dtype=torch.float64)
    h = torch.randn(C, total, generator=g, dtype=torch.float64)
    direct = torch.stack([(a[..., :t + 1] * h[:, :t + 1].flip(-1)).sum(-1) for t in range(total)], -1)
    for long_conv in (partial(decoding.OnlineConv, window=window), th.ConvHistory):
        conv = long_conv(h)
        got = [conv.prefill(a[..., :P])] + [conv.step(a[..., t])[..., None] for t in range(P, total)]
        torch.testing.assert_close(torch.cat(got, -1), direct, rtol=1e-10, atol=1e-10)
        with pytest.raises(th.UserError, match=f"room for {total} positions, not {total + 1}"):
            conv.step(a[..., 0])
    # with a skip term folded in (add_skip: a tap at lag 0), halfway through the steps: y[t] + skip * a[t] from then on
    skip = torch.randn(C, generator=g, dtype=torch.float64)
    conv = decoding.OnlineConv(h, window=window)
    got = [conv.prefill(a[..., :P])] + [conv.step(a[..., t])[..., None] for t in range(P, P + steps // 2)]
    conv.add_skip(skip)
    got += [conv.step(a[..., t])[..., None] for t in range(P + steps // 2, total)]
    from_then_on = torch.arange(total, dtype=torch.float64) >= P + steps // 2
    with_skip = direct + from_then_on * skip[:, None] * a
    torch.testing.assert_close(torch.cat(got, -1), with_skip, rtol=1e-10, atol=1e-10)
    with pytest.raises(th.UserError, match="window must be a power of two, got 3"):
        decoding.OnlineConv(h, window=3)


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
    assert not online.is_inference()  # decoded in inference mode, handed back as an ordinary tensor
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
    # the sampling flags at other values reach the library call
    result = run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGTACGTAC", "--length", 40, "--num", 3,
                        "--temperature", 3.0, "--top_k", 2, "--seed", 7, "--out", tmp_path / "k2.fa")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = decoding.generate(th.from_pretrained(FIXTURE), "ACGTACGTAC", 40, num=3, temperature=3.0, top_k=2, seed=7)
    assert np.array_equal(np.stack([ids for _, ids in data.read_fasta(str(tmp_path / "k2.fa"))]), expected.numpy())
    for flag, value in (("--top_k", 5), ("--top_k", 0), ("--temperature", -1), ("--num", 0)):
        assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 5,
                                         flag, value), flag)
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 1100),
                          "over the model's l_max 1026")
    assert_one_line_error(run_script("generate.py", "--checkpoint", FIXTURE, "--prompt", "ACGT", "--length", 0),
                          "--length")


# Next-token logits over the whole vocabulary: the four bases at 2, 1, 0.5, -1 (ties nowhere), and higher scores
# on tokens sampling never draws (a special token, N), which must not leak into the bases' probabilities.
LOGITS = torch.full((12,), -3.0)
LOGITS[[7, 8, 9, 10]] = torch.tensor([2.0, 1.0, 0.5, -1.0])
LOGITS[[0, 11]] = 5.0
DRAWS = 20000


def draw(logits, temperature, top_k, seed):
    """One position's draws (B,) from logits (B, V) by a fresh decoding.Sampler seeded with `seed`."""
    sampler = decoding.Sampler(temperature, top_k, torch.Generator().manual_seed(seed))
    return sampler(logits, torch.empty(len(logits), dtype=torch.long))


def expected_frequencies(temperature, top_k):
    """What the sampler must draw from: softmax(base logits / temperature) over the top_k best bases."""
    scores = LOGITS[decoding.BASE_TOKENS].double() / temperature
    p = torch.softmax(scores, 0)
    p[scores.argsort(descending=True)[top_k or 4:]] = 0
    return p / p.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 2, 3])
def test_sampling_draws_from_the_tempered_top_k_distribution(temperature, top_k):
    """20,000 seeded draws from the same logits: their counts fit softmax(logits / temperature) over the top_k
    bases (Pearson's chi-square below its 1e-4 quantile; the seed is fixed, so this cannot flake), and no
    base outside the top_k is ever drawn. A temperature multiplied instead of divided, a top_k off by one, or
    special tokens left in the softmax each put the statistic in the thousands."""
    drawn = draw(LOGITS.repeat(DRAWS, 1), temperature, top_k, 0)
    counts = torch.stack([(drawn == token).sum() for token in decoding.BASE_TOKENS]).double()
    p = expected_frequencies(temperature, top_k)
    assert counts.sum() == DRAWS and counts[p == 0].sum() == 0  # only bases, and only the top_k of them
    kept = p > 0
    chi2 = float(((counts[kept] - DRAWS * p[kept]) ** 2 / (DRAWS * p[kept])).sum())
    assert chi2 < {1: 15.1, 2: 18.4, 3: 21.1}[int(kept.sum()) - 1], (counts, DRAWS * p)  # 1e-4 quantiles


def test_draws_at_many_positions_fit_and_each_batch_of_noise_is_new():
    """Over positions: a batch of 40 drawn at 600 positions (the noise drawn NOISE_ROWS at a time, three times)
    fits softmax(logits) as one position's draws do, and no position's draws repeat those NOISE_ROWS before
    (a batch of noise used twice would); then logits of another batch size get noise of their own."""
    sampler, rows = decoding.Sampler(1.0, None, torch.Generator().manual_seed(3)), decoding.Sampler.NOISE_ROWS
    drawn = torch.stack([sampler(LOGITS.repeat(40, 1), torch.empty(40, dtype=torch.long)) for _ in range(600)])
    counts = torch.stack([(drawn == token).sum() for token in decoding.BASE_TOKENS]).double()
    p = expected_frequencies(1.0, None)
    expected = drawn.numel() * p
    assert counts.sum() == drawn.numel() and float(((counts - expected) ** 2 / expected).sum()) < 21.1  # 1e-4
    assert not (drawn[rows:] == drawn[:-rows]).all(-1).any()
    one = sampler(LOGITS[None], torch.empty(1, dtype=torch.long))  # then a batch of 1, then of 64: noise for each
    assert one.shape == (1,) and len(set(sampler(LOGITS.repeat(64, 1), torch.empty(64, dtype=torch.long)).tolist())) > 1


@pytest.mark.parametrize("uniform", [0.0, 1 - 2.0 ** -53])
def test_the_extreme_uniforms_draw_a_base_and_never_one_of_probability_zero(monkeypatch, uniform):
    """Every base's uniform at 0 (an Exp(1) draw of 0: infinite Gumbel noise, but for the clamp) or at the largest
    below 1: the draw is still a base, and never one whose logit is -inf (inf + -inf would be NaN, and argmax
    takes NaN)."""
    logits = LOGITS.repeat(3, 1)
    logits[:, decoding.BASE_TOKENS[0]] = -torch.inf  # the best base made impossible: the next best must be drawn
    monkeypatch.setattr(decoding.torch, "rand", lambda *shape, **kwargs: torch.full(shape, uniform,
                                                                                    dtype=torch.float64))
    assert draw(logits, 1.0, None, 0).tolist() == [int(decoding.BASE_TOKENS[1])] * 3


def test_lower_temperature_sharpens_and_top_k_1_or_temperature_0_is_greedy():
    frequencies = {}
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0):
        drawn = draw(LOGITS.repeat(DRAWS, 1), temperature, None, 1)
        frequencies[temperature] = float((drawn == decoding.BASE_TOKENS[0]).double().mean())
    best = list(frequencies.values())
    assert all(a > b for a, b in zip(best, best[1:])), frequencies  # the best base ever likelier as T falls
    assert best[-1] > 0.25  # even a high temperature keeps the order of the bases
    for temperature, top_k in ((0, None), (0, 3), (1.0, 1), (7.5, 1)):
        drawn = draw(LOGITS.repeat(50, 1), temperature, top_k, 2)
        assert (drawn == decoding.BASE_TOKENS[0]).all(), (temperature, top_k)


@given(st.lists(st.floats(-20, 20, width=32), min_size=12, max_size=12, unique=True), st.floats(0.05, 10),
       st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_sampling_draws_only_among_the_k_best_bases(logits, temperature, top_k, seed):
    """(Distinct float32 logits: a tie at the k-th best base keeps every tied base.)"""
    logits = torch.tensor(logits)
    drawn = draw(logits.repeat(64, 1), temperature, top_k, seed)
    best = decoding.BASE_TOKENS[logits[decoding.BASE_TOKENS].argsort(descending=True)[:top_k]]
    assert torch.isin(drawn, best).all()


def test_generate_options_at_their_other_values_and_limits():
    """Through generate: a lower temperature draws other bases than the default's from the same seed; top_k 2
    draws each base among the model's two most probable at its position; a prompt and length that together
    reach l_max exactly decode (every method the same), one more does not; a prompt of one base and a length of
    one are the smallest; bad temperature and top_k are refused."""
    cfg = th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=100, order=2)
    model = random_model(cfg, 3)
    default = decoding.generate(model, "ACGTAC", 60, num=2, seed=4)
    cold = decoding.generate(model, "ACGTAC", 60, num=2, temperature=0.3, seed=4)
    assert not torch.equal(default, cold)
    top2 = decoding.generate(model, "ACGTAC", 60, num=2, temperature=3.0, top_k=2, seed=4)
    with torch.no_grad():
        for row in top2:
            seq = torch.cat([torch.from_numpy(th.tokenize("ACGTAC")), row])
            scores = model(seq[None, :-1])[0, 5:, decoding.BASE_TOKENS]  # (60, 4): the logits each base was drawn by
            best2 = decoding.BASE_TOKENS[scores.argsort(-1, descending=True)[:, :2]]
            assert (best2 == row[:, None]).any(-1).all()
    full = {method: decoding.generate(model, "A" * 70, 30, seed=1, method=method) for method in decoding.METHODS}
    assert full["online"].shape == (1, 30) and all(torch.equal(full["online"], v) for v in full.values())
    with pytest.raises(th.UserError, match="reach 101 bases, over the model's l_max 100"):
        decoding.generate(model, "A" * 70, 31)
    assert decoding.generate(model, "A", 1, seed=0).shape == (1, 1)
    assert decoding.generate(model, "A" * 99, 1, seed=0).shape == (1, 1)
    for bad in (dict(temperature=-0.1), dict(top_k=0), dict(top_k=5)):
        with pytest.raises(th.UserError, match="temperature must be >= 0 and top_k in 1..4"):
            decoding.generate(model, "A", 5, **bad)
    with pytest.raises(th.UserError, match="the prompt is empty"):
        decoding.generate(model, "", 5)
