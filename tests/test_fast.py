"""fast.py: each fast path held to the plain path (values and gradients), the memory budgets, the kept
spectra, and the process-wide CPU settings (which importing never makes)."""

import os
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import fast
import tinyhyena as th
from helpers import configs_and_lengths, direct_causal_conv, random_model, rel_err, run_process


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


@given(configs_and_lengths(), st.booleans(), st.data())
def test_fast_path_equals_plain_path_with_gradients(case, checkpointing, data):
    """HyenaDNA(cfg) and HyenaDNA(cfg, fast=False) with the same weights: the same outputs, and the same
    gradients of every parameter and of the input, with several channel groups, with gradient checkpointing
    (the fast path then recomputes each group, and the MLP in slices of positions, alone), and without a
    gradient (the kept spectra, read twice; the streams in pieces of `positions` positions, or each group's
    from its projection; the MLP into the stream in place, in pieces of `rows` positions)."""
    cfg, L, B, seed, group = case
    fast_model, plain = fast_and_plain(cfg, seed, group)
    chunk = data.draw(st.one_of(st.just(1 << 16), st.integers(1, max(1, L))))  # MLP slices of `chunk` positions
    rows = data.draw(st.one_of(st.just(2048), st.integers(1, B * L + 1)))  # pieces of rows, batch rows included
    positions = data.draw(st.one_of(st.just(2048), st.none(), st.integers(1, B * L + 1)))  # sequences a piece too
    for block in fast_model.blocks:
        block.fast.mlp_chunk, block.fast.mlp_rows = chunk, rows
        block.mixer.fast.stream_positions = positions
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


def test_memory_budgets_split_long_sequences_into_groups_and_slices(monkeypatch):
    """Where a sequence is long for the memory budgets, the fast path runs the operator in several channel groups
    (group_size, from group_budget), the MLP in slices of positions (mlp_chunk) and the filter's MLP in pieces of
    positions (FILTER_ROWS on the CPU, FILTER_PIECE elsewhere): in place without a gradient, recomputed one
    group, slice and piece at a time under checkpointing. The same values and gradients as the
    plain path. (The budgets are shrunk here so that 3,000 positions are "long".)"""
    cfg = th.HyenaConfig(d_model=40, n_layer=2, d_inner=16, filter_order=4, l_max=3_002)
    model, plain = fast_and_plain(cfg, 0, None)
    monkeypatch.setattr(fast, "FILTER_PIECE", 1_100)  # 3 pieces, the last short
    monkeypatch.setattr(fast, "FILTER_ROWS", 1_100)
    for block in model.blocks:
        block.mixer.fast.group_budget = 3 * 3_000  # one channel's projections: the 16-channel floor decides
        block.fast.mlp_chunk = 700  # 5 slices, the last short
        block.fast.mlp_rows = 700  # the same without a gradient
    assert model.blocks[0].mixer.fast.group_size(1, 3_000, 40, 2) == 14  # 3 equal groups of at most 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3_000, 40, generator=g, dtype=torch.float64)
    grad_out = torch.randn(1, 3_000, 40, generator=g, dtype=torch.float64)
    for checkpointing in (True, False):
        model.gradient_checkpointing = plain.gradient_checkpointing = checkpointing
        out, grads = outputs_and_gradients(model, x, grad_out)
        plain_out, plain_grads = outputs_and_gradients(plain, x, grad_out)
        assert rel_err(out, plain_out) <= 1e-10
        for name, grad in plain_grads.items():
            assert rel_err(grads[name], grad) <= 1e-8, (name, checkpointing)
    with torch.no_grad():
        assert rel_err(model.hidden_states_from_embeddings(x), plain_out) <= 1e-10


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
    """GatedCausalConv's own backward, for every subset of inputs that need a gradient: its branches compute
    the gradients of (v, x) and of (k, bias) apart."""
    v, x = torch.randn(2, 2, 3, L, dtype=torch.float64)
    k, bias = torch.randn(3, L, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for wanted in ((True, True, True, True), (True, True, False, False), (False, False, True, True),
                   (False, True, False, True), (True, False, True, False)):
        inputs = [t.clone().requires_grad_(w) for t, w in zip((v, x, k, bias), wanted)]
        assert torch.autograd.gradcheck(fast.GatedCausalConv.apply, inputs), wanted
    # without a gradient the filter may come as its spectrum, the skip term added to its tap at lag 0 (the kept
    # spectra; parallel.py's channel steps)
    with torch.no_grad():
        with_skip = torch.cat([k[:, :1] + bias[:, None], k[:, 1:]], dim=1)
        spectrum = torch.fft.rfft(with_skip, n=fast.fft_size(2 * L - 1))
        torch.testing.assert_close(fast.gated_causal_conv(v, x, spectrum, bias.neg()),  # (bias not read)
                                   fast.gated_causal_conv(v, x, k, bias))


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 60), st.integers(1, 5), st.integers(0, 2**31 - 1),
       st.one_of(st.just(fast.SHORT_CONV_PIECE), st.integers(1, 400)))
