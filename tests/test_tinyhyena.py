"""tinyhyena.py: the model against the published outputs and its NumPy twin, causality, the tokenizer, the
config and presets, initialisation, and bad input."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyhyena as th
from helpers import FIXTURE, configs_and_lengths, n_params, needs_cuda, random_model, rel_err, with_float64_tables


def check_twin(cfg, L, B, seed, group, device, fast=True):
    """The model in float64, its positional tables too, against the twin: what remains is float64's rounding
    (float32's, compounded by up to three gates and convolutions, reached 1e-3 on the random weights; float64's,
    through a LayerNorm of two channels that cancel, reached 2.7e-10 for the plain path)."""
    model = with_float64_tables(random_model(cfg, seed, fast, group).double()).to(device)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids.to(device)).cpu().numpy()
    assert out.shape == (B, L, cfg.padded_vocab_size)
    assert rel_err(out, th.reference_forward(model, ids)) <= 1e-9


def test_fixture_matches_published_outputs():
    model = th.from_pretrained(FIXTURE)
    ref = np.load(FIXTURE / "reference.npz")
    ids = torch.from_numpy(ref["input_ids"])
    with torch.no_grad():
        assert rel_err(model.hidden_states(ids), ref["hidden"]) <= 1e-5
        assert rel_err(model(ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids, return_hidden=True), ref["hidden"]) <= 1e-5


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@given(case=configs_and_lengths())
def test_torch_matches_numpy_twin(case, fast):
    check_twin(*case, device="cpu", fast=fast)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@given(case=configs_and_lengths())
def test_torch_matches_numpy_twin_cuda(case, fast):
    check_twin(*case, device="cuda", fast=fast)


def test_numpy_twin_builds_its_own_positional_features_and_window():
    """The twin computes the filters' positional features and window rates from the config: a model whose
    stored tables were built wrongly no longer matches it."""
    cfg = th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=300)
    ids = torch.randint(7, 12, (1, 200), generator=torch.Generator().manual_seed(0))
    model = random_model(cfg, 0).double()
    with torch.no_grad():
        assert rel_err(model(ids), th.reference_forward(model, ids)) < 1e-7
    for table, wrong in (("z", lambda z: z[:, [0, 2, 1, 3, 4]]), ("t", lambda t: t * 300 / 299), ("deltas", lambda d: d.flip(0))):
        model = random_model(cfg, 0).double()
        with torch.no_grad():
            buffer = getattr(model.blocks[0].mixer.filter, table)
            buffer.copy_(wrong(buffer))
            assert rel_err(model(ids), th.reference_forward(model, ids)) > 1e-5, table


@given(configs_and_lengths(), st.data())
def test_causal(case, data):
    cfg, L, B, seed, group = case
    model = random_model(cfg, seed, True, group).double()
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    t = data.draw(st.integers(0, L - 1))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, changed[:, t + 1:].shape)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # (the FFT spreads float64's rounding over every position: 2.7e-9 seen at order 4, through a LayerNorm of two
    # channels that cancel; a leak of the future would be of the outputs' own size)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-8 * max(1.0, float(a.abs().max())))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ACGTN", max_size=300))
def test_tokenizer_round_trip(seq):
    ids = th.tokenize(seq)
    assert ids.dtype == np.int64 and len(ids) == len(seq)
    assert th.detokenize(ids) == seq
    assert np.array_equal(th.tokenize(seq.lower()), ids)  # soft-masked bases are ordinary bases


def test_tokenizer_ids_and_unknown_letters():
    assert th.tokenize("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert th.tokenize("RYKMSW-x").tolist() == [th.N_ID] * 8  # IUPAC and any other letter -> N
    assert th.detokenize([0, 7, 1, 4]) == "[CLS]A[SEP][PAD]"
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        th.detokenize([13])


@pytest.fixture(scope="module")
def small_model():
    return th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=50)).eval()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[7, 8, 12]]), r"token ids must be in \[0, 12\), got values in \[7, 12\]"),
    (torch.tensor([[-1, 8]]), r"token ids must be in \[0, 12\)"),
    (torch.full((1, 51), 7), r"length 51 is outside the allowed range \[1, 50\]"),
    (torch.zeros((1, 0), dtype=torch.long), r"length 0 is outside"),
    (torch.tensor([7, 8]), r"shape \(batch, length\), got \(2,\)"),
    (torch.full((1, 2, 3), 7), r"got \(1, 2, 3\)"),
    (torch.zeros((0, 3), dtype=torch.long), r"shape \(batch, length\), got \(0, 3\)"),
    (torch.tensor([[7.0, 8.0]]), r"integer torch.Tensor .* got dtype torch.float32"),
    (np.array([[7, 8]]), r"integer torch.Tensor .* got ndarray"),
])
def test_bad_input_ids(small_model, ids, message):
    """forward and prefill (a prompt's ids, checked as forward's) name what is wrong with the ids."""
    with pytest.raises(ValueError, match=message):
        small_model(ids)
    with pytest.raises(ValueError, match=message):
        small_model.prefill(ids, small_model.decoding_state(50))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([7, 12]), r"token ids must be in \[0, 12\), got values in \[7, 12\]"),
    (torch.tensor([-1, 8]), r"token ids must be in \[0, 12\)"),
    (torch.tensor([7.0, 8.0]), r"integer torch.Tensor .* got dtype torch.float32"),
    (torch.tensor([7, 8, 9]), r"one token per sequence of the prefill, input_ids of shape \(2,\), got \(3,\)"),
    (torch.tensor([[7], [8]]), r"of shape \(2,\), got \(2, 1\)"),
    (torch.tensor(7), r"got \(\)"),
    ([7, 8], r"got list"),
])
def test_bad_step_ids(small_model, ids, message):
    """step takes one valid token for each sequence the prefill read; anything else is named, before any work."""
    state = small_model.decoding_state(10)
    with pytest.raises(ValueError, match="state is empty: read a prompt into it with prefill"):
        small_model.step(torch.tensor([7, 8]), state)
    small_model.prefill(torch.tensor([[7, 8], [9, 10]]), state)
    with pytest.raises(ValueError, match=message):
        small_model.step(ids, state)
    assert small_model.step(torch.tensor([7, 8]), state).shape == (2, small_model.cfg.padded_vocab_size)


def test_bad_config():
    with pytest.raises(ValueError, match="order must be an integer >= 2"):
        th.HyenaDNA(th.HyenaConfig(order=1))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        th.preset_config("huge")


@pytest.mark.parametrize("name, d_model, n_layer, trained", [
    ("tiny-1k", 128, 2, 1024), ("tiny-1k-d256", 256, 2, 1024), ("tiny-16k-d128", 128, 2, 16384),
    ("small-32k", 256, 4, 32768), ("medium-160k", 256, 8, 160000), ("medium-450k", 256, 8, 450000),
    ("large-1m", 256, 8, 1_000_000)])
def test_presets_are_the_published_models(name, d_model, n_layer, trained):
    cfg = th.preset_config(name)
    assert (cfg.d_model, cfg.n_layer, cfg.d_inner, cfg.l_max) == (d_model, n_layer, 4 * d_model, trained + 2)
    assert (cfg.order, cfg.filter_order, cfg.emb_dim, cfg.short_filter_order, cfg.padded_vocab_size) == (2, 64, 5, 3, 16)
    d = d_model
    per_layer = (d * 3 * d + 3 * d) + (3 * d * 3 + 3 * d) + (d * d + d)  # in_proj, short conv, out_proj
    per_layer += (5 * 64 + 64) + 2 * (64 * 64 + 64) + 64 + 64 * d + d  # filter MLP, one shared freq, last layer, bias
    per_layer += 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # two norms, the MLP
    model = th.HyenaDNA(cfg)
    assert n_params(model) == 16 * d + n_layer * per_layer + 2 * d  # + embedding, final norm
    if name == "large-1m":
        assert 6.4e6 < n_params(model) < 6.8e6  # "about 6.6M parameters"


def test_fresh_model_is_initialised_as_published():
    """N(0, 0.02) linear and embedding weights (out_proj and fc2 scaled by 1/sqrt(2 n_layer)), zero biases,
    sine frequencies w, window decay rates from ln(0.01)/1.5 to ln(0.01)/0.3, a N(0, 1) skip bias, and
    PyTorch's default for the short convolution."""
    cfg = th.HyenaConfig(d_model=256, n_layer=4, d_inner=1024, l_max=4098)
    torch.manual_seed(0)
    model = th.HyenaDNA(cfg)
    std = lambda name: model.get_parameter(name).std().item()
    assert std("embedding.weight") == pytest.approx(0.02, rel=0.05)
    for i in range(4):
        for name in ("mixer.in_proj.weight", "mlp.fc1.weight", "mixer.filter.mlp.0.weight", "mixer.filter.mlp.6.weight"):
            assert std(f"blocks.{i}.{name}") == pytest.approx(0.02, rel=0.1), name
        for name in ("mixer.out_proj.weight", "mlp.fc2.weight"):
            assert std(f"blocks.{i}.{name}") == pytest.approx(0.02 / np.sqrt(8), rel=0.05), name
        for name in ("mixer.in_proj.bias", "mixer.out_proj.bias", "mlp.fc1.bias", "mixer.filter.mlp.2.bias"):
            assert not model.get_parameter(f"blocks.{i}.{name}").any(), name
        block = model.blocks[i]
        assert torch.equal(block.mixer.filter.mlp[1].freq, torch.full((1, 64), 10.0))
        deltas = block.mixer.filter.deltas.reshape(-1)
        torch.testing.assert_close(deltas, torch.linspace(np.log(1e-2) / 1.5, np.log(1e-2) / 0.3, 256))
        assert std(f"blocks.{i}.mixer.filter.bias") == pytest.approx(1.0, rel=0.2)
        short = block.mixer.short_conv.weight
        assert short.abs().max() <= 1 / np.sqrt(3) and short.std().item() == pytest.approx(1 / 3, rel=0.1)
