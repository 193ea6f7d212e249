"""Tests for tinyhyena. `pytest -q` runs them on CPU in a few minutes; `pytest -m cuda` runs the GPU ones."""

import os
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoints
import classifier
import cli
import fast
import tinyhyena as th

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT / "fixtures" / "hyenadna_tiny"  # published layout + the published code's outputs
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
property_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(out, ref):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_model(cfg, seed, fast=True, channel_group=None):
    """A model whose every weight is drawn at a scale where no term of the forward pass is negligible
    (the published init makes the filter MLP nearly silent, which would hide mistakes in it). channel_group
    sets the fast path's channels per group (small: several groups)."""
    torch.manual_seed(seed)
    model = th.HyenaDNA(cfg, fast=fast).eval()
    if fast and channel_group:
        for block in model.blocks:
            block.mixer.fast.channel_group = channel_group
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("freq"):
                p.uniform_(0.5, 2.0)
            elif p.dim() >= 2:
                p.normal_(0, 1 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.5)
    return model


# Lengths where bugs live: 1, the first few, both sides of powers of two and of the fast path's FFT sizes
# (smooth numbers: 2^a 3^b 5^c), and up to a few thousand.
LENGTHS = [1, 2, 3, 5, 7, 13, 31, 32, 33, 63, 64, 65, 97, 128, 255, 256, 257, 331, 511, 512, 513, 1000, 1023, 1024,
           1025, 1537, 2047, 2048, 2049, 3000]


@st.composite
def configs_and_lengths(draw, max_len=3000):
    """(cfg, L, B, seed, channel_group): widths and channel groups that make several groups, orders 2-4."""
    cfg = th.HyenaConfig(
        d_model=draw(st.integers(1, 12)) * 2,
        n_layer=draw(st.integers(1, 2)),
        d_inner=draw(st.integers(4, 48)),
        order=draw(st.integers(2, 4)),
        filter_order=draw(st.integers(2, 16)),
        emb_dim=draw(st.sampled_from([3, 5, 7])),
        short_filter_order=draw(st.integers(1, 4)),
        l_max=draw(st.integers(2, max_len)),
    )
    L = draw(st.one_of(st.sampled_from(LENGTHS + [cfg.l_max, cfg.l_max - 1]), st.integers(1, cfg.l_max)))
    group = draw(st.one_of(st.none(), st.integers(1, cfg.d_model)))  # None: the budget's choice
    return cfg, max(1, min(L, cfg.l_max)), draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1)), group


def check_twin(cfg, L, B, seed, group, device, fast=True):
    """The model in float64 against the twin: float32's rounding, compounded by up to three gates and
    convolutions, reached 1e-3 on the random weights; in float64 what remains is the positional tables' float32
    rounding (the model stores them so), 5e-7 at most over 150 drawn cases."""
    model = random_model(cfg, seed, fast, group).double().to(device)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids.to(device)).cpu().numpy()
    assert out.shape == (B, L, cfg.padded_vocab_size)
    assert rel_err(out, th.reference_forward(model, ids)) <= 1e-5


# --- the fixture: the published implementation's outputs --------------------------------------------------

def test_fixture_matches_published_outputs():
    model = th.from_pretrained(FIXTURE)
    ref = np.load(FIXTURE / "reference.npz")
    ids = torch.from_numpy(ref["input_ids"])
    with torch.no_grad():
        assert rel_err(model.hidden_states(ids), ref["hidden"]) <= 1e-5
        assert rel_err(model(ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids, return_hidden=True), ref["hidden"]) <= 1e-5


# --- properties ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@property_settings
@given(case=configs_and_lengths())
def test_torch_matches_numpy_twin(case, fast):
    check_twin(*case, device="cpu", fast=fast)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@property_settings
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


def fast_and_plain(cfg, seed, group):
    """The same weights in the default model (fast paths, `group` channels per group) and the plain one."""
    fast_model = random_model(cfg, seed, True, group).double()
    plain = th.HyenaDNA(cfg, fast=False).double().eval()
    plain.load_state_dict(fast_model.state_dict())
    return fast_model, plain


def outputs_and_gradients(model, x, grad_out):
    """Hidden states of embeddings x and the gradients of every parameter and of x, for a given grad_out."""
    x = x.clone().requires_grad_(True)
    out = model.hidden_states_from_embeddings(x)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if n != "embedding.weight"])  # (unused)
    grads = torch.autograd.grad(out, (x, *params), grad_out)
    return out.detach(), dict(zip(("input",) + names, grads))


@property_settings
@given(configs_and_lengths(), st.booleans(), st.data())
def test_fast_path_equals_plain_path_with_gradients(case, checkpointing, data):
    """HyenaDNA(cfg) and HyenaDNA(cfg, fast=False) with the same weights: the same outputs, and the same
    gradients of every parameter and of the input, with several channel groups, with gradient checkpointing
    (the fast path then recomputes each group, and the MLP in slices of positions, alone), and without a
    gradient (the kept spectra, read twice)."""
    cfg, L, B, seed, group = case
    fast_model, plain = fast_and_plain(cfg, seed, group)
    chunk = data.draw(st.one_of(st.just(1 << 16), st.integers(1, max(1, L))))  # MLP slices of `chunk` positions
    for block in fast_model.blocks:
        block.fast.mlp_chunk = chunk
    fast_model.gradient_checkpointing = plain.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, cfg.d_model, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, L, cfg.d_model, generator=g, dtype=torch.float64)
    out, grads = outputs_and_gradients(fast_model, x, grad_out)
    plain_out, plain_grads = outputs_and_gradients(plain, x, grad_out)
    assert rel_err(out, plain_out) <= 1e-10
    for name, grad in plain_grads.items():
        # float64; some gradients are sums that cancel (to 1e-13 through a LayerNorm of 2 channels)
        assert torch.linalg.norm(grads[name] - grad) <= 1e-6 * torch.linalg.norm(grad) + 1e-12, name
    with torch.no_grad():
        for _ in range(2):
            assert rel_err(fast_model.hidden_states_from_embeddings(x), plain_out) <= 1e-10


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_long_sequences_with_checkpointing_and_mlp_slices(fast):
    """Past 65,536 positions the fast path runs the MLP in slices of positions (in place without a gradient,
    recomputed one slice at a time under checkpointing): the same values and gradients as one call."""
    cfg = th.HyenaConfig(d_model=4, n_layer=1, d_inner=8, filter_order=4, l_max=70_002)
    model = random_model(cfg, 0, fast).double()
    plain = th.HyenaDNA(cfg, fast=False).double().eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 70_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad_out = torch.randn(1, 70_000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.gradient_checkpointing = True
    out, grads = outputs_and_gradients(model, x, grad_out)
    plain_out, plain_grads = outputs_and_gradients(plain, x, grad_out)
    assert rel_err(out, plain_out) <= 1e-9
    for name, grad in plain_grads.items():
        assert rel_err(grads[name], grad) <= 1e-6, name
    with torch.no_grad():
        assert rel_err(model.hidden_states_from_embeddings(x), plain_out) <= 1e-9


@property_settings
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
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-9)


def direct_causal_conv(u, k):
    """y[b, c, t] = sum_{s<=t} k[c, t-s] u[b, c, s], the O(L^2) way."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        y[..., t] = (u[..., :t + 1] * k[:, :t + 1].flip(-1)).sum(-1)
    return y


@property_settings
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_fft_conv_equals_direct_conv(B, C, L, seed):
    g = torch.Generator().manual_seed(seed)
    v, x = torch.randn(2, B, C, L, generator=g, dtype=torch.float64)
    k, bias = torch.randn(C, L, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    a = v * x
    torch.testing.assert_close(fast.GatedCausalConv.apply(v, x, k, bias), direct_causal_conv(a, k) + bias[:, None] * a,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("L", [1, 2, 5, 16, 33])
def test_fft_conv_gradcheck(L):
    v, x = (torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k = torch.randn(3, L, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.GatedCausalConv.apply, (v, x, k, bias))
    k.requires_grad_(False)  # the branches for a subset of the inputs
    assert torch.autograd.gradcheck(fast.GatedCausalConv.apply, (v, x, k, bias))


@property_settings
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 60), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_short_conv_equals_conv1d_with_gradients(B, C, L, K, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, L, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, K, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    ours = fast.causal_short_conv(z, weight, bias)
    grads = torch.autograd.grad(ours, (z, weight, bias), torch.ones_like(ours))
    left_padded = torch.nn.functional.pad(z, (K - 1, 0))  # causal: out[t] sees z[t-K+1 .. t]
    reference = torch.nn.functional.conv1d(left_padded, weight[:, None, :], bias, groups=C)
    reference_grads = torch.autograd.grad(reference, (z, weight, bias), torch.ones_like(reference))
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    for mine, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


@property_settings
@given(st.integers(1, 3), st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 40),
       st.integers(0, 2**31 - 1))
def test_grouped_projection_equals_one_linear_layer_with_gradients(B, d, sizes, L, seed):
    """GroupedProjection's groups are the rows of one linear layer, transposed to (B, rows, L), and its own
    backward gives autograd's gradients, whatever the gradients of the groups."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(sum(sizes), generator=g, dtype=torch.float64, requires_grad=True)
    ours = fast.GroupedProjection.apply(u, weight, bias, sizes)
    reference = torch.nn.functional.linear(u, weight, bias).transpose(1, 2).split(sizes, dim=1)
    grads_out = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in reference]
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(torch.autograd.grad(ours, (u, weight, bias), grads_out),
                            torch.autograd.grad(reference, (u, weight, bias), grads_out)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: fast.GroupedProjection.apply(*a, sizes), (u, weight, bias))