def test_short_conv_equals_conv1d_with_gradients(B, C, L, K, seed, piece):
    """The short convolution, forward and backward a piece of `piece` floats of channels at a time (one
    channel, several, or all), is conv1d's with zeros before position 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, L, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, K, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    default, fast.SHORT_CONV_PIECE = fast.SHORT_CONV_PIECE, piece
    try:
        ours = fast.causal_short_conv(z, weight, bias)
        grad_out = torch.randn(ours.shape, generator=g, dtype=torch.float64)  # a different weight on every output
        grads = torch.autograd.grad(ours, (z, weight, bias), grad_out)
    finally:
        fast.SHORT_CONV_PIECE = default
    left_padded = torch.nn.functional.pad(z, (K - 1, 0))  # causal: out[t] sees z[t-K+1 .. t]
    reference = torch.nn.functional.conv1d(left_padded, weight[:, None, :], bias, groups=C)
    reference_grads = torch.autograd.grad(reference, (z, weight, bias), grad_out)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    for mine, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1),
       st.integers(1, 200))
def test_short_conv_split_into_parts_is_the_whole_split(B, parts, size, L, seed, piece):
    """causal_short_conv(z, weight, bias, size) is the convolution's output split along channels into parts of
    `size`, and its gradients, from each part's own gradient, are those of the whole (pieces of channels that
    end inside a part, at its end, or take one channel)."""
    g = torch.Generator().manual_seed(seed)
    C = parts * size
    z = torch.randn(B, C, L, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    default, fast.SHORT_CONV_PIECE = fast.SHORT_CONV_PIECE, piece
    try:
        split = fast.causal_short_conv(z, weight, bias, size)
        grads = torch.autograd.grad(split, (z, weight, bias), grad_out.split(size, dim=1))
    finally:
        fast.SHORT_CONV_PIECE = default
    whole = fast.causal_short_conv(z, weight, bias)
    assert len(split) == parts and all(torch.equal(a, b) for a, b in zip(split, whole.split(size, dim=1)))
    for mine, theirs in zip(grads, torch.autograd.grad(whole, (z, weight, bias), grad_out)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 50), st.integers(1, 5), st.integers(0, 2**31 - 1))
@example(2, 2, 2, 4, 0).via("a lag past the sequence")
@example(1, 2, 2, 4, 0).via("a lag past the sequence")
@example(2, 17, 2, 4, 0).via("a lag past the sequence")
def test_short_conv_lagged_sums_equal_the_shifted_products_summed(B, C, L, K, seed):
    """CausalShortConv.lagged_sums (the weight's gradient: for each lag j the sum over batch and positions of
    g[t] z[t - j], in column K-1-j) whatever its way: the products summed at batch 1, the diagonals of the
    batched products for a few channels, dot products for many; lags past the sequence sum to zero."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, B, C, L, generator=g, dtype=torch.float64)
    expected = torch.stack([(a[..., j:] * b[..., :max(L - j, 0)]).sum((0, 2)) for j in reversed(range(K))], dim=1)
    torch.testing.assert_close(fast.CausalShortConv.lagged_sums(a, b, K), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L, K", [(1, 1), (1, 3), (2, 3), (7, 3), (9, 4)])
def test_short_conv_gradcheck(L, K):
    z, weight, bias = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 3, L), (3, K), (3,)))
    assert torch.autograd.gradcheck(fast.causal_short_conv, (z, weight, bias))