def test_freed_heap_memory_kept_only_when_the_user_set_no_malloc_variable(monkeypatch):
    """tune_cpu_memory calls mallopt on glibc, never over a variable the user set, and not when switched off."""
    calls = []
    fake_libc = types.SimpleNamespace(mallopt=lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(fast.ctypes, "CDLL", lambda name: fake_libc)
    monkeypatch.setattr(fast.sys, "platform", "linux")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stays
    for name in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    fast.tune_cpu_memory()
    assert calls == [(-3, 32 << 20), (-1, (1 << 31) - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    calls.clear()
    monkeypatch.setenv("TINYHYENA_KEEP_FREED_MEMORY", "0")
    fast.tune_cpu_memory()
    assert calls == []
    monkeypatch.delenv("TINYHYENA_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    fast.tune_cpu_memory()
    assert calls == []


def test_importing_changes_nothing_outside_the_module():
    """Importing the project's modules sets no environment variable and calls no mallopt (the CPU memory settings
    are fast.tune_cpu_memory, which scripts call in main); importing export loads no training code."""
    code = """
import ctypes, os, sys
calls = []
real_cdll = ctypes.CDLL
class Spy:  # records every mallopt asked of the C library
    def __init__(self, *args, **kwargs):
        self.lib = real_cdll(*args, **kwargs)
    def __getattr__(self, name):
        if name == "mallopt":
            return lambda *args: calls.append(args)
        return getattr(self.lib, name)
ctypes.CDLL = Spy
before = dict(os.environ)
import tinyhyena, export
training = sorted({"finetune", "train", "data"} & set(sys.modules))
import torch
torch.ones(1 << 20)  # a first tensor: anything deferred to it happens now
import bench, checkpoints, classifier, cli, data, fast, finetune, score, train
changed = sorted(set(os.environ.items()) ^ set(before.items()))
print(training, changed, calls)
"""
    result = run_script("-c", code, env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "[]", "[]"], result.stdout


def test_mlp_in_pieces_equals_whole(monkeypatch):
    """The CPU's MLP over pieces of positions (fast.HEAP_BUFFER_FLOATS) is the same function, same gradients."""
    mlp = th.MLP(th.preset_config("tiny")).double()
    x = torch.randn(2, 300, 128, dtype=torch.float64, requires_grad=True)
    whole = mlp(x)  # the plain MLP, one call
    monkeypatch.setattr(fast, "HEAP_BUFFER_FLOATS", 512 * 70)  # pieces of 70 rows: 9 pieces, the last short
    assert len(fast.cpu_pieces(x.reshape(600, 128), 512)) == 9
    pieces = fast.mlp_in_pieces(mlp, x)
    torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(whole)
    for a, b in zip(torch.autograd.grad(pieces, [x, *mlp.parameters()], g),
                    torch.autograd.grad(whole, [x, *mlp.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_filter_spectra_kept_without_gradient_follow_the_weights():
    """Without a gradient the filters' spectra are kept between calls (FastHyena.cached_spectrum); every
    call must still compute the model's current function: after an in-place update, a load_state_dict, at
    another length, and with the cache switched off."""
    torch.manual_seed(0)
    model = th.HyenaDNA(th.HyenaConfig(d_model=16, n_layer=2, d_inner=32, filter_order=8, l_max=300)).eval()
    ids = torch.randint(7, 12, (2, 200))

    def check(ids):  # the no-gradient path (twice: the second call reads the kept spectra) against the other
        with torch.enable_grad():
            reference = model.hidden_states(ids).detach()
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model.hidden_states(ids), reference, rtol=1e-5, atol=1e-6)

    check(ids)
    filters = [block.mixer.fast for block in model.blocks]
    assert all(f.spectrum_cache is not None for f in filters)
    with torch.no_grad():
        model.blocks[1].mixer.filter.mlp[0].weight.mul_(1.5)  # as an optimizer step would: in place
    check(ids)
    model.load_state_dict(th.HyenaDNA(model.cfg).state_dict())
    check(ids)
    check(ids[:, :37])
    for f in filters:
        f.spectrum_cache, f.spectrum_cache_bytes = None, 0
    check(ids)
    assert all(f.spectrum_cache is None for f in filters)


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


def test_fft_size_is_smooth_and_large_enough():
    for n in range(1, 3000):
        m = fast.fft_size(n)
        assert m >= n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1
    assert fast.fft_size(2 * 1000 - 1) == 2000
    assert fast.fft_size(1000, radices=(2,)) == 1024


# --- bad input -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=50)).eval()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[7, 8, 12]]), r"token ids must be in \[0, 12\), got values in \[7, 12\]"),
    (torch.tensor([[-1, 8]]), r"token ids must be in \[0, 12\)"),
    (torch.full((1, 51), 7), r"length 51 is outside the allowed range \[1, 50\]"),
    (torch.zeros((1, 0), dtype=torch.long), r"length 0 is outside"),
    (torch.tensor([7, 8]), r"shape \(batch, length\), got 1 dims"),
    (torch.full((1, 2, 3), 7), r"got 3 dims"),
    (torch.tensor([[7.0, 8.0]]), r"integer tensor .* got dtype torch.float32"),
    (np.array([[7, 8]]), r"must be a torch.Tensor"),
])
def test_bad_input_ids(small_model, ids, message):
    with pytest.raises(ValueError, match=message):
        small_model(ids)


def test_bad_config():
    with pytest.raises(ValueError, match="order must be an integer >= 2"):
        th.HyenaDNA(th.HyenaConfig(order=1))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        th.preset_config("huge")


# --- checkpoints -----------------------------------------------------------------------------------------

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
    assert model.num_params() == 16 * d + n_layer * per_layer + 2 * d  # + embedding, final norm
    if name == "large-1m":
        assert 6.4e6 < model.num_params() < 6.8e6  # "about 6.6M parameters"


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


def test_load_published_variants(tmp_path):
    """The `.mixer.layer.` layout, and a full Lightning file whose hyper-parameters are objects of a library
    this machine lacks (omegaconf): both load, and give the same model."""
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    wrapped = {k.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer."): v
               for k, v in blob["state_dict"].items()}
    parent, fake = types.ModuleType("omegaconf_missing"), types.ModuleType("omegaconf_missing.dictconfig")

    class DictConfig(dict):
        pass
    DictConfig.__module__ = fake.__name__
    DictConfig.__qualname__ = "DictConfig"
    fake.DictConfig = DictConfig
    sys.modules.update({parent.__name__: parent, fake.__name__: fake})
    try:
        hparams = DictConfig(model={"d_model": 128})
        hparams.extra = [1, 2]
        lightning = {"state_dict": wrapped, "hyper_parameters": hparams, "epoch": 3,
                     "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}]}
        os.makedirs(tmp_path / "ckpt")
        torch.save(lightning, tmp_path / "ckpt" / "weights.ckpt")
    finally:
        del sys.modules[fake.__name__], sys.modules[parent.__name__]
    (tmp_path / "ckpt" / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(Exception):  # what a user meets with torch.load's safe mode
        torch.load(tmp_path / "ckpt" / "weights.ckpt", weights_only=True)
    a, b = th.from_pretrained(FIXTURE), th.from_pretrained(tmp_path / "ckpt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": exploit}, tmp_path / "evil.ckpt")
    blob = checkpoints.load_torch_file(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert torch.equal(blob["state_dict"]["x"], torch.zeros(1))


def test_own_checkpoint_round_trip(tmp_path):
    model = random_model(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, order=3, filter_order=8, l_max=40), 0)
    th.save_pretrained(model, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "model.pt"]
    loaded = th.from_pretrained(tmp_path / "run")
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, 12, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint folder not found"):
        th.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed config"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        th.from_pretrained(folder)
    (folder / "weights.ckpt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="weights.ckpt: not a readable PyTorch checkpoint"):
        th.from_pretrained(folder)
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    del blob["state_dict"]["model.backbone.ln_f.bias"]
    torch.save(blob, folder / "weights.ckpt")
    with pytest.raises(ValueError, match=r"weights.ckpt: keys do not match the model: missing \['ln_f.bias'\]"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text((FIXTURE / "config.json").read_text().replace('"d_model": 128', '"d_model": 64'))
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    torch.save(blob, folder / "weights.ckpt")
    with pytest.raises(ValueError, match="weights.ckpt: embedding.weight has shape"):
        th.from_pretrained(folder)


# --- the Hugging Face hub layout ("-hf" folders) -----------------------------------------------------------

def hf_folder(tmp_path, name="hf", drop=(), weights="safetensors", **config_changes):
    """The fixture written as a -hf folder; `drop` removes weight keys (as the hub's deduplicating save does),
    `config_changes` edits config.json."""
    folder = tmp_path / name
    th.save_pretrained(th.from_pretrained(FIXTURE), folder, layout="hf")
    state = {k: v for k, v in checkpoints.read_safetensors(folder / "model.safetensors").items() if k not in drop}
    if weights == "bin":
        os.remove(folder / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
    else:
        checkpoints.write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_folder_round_trips_bitwise_and_computes_the_published_function(tmp_path):
    model = th.from_pretrained(FIXTURE)
    th.save_pretrained(model, tmp_path / "hf", layout="hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                   "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_seq_len"] == 1026 and config["hyena_order"] == 2 and config["activation_freq"] == 10
    assert config["model_type"] == "hyenadna" and "AutoModelForCausalLM" in config["auto_map"]
    weights = checkpoints.read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert weights["hyena.backbone.layers.0.mixer.filter_fn.pos_emb.z"].shape == (1, 1026, 5)
    assert weights["hyena.backbone.layers.1.mixer.filter_fn.modulation.deltas"].shape == (1, 1, 128)
    assert torch.equal(weights["lm_head.weight"], weights["hyena.backbone.embeddings.word_embeddings.weight"])
    loaded = th.from_pretrained(tmp_path / "hf")
    assert loaded.cfg == model.cfg
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ref = np.load(FIXTURE / "reference.npz")
    with torch.no_grad():
        assert rel_err(loaded(torch.from_numpy(ref["input_ids"])), ref["logits"]) <= 1e-5


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hf_folder_with_deduplicated_tensors_loads(tmp_path, weights):
    shared = [f"hyena.backbone.layers.{i}.mixer.filter_fn.implicit_filter.{j}.freq" for i in (0, 1) for j in (3, 5)]
    folder = hf_folder(tmp_path, drop=shared + ["lm_head.weight"], weights=weights)
    a, b = th.from_pretrained(FIXTURE), th.from_pretrained(folder)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_hf_without_trained_frequencies_uses_activation_freq(tmp_path):
    freqs = [f"hyena.backbone.layers.{i}.mixer.filter_fn.implicit_filter.{j}.freq" for i in (0, 1) for j in (1, 3, 5)]
    model = th.from_pretrained(hf_folder(tmp_path, drop=freqs, train_freq=False, activation_freq=7))
    assert torch.equal(model.blocks[1].mixer.filter.mlp[5].freq, torch.full((1, 64), 7.0))


def test_hf_pickle_that_would_run_code_runs_nothing(tmp_path):
    folder = hf_folder(tmp_path, weights="bin")
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": exploit}, folder / "pytorch_model.bin")
    model = th.from_pretrained(folder)  # the exploit is an inert placeholder, not a tensor: ignored
    assert not marker.exists()
    ref = np.load(FIXTURE / "reference.npz")
    with torch.no_grad():
        assert rel_err(model(torch.from_numpy(ref["input_ids"])), ref["logits"]) <= 1e-5


@pytest.mark.parametrize("field, value", [("hyena_order", 3), ("num_inner_mlps", 1), ("use_bias", False),
                                          ("short_filter_order", 5), ("layer_norm_epsilon", 1e-6),
                                          ("d_model", 0), ("max_seq_len", "long")])
def test_hf_config_tinyhyena_cannot_represent_is_refused_by_field(tmp_path, field, value):
    folder = hf_folder(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"config.json: malformed config \(config field {field if field != 'max_seq_len' else 'l_max'}"):
        th.from_pretrained(folder)


def test_safetensors_garbage_is_refused_by_name(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        th.from_pretrained(folder)


# --- data.py ---------------------------------------------------------------------------------------------

import gzip
import http.server
import json
import subprocess
import threading

import data
import train


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert last.startswith("error: ") and all(n in last for n in needles), result.stderr


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ACGTNacgtn", max_size=200))
def test_reverse_complement_twice_is_identity(seq):
    ids = th.tokenize(seq).astype(np.uint8)
    assert np.array_equal(data.reverse_complement(data.reverse_complement(ids)), ids)
    by_definition = seq.upper()[::-1].translate(str.maketrans("ACGTN", "TGCAN"))  # complement, read backwards
    assert th.detokenize(data.reverse_complement(ids)) == by_definition
    assert th.detokenize(data.reverse_complement(th.tokenize("AACGTN"))) == "NACGTT"


FASTA = ">chr1 some description\nACGTacgtNR\nAC\n>chr2\n" + "ACGT" * 30 + "\n\n>chr3\nGGGGCCCC\n"


@pytest.fixture()
def genome(tmp_path):
    path = tmp_path / "g.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(FASTA)
    return data.Genome(data.prepare(str(path), quiet=True))


def test_prepare_and_fetch(genome, tmp_path):
    assert genome.chroms == {"chr1": 12, "chr2": 120, "chr3": 8}
    assert th.detokenize(genome.fetch("chr1", -2, 14)) == "[PAD]" * 2 + "ACGTACGTNNAC" + "[PAD]" * 2
    # reused while the source is unchanged: the cache is not rewritten
    stamp = os.stat(Path(genome.directory) / "index.json").st_mtime_ns
    assert data.prepare(str(tmp_path / "g.fa.gz")) == genome.directory
    assert os.stat(Path(genome.directory) / "index.json").st_mtime_ns == stamp


def test_windows_from_bed_and_dataloader_workers(genome, tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr2\t40\t60\ttrain\nchr1\t0\t4\ttrain\nchr3\t0\t8\tvalid\n")
    ds = data.Windows(genome, 16, "train", str(bed))
    assert len(ds) == 2
    x, y = ds[0]
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert th.detokenize(torch.cat([x, y[-1:]])) == ("ACGT" * 30)[50 - 8:50 + 9]  # centred on the interval
    x, y = ds[1]  # clipped at the chromosome's start, padded on the left
    assert th.detokenize(x[:6]) == "[PAD]" * 6 and th.detokenize(x[6:]) == "ACGTACGTNN"
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    (xb, yb), = list(loader)
    assert xb.shape == (2, 16)
    assert len(data.Windows(genome, 16, "valid", str(bed))) == 1


def test_windows_without_bed_hold_out_chromosomes(genome):
    assert {c for c, _ in data.Windows(genome, 7, "train").starts} == {"chr1"}
    assert {c for c, _ in data.Windows(genome, 7, "valid").starts} == {"chr2"}
    assert {c for c, _ in data.Windows(genome, 7, "test").starts} == {"chr3"}


def test_bed6_and_chromosome_names_without_chr(genome, tmp_path):
    """A standard BED6 (name, score, strand) is read past its third column, and chromosomes match with or
    without "chr"; Basenji's 4th column is a split only where it holds train/valid/test."""
    (tmp_path / "peaks.bed").write_text("track name=peaks\n2\t40\t60\tpeak1\t500\t-\nchr1\t0\t4\tpeak2\t0\t+\n")
    assert data.read_bed(str(tmp_path / "peaks.bed"), genome) == [("chr2", 40, 60, None), ("chr1", 0, 4, None)]
    (tmp_path / "named.bed").write_text("chr2\t40\t60\tpeak1\n")
    assert data.read_bed(str(tmp_path / "named.bed"), genome) == [("chr2", 40, 60, None)]
    (tmp_path / "split.bed").write_text("chr2\t40\t60\ttrain\n3\t0\t8\tvalid\n")
    assert data.read_bed(str(tmp_path / "split.bed"), genome) == [("chr2", 40, 60, "train"), ("chr3", 0, 8, "valid")]
    peaks = str(tmp_path / "peaks.bed")  # no split column: by held-out chromosome (chr2 valid, chr3 test)
    assert [c for c, _ in data.Windows(genome, 16, "train", peaks).starts] == ["chr1"]
    assert [c for c, _ in data.Windows(genome, 16, "valid", peaks).starts] == ["chr2"]


def test_data_errors(genome, tmp_path, capsys):
    def bed(text):
        (tmp_path / "b.bed").write_text(text)
        return str(tmp_path / "b.bed")
    with pytest.raises(data.DataError, match=r"b.bed:2: expected at least 3 tab-separated columns"):
        data.read_bed(bed("chr1\t0\t4\nchr1 0 4\n"), genome)
    # a 4th column is a split only where every row holds one: otherwise names, with a warning for a typo
    assert data.read_bed(bed("chr1\t0\t4\ttrain\nchr1\t4\t8\ttrian\n"), genome) == [("chr1", 0, 4, None), ("chr1", 4, 8, None)]
    assert "b.bed:2: column 4 is 'trian'" in capsys.readouterr().err
    with pytest.raises(data.DataError, match=r"b.bed:1: start and end must be integers"):
        data.read_bed(bed("chr1\tx\t4\n"), genome)
    with pytest.raises(data.DataError, match=r"b.bed:1: chromosome 'chrX' is not in the FASTA"):
        data.read_bed(bed("chrX\t0\t4\n"), genome)
    with pytest.raises(data.DataError, match=r"b.bed:1: interval chr1:0-99 lies outside the chromosome"):
        data.read_bed(bed("chr1\t0\t99\n"), genome)
    with pytest.raises(data.DataError, match="seq_len must be a positive integer"):
        data.Windows(genome, 0)


def test_prepare_cli_errors(tmp_path):
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "missing.fa"), "missing.fa: file not found")
    (tmp_path / "notfasta.txt").write_text("hello\nworld\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "notfasta.txt"), "not a FASTA file")
    raw = gzip.compress((">chr1\n" + "ACGT" * 50000 + "\n").encode())
    (tmp_path / "cut.fa.gz").write_bytes(raw[:len(raw) // 2])
    result = run_script("data.py", "prepare", tmp_path / "cut.fa.gz")
    assert_one_line_error(result, "cut.fa.gz: truncated or corrupt gzip")
    assert not (tmp_path / "cut.fa.gz.tinyhyena").exists()  # no cache that looks finished


def test_prepare_never_replaces_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    (tmp_path / "small.fa").write_text(">chr1\nACGTACGT\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa", "--out", precious),
                          str(precious), "not a genome prepared by tinyhyena")
    assert sorted(os.listdir(precious)) == ["thesis.txt"] and (precious / "thesis.txt").read_text() == "my thesis"
    # an earlier prepared genome is replaced when the FASTA changes; no temporary folders are left behind
    out = tmp_path / "genome"
    assert run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out).returncode == 0
    (tmp_path / "small.fa").write_text(">chrA\nGGGG\n")
    assert run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out).returncode == 0
    assert data.Genome(str(out)).chroms == {"chrA": 4} and sorted(os.listdir(out)) == ["chrA.u8", "index.json"]
    assert sorted(os.listdir(tmp_path)) == ["genome", "precious", "small.fa"]
    # ... but not once a user's file sits in it; the default folder FASTA.tinyhyena follows the same rule
    (out / "notes.txt").write_text("mine")
    (tmp_path / "small.fa").write_text(">chrB\nTTTT\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out), str(out))
    assert (out / "notes.txt").read_text() == "mine" and data.Genome(str(out)).chroms == {"chrA": 4}
    (tmp_path / "small.fa.tinyhyena").mkdir()
    (tmp_path / "small.fa.tinyhyena" / "x").write_text("mine")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa"), "small.fa.tinyhyena")
    # hg38 --dir: a folder holding anything that `data.py hg38` does not write is not used
    assert_one_line_error(run_script("data.py", "hg38", "--dir", precious, "--fasta_url", "http://127.0.0.1:9/x"),
                          str(precious), "did not write")
    assert sorted(os.listdir(precious)) == ["thesis.txt"]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first request for a file in `cut` is cut off halfway."""
    files, cut = {}, set()

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.cut:
            self.cut.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # cut off midway
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


def test_hg38_download_resumes_and_prepares(tmp_path):
    fasta = gzip.compress(("".join(f">chr{i}\n" + "ACGTN" * 4000 + "\n" for i in range(3))).encode())
    bed = "chr0\t0\t100\ttrain\nchr1\t0\t100\tvalid\nchr2\t5\t105\ttest\n".encode()
    _RangeHandler.files = {"/hg38.ml.fa.gz": fasta, "/sequences_human.bed": bed}
    _RangeHandler.cut = {"/hg38.ml.fa.gz"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        args = ["data.py", "hg38", "--dir", tmp_path / "hg38", "--fasta_url", url + "/hg38.ml.fa.gz",
                "--bed_url", url + "/sequences_human.bed"]
        first = run_script(*args)
        assert_one_line_error(first, "download interrupted", "run the same command again to resume")
        assert 0 < os.path.getsize(tmp_path / "hg38" / "hg38.ml.fa.gz.part") < len(fasta)
        second = run_script(*args)
        assert second.returncode == 0, second.stderr
        assert (tmp_path / "hg38" / "hg38.ml.fa.gz").read_bytes() == fasta
        assert "3 chromosomes, 3 intervals" in second.stdout
    finally:
        server.shutdown()


# --- train.py --------------------------------------------------------------------------------------------

def markov_table(seed=0, favourites=None):
    """(16, 4) transition probabilities of an order-2 Markov source: after each pair of bases (row 4*a + b),
    one next base (its favourite, random unless given) has probability 0.7, the other three 0.1."""
    rng = np.random.default_rng(seed)
    probs = np.full((16, 4), 0.1)
    probs[np.arange(16), rng.integers(0, 4, 16) if favourites is None else favourites] = 0.7
    return probs


def markov_sequence(probs, length, rng):
    """A base string drawn from the source."""
    cum, seq, u = probs.cumsum(1), [int(rng.integers(4)), int(rng.integers(4))], rng.random(length)
    for i in range(2, length):
        seq.append(min(3, int(np.searchsorted(cum[seq[-2] * 4 + seq[-1]], u[i]))))
    return "".join("ACGT"[b] for b in seq[:length])


def markov_genome(path, n_chroms=4, length=40000, seed=0):
    """A genome from the order-2 Markov source markov_table(seed). Returns the entropy rate in nats per base."""
    rng = np.random.default_rng(seed)
    probs = markov_table(seed)
    with open(path, "w") as f:
        for c in range(n_chroms):
            text = markov_sequence(probs, length, rng)
            f.write(f">chr{c}\n" + "\n".join(text[i:i + 70] for i in range(0, length, 70)) + "\n")
    return -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    path = tmp_path_factory.mktemp("markov") / "markov.fa"
    return str(path), markov_genome(path)


def read_metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def markov_model(markov, tmp_path_factory):
    """A tiny model trained on the Markov genome to near its entropy rate: train.py's own test, and a known
    source for score.py and finetune.py."""
    out = tmp_path_factory.mktemp("markov_model") / "run"
    result = run_script("train.py", "--fasta", markov[0], "--preset", "tiny", "--seq_len", 256, "--min_seq_len", 128,
                        "--batch_size", 8, "--max_steps", 120, "--lr", 3e-3, "--warmup_steps", 10,
                        "--eval_interval", 60, "--eval_batches", 8, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_train_learns_markov_source(markov, markov_model):
    _, entropy = markov
    metrics = read_metrics(markov_model)
    assert {m["seq_len"] for m in metrics if m["split"] == "train"} == {128, 256}  # the length warm-up ran
    assert all({"step", "split", "loss", "tokens", "seq_len", "elapsed_s"} <= set(m) for m in metrics)
    assert [(m["split"], m["step"]) for m in metrics[-3:]] == [("train", 120), ("val", 120), ("test", 120)]
    assert metrics[-2]["loss"] < entropy + 0.05 < np.log(4)  # near the source's entropy rate, far below chance
    test = metrics[-1]  # the held-out chromosome, reported at the end
    assert test["loss"] < entropy + 0.05 and test["bits_per_base"] == pytest.approx(test["loss"] / np.log(2))
    model = th.from_pretrained(markov_model)
    assert model.cfg.l_max == 258


def test_init_from_starts_where_the_checkpoint_is(markov, markov_model, tmp_path):
    """--init_from: the run's first evaluation (step 0) is the checkpoint's own loss on the same validation
    windows; a longer --seq_len raises l_max and trains on; --preset beside it is an error."""
    args = ["train.py", "--fasta", markov[0], "--init_from", markov_model, "--max_steps", 2, "--eval_batches", 4,
            "--batch_size", 2, "--min_seq_len", 64]
    result = run_script(*args, "--out", tmp_path / "same")
    assert result.returncode == 0, result.stderr[-2000:]
    first = read_metrics(tmp_path / "same")[0]
    assert (first["split"], first["step"], first["seq_len"]) == ("val", 0, 256)  # the checkpoint's length
    checkpoint = th.from_pretrained(markov_model)
    windows = data.Windows(data.Genome(data.prepare(markov[0], quiet=True)), 256, "valid")
    expected = train.evaluate(checkpoint, windows, types.SimpleNamespace(eval_batches=4), torch.device("cpu"), 0, 1)
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    assert first["loss"] < np.log(4) - 0.2  # a trained model's loss, not a fresh one's
    longer = run_script(*args, "--seq_len", 512, "--out", tmp_path / "longer")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert th.from_pretrained(tmp_path / "longer").cfg.l_max == 514
    assert_one_line_error(run_script(*args, "--preset", "tiny", "--out", tmp_path / "x"), "--init_from", "--preset")


def test_train_stopped_by_sigterm_and_resumed_matches_uninterrupted_run(markov, tmp_path):
    fasta, _ = markov
    args = [sys.executable, "train.py", "--fasta", fasta, "--seq_len", 64, "--min_seq_len", 32, "--batch_size", 2,
            "--max_steps", 40, "--eval_interval", 15, "--eval_batches", 2, "--rc_aug", "--lr", 1e-3]
    full = subprocess.run(list(map(str, args + ["--out", tmp_path / "full"])), cwd=ROOT, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    run = subprocess.Popen(list(map(str, args + ["--out", tmp_path / "cut"])), cwd=ROOT, stderr=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while run.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "continue with --resume" in out, err[-2000:]
    stopped_at = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 40
    resumed = subprocess.run(list(map(str, args + ["--out", tmp_path / "cut", "--resume"])), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    drop = lambda rows: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in rows]
    assert drop(read_metrics(tmp_path / "cut")) == drop(read_metrics(tmp_path / "full"))  # every row, in order
    cut, full = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("cut", "full"))
    assert cut.keys() == full.keys() and all(torch.equal(cut[k], full[k]) for k in full)


def test_train_refuses_an_out_holding_another_run(markov, tmp_path):
    fasta, _ = markov
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # an unrelated file: used beside, never deleted
    args = ["train.py", "--fasta", fasta, "--seq_len", 32, "--min_seq_len", 32, "--batch_size", 2, "--max_steps", 2,
            "--eval_batches", 1, "--out", out]
    assert run_script(*args).returncode == 0
    first = {name: (out / name).read_bytes() for name in ("model.pt", "train_state.pt", "metrics.jsonl")}
    again = run_script(*args, "--max_steps", 3)  # the shell-history slip: same command, no --resume
    assert_one_line_error(again, str(out), "--resume", "--overwrite")
    assert {name: (out / name).read_bytes() for name in first} == first  # byte-identical: nothing touched
    resumed = run_script(*args, "--max_steps", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1, 2, 3]
    over = run_script(*args, "--max_steps", 1, "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1]  # started over
    assert (out / "notes.txt").read_text() == "mine"
    assert_one_line_error(run_script(*args, "--resume", "--overwrite"), "exclude each other")


def test_train_without_data_says_how_to_get_it(tmp_path):
    result = run_script(ROOT / "train.py", "--max_steps", 1, cwd=tmp_path)
    assert_one_line_error(result, "python data.py hg38", "--fasta")


def test_train_stops_on_non_finite_loss(markov, tmp_path):
    fasta, _ = markov
    result = run_script("train.py", "--fasta", fasta, "--seq_len", 32, "--min_seq_len", 32, "--batch_size", 2,
                        "--max_steps", 20, "--lr", 1e30, "--warmup_steps", 0, "--ckpt_interval", 1,
                        "--out", tmp_path / "nan")
    assert result.returncode == 1 and "last good checkpoint" in result.stderr
    metrics = read_metrics(tmp_path / "nan")
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics)  # the bad step logged nothing
    last = metrics[-1]["step"]
    assert last < 20 and f"at step {last};" in result.stderr  # stopped at the first non-finite loss
    state = torch.load(tmp_path / "nan" / "train_state.pt", weights_only=True)
    assert state["step"] == last  # the checkpoint of the last step that completed, not the bad one
    model = th.from_pretrained(tmp_path / "nan")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def deterministic_run(markov, out, *extra, launcher=()):
    """A short train.py run without dropout (so that its steps depend only on its batches): (train losses,
    final weights)."""
    result = run_script(*launcher, "train.py", "--fasta", markov[0], "--seq_len", 64, "--min_seq_len", 64,
                        "--max_steps", 3, "--eval_batches", 2, "--dropout", 0, "--lr", 3e-3, "--warmup_steps", 1,
                        "--device", "cpu", "--out", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(out) if m["split"] == "train"]
    return losses, torch.load(Path(out) / "model.pt", weights_only=True)


def assert_same_run(a, b, rtol=1e-5):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    assert len(losses_a) == len(losses_b) == 3
    np.testing.assert_allclose(losses_a, losses_b, rtol=rtol)
    for k in weights_a:
        torch.testing.assert_close(weights_a[k], weights_b[k], rtol=1e-4, atol=2e-5)  # Adam: rounding of tiny gradients


def test_train_ddp_two_processes_equal_one_process_with_their_global_batch(markov, tmp_path):
    """Two DDP ranks of 2 sequences each take the steps one process takes on the same 4 sequences."""
    ddp = deterministic_run(markov, tmp_path / "ddp", "--batch_size", 2,
                            launcher=("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port()))
    assert_same_run(ddp, deterministic_run(markov, tmp_path / "one", "--batch_size", 4))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(fasta, out, *extra):
    """Two torchrun agents on this machine, one process each, joined by a c10d rendezvous on 127.0.0.1 (a free
    port, a fresh id): two "nodes" of one run. Returns the agents' Popen objects."""
    port = free_port()
    args = ["-m", "torch.distributed.run", "--nnodes", 2, "--nproc_per_node", 1, "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test{port}{os.getpid()}", "train.py", "--fasta", fasta,
            "--seq_len", 64, "--min_seq_len", 64, "--batch_size", 2, "--max_steps", 8, "--eval_interval", 4,
            "--eval_batches", 2, "--rc_aug", "--device", "cpu", "--out", out, *extra]
    return [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def finish(agents, timeout=240):
    """(exit codes, outputs) of the agents; a run that hangs past `timeout` seconds is killed and fails."""
    try:
        results = [agent.communicate(timeout=timeout) for agent in agents]
    except subprocess.TimeoutExpired:
        for agent in agents:
            subprocess.run(["pkill", "-9", "-P", str(agent.pid)])
            agent.kill()
        pytest.fail(f"the run did not end within {timeout} s")
    return [agent.returncode for agent in agents], results


def test_two_nodes_stop_together_on_one_ranks_sigterm_and_resume_exactly(markov, tmp_path):
    """A SIGTERM to one rank's process stops both ranks at the same step: one checkpoint, every process exits 0.
    --resume then ends where an uninterrupted two-node run ends. Each run starts from an unprepared FASTA,
    prepared by rank 0 alone."""
    fasta = tmp_path / "g.fa"
    fasta.write_text(Path(markov[0]).read_text())
    codes, outputs = finish(two_nodes(fasta, tmp_path / "full"))
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    cut = two_nodes(fasta, tmp_path / "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(cut[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 1, workers
    os.kill(int(workers[0]), signal.SIGTERM)  # one rank's process, as a preempted node's agent would
    codes, outputs = finish(cut, timeout=60)
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)
    assert 3 <= state["step"] < 8 and len(state["rng"]) == 2  # each rank's random state, its own
    assert not torch.equal(state["rng"][0]["torch_rng"], state["rng"][1]["torch_rng"])
    codes, outputs = finish(two_nodes(fasta, tmp_path / "cut", "--resume"))
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    drop = lambda rows: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in rows]
    full, resumed = drop(read_metrics(tmp_path / "full")), drop(read_metrics(tmp_path / "cut"))
    assert [m["step"] for m in resumed if m["split"] == "train"] == list(range(1, 9))  # each step logged once
    assert resumed[-1]["split"] == "test" and resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)
    for a, b in zip(resumed, full):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    index = json.loads((Path(str(fasta) + ".tinyhyena") / "index.json").read_text())  # prepared once, in place
    assert set(index["chroms"]) == {"chr0", "chr1", "chr2", "chr3"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    single = run_script("train.py", "--fasta", fasta, "--seq_len", 64, "--min_seq_len", 64, "--batch_size", 2,
                        "--max_steps", 10, "--device", "cpu", "--out", tmp_path / "cut", "--resume")
    assert_one_line_error(single, "written by 2 process(es)", "same number")


def test_resume_after_sigkills_at_random_moments_and_a_torn_metrics_line(markov, tmp_path):
    """A run that checkpoints every step, killed with SIGKILL at random moments (checkpoint writing included),
    resumes each time; a torn last line in metrics.jsonl is dropped with a warning."""
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "--fasta", markov[0], "--seq_len", 32, "--min_seq_len", 32, "--batch_size",
            2, "--max_steps", 400, "--ckpt_interval", 1, "--eval_interval", 1000, "--eval_batches", 1, "--out", out]
    rng = np.random.default_rng(0)
    for attempt in range(3):
        run = subprocess.Popen(list(map(str, args + (["--resume"] if attempt else []))), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None and not (out / "train_state.pt").exists():
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.2, 1.5)))
        run.kill()
        _, err = run.communicate()
        assert run.returncode == -signal.SIGKILL, err[-2000:]  # still training when killed: the resume worked
        state = torch.load(out / "train_state.pt", weights_only=True)  # the last checkpoint is whole
        assert state["step"] >= 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "split": "tr')  # a write cut short
    done = run_script(*args[1:-4], "--max_steps", state["step"] + 2, "--out", out, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped a torn last line" in done.stderr
    steps = [m["step"] for m in read_metrics(out) if m["split"] == "train"]
    assert steps == list(range(1, state["step"] + 3))


def test_finetune_under_torchrun_is_one_data_parallel_run(tmp_path):
    write_table(tmp_path / "train.csv", labelled(200, 0))
    write_table(tmp_path / "test.csv", labelled(40, 1))
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(), *FIT,
                        "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--test",
                        tmp_path / "test.csv", "--max_steps", 6, "--eval_interval", 3, "--batch_size", 8,
                        "--device", "cpu", "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "ft")
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [m["split"] for m in metrics if m["split"] != "train"] == ["valid", "valid", "test"]
    assert finetune.load_classifier(tmp_path / "ft").class_names == ["neg", "pos"]


def test_grad_accum_equals_the_bigger_batch(markov, tmp_path):
    """Accumulating 2 micro-batches of 2 takes the steps of one batch of 4 (same sequences, same mean loss)."""
    accumulated = deterministic_run(markov, tmp_path / "accum", "--batch_size", 2, "--grad_accum", 2)
    assert_same_run(accumulated, deterministic_run(markov, tmp_path / "whole", "--batch_size", 4))
    different = deterministic_run(markov, tmp_path / "half", "--batch_size", 2)  # the check can tell batches apart
    assert not np.allclose(different[0][1:], accumulated[0][1:], rtol=1e-5)


def test_learning_rate_schedule():
    """Linear warm-up to the peak, then a cosine that falls monotonically to 10% of it at max_steps."""
    args = types.SimpleNamespace(lr=1e-3, warmup_steps=10, max_steps=110)
    lrs = [train.lr_at(step, args) for step in range(120)]
    np.testing.assert_allclose(lrs[:10], [1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)  # held at the floor after


def test_weight_decay_only_on_matrices_outside_the_filter():
    """AdamW decays the embedding and the projections' and MLP's matrices; never biases, norms, or the implicit
    filter (a function of position); frozen parameters are not handed to the optimizer at all."""
    model = th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=20))
    decayed, plain = train.adamw(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1)).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    expected = {"embedding.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                       for m in ("mixer.in_proj", "mixer.short_conv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")}
    assert decayed_names == expected
    assert {names[id(p)] for p in plain["params"]} == set(names.values()) - expected
    model.blocks[0].requires_grad_(False)
    groups = train.adamw(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1)).param_groups
    assert not {names[id(p)] for g in groups for p in g["params"]} & {n for n in names.values() if n.startswith("blocks.0.")}


def test_reverse_complement_augmentation_flips_about_half_the_windows(genome):
    """--rc_aug (train.py's Windows, finetune.py's Examples): each item is its sequence or, about half the time,
    the reverse complement of it, with targets still the next base of what the model reads."""
    plain, augmented = data.Windows(genome, 20, "valid"), data.Windows(genome, 20, "valid", rc_aug=True)
    torch.manual_seed(0)
    flipped = 0
    for draw in range(400):
        i = draw % len(plain)
        (x, y), (xa, ya) = plain[i], augmented[i]
        assert torch.equal(xa[1:], ya[:-1])  # still next-token pairs
        whole, seen = torch.cat([x, y[-1:]]).numpy(), torch.cat([xa, ya[-1:]]).numpy()
        is_flipped = np.array_equal(seen, data.reverse_complement(whole.astype(np.uint8)).astype(np.int64))
        assert is_flipped or np.array_equal(seen, whole)
        flipped += is_flipped
    assert 160 <= flipped <= 240, flipped  # binomial(400, 0.5): 200 +- 40 is over 4 sigma
    seqs = [th.tokenize("AACGTTTGCA").astype(np.uint8)]
    examples = finetune.Examples(seqs, [1], rc_aug=True)
    outcomes = [th.detokenize(examples[0][0]) for _ in range(400)]
    assert set(outcomes) == {"AACGTTTGCA", "TGCAAACGTT"} and 160 <= outcomes.count("TGCAAACGTT") <= 240


# --- export.py -------------------------------------------------------------------------------------------

import onnx
import onnxruntime as ort

import export


def test_export_cpu_matches_published_outputs(tmp_path):
    model = th.from_pretrained(FIXTURE)
    export.export(model, str(tmp_path / "m.onnx"), "cpu", outputs="both")
    ref = np.load(FIXTURE / "reference.npz")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, hidden = session.run(None, {"input_ids": ref["input_ids"]})
    assert rel_err(logits, ref["logits"]) <= 1e-4 and rel_err(hidden, ref["hidden"]) <= 1e-4
    # dynamic batch and length, against torch
    assert export.check_against_torch(model, str(tmp_path / "m.onnx"), "both", [1, 37, 1000]) <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["tokens"])["A"] == 7 and meta["pad_id"] == "4" and meta["l_max"] == "1026"
    assert meta["target"] == "cpu" and json.loads(meta["config"])["d_model"] == 128


def test_export_holds_parameters_and_serves_any_length_up_to_max_len(tmp_path):
    """The filters are computed in the graph for the input's length and the FFT size follows that length, so
    a graph exported for a long max_len holds about the parameters and is exact on short inputs too."""
    model = random_model(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=20000), 0)
    export.export(model, str(tmp_path / "m.onnx"), "cpu")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert stored <= 1.1 * model.num_params() + 200, (stored, model.num_params())  # no l_max-long tables
    assert not any(op == "DFT" for _, op in export.graph_ops(graph))  # ONNX Runtime's CPU DFT is the slow kernel
    # the channel groups and the MLP's hidden groups are Loops: 2 per block, nothing else at the top level
    assert [n.op_type for n in graph.node].count("Loop") == 2 * model.cfg.n_layer
    # lengths on both sides of every length where the matrix FFT's radix p doubles
    changes = list(export.fft_radix_lengths(model.cfg.l_max).values())[1:]
    assert len(changes) == 3  # p = 2, 4, 8
    lengths = sorted({1, 37, 1000} | {L + side for L in changes for side in (-1, 0)})
    assert export.check_against_torch(model, str(tmp_path / "m.onnx"), "logits", lengths, batches=(1, 2)) <= 1e-4


@pytest.mark.parametrize("d_model,order,d_inner", [(12, 3, 40), (48, 2, 300), (7, 2, 8)])
def test_export_groups_compute_the_model(d_model, order, d_inner, monkeypatch):
    """The graph's blocks in groups (channels of the operator, hidden units of the MLP; each group a Loop
    iteration) compute the model, in torch, for group sizes that divide the widths unevenly or not at all."""
    monkeypatch.setattr(export, "CHANNEL_GROUP", 5)
    monkeypatch.setattr(export, "HIDDEN_GROUP", 16)
    cfg = th.HyenaConfig(d_model=d_model, n_layer=2, d_inner=d_inner, order=order, filter_order=8, l_max=300)
    model = random_model(cfg, 3)
    wrapper = export.ExportedModel(model, "both").eval()
    ids = torch.randint(7, 12, (2, 257))
    with torch.no_grad():
        logits, hidden = wrapper(ids)
        assert rel_err(logits, model(ids)) <= 1e-5 and rel_err(hidden, model.hidden_states(ids)) <= 1e-5


@pytest.fixture(scope="module")
def cpu_conv_session(tmp_path_factory):
    """The cpu target's long convolution (the FFT as matrix products) alone, as ONNX Runtime runs it."""
    class Conv(torch.nn.Module):
        def forward(self, u, k):
            return torch.ops.tinyhyena.causal_conv(u, k)
    dims = {name: torch.export.Dim(name, max=5000) for name in ("B", "C", "L")}
    program = torch.onnx.export(Conv(), (torch.randn(2, 3, 40), torch.randn(3, 40)), dynamo=True,
                                dynamic_shapes=({0: dims["B"], 1: dims["C"], 2: dims["L"]}, {0: dims["C"], 1: dims["L"]}),
                                custom_translation_table={torch.ops.tinyhyena.causal_conv.default:
                                                          export.cpu_translation(5000)}, verbose=False)
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    onnx.save(program.model_proto, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@property_settings
@given(st.integers(1, 3), st.integers(1, 4), st.one_of(st.integers(1, 300), st.integers(1000, 5000)),
       st.integers(0, 2**31 - 1))
def test_exported_cpu_conv_equals_direct_conv(cpu_conv_session, B, C, L, seed):
    g = torch.Generator().manual_seed(seed)
    u, k = torch.randn(B, C, L, generator=g, dtype=torch.float64), torch.randn(C, L, generator=g, dtype=torch.float64)
    (y,) = cpu_conv_session.run(None, {"u": u.float().numpy(), "k": k.float().numpy()})
    assert rel_err(y, direct_causal_conv(u, k).numpy()) <= 1e-5


from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class Rfft(OpRun):  # onnx.reference matches ops by class name
    """com.microsoft.Rfft as ONNX Runtime's CUDA kernel computes it (cuFFT R2C, unnormalised), for onnx's
    reference evaluator: the cuda graph's arithmetic is checked on a machine without a GPU."""
    op_domain = "com.microsoft"

    def _run(self, x, normalized=0, onesided=1, signal_ndim=1):
        X = np.fft.rfft(x.astype(np.float64), axis=-1)
        return (np.stack([X.real, X.imag], -1).astype(x.dtype),)


class Irfft(OpRun):
    """com.microsoft.Irfft as the CUDA kernel computes it: m bins give 2m-1 outputs, divided by 2m-1."""
    op_domain = "com.microsoft"

    def _run(self, x, normalized=0, onesided=1, signal_ndim=1):
        return (np.fft.irfft(x[..., 0] + 1j * x[..., 1], n=2 * x.shape[-2] - 1, axis=-1).astype(x.dtype),)


def test_export_cuda_graph_runs_on_the_cuda_provider_only_ops(tmp_path):
    export.export(th.from_pretrained(FIXTURE), str(tmp_path / "m.onnx"), "cuda")
    ref = np.load(FIXTURE / "reference.npz")
    (logits,) = ReferenceEvaluator(str(tmp_path / "m.onnx"), new_ops=[Rfft, Irfft]).run(
        None, {"input_ids": ref["input_ids"]})
    assert rel_err(logits, ref["logits"]) <= 1e-5
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = export.graph_ops(graph)  # Loop bodies included
    assert not any(op == "DFT" for _, op in ops)
    assert {("com.microsoft", "Rfft"), ("com.microsoft", "Irfft")} <= ops
    assert {op for _, op in ops} <= export.CUDA_OPS, {op for _, op in ops} - export.CUDA_OPS
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "length"]


def test_export_cuda_graph_arithmetic_at_several_lengths(tmp_path):
    model = random_model(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=5000), 1)
    export.export(model, str(tmp_path / "m.onnx"), "cuda", outputs="hidden")
    evaluator = ReferenceEvaluator(str(tmp_path / "m.onnx"), new_ops=[Rfft, Irfft])
    rng = np.random.default_rng(0)
    for L in (1, 2, 37, 1000, 4321):
        ids = rng.integers(7, 12, size=(2, L))
        (hidden,) = evaluator.run(None, {"input_ids": ids})
        with torch.no_grad():
            assert rel_err(hidden, model.hidden_states(torch.from_numpy(ids))) <= 1e-4, L


def test_large_1m_shape_exports_within_memory(tmp_path):
    """A model of large-1m's shape (d_model 256, l_max 1,000,002; 2 of its 8 layers, random weights) exports
    for both targets in a subprocess whose peak RSS and file size are checked."""
    torch.manual_seed(0)
    th.save_pretrained(th.HyenaDNA(th.preset_config("large-1m", n_layer=2)), tmp_path / "large")
    wrapper = ("import resource, runpy, sys\nsys.argv = ['export.py'] + sys.argv[1:]\n"
               "try:\n    runpy.run_path('export.py', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
               "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    for target in ("cpu", "cuda"):
        out = tmp_path / f"{target}.onnx"
        result = run_script("-c", wrapper, "--checkpoint", tmp_path / "large", "--target", target, "--no-check",
                            "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        peak_gb = int(result.stdout.split("peak_rss_kb")[1]) / 2**20
        assert peak_gb < 4, peak_gb  # the issue's bound is 8 GB for all 8 layers; 0.8 GB measured for 8
        assert os.path.getsize(out) < 20e6  # 2 layers: about 3.5M parameters, 14 MB


def test_odd_fft_sizes():
    for n in [1, 2, 100, 2051, 2 * 1_000_002 - 1]:
        sizes = export.odd_fft_sizes(n)
        m = sizes[-1]  # the graph's largest choice: the first size that fits n
        assert m >= n and m % 2 == 1 and m < 1.3 * n + 3
        assert sizes == sorted(sizes) and all(s % 2 == 1 for s in sizes) and (len(sizes) == 1 or sizes[-2] < n)


def test_export_default_out_never_replaces_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "tinyhyena.onnx").write_text("not a model")
    result = run_script(ROOT / "export.py", "--checkpoint", FIXTURE, "--target", "cpu", "--no-check", cwd=tmp_path)
    assert_one_line_error(result, "tinyhyena.onnx exists and is not an ONNX model", "--out")
    assert (tmp_path / "tinyhyena.onnx").read_text() == "not a model"
    (tmp_path / "tinyhyena.onnx").unlink()
    for _ in range(2):  # an earlier export is the kind of file export.py writes: replaced
        result = run_script(ROOT / "export.py", "--checkpoint", FIXTURE, "--target", "cpu", "--no-check", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["tinyhyena.onnx"]


@pytest.fixture(scope="module")
def trained_checkpoint(markov, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    result = run_script("train.py", "--fasta", markov[0], "--seq_len", 64, "--min_seq_len", 64, "--batch_size", 2,
                        "--max_steps", 2, "--eval_batches", 1, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_export_cli_from_train_checkpoint_both_targets(trained_checkpoint, tmp_path):
    # the default checkpoint is the newest under out/ of the working directory
    work = trained_checkpoint.parent
    result = run_script(ROOT / "export.py", "--target", "cpu", "--out", tmp_path / "cpu.onnx", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max relative error" in result.stdout
    result = run_script(ROOT / "export.py", "--checkpoint", trained_checkpoint, "--out", tmp_path / "cuda.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cuda.onnx").exists()


def test_export_cli_errors(trained_checkpoint, tmp_path):
    assert_one_line_error(run_script(ROOT / "export.py", cwd=tmp_path), "no checkpoint in out/", "train.py")
    assert_one_line_error(run_script("export.py", "--checkpoint", trained_checkpoint, "--max_len", 100000),
                          "--max_len 100000 is outside [1, 66]")
    assert_one_line_error(run_script("export.py", "--checkpoint", trained_checkpoint, "--target", "tpu"),
                          "--target", "invalid choice: 'tpu'")
    assert_one_line_error(run_script("export.py", "--checkpoint", tmp_path / "none"), "--checkpoint", "none: not found")


def test_readme_deploy_snippet_runs_without_torch(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- deploy-snippet -->")[1].split("```python")[1].split("```")[0]
    export.export(th.from_pretrained(FIXTURE), str(tmp_path / "tinyhyena.onnx"), "cpu", outputs="both")
    (tmp_path / "app.py").write_text("import sys\nsys.modules['torch'] = None  # importing torch now fails\n" + snippet)
    result = run_script(tmp_path / "app.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "next base" in result.stdout and "embedding" in result.stdout


# --- generate.py -----------------------------------------------------------------------------------------

import generate


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


# --- bench.py --------------------------------------------------------------------------------------------

def test_bench_runs_at_a_tiny_size():
    result = run_script("bench.py", "--lengths", 64, "--train", "--no_append", "--timeout", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2 and "inference" in rows[0] and "train step" in rows[1]
    assert "-" not in rows[0].split("|")[3]  # tinyhyena was timed
    assert_one_line_error(run_script("bench.py", "--lengths", "12,x"), "comma-separated")
    assert_one_line_error(run_script("bench.py", "--published", "missing.py"), "missing.py: file not found")


# --- score.py --------------------------------------------------------------------------------------------

import score


def spearman(a, b):
    """Spearman's rank correlation, ties given their average rank."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average the ranks of tied values
            r[x == value] = r[x == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(2, 300), st.data())
def test_scoring_windows_predict_every_base_once(length, window, data):
    context = data.draw(st.integers(0, window - 1))
    plan = th.scoring_windows(length, window, context)
    scored = [t for i, (start, first) in enumerate(plan) for t in range(first, min(start + window, length))]
    assert scored == list(range(1, length))  # each base once, in order; base 0 has no prediction
    for start, first in plan:
        assert 0 <= start < first and start + window <= max(length, window)
        assert first - start >= min(max(context, 1), first)  # at least `context` bases before, as far as exist


def test_windowed_scoring_equals_a_single_pass_where_the_window_covers_the_record():
    model = random_model(th.HyenaConfig(d_model=16, n_layer=2, d_inner=32, filter_order=8, l_max=700), 1)
    ids = np.random.default_rng(0).integers(7, 11, 700)
    with torch.no_grad():
        single = th.log_likelihood(model, torch.from_numpy(ids)[None])[0]
    logits = th.reference_forward(model, ids[None])[0]  # the twin's: no code shared with record_log_probs
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    by_twin = log_probs[np.arange(len(ids) - 1), ids[1:]]  # log P(base t | bases before it), t = 1 .. 699
    assert np.allclose(th.record_log_probs(model, ids).numpy(), by_twin, atol=1e-4)  # window = l_max: one pass
    assert np.allclose(th.record_log_probs(model, ids[:450]).numpy(), by_twin[:449], atol=1e-4)
    windowed = th.record_log_probs(model, ids, window=256, context=100, batch_size=3)
    for start, first in th.scoring_windows(len(ids), 256, 100):  # each window's bases, as that window alone
        stop = min(start + 256, len(ids))
        alone = th.log_likelihood(model, torch.from_numpy(ids[start:stop])[None])[0]
        assert torch.allclose(windowed[first - 1:stop - 1], alone[first - start - 1:], atol=1e-5)
    # right padding changes nothing before it (the model is causal)
    padded, lengths = th.pad_right([ids[:300], ids[:500]])
    assert torch.allclose(th.log_likelihood(model, padded, lengths)[0, :299], single[:299], atol=1e-4)
    assert (th.log_likelihood(model, padded, lengths)[0, 299:] == 0).all()


def test_regions_of_a_genome_as_input(tmp_path, fixture_classifier):
    """score.py sequences and finetune.py predict read --bed regions of --fasta as the sequences cut out by
    hand: BED3 to BED6, the name or chrom:start-end as the id, a - strand reverse-complemented, chromosome
    names with or without chr and the mitochondrion as M or MT."""
    rng = np.random.default_rng(5)
    chr1, chrM = ("".join(rng.choice(list("ACGT"), n)) for n in (300, 120))
    (tmp_path / "g.fa").write_text(f">chr1\n{chr1}\n>chrM\n{chrM}\n")
    (tmp_path / "r.bed").write_text("track name=peaks\n1\t10\t80\tpeakA\t0\t+\nchr1\t100\t170\tpeakB\t0\t-\n"
                                    "MT\t5\t60\n")
    complement = str.maketrans("ACGT", "TGCA")
    by_hand = {"peakA": chr1[10:80], "peakB": chr1[100:170].translate(complement)[::-1], "MT:5-60": chrM[5:60]}
    result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "s.tsv", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(by_hand)
    model = th.from_pretrained(FIXTURE)
    for row, seq in zip(rows, by_hand.values()):
        logp = th.record_log_probs(model, th.tokenize(seq), model.cfg.l_max, model.cfg.l_max // 2, 32).numpy()
        assert int(row[1]) == len(seq) and abs(float(row[2]) + logp.mean()) < 1e-5
    result = run_script("finetune.py", "predict", "--checkpoint", fixture_classifier, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "p.tsv")
    assert result.returncode == 0, result.stderr[-2000:]
    clf = classifier.load_classifier(fixture_classifier)
    expected = classifier.readout(clf.task, finetune.predict_logits(clf, [th.tokenize(s) for s in by_hand.values()], 8,
                                                                    torch.device("cpu")))
    rows = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(by_hand)
    assert np.allclose([[float(x) for x in r[2:]] for r in rows], expected.numpy(), atol=1e-5)
    result = run_script("finetune.py", "embed", "--checkpoint", FIXTURE, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "e.npy", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.allclose(np.load(tmp_path / "e.npy"), th.embed(model, list(by_hand.values())), atol=1e-5)


def test_score_sequence_by_hand_on_the_published_fixture(tmp_path):
    seq = "ACGTTGACCATGGCAATTGCCGATAGGCTA" * 5
    (tmp_path / "in.fa").write_text(f">s1 a record\n{seq[:70]}\n{seq[70:]}\n>s2\nA\n")
    result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--input", tmp_path / "in.fa",
                        "--out", tmp_path / "s.tsv", "--per_base", tmp_path / "s.bedGraph", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    model = th.from_pretrained(FIXTURE)
    ids = torch.from_numpy(th.tokenize(seq))[None]
    with torch.no_grad():
        logits = model(ids)
    by_hand = [float(torch.log_softmax(logits[0, t - 1], -1)[ids[0, t]]) for t in range(1, len(seq))]
    header, s1, s2 = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()]
    assert header == ["id", "length", "nats_per_base", "bits_per_base", "perplexity"]
    nats = -np.mean(by_hand)
    assert s1[:2] == ["s1", str(len(seq))] and abs(float(s1[2]) - nats) < 1e-4
    assert abs(float(s1[3]) - nats / np.log(2)) < 1e-4 and abs(float(s1[4]) - np.exp(nats)) < 1e-3 * np.exp(nats)
    assert s2 == ["s2", "1", "NA", "NA", "NA"]  # one base: nothing to predict
    bedgraph = [line.split("\t") for line in (tmp_path / "s.bedGraph").read_text().splitlines()]
    assert [(c, int(a), int(b)) for c, a, b, _ in bedgraph] == [("s1", t, t + 1) for t in range(1, len(seq))]
    assert np.allclose([float(v) for *_, v in bedgraph], by_hand, atol=1e-5)


VCF = """##fileformat=VCFv4.2
##contig=<ID=chr1>
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO
chr1\t100\trs1\tA\tC,G\t.\tPASS\t.
1\t200\trs2\tC\tCTT\t.\t.\t.
chr1\t300\t.\tGAC\tG\t.\t.\t.
chr1\t50\tbad\tT\tA\t.\t.\t.
chr2\t10\t.\tA\tT\t.\t.\t.
chr1\t3000\t.\tAC\tA\t.\t.\t.
chr1\t400\t.\tA\t<DEL>\t.\t.\t.
"""


def test_vcf_parsing_and_variant_windows(tmp_path):
    rng = np.random.default_rng(0)
    ref = list(rng.choice(list("ACGT"), 3000))
    ref[99], ref[199], ref[299:302], ref[49] = "A", "C", list("GAC"), "G"
    (tmp_path / "ref.fa").write_text(">chr1\n" + "".join(ref) + "\n")
    with gzip.open(tmp_path / "v.vcf.gz", "wt") as f:
        f.write(VCF)
    variants = score.read_vcf(str(tmp_path / "v.vcf.gz"))
    assert [(v.chrom, v.pos, v.ref, v.alt) for v in variants][:3] == [("chr1", 100, "A", "C"), ("chr1", 100, "A", "G"),
                                                                     ("1", 200, "C", "CTT")]
    genome = data.load_genome(str(tmp_path / "ref.fa"))
    windows = [score.variant_windows(genome, v, 64, 66) for v in variants]
    r, a = windows[0]
    assert len(r) == len(a) == 64 and (r != a).sum() == 1 and th.detokenize(r[32]) == "A" and th.detokenize(a[32]) == "C"
    r, a = windows[2]  # "1" found as "chr1"; an insertion makes the ALT window longer, within l_max
    assert len(a) == 66 and th.detokenize(a[32:35]) == "CTT" and np.array_equal(a[35:], r[33:])
    r, a = windows[3]
    assert len(a) == 62 and np.array_equal(a[:33], r[:33]) and np.array_equal(a[33:], r[35:])
    notes = [w for w in windows if isinstance(w, str)]
    assert [n.split(":")[0] for n in notes] == ["REF mismatch", "missing chromosome", "outside the chromosome",
                                              "symbolic ALT"]
    assert "the FASTA has G" in notes[0]
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=66), 0)
    scores = score.score_variants(model, genome, variants, 64, both_strands=True, batch_size=2)
    for (llr, forward, reverse, note), w in zip(scores, windows):
        assert np.isnan(llr) == isinstance(w, str) and (note == "") == (not isinstance(w, str))
        if not isinstance(w, str):  # each strand's llr is log P(alt) - log P(ref), computed here directly
            for ids, strand_llr in ((w, forward), ([data.reverse_complement(x).astype(np.int64) for x in w], reverse)):
                whole = [th.log_likelihood(model, torch.from_numpy(x)[None])[0].sum().item() for x in ids]
                assert abs((whole[1] - whole[0]) - strand_llr) < 1e-3
            assert abs(llr - (forward + reverse) / 2) < 1e-9


def test_long_alleles_keep_both_windows_within_l_max_or_say_why(tmp_path):
    rng = np.random.default_rng(2)
    ref = "".join(rng.choice(list("ACGT"), 400))
    (tmp_path / "ref.fa").write_text(">chr1\n" + ref + "\n")
    genome = data.load_genome(str(tmp_path / "ref.fa"))
    insertion = "".join(rng.choice(list("ACGT"), 20))
    v = score.Variant("chr1", 200, ".", ref[199], ref[199] + insertion, 0)
    r, a = score.variant_windows(genome, v, 64, 70)  # the ALT window would be 84 bases: 14 over l_max
    assert len(r) == 64 - 14 and len(a) == 70  # both gave up the same 14 bases on the left
    offset = 199 - (199 - 32) - 14  # the variant's place in the trimmed windows
    assert th.detokenize(r) == ref[199 - 32 + 14:199 + 32]
    assert th.detokenize(a) == ref[199 - 32 + 14:200] + insertion + ref[200:199 + 32]
    assert np.array_equal(r[:offset], a[:offset])  # they differ only from the variant on
    too_long = score.Variant("chr1", 200, ".", ref[199], ref[199] + "A" * 60, 0)
    assert score.variant_windows(genome, too_long, 64, 70).startswith("ALT too long")
    long_ref = score.Variant("chr1", 100, ".", ref[99:99 + 64], "A", 0)
    assert score.variant_windows(genome, long_ref, 64, 70).startswith("REF too long: 64 bp")
    assert not isinstance(score.variant_windows(genome, score.Variant("chr1", 100, ".", ref[99:99 + 63], "A", 0),
                                                64, 70), str)


def test_variants_cli_and_its_errors(tmp_path):
    (tmp_path / "ref.fa").write_text(">chr1\n" + "ACGT" * 40 + "\n")
    (tmp_path / "v.vcf").write_text("#CHROM\tPOS\tID\tREF\tALT\nchr1\t3\tx\tG\tT\nchr1\t4\ty\tA\tC\n")
    args = ["score.py", "variants", "--checkpoint", FIXTURE, "--fasta", tmp_path / "ref.fa", "--window", 32]
    result = run_script(*args, "--vcf", tmp_path / "v.vcf", "--out", tmp_path / "o.tsv")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "o.tsv").read_text().splitlines()]
    assert rows[0][:6] == ["chrom", "pos", "id", "ref", "alt", "llr"] and len(rows) == 3
    assert rows[1][:5] == ["chr1", "3", "x", "G", "T"] and rows[2][-1] == "REF mismatch: the FASTA has T"
    assert "1 x REF mismatch" in result.stderr
    both = run_script(*args, "--vcf", tmp_path / "v.vcf", "--out", tmp_path / "both.tsv", "--both_strands")
    assert both.returncode == 0, both.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "both.tsv").read_text().splitlines()]
    assert rows[0] == ["chrom", "pos", "id", "ref", "alt", "llr", "llr_forward", "llr_reverse", "note"]
    llr, forward, reverse = map(float, rows[1][5:8])
    single = float((tmp_path / "o.tsv").read_text().splitlines()[1].split("\t")[5])
    assert forward == pytest.approx(single, abs=2e-6) and llr == pytest.approx((forward + reverse) / 2, abs=2e-6)
    assert abs(forward - reverse) > 1e-4  # the other strand is scored, not the same one twice
    assert rows[2][5:8] == ["NA", "NA", "NA"] and rows[2][-1].startswith("REF mismatch")
    (tmp_path / "nohead.vcf").write_text("chr1\t3\tx\tG\tT\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "nohead.vcf"), "nohead.vcf:1", "#CHROM header")
    (tmp_path / "bad.vcf").write_text("##x\n#CHROM\tPOS\tID\tREF\tALT\nchr1\tthree\tx\tG\tT\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "bad.vcf"), "bad.vcf:3", "POS must be")
    (tmp_path / "short.vcf").write_text("#CHROM\tPOS\tID\tREF\tALT\nchr1\t3\tx\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "short.vcf"), "short.vcf:2", "5 tab-separated")
    assert_one_line_error(run_script("score.py", "variants", "--checkpoint", FIXTURE, "--fasta", tmp_path / "no.fa",
                                     "--vcf", tmp_path / "v.vcf"), "--fasta", "no.fa: not found")
    assert_one_line_error(run_script(*args[:-2], "--window", 5000, "--vcf", tmp_path / "v.vcf"),
                          "--window 5000 is outside [2, 1026]")


def test_variant_scores_rank_snps_like_the_true_source(markov_model, markov):
    """The model trained on an order-2 Markov source ranks SNPs as the source's exact log-likelihood ratios do."""
    probs = np.log(markov_table(0))
    genome = data.load_genome(markov[0])
    chrom = genome.array("chr3")
    rng = np.random.default_rng(1)
    variants, truth = [], []
    for pos in rng.choice(np.arange(200, len(chrom) - 200), 150, replace=False):
        seq = [int(b) - 7 for b in chrom[pos - 2:pos + 3]]  # two bases before the SNP, three from it
        alt = int(rng.choice([b for b in range(4) if b != seq[2]]))
        mutated = seq[:2] + [alt] + seq[3:]

        def logp(s):  # the terms that the SNP touches: positions pos, pos+1, pos+2
            return sum(probs[s[t - 2] * 4 + s[t - 1], s[t]] for t in (2, 3, 4))
        truth.append(logp(mutated) - logp(seq))
        variants.append(score.Variant("chr3", int(pos) + 1, ".", "ACGT"[seq[2]], "ACGT"[alt], 0))
    model = th.from_pretrained(markov_model)
    scores = score.score_variants(model, genome, variants, window=128, batch_size=50)
    llr = [s[0] for s in scores]
    rho = spearman(llr, truth)
    print(f"Spearman {rho:.3f}")
    assert rho >= 0.7, rho


# --- finetune.py -----------------------------------------------------------------------------------------

import finetune

SOURCES = [markov_table(0), markov_table(0, favourites=0)]  # the genome's source, and one that favours A


def labelled(n, seed, lengths=(80, 120)):
    """n sequences alternating between the two sources: [(sequence, class 0 or 1)]."""
    rng = np.random.default_rng(seed)
    return [(markov_sequence(SOURCES[i % 2], int(rng.integers(*lengths)), rng), i % 2) for i in range(n)]


def write_table(path, rows, sep=",", labels=("neg", "pos"), split=None):
    with open(path, "w") as f:
        f.write(sep.join(["name", "sequence", "label"] + (["split"] if split else [])) + "\n")
        for i, (seq, c) in enumerate(rows):
            f.write(sep.join([f"s{i}", seq, labels[c]] + ([split(i)] if split else [])) + "\n")


def write_benchmark(root, split, rows, labels=("negative", "positive")):
    for i, (seq, c) in enumerate(rows):
        folder = root / split / labels[c]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text(seq)


def write_species_fasta(path, source, seed, records=2, length=12000):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for r in range(records):
            text = markov_sequence(source, length, rng)
            f.write(f">rec{r}\n" + "\n".join(text[i:i + 60] for i in range(0, length, 60)) + "\n")


FIT = ["finetune.py", "fit", "--batch_size", 16, "--lr", 1e-3, "--max_steps", 40, "--eval_interval", 20]


def test_finetune_learns_each_data_format(tmp_path):
    train, test = labelled(400, 0), labelled(100, 1)
    write_table(tmp_path / "train.csv", train)  # Nucleotide Transformer style: CSV + --test
    write_table(tmp_path / "test.csv", test)
    write_table(tmp_path / "all.tsv", train + test, sep="\t", labels=("0", "1"),  # integer labels, split column
                split=lambda i: "train" if i < 360 else "valid" if i < 400 else "test")
    write_benchmark(tmp_path / "gb", "train", train)  # genomic-benchmarks folders
    write_benchmark(tmp_path / "gb", "test", test)
    write_species_fasta(tmp_path / "a.fa", SOURCES[0], 2)
    with gzip.open(tmp_path / "b.fa.gz", "wt") as f:
        write_species_fasta(tmp_path / "b.fa", SOURCES[1], 3)
        f.write((tmp_path / "b.fa").read_text())
    with open(tmp_path / "train.fna", "w") as f:  # the Nucleotide Transformer tasks' own files: >name|label
        f.writelines(f">seq{i}|{c}\n{seq[:60]}\n{seq[60:]}\n" for i, (seq, c) in enumerate(train))
    with open(tmp_path / "test_hub.csv", "w") as f:  # the hub copies of the genomic benchmarks: a seq column
        f.writelines(["seq,label\n"] + [f"{seq},{c}\n" for seq, c in test])
    runs = {"csv": ["--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"],
            "fna": ["--data", tmp_path / "train.fna", "--test", tmp_path / "test_hub.csv"],
            "tsv": ["--data", tmp_path / "all.tsv"],
            "benchmark": ["--data", tmp_path / "gb"],
            "species": ["--species", f"alpha={tmp_path / 'a.fa'}", f"beta={tmp_path / 'b.fa.gz'}", "--eval_windows", 50]}
    for name, data_args in runs.items():
        out = tmp_path / name
        result = run_script(*FIT, "--preset", "tiny", "--seq_len", 100, *data_args, "--out", out)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        # every sequence longer than the model takes is cut and counted once; species windows are made to fit
        too_long = 0 if name == "species" else sum(len(seq) > 100 for seq, _ in train + test)
        assert (f"{too_long} sequences longer than 100 were cut" in result.stderr if too_long
                else "sequences longer than" not in result.stderr), (name, result.stderr[-2000:])
        metrics = read_metrics(out)
        assert all({"step", "split", "loss", "accuracy", "mcc", "f1_macro", "elapsed_s"} <= set(m) for m in metrics)
        assert [m["split"] for m in metrics if m["split"] != "train"] == ["valid", "valid", "test"]
        assert metrics[-1]["accuracy"] >= 0.9, (name, metrics[-1])
        classifier = finetune.load_classifier(out)
        assert classifier.class_names == {"tsv": ["0", "1"], "fna": ["0", "1"], "benchmark": ["negative", "positive"],
                                          "species": ["alpha", "beta"]}.get(name, ["neg", "pos"])
        with torch.no_grad():
            assert classifier(torch.from_numpy(th.tokenize(test[0][0]))[None]).shape == (1, 2)
    # sequences longer than the model takes are cut, and counted
    long_rows = labelled(40, 5, lengths=(150, 200))
    write_table(tmp_path / "long.csv", long_rows)
    result = run_script(*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "long.csv",
                        "--max_steps", 1, "--out", tmp_path / "long", "--truncate", "left")
    assert result.returncode == 0 and "40 sequences longer than 100 were cut (--truncate left)" in result.stderr


def test_labelled_fasta_and_seq_column_errors(tmp_path):
    """The .fna and seq-column readers: ids, labels and sequences as written, errors naming file and line."""
    (tmp_path / "a.fna").write_text(">chr1:5-9|promoter\nACGT\nAC\n>x|y|0\nGG\n")
    rows, columns = finetune.read_table(str(tmp_path / "a.fna"))
    assert columns == ["label"] and [(r["name"], r["sequence"], r["label"], r["line"]) for r in rows] == \
        [("chr1:5-9", "ACGTAC", "promoter", 1), ("x|y", "GG", "0", 4)]
    (tmp_path / "b.fna").write_text(">s1|1\nACGT\n>s2\nACGT\n")
    with pytest.raises(data.DataError, match=r"b.fna:3: header has no label after a '\|'"):
        finetune.read_table(str(tmp_path / "b.fna"))
    assert [r["name"] for r in finetune.read_table(str(tmp_path / "b.fna"), need_label=False)[0]] == ["s1", "s2"]
    with pytest.raises(data.DataError, match=r"--label_columns is for CSV/TSV"):
        finetune.read_table(str(tmp_path / "b.fna"), label_columns="a,b")
    (tmp_path / "c.tsv").write_text("seq\tlabel\nACGT\tx\n\tx\n")
    with pytest.raises(data.DataError, match=r"c.tsv:3: empty sequence"):
        finetune.read_table(str(tmp_path / "c.tsv"))
    (tmp_path / "d.csv").write_text("id,seq\nr1,ACGT\n")
    assert [(n, list(ids)) for n, ids in finetune.read_sequences(str(tmp_path / "d.csv"))] == [("r1", [7, 8, 9, 10])]


def composition_rows(n, seed, length=100):
    """Sequences of random base composition, with composition-derived targets: [(sequence, gc fraction,
    [gc > 0.5, A > T, G > C])]."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = rng.dirichlet(np.ones(4))
        seq = "".join(rng.choice(list("ACGT"), size=length, p=p))
        count = {b: seq.count(b) for b in "ACGT"}
        gc = (count["G"] + count["C"]) / length
        rows.append((seq, gc, [int(gc > 0.5), int(count["A"] > count["T"]), int(count["G"] > count["C"])]))
    return rows


def test_finetune_regression_and_multilabel_learn(tmp_path):
    rows = composition_rows(500, 0)
    with open(tmp_path / "train.csv", "w") as f:
        f.write("name,sequence,gc,t_gc,t_at,t_gcskew,split\n")
        for i, (seq, gc, t) in enumerate(rows):
            split = "train" if i < 400 else "valid" if i < 450 else "test"
            f.write(f"s{i},{seq},{gc},{t[0]},{t[1]},{t[2]},{split}\n")
    common = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 60]
    result = run_script(*common, "--task", "regression", "--label_columns", "gc", "--out", tmp_path / "reg")
    assert result.returncode == 0, result.stderr[-2000:]
    test = read_metrics(tmp_path / "reg")[-1]
    assert test["split"] == "test" and test["pearson"] > 0.8 and test["spearman"] > 0.8, test
    result = run_script(*common, "--task", "multilabel", "--label_columns", "t_*", "--out", tmp_path / "multi")
    assert result.returncode == 0, result.stderr[-2000:]
    test = read_metrics(tmp_path / "multi")[-1]
    assert test["split"] == "test" and test["auroc"] > 0.9 and test["targets_scored"] == 3, test
    # predict: one value per target; probabilities per binary target
    with open(tmp_path / "new.fa", "w") as f:
        f.writelines(f">r{i}\n{seq}\n" for i, (seq, _, _) in enumerate(rows[450:]))
    for name, header in (("reg", ["id", "gc"]), ("multi", ["id", "p_t_gc", "p_t_at", "p_t_gcskew"])):
        result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / name, "--input", tmp_path / "new.fa")
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert lines[0] == header and len(lines) == 51
        values = np.array([[float(x) for x in line[1:]] for line in lines[1:]])
        if name == "reg":  # de-standardized: on the targets' own scale
            assert np.corrcoef(values[:, 0], [gc for _, gc, _ in rows[450:]])[0, 1] > 0.8
        else:
            assert ((0 <= values) & (values <= 1)).all()
    # the exported graph of a regression model outputs values
    result = run_script("export.py", "--checkpoint", tmp_path / "reg", "--target", "cpu", "--out", tmp_path / "r.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["values"]
    ids = torch.from_numpy(th.tokenize(rows[460][0]))[None]
    with torch.no_grad():
        expect = finetune.load_classifier(tmp_path / "reg")(ids).numpy()
    assert rel_err(session.run(None, {"input_ids": ids.numpy()})[0], expect) <= 1e-4


def test_regression_and_auroc_metrics():
    assert finetune.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert finetune.auroc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5  # ties count half
    m = finetune.regression_metrics(np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([[1.0], [4.0], [9.0], [16.0]]))
    assert m["spearman"] == pytest.approx(1.0) and 0.9 < m["pearson"] < 1.0 and m["mse"] == pytest.approx(46.0)
    assert list(finetune.average_ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]


def test_label_column_errors(tmp_path):
    (tmp_path / "t.csv").write_text("sequence,y1,y2\nACGT,1,0\nACGA,1,x\n")
    for extra, needle in ((["--task", "regression", "--label_columns", "z*"], "no column starts with 'z'"),
                          (["--task", "regression", "--label_columns", "y1,y2"], "t.csv:3: y2 is 'x', not a number"),
                          (["--task", "multilabel", "--label_columns", "y1", "--batch_size", 1], None),
                          (["--task", "regression", "--soft_prompt", 4, "--label_columns", "y1"], "--soft_prompt")):
        result = run_script(*FIT, "--preset", "tiny", "--seq_len", 10, "--data", tmp_path / "t.csv", *extra,
                            "--max_steps", 1, "--out", tmp_path / "o", "--overwrite")
        if needle is None:  # 0/1 targets in y1: a valid multilabel run
            assert result.returncode == 0, result.stderr[-2000:]
            assert finetune.load_classifier(tmp_path / "o").task == "multilabel"
        else:
            assert_one_line_error(result, needle)
    (tmp_path / "m.csv").write_text("sequence,y1\nACGT,1\nACGA,2\n")
    assert_one_line_error(run_script(*FIT, "--preset", "tiny", "--seq_len", 10, "--data", tmp_path / "m.csv",
                                     "--task", "multilabel", "--label_columns", "y1", "--out", tmp_path / "o2"),
                          "m.csv:3: y1 is '2'; multilabel targets are 0 or 1")


def hf_classifier_folder(tmp_path, n_labels=2, **config):
    folder = hf_folder(tmp_path, "hf_clf", architectures=["HyenaDNAForSequenceClassification"],
                       id2label={str(i): f"label{i}" for i in range(n_labels)}, **config)
    state = checkpoints.read_safetensors(folder / "model.safetensors")
    state["score.weight"] = torch.randn(n_labels, 128, generator=torch.Generator().manual_seed(0))
    del state["lm_head.weight"]
    checkpoints.write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    return folder, state["score.weight"]


@pytest.mark.parametrize("problem_type, task", [("single_label_classification", "classify"),
                                                ("multi_label_classification", "multilabel"),
                                                ("regression", "regression")])
def test_hf_sequence_classifier_loads_with_its_score_head(tmp_path, problem_type, task):
    folder, score = hf_classifier_folder(tmp_path, problem_type=problem_type)
    clf = finetune.load_classifier(folder)
    assert clf.task == task and clf.class_names == ["label0", "label1"] and clf.pool == "last"
    assert clf.max_len == th.from_pretrained(FIXTURE).cfg.l_max - 1  # room for the [SEP]
    ids = torch.from_numpy(np.random.default_rng(0).integers(7, 12, (3, 50)))
    lm = th.from_pretrained(FIXTURE)
    with_sep = torch.cat([ids, torch.full((3, 1), th.SPECIAL_TOKENS["[SEP]"])], 1)  # what the port's tokenizer gives
    with torch.no_grad():  # the port: score (no bias) of the last token's hidden state, the [SEP]'s
        torch.testing.assert_close(clf(ids), lm.hidden_states(with_sep)[:, -1] @ score.T, rtol=1e-5, atol=1e-5)
    if task == "classify":
        (tmp_path / "in.txt").write_text("ACGTACGTAC\nGGGGCCCCAA\n")
        result = run_script("finetune.py", "predict", "--checkpoint", folder, "--input", tmp_path / "in.txt")
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert lines[0] == ["id", "predicted", "p_label0", "p_label1"]
        with torch.no_grad():
            expect = finetune.readout("classify", clf(torch.from_numpy(th.tokenize("GGGGCCCCAA"))[None]))[0]
        assert np.allclose([float(x) for x in lines[2][2:]], expect.numpy(), atol=1e-5)
        # the exported graph appends the [SEP] itself: an app sends the bases, as to any classifier's graph
        result = run_script("export.py", "--checkpoint", folder, "--target", "cpu", "--out", tmp_path / "c.onnx")
        assert result.returncode == 0, result.stderr[-2000:]
        session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            assert rel_err(got, finetune.readout("classify", clf(ids)).numpy()) <= 1e-4


def test_hf_folder_without_a_score_head_is_no_classifier(tmp_path):
    folder = hf_folder(tmp_path, architectures=["HyenaDNAForSequenceClassification"])
    with pytest.raises(ValueError, match="no score.weight"):
        finetune.load_classifier(folder)
    folder, _ = hf_classifier_folder(tmp_path, problem_type="ranking")
    with pytest.raises(ValueError, match="config field problem_type is 'ranking'"):
        finetune.load_classifier(folder)


def test_classification_metrics():
    m = finetune.classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 3)
    assert abs(m["accuracy"] - 5 / 6) < 1e-12
    f1 = np.mean([1.0, 2 / 3, 0.8])
    assert abs(m["f1_macro"] - f1) < 1e-12
    # binary MCC against its textbook formula
    tp, tn, fp, fn = 3, 4, 1, 2
    labels = [1] * (tp + fn) + [0] * (tn + fp)
    preds = [1] * tp + [0] * fn + [0] * tn + [1] * fp
    expect = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert abs(finetune.classification_metrics(labels, preds, 2)["mcc"] - expect) < 1e-12
    assert finetune.classification_metrics([0, 1], [1, 1], 2)["mcc"] == 0.0


@pytest.fixture(scope="module")
def mixed_lm(tmp_path_factory):
    """A tiny language model pretrained on a genome from both sources: to predict well it must tell, from
    context, which source it is reading. Soft prompting can then draw the class from its next-token logits."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    with open(root / "mix.fa", "w") as f:
        for c in range(6):
            text = markov_sequence(SOURCES[c % 2], 30000, rng)
            f.write(f">chr{c}\n" + "\n".join(text[i:i + 70] for i in range(0, len(text), 70)) + "\n")
    result = run_script("train.py", "--fasta", root / "mix.fa", "--seq_len", 256, "--min_seq_len", 256,
                        "--batch_size", 8, "--max_steps", 100, "--lr", 3e-3, "--warmup_steps", 10,
                        "--eval_interval", 1000, "--eval_batches", 4, "--out", root / "lm")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "lm"


def test_freeze_and_soft_prompt_leave_the_backbone_untouched(mixed_lm, tmp_path):
    write_table(tmp_path / "train.csv", labelled(400, 0), labels=("0", "1"))
    write_table(tmp_path / "test.csv", labelled(200, 1), labels=("0", "1"))
    before = th.from_pretrained(mixed_lm).state_dict()
    data_args = ["--checkpoint", mixed_lm, "--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"]
    for name, mode in (("frozen", ["--freeze"]), ("prompt", ["--soft_prompt", 8, "--class_tokens", "CA", "--lr", 1e-2])):
        result = run_script(*FIT, *data_args, "--max_steps", 60, *mode, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        after = finetune.load_classifier(tmp_path / name).backbone.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: nothing of the backbone trained
        state = torch.load(tmp_path / name / "train_state.pt", weights_only=True)["model"]
        assert all(torch.equal(before[k], state["backbone." + k]) for k in before)
    prompt = finetune.load_classifier(tmp_path / "prompt")
    assert prompt.prompt.shape == (8, 128) and prompt.head is None
    test = read_metrics(tmp_path / "prompt")[-1]
    assert test["split"] == "test" and test["accuracy"] >= 0.6 and test["mcc"] > 0.2, test  # chance: 0.5, 0


def test_soft_prompt_sits_between_padding_and_sequence():
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=40), 0)
    clf = finetune.SequenceClassifier(model, 2, soft_prompt=3, class_tokens="AC").eval()
    seqs = [th.tokenize("ACGTAC"), th.tokenize("GGATTACAGT")]
    with torch.no_grad():
        batched = clf(finetune.pad_left(seqs))
        width = max(len(s) for s in seqs)
        for row, seq in enumerate(seqs):  # [its pads, the prompt, its bases], built by hand
            pads = model.embedding(torch.full((width - len(seq),), th.PAD_ID))
            x = torch.cat([pads, clf.prompt, model.embedding(torch.from_numpy(seq))])[None]
            logits = model.hidden_states_from_embeddings(x)[0, -1] @ model.embedding.weight.T
            expected = logits[[th.BASE_IDS["A"], th.BASE_IDS["C"]]]
            assert torch.allclose(batched[row], expected, atol=1e-5), row
            alone = model.hidden_states_from_embeddings(x[:, width - len(seq):])[0, -1] @ model.embedding.weight.T
            assert torch.allclose(clf(torch.from_numpy(seq)[None])[0], alone[[th.BASE_IDS["A"], th.BASE_IDS["C"]]],
                                  atol=1e-5)
        assert not torch.allclose(batched[0], alone[[th.BASE_IDS["A"], th.BASE_IDS["C"]]], atol=1e-3)


def test_finetune_overwrite_deletes_only_the_runs_own_files(tmp_path):
    write_table(tmp_path / "train.csv", labelled(40, 0))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "embeddings.npy").write_bytes(b"not the run's")
    args = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 2,
            "--out", out]
    assert run_script(*args).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run_script(*args), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # a refused run touches nothing
    over = run_script(*args, "--max_steps", 1, "--overwrite", "--seed", 1)
    assert over.returncode == 0, over.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1]  # started over
    assert (out / "notes.txt").read_text() == "mine" and (out / "embeddings.npy").read_bytes() == b"not the run's"
    assert set(first) <= {p.name for p in out.iterdir()}


def test_finetune_resume_reproduces_an_uninterrupted_run(tmp_path):
    write_table(tmp_path / "train.csv", labelled(300, 0))
    args = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 30,
            "--eval_interval", 5, "--rc_aug"]
    full = run_script(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run = subprocess.Popen(list(map(str, [sys.executable, *args, "--out", tmp_path / "cut"])), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while run.poll() is None and not (metrics.exists() and '"valid"' in metrics.read_text()
                                      and len(metrics.read_text().splitlines()) >= 9):
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "continue with --resume" in out, err[-2000:]
    assert 5 <= torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"] < 30
    resumed = run_script(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    drop = lambda rows: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in rows]
    assert drop(read_metrics(tmp_path / "cut")) == drop(read_metrics(tmp_path / "full"))
    assert (tmp_path / "cut" / "head.pt").read_bytes() == (tmp_path / "full" / "head.pt").read_bytes()


@pytest.fixture(scope="module")
def fixture_classifier(tmp_path_factory):
    """A classifier fine-tuned a few steps from the published-format fixture."""
    root = tmp_path_factory.mktemp("fixture_classifier")
    write_table(root / "train.csv", labelled(64, 0))
    result = run_script(*FIT, "--checkpoint", FIXTURE, "--data", root / "train.csv", "--max_steps", 3,
                        "--out", root / "clf")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "clf"


def test_predict_and_embed_round_trips(fixture_classifier, tmp_path):
    rows = labelled(7, 3)
    (tmp_path / "in.fa").write_text("".join(f">r{i} x\n{seq}\n" for i, (seq, _) in enumerate(rows)))
    (tmp_path / "in.txt").write_text("".join(seq + "\n" for seq, _ in rows))
    write_table(tmp_path / "in.csv", rows)
    clf = finetune.load_classifier(fixture_classifier)
    with torch.no_grad():
        expect = [torch.softmax(clf(torch.from_numpy(th.tokenize(s))[None])[0], -1).numpy() for s, _ in rows]
    for name, ids in (("in.fa", [f"r{i}" for i in range(7)]), ("in.txt", [str(i) for i in range(1, 8)]),
                      ("in.csv", [f"s{i}" for i in range(7)])):
        result = run_script("finetune.py", "predict", "--checkpoint", fixture_classifier, "--input", tmp_path / name,
                            "--out", tmp_path / "p.tsv", "--batch_size", 3)
        assert result.returncode == 0, result.stderr[-2000:]
        table = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()]
        assert table[0] == ["id", "predicted", "p_neg", "p_pos"] and [r[0] for r in table[1:]] == ids
        probs = np.array([[float(x) for x in r[2:]] for r in table[1:]])
        assert np.allclose(probs, expect, atol=1e-5)  # batched, yet each as it is alone
        assert [r[1] for r in table[1:]] == [["neg", "pos"][int(p.argmax())] for p in probs]
    # embed: any checkpoint, the published fixture included; rows in input order, batching irrelevant
    for checkpoint in (FIXTURE, fixture_classifier):
        for pool in ("mean", "last"):
            result = run_script("finetune.py", "embed", "--checkpoint", checkpoint, "--input", tmp_path / "in.fa",
                                "--out", tmp_path / "e.npy", "--pool", pool, "--batch_size", 2)
            assert result.returncode == 0, result.stderr[-2000:]
            got = np.load(tmp_path / "e.npy")
            model = th.from_pretrained(checkpoint)
            with torch.no_grad():
                hidden = [model.hidden_states(torch.from_numpy(th.tokenize(s))[None])[0] for s, _ in rows]
            expect_e = np.stack([(h.mean(0) if pool == "mean" else h[-1]).numpy() for h in hidden])
            assert got.shape == (7, 128) and np.allclose(got, expect_e, atol=1e-4)
    model = th.from_pretrained(FIXTURE)
    with torch.no_grad():
        last = np.stack([model.hidden_states(torch.from_numpy(th.tokenize(s))[None])[0, -1].numpy() for s, _ in rows])
    assert np.allclose(th.embed(model, [s for s, _ in rows], "last", batch_size=3), last, atol=1e-4)


def test_exported_classifier_matches_torch(fixture_classifier, tmp_path):
    result = run_script("export.py", "--checkpoint", fixture_classifier, "--target", "cpu", "--out", tmp_path / "c.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max relative error" in result.stdout
    clf = finetune.load_classifier(fixture_classifier)
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    ids = finetune.pad_left([th.tokenize(s) for s, _ in labelled(4, 9)])  # left-padded, as in fine-tuning
    (probs,) = session.run(["probabilities"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        assert rel_err(probs, torch.softmax(clf(ids), -1)) <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "c.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == ["neg", "pos"] and meta["outputs"] == "probabilities"
    assert_one_line_error(run_script("export.py", "--checkpoint", fixture_classifier, "--outputs", "hidden",
                                     "--out", tmp_path / "x.onnx"), "fine-tuned model")


def test_finetune_errors(fixture_classifier, tmp_path):
    fit = [*FIT, "--preset", "tiny", "--seq_len", 100, "--out", tmp_path / "o"]
    (tmp_path / "gb" / "train" / "pos").mkdir(parents=True)
    (tmp_path / "gb" / "train" / "neg").mkdir(parents=True)
    (tmp_path / "gb" / "train" / "pos" / "1.txt").write_text("ACGT")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "gb"), "train/neg", "empty class folder")
    (tmp_path / "nolabel.csv").write_text("sequence,class\nACGT,1\n")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "nolabel.csv"), "nolabel.csv:1", "'label'")
    (tmp_path / "empty.csv").write_text("sequence,label\n")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "empty.csv"), "empty.csv", "no sequences")
    write_table(tmp_path / "train.csv", labelled(40, 0))
    write_table(tmp_path / "test.csv", labelled(4, 1), labels=("neg", "maybe"))
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"),
                          "test.csv", "'maybe' is unseen in training")
    assert_one_line_error(run_script(*fit, "--species", "human", "mouse=m.fa"), "'human'", "NAME=FASTA")
    write_species_fasta(tmp_path / "a.fa", SOURCES[0], 0, records=1, length=400)
    write_species_fasta(tmp_path / "b.fa", SOURCES[1], 1, records=1, length=400)
    assert_one_line_error(run_script(*fit, "--species", f"a={tmp_path / 'a.fa'}", f"b={tmp_path / 'b.fa'}"),
                          "windows are fewer than one batch")
    assert_one_line_error(run_script("finetune.py", "predict", "--checkpoint", FIXTURE, "--input", tmp_path / "test.csv"),
                          "not a fine-tuned classifier")
    assert_one_line_error(run_script("finetune.py", "embed", "--checkpoint", fixture_classifier, "--input",
                                     tmp_path / "missing.fa", "--out", tmp_path / "e.npy"), "missing.fa: file not found")
    # a second fit into the same --out refuses, as train.py does
    assert_one_line_error(run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv",
                                     "--out", fixture_classifier), "--resume", "--overwrite")


# --- the command-line convention: a bad invocation is one line, `error: ...`, exit 1 ---------------------

def test_hub_folders_hold_the_tokenizer_and_the_classifier(tmp_path, monkeypatch):
    """save_pretrained(layout="hf") writes the port's tokenizer files beside config.json, pointing at the
    port's tokenizer as config.json points at its model. A classifier fine-tuned with --layout hf is written
    as the hub's HyenaDNAForSequenceClassification folder, which finetune.py predict and export.py read back
    with the same predictions."""
    model = th.from_pretrained(FIXTURE)
    th.save_pretrained(model, tmp_path / "lm", layout="hf")
    tokenizer = json.loads((tmp_path / "lm" / "tokenizer_config.json").read_text())
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert tokenizer["auto_map"]["AutoTokenizer"][0] == config["auto_map"]["AutoModel"].split("--")[0] + \
        "--tokenization_hyena.HyenaDNATokenizer"
    assert tokenizer["padding_side"] == "left" and tokenizer["characters"] == list("ACGTN")
    assert tokenizer["model_max_length"] == model.cfg.l_max and tokenizer["eos_token"] == "[SEP]"
    assert {int(i): t["content"] for i, t in tokenizer["added_tokens_decoder"].items()} == \
        {i: t for t, i in th.SPECIAL_TOKENS.items()}
    assert json.loads((tmp_path / "lm" / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"
    # a hub classifier, fine-tuned a step from the command line, read back by predict and by export
    write_table(tmp_path / "train.csv", labelled(64, 0))
    result = run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--max_steps", 2,
                        "--layout", "hf", "--out", tmp_path / "clf")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["HyenaDNAForSequenceClassification"] and config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["problem_type"] == "single_label_classification" and config["tinyhyena"]["truncate"] == "right"
    assert (tmp_path / "clf" / "tokenizer_config.json").is_file() and not (tmp_path / "clf" / "model.pt").exists()
    assert_one_line_error(run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--resume",
                                     "--out", tmp_path / "clf"), "written with --layout hf")
    clf = classifier.load_classifier(tmp_path / "clf")
    assert clf.pool == "last" and clf.end_token == th.SPECIAL_TOKENS["[SEP]"] and not clf.head.bias.any()
    seqs = [seq for seq, _ in labelled(5, 1)]
    (tmp_path / "in.txt").write_text("\n".join(seqs) + "\n")
    result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / "clf", "--input", tmp_path / "in.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.array([[float(x) for x in line.split("\t")[2:]] for line in result.stdout.splitlines()[1:]])
    expected = classifier.readout("classify", finetune.predict_logits(clf, [th.tokenize(s) for s in seqs], 8,
                                                                      torch.device("cpu"))).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    export.export(clf, str(tmp_path / "clf.onnx"), "cpu")
    assert export.check_against_torch(clf, str(tmp_path / "clf.onnx"), "probabilities", [5, 40]) <= 1e-4
    # the same folder written in-process from a classifier built the hub's way, and refusals
    clf.head.weight.data.normal_()
    classifier.save_classifier(clf, tmp_path / "again", clf.class_names, {}, layout="hf")
    again = classifier.load_classifier(tmp_path / "again")
    ids = classifier.pad_left([th.tokenize(s) for s in seqs])
    with torch.no_grad():
        assert torch.allclose(again(ids), clf(ids), atol=1e-5)
    plain = classifier.SequenceClassifier(model, 2)  # mean pooling, a bias
    with pytest.raises(th.UserError, match="cannot hold a pool other than the last token's"):
        classifier.save_classifier(plain, tmp_path / "plain", ["a", "b"], {}, layout="hf")


def bad_invocations(tmp):
    """(script and arguments, what the one line must name) for every script."""
    (tmp / "user_folder").mkdir()
    (tmp / "user_folder" / "thesis.txt").write_text("precious")
    (tmp / "a.fa").write_text(">r\nACGT\n")
    (tmp / "plain.txt").write_text("not a folder")
    (tmp / "t.csv").write_text("sequence,label\nACGT,a\nACGA,b\n")
    (tmp / "outside.bed").write_text("r\t0\t4\nr\t2\t9\tpeak\n")
    fix = str(FIXTURE)
    cases = [
        # train.py
        (["train.py", "--device", "cuda:99", "--fasta", tmp / "a.fa"], ["--device cuda:99"]),
        (["train.py", "--fasta", tmp / "a.fa", "--out", tmp / "plain.txt" / "run"], ["--out", "plain.txt/run"]),
        (["train.py", "--seq_len", "0"], ["--seq_len", "positive integer", "'0'"]),
        (["train.py", "--lr", "-1"], ["--lr", "positive number"]),
        (["train.py", "--fasta", tmp / "missing.fa"], ["--fasta", "missing.fa: file not found"]),
        (["train.py", "--preset", "huge"], ["--preset", "huge"]),
        (["train.py", "--resume", "--overwrite"], ["--resume and --overwrite"]),
        # data.py
        (["data.py", "prepare", tmp / "missing.fa"], ["missing.fa: file not found"]),
        (["data.py", "prepare", tmp / "a.fa", "--out", tmp / "user_folder"], ["user_folder"]),
        (["data.py", "unpack"], ["invalid choice: 'unpack'"]),
        (["data.py", "hg38", "--dir", tmp / "user_folder"], ["user_folder"]),
        # export.py
        (["export.py", "--checkpoint", fix, "--max_len", "0"], ["--max_len", "positive integer"]),
        (["export.py", "--checkpoint", fix, "--out", "/nonexistent/dir/x.onnx"], ["--out", "/nonexistent/dir/x.onnx", "does not exist"]),
        (["export.py", "--checkpoint", fix, "--max_len", "5000", "--out", tmp / "x.onnx"], ["--max_len 5000", "l_max"]),
        (["export.py", "--checkpoint", fix, "--target", "tpu"], ["--target", "'tpu'"]),
        (["export.py", "--checkpoint", tmp / "nowhere"], ["--checkpoint", "nowhere: not found"]),
        # bench.py
        (["bench.py", "--batch", "0"], ["--batch", "positive integer"]),
        (["bench.py", "--lengths", "1024,x"], ["--lengths", "1024,x"]),
        (["bench.py", "--published", tmp / "missing.py"], ["--published", "missing.py: file not found"]),
        (["bench.py", "--timeout", "-5"], ["--timeout", "positive number"]),
        # finetune.py
        (["finetune.py", "fit", "--preset", "tiny", "--seq_len", "10", "--data", tmp / "t.csv", "--val_fraction", "1.5"],
         ["--val_fraction", "between 0 and 1"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "missing.csv"], ["--data", "missing.csv: not found"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--device", "cuda:99",
          "--out", tmp / "ft"], ["--device cuda:99"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--out", tmp / "plain.txt" / "ft"],
         ["--out", "plain.txt/ft"]),
        (["finetune.py", "predict", "--checkpoint", fix, "--input", tmp / "a.fa"], ["not a fine-tuned classifier"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "e.npy",
          "--batch_size", "0"], ["--batch_size", "positive integer"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "no" / "e.npy"],
         ["--out", "no/e.npy", "does not exist"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--layout", "hf", "--soft_prompt", "4"],
         ["--layout hf", "drop --soft_prompt"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--layout", "hub"], ["--layout", "'hub'"]),
        # score.py
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "missing.fa"], ["--input", "missing.fa"]),
        (["score.py", "variants", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--vcf", tmp / "a.fa", "--window", "0"],
         ["--window", "positive integer"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--device", "cuda:99"],
         ["--device cuda:99"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "no" / "s.tsv"],
         ["--out", "no/s.tsv", "does not exist"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--fasta", tmp / "a.fa", "--bed",
          tmp / "outside.bed"], ["--input and --fasta/--bed exclude each other"]),
        (["score.py", "sequences", "--checkpoint", fix], ["give --input FILE, or --fasta GENOME with --bed REGIONS"]),
        (["score.py", "sequences", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--bed", tmp / "outside.bed"],
         ["outside.bed:2: interval r:2-9 lies outside the chromosome (length 4)"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--bed", tmp / "outside.bed", "--out", tmp / "e.npy"],
         ["--fasta and --bed go together"]),
        (["finetune.py", "predict", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--bed", tmp / "missing.bed"],
         ["--bed", "missing.bed: file not found"]),
        # generate.py
        (["generate.py", "--checkpoint", fix, "--prompt", "ACGT", "--length", "5", "--temperature", "-1"],
         ["--temperature", "a number >= 0"]),
        (["generate.py", "--checkpoint", fix, "--prompt_fasta", tmp / "missing.fa", "--length", "5"],
         ["--prompt_fasta", "missing.fa: file not found"]),
        (["generate.py", "--checkpoint", fix, "--prompt", "ACGT", "--length", "5", "--out", tmp / "no" / "g.fa"],
         ["--out", "no/g.fa", "does not exist"]),
    ]
    if sys.platform.startswith("linux"):
        cases.append((["train.py", "--fasta", tmp / "a.fa", "--out", "/proc/x"], ["--out /proc/x"]))
    return cases


def test_every_script_reports_a_bad_command_line_in_one_line(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    cases = bad_invocations(tmp_path)
    with ThreadPoolExecutor(4) as pool:  # each run is mostly importing torch
        results = list(pool.map(lambda case: run_script(ROOT / case[0][0], *case[0][1:], cwd=tmp_path), cases))
    for (args, needles), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        shown = " ".join(map(str, args))
        assert result.returncode == 1, (shown, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len(lines) == 1, (shown, result.stderr[-2000:])
        assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), (shown, lines[0])
    assert (tmp_path / "user_folder" / "thesis.txt").read_text() == "precious"
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob("**/*.tmp*"))


def test_bugs_keep_their_traceback():
    """Only UserError becomes one line: anything else is a bug, and the user should see where it is."""
    def buggy(argv):
        raise KeyError("a bug")

    def wrong_flag(argv):
        raise th.UserError("--x 3: bad")
    with pytest.raises(KeyError):
        cli.run_command(buggy)
    assert cli.run_command(wrong_flag) == 1