@given(st.integers(1, 3), st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 40),
       st.integers(0, 2**31 - 1), st.integers(1, 90))
def test_grouped_projection_equals_one_linear_layer_with_gradients(B, d, sizes, L, seed, positions):
    """GroupedProjection's groups are the rows of one linear layer, transposed to (B, rows, L), made in one
    product a group or in pieces of `positions` positions for all groups (several batch items a piece where L is
    shorter), and its own
    backward, in one product a group or in the same pieces, gives autograd's gradients, whatever the gradients
    of the groups."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(sum(sizes), generator=g, dtype=torch.float64, requires_grad=True)
    ours = fast.GroupedProjection.apply(u, weight, bias, sizes)
    reference = torch.nn.functional.linear(u, weight, bias).transpose(1, 2).split(sizes, dim=1)
    grads_out = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in reference]
    in_pieces = fast.GroupedProjection.project(u.detach(), weight.detach(), bias.detach(), sizes, positions)
    whole = fast.GroupedProjection.project(u.detach(), weight.detach(), bias.detach(), sizes)  # (off the CPU)
    for mine, pieces, one_product, theirs in zip(ours, in_pieces, whole, reference):
        for made in (mine, pieces, one_product):
            torch.testing.assert_close(made, theirs, rtol=1e-12, atol=1e-12)
    theirs = torch.autograd.grad(reference, (u, weight, bias), grads_out)
    pieces = fast.GroupedProjection.backward_in_pieces(u.detach(), weight.detach(), grads_out, sizes, positions)
    for mine, in_pieces, exact in zip(torch.autograd.grad(ours, (u, weight, bias), grads_out), pieces, theirs):
        torch.testing.assert_close(mine, exact, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(in_pieces, exact, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: fast.GroupedProjection.apply(*a, sizes), (u, weight, bias))


@given(st.integers(1, 10), st.integers(1, 5), st.integers(1, 200), st.integers(1, 5), st.integers(1, 9), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_summed_product_equals_the_batched_product_summed(B, r, L, d, pieces, strided, seed):
    """A weight gradient's product, split into pieces of positions where the batch is small, is the batched
    product summed over the batch, whatever the pieces (one, or more than L / 16) and the input's strides."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, r, 2 * L if strided else L, generator=g, dtype=torch.float64)[..., ::2 if strided else 1]
    b = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fast.summed_product(a, b, pieces), torch.bmm(a, b).sum(0), rtol=1e-12, atol=1e-12)

@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_channels_first_linear_equals_linear_on_the_transpose_with_a_channels_first_gradient(B, d_in, d_out, L, seed):
    """out_proj's Function is F.linear on y transposed, and hands y its gradient channels first, contiguous."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, d_in, L, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d_out, generator=g, dtype=torch.float64, requires_grad=True)
    ours, theirs = fast.ChannelsFirstLinear.apply(y, weight, bias), F.linear(y.transpose(1, 2), weight, bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(theirs.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(ours, (y, weight, bias), grad_out)
    for m, t in zip(mine, torch.autograd.grad(theirs, (y, weight, bias), grad_out)):
        torch.testing.assert_close(m, t, rtol=1e-10, atol=1e-10)
    assert mine[0].is_contiguous()
    assert torch.autograd.gradcheck(fast.ChannelsFirstLinear.apply, (y, weight, bias))

def test_in_proj_runs_in_pieces_on_the_cpu_without_autocast():
    """GroupedProjection.piece_positions: pieces of PROJECTION_POSITIONS on the CPU, one product a group under
    autocast or off the CPU."""
    at = lambda B, L, device="cpu": torch.zeros(1, 1, 128, device=device).expand(B, L, 128)  # shapes only
    pieces = fast.GroupedProjection.piece_positions
    assert pieces(at(1, 1 << 20)) == pieces(at(32, 1024)) == pieces(at(1, 1)) == fast.PROJECTION_POSITIONS
    assert pieces(at(1, 1 << 20, "meta")) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pieces(at(1, 1 << 20)) is None


def test_in_proj_backward_runs_in_pieces_only_where_a_piece_is_within_one_sequence(monkeypatch):
    """GroupedProjection's backward walks the forward's pieces of positions where each lies within one sequence
    (L >= PROJECTION_POSITIONS); where a piece would hold several short sequences, each group's own products."""
    shapes, in_pieces = [], fast.GroupedProjection.backward_in_pieces
    monkeypatch.setattr(fast.GroupedProjection, "backward_in_pieces",
                        staticmethod(lambda u, *rest: shapes.append(tuple(u.shape)) or in_pieces(u, *rest)))
    monkeypatch.setattr(fast, "PROJECTION_POSITIONS", 8)
    for B, L in ((1, 8), (2, 20), (3, 4), (1, 7)):
        u = torch.randn(B, L, 4, requires_grad=True)
        weight, bias = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
        sum(group.sum() for group in fast.GroupedProjection.apply(u, weight, bias, [3, 3])).backward()
    assert shapes == [(1, 8, 4), (2, 20, 4)]


def test_streams_come_first_only_without_gradient_on_the_cpu_without_autocast():
    """FastHyena.streams_first: the streams of every channel in pieces of positions (gated_streams) only without
    a gradient, on the CPU, without autocast, and while stream_positions is set; else each group from its own
    projection on. Either way the same function (test_fast_path_equals_plain_path_with_gradients)."""
    path = fast.FastHyena(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=4, l_max=10))
    u = torch.randn(2, 5, 8)
    assert path.streams_first(u) is False  # with a gradient
    with torch.no_grad():
        assert path.streams_first(u) is True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert path.streams_first(u) is False
        assert path.streams_first(u.to("meta")) is False  # off the CPU
        path.stream_positions = None
        assert path.streams_first(u) is False


def test_freed_heap_memory_kept_only_when_the_user_set_no_malloc_variable(monkeypatch):
    """tune_cpu_memory calls mallopt on glibc (memory first or speed first), never over a variable the user set, and
    not when switched off."""
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
    fast.tune_cpu_memory(memory_first=True)  # every buffer of 1 MB or more mapped, and handed back when freed
    assert calls == [(-3, 1 << 20), (-1, 32 << 20)]
    calls.clear()
    monkeypatch.setenv("TINYHYENA_KEEP_FREED_MEMORY", "0")
    fast.tune_cpu_memory()
    assert calls == []
    monkeypatch.delenv("TINYHYENA_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    fast.tune_cpu_memory()
    assert calls == []


@pytest.mark.slow
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
training = sorted({"finetune", "train", "trainer", "data"} & set(sys.modules))
import torch
torch.ones(1 << 20)  # a first tensor: anything deferred to it happens now
import base, bench, checkpoints, classifier, cli, data, decoding, fast, finetune, generate, onnx_graph, parallel, score
import tasks, train, trainer
changed = sorted(set(os.environ.items()) ^ set(before.items()))
print(training, changed, calls)
"""
    result = run_process("-c", code, env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "[]", "[]"], result.stdout


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64),
       st.sampled_from([torch.float32, torch.float64]))
@example([-5.5, -3.0, -0.5, 0.0, 1e-30, 0.7, 3.0, 9.0], torch.float32)
def test_gelu_through_the_sigmoid_equals_torch_gelu(values, dtype):
    """fast.scaled_gelu (x * sigmoid(x + c x^3) at x = GELU_SCALE h) is GELU_SCALE * F.gelu(h, approximate="tanh")
    (h * (1 + tanh z) / 2) to the dtype's rounding, both held to torch's GELU in float64, written into a buffer,
    its input left as it is."""
    h = torch.tensor(values, dtype=dtype)
    x = h * fast.GELU_SCALE  # (as fc1 with its weights scaled makes it: rounded once more)
    exact = F.gelu(h.double(), approximate="tanh")
    got = fast.scaled_gelu(x, torch.empty_like(x)) / fast.GELU_SCALE
    assert torch.equal(x, torch.tensor(values, dtype=dtype) * fast.GELU_SCALE)
    eps = torch.finfo(dtype).eps
    bound = 8 * eps * h.double().abs().clamp(min=1)  # torch's own float32 GELU is 3.6 eps off at |h| ~ 3
    assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()
    assert ((F.gelu(h, approximate="tanh").double() - exact).abs() <= bound).all()  # the bound is fair to torch


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64),
       st.sampled_from([torch.float32, torch.float64]))
@example([-5.5, -3.0, -0.5, 0.0, 1e-30, 0.7, 3.0, 9.0], torch.float32)
@example([4.5, 5.0], torch.float32)  # the gate rounds near 1 (hypothesis found h = 5 past a flat bound)
def test_gelu_slope_equals_autograds_derivative(values, dtype):
    """fast.scaled_gelu_with_slope's slope (s + t s (1 - s), t = x + 3 c x^3 at x = GELU_SCALE h, from GELU's
    gate s) times a gradient is autograd's gradient through F.gelu(h, approximate="tanh") in float64, to the
    dtype's rounding: a few eps, and the gate's own rounding (up to eps, near s = 1) carried by |t| into the
    term t s (1 - s), never by more than that term (13 eps at h = 5 in float32, where ATen's is 4); and the
    GELU it writes beside the slope is scaled_gelu's, to the bit."""
    h = torch.tensor(values, dtype=dtype)
    x = h * fast.GELU_SCALE
    gelu, slope, gate = torch.empty(3, *x.shape, dtype=dtype)
    fast.scaled_gelu_with_slope(x.clone(), gelu, slope, gate)
    assert torch.equal(gelu, fast.scaled_gelu(x, torch.empty_like(x)))
    grad = torch.linspace(-2, 3, len(values), dtype=dtype)
    h64 = h.double().clone().requires_grad_()
    exact, = torch.autograd.grad(F.gelu(h64, approximate="tanh"), h64, grad.double())
    got = grad * slope
    eps = torch.finfo(dtype).eps
    h64 = h64.detach()
    z = fast.GELU_SCALE * (h64 + 0.044715 * h64 ** 3)
    s_times_1_minus_s = torch.sigmoid(z) * torch.sigmoid(-z)  # (1 - s as sigmoid(-z): exact where s rounds to 1)
    carried = fast.GELU_SCALE * (h64 + 3 * 0.044715 * h64 ** 3).abs() * s_times_1_minus_s.clamp(max=eps)
    bound = (8 * eps + 2 * carried) * (1 + grad.double().abs())
    assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()


@given(st.integers(1, 60), st.integers(1, 70), st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_mlp_in_pieces_equals_the_plain_mlp_with_gradients(N, rows, d, d_inner, seed):
    """MLPInPieces, the MLP `rows` positions at a time with its own backward, is the plain MLP: the same
    outputs and the same gradients of its input and of every parameter, whatever the pieces (one position,
    several with the last short, or one piece of all)."""
    torch.manual_seed(seed)
    mlp = th.MLP(th.HyenaConfig(d_model=d, d_inner=d_inner)).double()
    x = torch.randn(1, N, d, dtype=torch.float64, requires_grad=True)
    ours, theirs = fast.mlp_in_pieces(mlp, x, rows), mlp(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, [x, *mlp.parameters()], grad_out),
                    torch.autograd.grad(theirs, [x, *mlp.parameters()], grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    w = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    assert torch.autograd.gradcheck(lambda x, *w: fast.MLPInPieces.apply(x, *w, rows), (x[0, :7], *w))


@given(st.integers(1, 300), st.integers(1, 400), st.integers(2, 3), st.integers(1, 9), st.booleans(), st.booleans(),
       st.booleans(), st.integers(0, 2**31 - 1))
@example(L=300, rows=128, order=3, filter_order=4, keep=True, some_rows=False, general=False, seed=0)  # 3 pieces
@example(L=300, rows=128, order=3, filter_order=4, keep=False, some_rows=False, general=True, seed=0)
def test_filters_in_pieces_equal_the_plain_filter_with_gradients(L, rows, order, filter_order, keep, some_rows,
                                                                 general, seed):
    """fast.filters, the implicit filter `rows` positions at a time (FilterInPieces with its own backward on the
    CPU; filters_through_autograd, the path off it, with `general`), is the plain ImplicitFilter: the same
    filters and the same gradient of every parameter (the Sin's frequency, shared by its three places,
    included), whatever the pieces, whether backward keeps their activations or makes them again, and for a
    subset of the filters (FastHyena.cached_spectrum's and context parallelism's rows)."""
    torch.manual_seed(seed)
    cfg = th.HyenaConfig(d_model=5, order=order, filter_order=filter_order, l_max=300)
    filt = th.ImplicitFilter(cfg).double()
    n_filters = (order - 1) * 5
    chosen = torch.randperm(n_filters)[:max(1, n_filters // 2)] if some_rows else None

    def filters():
        if not general:
            return fast.filters(filt, L, chosen, checkpoint=not keep)
        W, deltas = (filt.mlp[-1].weight, filt.deltas) if chosen is None else (filt.mlp[-1].weight[chosen],
                                                                                 filt.deltas[chosen])
        return fast.filters_through_autograd(filt, L, W, -deltas.abs(), checkpoint=not keep)

    theirs = filt(L) if chosen is None else filt(L)[chosen]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast, "FILTER_ROWS", rows)
        patch.setattr(fast, "FILTER_PIECE", rows)
        ours = filters()
        with torch.no_grad():
            torch.testing.assert_close(filters(), theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grad_h = torch.randn_like(theirs)
    names, params = zip(*[(n, p) for n, p in filt.named_parameters() if p is not filt.bias])  # (the skip term's)
    ours, theirs = torch.autograd.grad(ours, params, grad_h), torch.autograd.grad(theirs, params, grad_h)
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


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


@given(configs_and_lengths(max_len=300), st.integers(1, 70))
@example((th.HyenaConfig(d_model=6, n_layer=2, d_inner=8, filter_order=4, short_filter_order=4, l_max=12), 1, 2, 3,
          None), 8)  # a one-base prompt: the short convolution's window starts with inputs before the prompt
def test_fast_step_equals_the_plain_step_at_every_position(case, steps):
    """fast.FastStep gives model.step's logits at every position, to 1e-10 in float64, from the same prefilled
    state (orders 2-4, short convolutions of 1-4 taps: every rotation of the window, 1-2 layers, batches of 1-3;
    prompts shorter than the window, which starts with the zeros before the prompt), with either long-convolution
    state."""
    import decoding
    cfg, P, B, seed, _ = case
    P = min(P, cfg.l_max - 1)
    steps = min(steps, cfg.l_max - P)
    model = random_model(cfg, seed).double()
    ids = torch.randint(0, cfg.vocab_size, (B, P + steps), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for long_conv in (decoding.OnlineConv, th.ConvHistory):
            plain_state, fast_state = (model.decoding_state(P + steps, long_conv) for _ in range(2))
            model.prefill(ids[:, :P], plain_state), model.prefill(ids[:, :P], fast_state)
            step = fast.FastStep(model, fast_state)
            for t in range(P, P + steps):
                expected = model.step(ids[:, t], plain_state)
                assert (step(ids[:, t]) - expected).abs().max() <= 1e-10 * max(1.0, expected.abs().max()), (long_conv, t)


def test_mlp_updates_the_stream_in_place_only_without_gradient_dropout_or_autocast():
    """FastBlock's MLP writes into the stream in place (fast.mlp_into_stream) only where nothing else needs the
    stream's old values or the branch's own tensor: no gradient, no active dropout, no autocast (whose bf16
    MLP the float32 stream must not be written by in place), a contiguous stream in the weights' dtype."""
    block = th.Block(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=4, l_max=10, resid_dropout=0.1))
    x = torch.randn(2, 5, 8)
    in_place = lambda: fast.FastBlock.mlp_in_place(block, x)
    with torch.no_grad():
        assert in_place() is False  # a training block with dropout
        block.eval()
        assert in_place() is True
        assert fast.FastBlock.mlp_in_place(block, x.transpose(0, 1)) is False
        assert fast.FastBlock.mlp_in_place(block, x.double()) is False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert in_place() is False
    assert in_place() is False  # with a gradient
