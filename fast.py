"""
The fast paths of tinyhyena's model: the same function as the plain code in tinyhyena.py, computed in less
time and memory. `tinyhyena.HyenaDNA(cfg)` takes them by default; `HyenaDNA(cfg, fast=False)` builds the same
model (same parameters, same state_dict) on the plain path alone. tests/test_fast.py holds the two paths to each
other (outputs, and the gradients of every parameter and input); BENCHMARKS.md has the measurements behind
each trick below.

In the order a forward pass meets them:
- `FastHyena`, HyenaOperator's fast path. Everything between in_proj and out_proj acts on each channel alone,
  so it runs a group of channels at a time: the big temporaries (the projected streams, the FFT buffers) are
  one group's worth, and under gradient checkpointing each group is recomputed alone in backward. Without a
  gradient the filters' spectra are kept between calls of one length (`cached_spectrum`), and on the CPU the
  streams come first, a piece of positions at a time from the block's LayerNorm to the first gate
  (`gated_streams`), then each group's long convolutions.
- Autograd Functions with hand-written backward passes, which keep fewer and smaller tensors than autograd
  would: `FilterInPieces` (the implicit filter on the CPU, a cache-sized piece of positions at a time from the
  positional features to the windowed filters), `GroupedProjection` (in_proj, into each group's layout; on
  the CPU a piece of positions at a time, one product for every group, forward and backward),
  `CausalShortConv` (the short convolution as shifted multiply-adds, a cache-sized piece of channels at a
  time, its output split into the operator's streams and each stream's gradient read where it is),
  `GatedCausalConv` (gate, FFT convolution and skip term in one, the filter's spectrum kept for backward),
  `ChannelsFirstLinear` (out_proj, its input's gradient made channels first, the layout the operator's
  backward reads).
- `FastBlock`: on the CPU the MLP a cache-sized piece of positions at a time, from fc1 through GELU to fc2
  (`MLPInPieces`, with its own backward over the same pieces; without a gradient `mlp_into_stream`, which
  writes it into the stream in place, where the residual was added in place too), its GELU through the sigmoid
  (`scaled_gelu`, fc1 scaled to save a pass), and with a gradient GELU's slope made beside it
  (`scaled_gelu_with_slope`); slices of positions at long L.
- `tune_cpu_memory`: process-wide settings for CPU memory (huge pages, glibc keeping freed memory), which the
  scripts call first thing in main and a library user may call; importing this file changes nothing.

Why pieces of 15 MB (HEAP_BUFFER_FLOATS): torch's CPU tensors come from glibc's malloc, which serves a buffer
under its mmap threshold (32 MB once tune_cpu_memory has run) from its heap and hands a freed one to the next
request, but maps a bigger one fresh each time, and each fresh page costs a fault when first written. On the
2-core CPU machine that was most of a training step's time, so the largest tensors are made in pieces that
the heap serves. With huge pages torch asks for 2 MB-aligned buffers, so the pieces stay well under 32 MB.
"""

import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------
# Process-wide CPU memory settings.

def tune_cpu_memory(memory_first=False):
    """Make the process's CPU memory faster for tinyhyena's tensors; call it first thing, before any tensor is
    made. Two settings, each measured on the 2-core CPU machine (BENCHMARKS.md, "CPU memory"):
    - transparent huge pages for torch's large CPU buffers (THP_MEM_ALLOC_ENABLE=1, which torch reads at the
      first allocation, and which child processes inherit): fewer page faults for fresh buffers;
    - glibc's malloc keeps freed buffers of up to 32 MB on its heap and keeps up to 2 GB of free heap instead
      of handing it back (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD): a training step's buffers are no longer
      faulted in afresh each step.
    The cost is memory: the heap keeps what it has grown to, and with huge pages' 2 MB alignment it fragments.
    Where memory comes first (a run long enough to need activation checkpointing), call it again with
    memory_first=True, at any time: glibc then maps every buffer of 1 MB or more afresh and hands it back when
    it is freed, so that the process holds little more than its live tensors.
    A value the user set wins (THP_MEM_ALLOC_ENABLE, any MALLOC_* or GLIBC_TUNABLES variable), and
    TINYHYENA_KEEP_FREED_MEMORY=0 leaves glibc as it is. Linux with glibc only."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    user_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    if not sys.platform.startswith("linux") or user_set or os.environ.get("TINYHYENA_KEEP_FREED_MEMORY") == "0":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 1 << 20 if memory_first else 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 32 << 20 if memory_first else (1 << 31) - 1)


HEAP_BUFFER_FLOATS = (15 << 20) // 4  # 15 MB of float32: the largest piece a CPU buffer is made in


def checkpointed(enabled, fn, *args):
    """fn(*args), but when `enabled` (and a gradient is being taken) its intermediates are recomputed in
    backward instead of kept."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---------------------------------------------------------------------------------------------------------
# The long convolution.

def fft_size(n, radices=(2, 3, 5)):
    """Smallest n' >= n whose only prime factors are `radices`: FFT libraries are fastest at such sizes.
    (radices=(2,) gives powers of two, which ONNX Runtime's DFT needs to be exact.)"""
    best = 1 << max(0, (n - 1).bit_length())
    if radices == (2,):
        return best
    p3 = 1
    while p3 < best:  # enumerate 2^a 3^b 5^c below the power-of-two bound
        p35 = p3
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 5
        p3 *= 3
    return best


class GatedCausalConv(torch.autograd.Function):
    """One gate and long convolution of the Hyena recurrence, with its skip term, by FFT:
        a = v * x;   y[..., t] = sum_{s<=t} k[..., t-s] a[..., s]  +  bias * a[..., t]
    v, x: (B, C, L), k: (C, L), bias: (C,) -> y: (B, C, L). Without a gradient k may be given as its spectrum
    instead, with the skip term in it (bias is then not read): rfft(k', n) (C, n/2+1) complex, n =
    fft_size(2L-1), where k' is k with bias added to its tap at lag 0 (see FastHyena.cached_spectrum).

    The skip term is that tap: bias * a is the convolution of a with bias at lag 0, whose spectrum is bias at
    every frequency, so bias is added to the filter's spectrum (C, n/2+1), not to the output (B, C, L), and the
    product's spectrum carries it through both FFTs (a pass over the output fewer, forward and backward). The
    gate's product is written straight into the zero-padded buffer the FFT reads (rfft(u, n) would copy u into
    a fresh padded tensor). For backward it keeps v, x and the spectra of a (2x the size of v) and of k' (in
    place of k: backward would make it again); autograd's own rfft/irfft would also keep the product's
    spectrum, a and the FFT's padded output. The gradients are correlations, convolutions with the conjugate
    spectrum:
        grad_a = corr(grad_y, k'),   grad_v = grad_a * x,   grad_x = grad_a * v,
        grad_k = sum_b corr(grad_y, a),   grad_bias = sum_{b,t} grad_y * a = grad_k at lag 0."""

    @staticmethod
    def forward(ctx, v, x, k, bias):
        kept = [] if any(ctx.needs_input_grad) else None  # (for backward: the spectra of a and of k')
        y = GatedCausalConv.compute(v, x, k, bias, kept=kept)
        ctx.save_for_backward(v, x, *(kept or []))
        return y

    @staticmethod
    def compute(v, x, k, bias, buffers=None, kept=None):
        """The forward pass, without autograd; x None where v is the gate's product already (FastHyena's streams).
        With `buffers` (a Buffers) the FFT's padded input is one they hold, and the result is the FFT's own
        output (a view, (B, C, L) of (B, C, n)). With `kept` (a list) the spectra of a and of k' are appended
        to it, left as they are."""
        L = v.shape[-1]
        n = fft_size(2 * L - 1)
        padded = None if buffers is None else buffers("padded", (*v.shape[:-1], n), v.dtype, zeros=True)
        a = GatedCausalConv.padded_product(v, x, n, padded)  # (B, C, n): v * x, then zeros
        # (C, n/2+1): the filter's spectrum with the skip term, bias at lag 0, in it
        k_spectrum = k if k.is_complex() else torch.fft.rfft(k, n=n).add_(bias[:, None])
        spectrum = torch.fft.rfft(a)
        if kept is None:
            spectrum.mul_(k_spectrum)  # in place: no third spectrum-sized buffer
        else:
            kept += [spectrum, k_spectrum]
            spectrum = spectrum * k_spectrum
        y = torch.fft.irfft(spectrum, n=n)[..., :L]
        # with no buffers shared a fresh (B, C, L): a view would keep the whole (B, C, n) output for backward
        return y if buffers is not None else y.contiguous()

    @staticmethod
    def backward(ctx, grad_y):
        v, x, a_spectrum, k_spectrum = ctx.saved_tensors
        L = v.shape[-1]
        n = fft_size(2 * L - 1)
        grad_spectrum = torch.fft.rfft(GatedCausalConv.padded_product(grad_y, None, n))  # (rfft(grad_y, n) fills
        # all n positions with zeros before copying grad_y in)
        grad_v = grad_x = grad_k = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # (conj_physical: a lazy .conj() would be copied whole by the product that reads it anyway)
            grad_a = torch.fft.irfft(grad_spectrum * k_spectrum.conj_physical(), n=n)[..., :L]
            grad_v = grad_a * x if ctx.needs_input_grad[0] else None
            grad_x = grad_a * v if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # The correlation is irfft(sum_b grad_spectrum conj(a_spectrum)) (C, n), lags 0 .. n-1. Conjugated in
            # place, the gradient's spectrum times a's is its conjugate, whose irfft r is the correlation reversed:
            # lag t is r[-t mod n]. (a's spectrum conjugated would be a copy of the batch's spectra.)
            products = grad_spectrum.conj_physical_().mul_(a_spectrum)
            r = torch.fft.irfft(products[0] if len(products) == 1 else products.sum(0), n=n)  # (a sum is a copy)
            grad_bias = r[..., 0]  # (the skip term's gradient: the same sum as k's at lag 0)
            grad_k = torch.cat([r[..., :1], r[..., n - L + 1:].flip(-1)], dim=-1)  # (C, L)
        return grad_v, grad_x, grad_k, grad_bias

    @staticmethod
    def padded_product(v, x, n, padded=None):
        """v * x (B, C, L) followed by zeros up to length n: the FFT's input, with no copy; into `padded`
        (B, C, n) where given, whose positions from L on are zeros already. x None: v is the product already."""
        L = v.shape[-1]
        if padded is None:
            padded = v.new_empty(*v.shape[:-1], n)
            padded[..., L:].zero_()
        if x is None:
            padded[..., :L].copy_(v)
        else:
            torch.mul(v, x, out=padded[..., :L])
        return padded


class Buffers:
    """Buffers by name, handed out again to the next request of the same shape and dtype: without a gradient
    the channel groups of an operator share the temporaries each would otherwise make afresh (at long L each
    is past the heap's 32 MB, so a fresh one is mapped and faulted in every time)."""

    def __init__(self, device):
        self.device, self.kept = device, {}

    def __call__(self, name, shape, dtype, zeros=False):
        buffer = self.kept.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            self.kept[name] = None  # the old one freed before the new one is made
            buffer = self.kept[name] = (torch.zeros if zeros else torch.empty)(shape, dtype=dtype, device=self.device)
        return buffer


def gated_causal_conv(v, x, k, bias):
    """GatedCausalConv in float32 even under bf16 autocast: a sum of up to a million products needs float32's
    mantissa (and bf16 FFTs are unsupported on most backends)."""
    dtype = torch.promote_types(v.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
    k = k if k.is_complex() else k.to(dtype)  # a spectrum is float32's (or float64's) already
    with torch.autocast(v.device.type, enabled=False):
        return GatedCausalConv.apply(v.to(dtype), x.to(dtype), k, bias.to(dtype)).to(v.dtype)


class CausalShortConv(torch.autograd.Function):
    """Depthwise causal convolution over the last K positions. z: (B, C, L), weight: (C, K), bias: (C,).
    out[t] = bias + sum_j weight[K-1-j] * z[t-j], written as K shifted multiply-adds (faster on the CPU than
    the depthwise conv1d kernel at long L). Its own backward, the same multiply-adds read the other way:
    autograd through in-place updates of slices would clone the gradient at each one and expand each slice's
    gradient to full size. Each channel is its own convolution, so both run a piece of channels at a time
    (`channel_pieces`), and the K shifted passes over a piece read it from cache. Given `split`, the output
    comes split along channels into parts of that many (the operator's streams), and backward reads each
    part's gradient where it is: split by autograd, their gradients would first be concatenated."""

    @staticmethod
    def forward(ctx, z, weight, bias, split=None):
        ctx.save_for_backward(z, weight)
        ctx.split = split
        out = z.new_empty(z.shape, dtype=torch.promote_types(z.dtype, weight.dtype))
        for c in CausalShortConv.channel_pieces(z):
            CausalShortConv.compute(z[:, c], weight[c], bias[c], out=out[:, c])
        return out if split is None else out.split(split, dim=1)

    @staticmethod
    def compute(z, weight, bias, out=None):
        """The forward pass, without autograd; into `out` (z's shape) where given."""
        K = weight.shape[-1]
        out = torch.mul(z, weight[:, K - 1:], out=out)  # the tap on z[t]
        for j in range(1, K):  # (at L <= j both slices are empty)
            out[..., j:].addcmul_(z[..., :-j], weight[:, K - 1 - j, None])  # the tap on z[t - j]
        return out.add_(bias[:, None])  # (not addcmul's input: with a broadcast input it runs at a third of the speed)

    @staticmethod
    def backward(ctx, *grad_outs):  # one gradient, or one for each of the split's parts
        z, weight = ctx.saved_tensors
        K = weight.shape[-1]
        grad_z = z.new_empty(z.shape, dtype=torch.promote_types(grad_outs[0].dtype, weight.dtype))
        grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight[:, 0])
        taps = weight.t()[:, :, None]  # (K, C, 1): taps[K-1-j] weighs z[t - j]
        starts = range(0, z.shape[1], ctx.split or z.shape[1])
        for c, g in [(slice(s + c.start, s + c.stop), part[:, c])
                     for s, part in zip(starts, grad_outs) for c in CausalShortConv.channel_pieces(part)]:
            z_c, taps_c, grad_z_c = z[:, c].to(g.dtype), taps[:, c], grad_z[:, c]
            torch.mul(g, taps_c[K - 1], out=grad_z_c)
            for j in range(1, K):  # z[t - j] reached out[t]
                grad_z_c[..., :-j].addcmul_(g[..., j:], taps_c[K - 1 - j])
            grad_weight[c] = CausalShortConv.lagged_sums(g, z_c, K)
            grad_bias[c] = g.sum((0, 2))
        return grad_z.to(z.dtype), grad_weight, grad_bias, None

    @staticmethod
    def lagged_sums(g, z, K):
        """The weight's gradient, g and z (B, C, L) -> (C, K): column K-1-j the sum over b and t of g[b, c, t]
        z[b, c, t - j]. Over a batch of a piece of at most 16 channels, the diagonals of the C x C products
        g_i z_i^T summed, every lag's products in one tensor summed at once: MKL's batched product reads each
        operand once, where dot products along positions (vecdot) write the products and read them back to sum;
        the product's C-fold multiply-adds make it the slower past 16 channels (a piece of short sequences),
        where vecdot stays. ATen's sum over two dimensions at once ran at under half their speed; at batch 1
        the product summed was the faster (BENCHMARKS.md)."""
        B, C, L = g.shape
        if B > 1 and C <= 16:
            products = g.new_empty(K, B, C, C)
            for j in range(K):
                torch.bmm(g[..., j:], z[..., :max(L - j, 0)].transpose(1, 2), out=products[K - 1 - j])
            return products.sum(1).diagonal(dim1=1, dim2=2).t()
        sums = g.new_empty(C, K)
        for j in range(K):
            a, b = g[..., j:], z[..., :max(L - j, 0)]  # (lags past the sequence: both empty)
            sums[:, K - 1 - j] = (a * b).sum((0, 2)) if B == 1 else torch.linalg.vecdot(a, b).sum(0)
        return sums

    @staticmethod
    def channel_pieces(z):
        """Slices of z's channels (B, C, L), each piece of them about SHORT_CONV_PIECE floats (one channel at least)."""
        step = max(1, SHORT_CONV_PIECE // max(1, z.shape[0] * z.shape[2]))
        return [slice(c, min(c + step, z.shape[1])) for c in range(0, z.shape[1], step)]


SHORT_CONV_PIECE = 1 << 18  # floats a piece of CausalShortConv's channels: 1 MB, in cache (BENCHMARKS.md)


causal_short_conv = CausalShortConv.apply  # (z, weight, bias[, split]) -> out, or out.split(split, dim=1)


def summed_product(a, b, pieces=8):
    """sum over the batch of a_i @ b_i, a (B, r, L), b (B, L, d) -> (r, d): a weight's gradient, whose sum runs
    over every position. Where the batch is smaller than `pieces`, on the CPU, each item's positions are split
    into `pieces` products summed after: MKL runs one product with so long a sum and so small a result on one
    core (BENCHMARKS.md)."""
    B, r, L = a.shape
    if a.device.type != "cpu" or B >= pieces or L < 16 * pieces:
        return torch.bmm(a, b).sum(0)
    n = L - L % pieces  # positions in the split; the rest in a product of their own
    out = a.new_zeros(r, b.shape[-1])
    for a_i, b_i in zip(a, b):  # a_i (r, L), b_i (L, d)
        a_split, b_split = a_i[:, :n].reshape(r, pieces, -1).transpose(0, 1), b_i[:n].reshape(pieces, -1, b_i.shape[-1])
        out += torch.bmm(a_split, b_split).sum(0)  # (pieces, r, L/pieces) @ (pieces, L/pieces, d), summed
        if n < L:
            out.addmm_(a_i[:, n:], b_i[n:])
    return out


PROJECTION_POSITIONS = 2048  # positions a piece of in_proj on the CPU: all rows' 3 MB at d = 128, in cache


class GroupedProjection(torch.autograd.Function):
    """A linear layer whose output rows come in groups, each group its own tensor, laid out for the FFT:
    u (B, L, d), weight (R, d), bias (R,), sizes (rows per group, summing to R) -> per group a (B, rows, L)
    tensor, one matmul against u transposed (no copy) each, or on the CPU a piece of positions at a time for
    every group (piece_positions). Its own backward, because autograd's would first concatenate the groups'
    gradients into one (B, R, L) tensor (past the heap's size at batch 32 x 1,024); here each group's matmul
    adds into one gradient for u, in place, or on the CPU at long L the pieces of positions again
    (backward_in_pieces)."""

    @staticmethod
    def forward(ctx, u, weight, bias, sizes):
        ctx.save_for_backward(u, weight)
        ctx.sizes, ctx.positions = sizes, GroupedProjection.piece_positions(u)
        return tuple(GroupedProjection.project(u, weight, bias, sizes, ctx.positions))

    @staticmethod
    def backward(ctx, *grad_groups):
        u, weight = ctx.saved_tensors
        # pieces where project made them with every group's rows, each piece within one sequence; a thin
        # projection's own products were faster, and so were the groups' where a piece held several sequences
        if ctx.positions is not None and len(weight) >= u.shape[-1] and u.shape[1] >= ctx.positions:
            return *GroupedProjection.backward_in_pieces(u, weight, grad_groups, ctx.sizes, ctx.positions), None
        grad_u = None
        for grad, w in zip(grad_groups, weight.split(ctx.sizes)):  # grad (B, rows, L), w (rows, d)
            rows_to_u = (grad.transpose(1, 2), w.expand(u.shape[0], -1, -1))  # (B, L, rows) @ (B, rows, d)
            grad_u = torch.bmm(*rows_to_u) if grad_u is None else grad_u.baddbmm_(*rows_to_u)
        grad_weight = torch.cat([summed_product(grad, u) for grad in grad_groups])  # (R, d)
        grad_bias = torch.cat([grad.sum((0, 2)) for grad in grad_groups])
        return grad_u, grad_weight, grad_bias, None

    @staticmethod
    def backward_in_pieces(u, weight, grad_groups, sizes, positions):
        """The gradients of u, weight and bias a piece of positions at a time, as project makes the groups: the
        piece's gradients of every group copied into one (R, P) buffer in cache, then one product for u's
        gradient, (P, R) @ (R, d), and one for the weight's, (R, P) @ (P, d), added in place. Each group's own
        products were thinner, and read u and wrote u's gradient once a group (BENCHMARKS.md)."""
        B, L, d = u.shape
        P, k = min(L, positions), max(1, positions // L)  # positions and batch items a piece
        grad_u, grad_weight, grad_bias = torch.empty_like(u), torch.zeros_like(weight), weight.new_zeros(len(weight))
        buffer = u.new_empty(min(k, B) * len(weight) * P)
        for i in range(0, B, k):
            for start in range(0, L, P):
                u_piece = u[i:i + k, start:start + P]  # (k', P', d)
                shape = (len(u_piece), len(weight), u_piece.shape[1])
                grad = buffer[:math.prod(shape)].view(shape)  # (k', R, P')
                for rows, grad_group in zip(grad.split(sizes, dim=1), grad_groups):
                    rows.copy_(grad_group[i:i + k, :, start:start + P])
                torch.bmm(grad.transpose(1, 2), weight.expand(len(grad), -1, -1), out=grad_u[i:i + k, start:start + P])
                for grad_item, u_item in zip(grad, u_piece):
                    grad_weight.addmm_(grad_item, u_item)
                grad_bias += grad.sum((0, 2))
        return grad_u, grad_weight, grad_bias

    @staticmethod
    def project(u, weight, bias, sizes, positions=None):
        """The forward pass, without autograd: one batched product a group or, given `positions`, a piece of
        that many positions at a time (at most, and several batch items a piece where L is shorter), each piece
        one product for every row whose rows are copied into their groups' outputs while in cache: (R, d) @
        (d, P), rows copied as they are; or where there are fewer rows than channels (one group alone) the
        product position-major, (P, d) @ (d, R), copied transposed, at one and a half times the other's speed
        for so thin a product (BENCHMARKS.md)."""
        B, L, d = u.shape
        if positions is None:
            u_t = u.transpose(1, 2)  # (B, d, L)
            return [torch.baddbmm(b[:, None], w.expand(B, -1, -1), u_t)
                    for w, b in zip(weight.split(sizes), bias.split(sizes))]
        P, k = min(L, positions), max(1, positions // L)  # positions and batch items a piece
        buffer = u.new_empty(min(k, B) * len(weight) * P)
        groups = [u.new_empty(B, n, L) for n in sizes]
        for i in range(0, B, k):
            for start in range(0, L, P):
                u_piece = u[i:i + k, start:start + P]  # (k', P', d)
                W = weight.expand(len(u_piece), -1, -1)
                if len(weight) >= d:
                    shape = (len(u_piece), len(weight), u_piece.shape[1])  # (k', R, P')
                    piece = torch.baddbmm(bias[:, None], W, u_piece.transpose(1, 2),
                                          out=buffer[:math.prod(shape)].view(shape))
                else:
                    shape = (*u_piece.shape[:2], len(weight))  # (k', P', R)
                    piece = torch.baddbmm(bias, u_piece, W.transpose(1, 2),
                                          out=buffer[:math.prod(shape)].view(shape)).transpose(1, 2)
                for out, rows in zip(groups, piece.split(sizes, dim=1)):
                    out[i:i + k, :, start:start + P].copy_(rows)
        return groups

    @staticmethod
    def piece_positions(u):
        """The positions a piece for project: PROJECTION_POSITIONS on the CPU without autocast, else None (one
        product a group). On the CPU each group's own product is thinner, reads every position once a group,
        and runs at two thirds of the speed of the pieces (BENCHMARKS.md); off it the pieces would be many
        small kernel launches."""
        on_cpu = u.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        return PROJECTION_POSITIONS if on_cpu else None


class ChannelsFirstLinear(torch.autograd.Function):
    """A linear layer on a channels-first input: y (B, d_in, L), weight (d_out, d_in), bias (d_out,) ->
    F.linear(y.transpose(1, 2), weight, bias) (B, L, d_out), bias and all in one batched product. Its own backward,
    because autograd's would hand y's producers the transpose of a (B, L, d_in) product, and every gate, skip
    term and FFT of the operator's backward would then step across rows; here y's gradient is made channels
    first, (d_in, d_out) @ (d_out, L) a batch item."""

    @staticmethod
    def forward(ctx, y, weight, bias):
        ctx.save_for_backward(y, weight)
        return torch.baddbmm(bias, y.transpose(1, 2), weight.t().expand(len(y), -1, -1))

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, L, d_out)
        y, weight = ctx.saved_tensors
        grad_y = torch.bmm(weight.t().expand(len(y), -1, -1), grad_out.transpose(1, 2))  # (B, d_in, L)
        grad_weight = summed_product(y, grad_out).t()  # sum over b of (grad_out_b^T y_b^T)
        return grad_y, grad_weight, grad_out.sum((0, 1))


# ---------------------------------------------------------------------------------------------------------
# The Hyena operator's fast path.

def recurrence_into(out, x, v, gated_long_conv):
    """HyenaOperator.recurrence(x, v, gated_long_conv), its last gate's product written into `out`."""
    for o, x_i in enumerate(reversed(x[1:])):
        v = gated_long_conv(o, v, x_i)
    return torch.mul(v, x[0], out=out)


FILTER_PIECE = 1 << 15  # positions per piece of filters_through_autograd at long L (BENCHMARKS.md)
FILTER_ROWS = 4096  # positions per piece of FilterInPieces: activations of 1 MB at filter_order 64, in cache


def filters(filt, L, rows=None, checkpoint=False):
    """ImplicitFilter's h (n_filters, L), or only the filters `rows` (an index tensor), computed straight into
    that layout: the last layer as W @ features^T, so that each filter is a contiguous row for the FFT (padding
    the rows of the transposed product was a strided copy). With `checkpoint` the MLP's activations are made
    again in backward, a piece at a time, instead of kept. On the CPU without autocast FilterInPieces;
    elsewhere filters_through_autograd."""
    W = filt.mlp[-1].weight if rows is None else filt.mlp[-1].weight[rows]  # (n_filters, filter_order)
    decay = -(filt.deltas if rows is None else filt.deltas[rows]).abs()  # (n_filters,)
    if W.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return filters_through_autograd(filt, L, W, decay, checkpoint)
    layers = [p for linear in filt.mlp[0:-1:2] for p in (linear.weight, linear.bias)]
    args = (filt.z[:L], filt.t[:L, 0], decay, filt.mlp[1].freq, *layers, W, FILTER_ROWS)
    return FilterInPieces.apply(*args, not checkpoint) if torch.is_grad_enabled() else FilterInPieces.compute(*args)


def filters_through_autograd(filt, L, W, decay, checkpoint=False):
    """filters' general path, the last layer's weight W and the window's decay rates given: the MLP through
    the filter's own modules on pieces of FILTER_PIECE positions, the window's exp and product in place, each
    piece (with `checkpoint`) recomputed alone in backward: its hidden activations, six of (L, filter_order),
    would otherwise be held at once."""

    def piece(z, t):  # z (P, emb_dim), t (P,) -> (n_filters, P)
        # (the first layer's weight made contiguous transposed, so that autograd makes its gradient as z^T @ grad
        # (emb_dim, P) @ (P, filter_order): as grad^T @ z, with five columns, it ran at a fifth of the speed)
        first = filt.mlp[0]
        h = torch.mm(W, filt.mlp[1:-1](torch.addmm(first.bias, z, first.weight.t().contiguous())).t())
        return h.mul_(FilterInPieces.window(decay, t))

    zs, ts = filt.z[:L].split(FILTER_PIECE), filt.t[:L, 0].split(FILTER_PIECE)
    if len(zs) == 1:
        return checkpointed(checkpoint, piece, zs[0], ts[0])
    if not torch.is_grad_enabled():  # each piece written into h: no list of pieces to concatenate
        h = W.new_empty(len(W), L)
        for start, z, t in zip(range(0, L, FILTER_PIECE), zs, ts):
            h[:, start:start + len(t)] = piece(z, t)
        return h
    return torch.cat([checkpointed(checkpoint, piece, z, t) for z, t in zip(zs, ts)], dim=1)


class FilterInPieces(torch.autograd.Function):
    """ImplicitFilter's MLP and window on the CPU, `rows` positions at a time from the positional features to the
    windowed filters, each piece's filters written into its columns of h: z (L, emb_dim), t (L,), decay
    (n_filters,) = -|deltas|, freq (1, F) the Sin's (one at all three places), the three inner layers' weights
    and biases, w4 (n_filters, F) -> h (n_filters, L). A piece's activations, (rows, F) each, are read back
    while in cache, and there is no list of pieces to concatenate. It keeps each piece's Sin inputs and outputs
    (autograd would keep those, each Sin's product with freq and the window (n_filters, L) too), or with
    keep=False nothing: backward then makes each piece again, as checkpointing would. Its backward runs over
    the same pieces, the window made again in cache, each piece's weight gradients added in place."""

    @staticmethod
    def forward(ctx, z, t, decay, freq, w1, b1, w2, b2, w3, b3, w4, rows, keep):
        kept = [] if keep else None
        h = FilterInPieces.compute(z, t, decay, freq, w1, b1, w2, b2, w3, b3, w4, rows, kept)
        ctx.rows = rows
        ctx.save_for_backward(z, t, decay, freq, w1, b1, w2, b2, w3, b3, w4, *(kept or []))
        return h

    @staticmethod
    def compute(z, t, decay, freq, w1, b1, w2, b2, w3, b3, w4, rows, kept=None):
        """The forward pass, without autograd; each piece's activations appended to `kept` (a list) if given."""
        h = w4.new_empty(len(w4), len(z))
        for start in range(0, len(z), rows):
            p = slice(start, start + rows)
            activations = FilterInPieces.piece(z[p], t[p], decay, freq, (w1, b1, w2, b2, w3, b3), w4, h[:, p])
            if kept is not None:
                kept.extend(activations)
        return h

    @staticmethod
    def piece(z, t, decay, freq, layers, w4, out):
        """One piece: z (P, emb_dim), t (P,) -> its windowed filters written into out (n_filters, P); returns the
        Sin inputs and outputs (a1, s1, a2, s2, a3, s3), each (P, F)."""
        activations, x = [], z
        for w, b in zip(layers[0::2], layers[1::2]):
            a = torch.addmm(b, x, w.t())
            x = torch.mul(a, freq).sin_()  # tinyhyena.Sin
            activations += [a, x]
        # (made in a buffer of its own, then copied: written in place, across rows L apart, the product ran slower)
        out.copy_(torch.mm(w4, x.t()).mul_(FilterInPieces.window(decay, t)))
        return activations

    @staticmethod
    def window(decay, t):
        """tinyhyena.filter_window, transposed: decay (n_filters,) = -|rates|, t (P,) -> (n_filters, P)."""
        return torch.outer(decay, t).exp_().add_(0.05)

    @staticmethod
    def backward(ctx, grad_h):  # (n_filters, L)
        z, t, decay, freq, w1, b1, w2, b2, w3, b3, w4, *kept = ctx.saved_tensors
        layers, rows = (w1, b1, w2, b2, w3, b3), ctx.rows
        grads = [torch.zeros_like(p) for p in (freq, w1.t(), b1, w2, b2, w3, b3, w4)]
        grad_freq, grad_w1_t, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3, grad_w4 = grads
        scratch = w4.new_empty(len(w4), min(rows, len(z)))  # a piece's filters, when made again
        for i, start in enumerate(range(0, len(z), rows)):
            p = slice(start, start + rows)
            z_p, t_p = z[p], t[p]
            if kept:
                a1, s1, a2, s2, a3, s3 = kept[6 * i:6 * i + 6]
            else:
                a1, s1, a2, s2, a3, s3 = FilterInPieces.piece(z_p, t_p, decay, freq, layers, w4,
                                                              scratch[:, :len(z_p)])
            grad = torch.mul(grad_h[:, p], FilterInPieces.window(decay, t_p))  # (n_filters, P)
            grad_w4.addmm_(grad, s3)
            grad_s = torch.mm(grad.t(), w4)  # (P, F)
            for a, x, w, grad_w, grad_b in ((a3, s2, w3, grad_w3, grad_b3), (a2, s1, w2, grad_w2, grad_b2),
                                            (a1, z_p, None, grad_w1_t, grad_b1)):
                slope = torch.mul(a, freq).cos_()
                grad_u = grad_s.mul_(slope)  # the gradient of freq * a
                grad_freq += torch.mul(grad_u, a, out=slope).sum(0)  # (slope's buffer reused)
                grad_a = grad_u.mul_(freq)
                grad_b += grad_a.sum(0)
                if w is None:  # the first layer: its weight's gradient as z^T @ grad (emb_dim, P) @ (P, F)
                    grad_w.addmm_(x.t(), grad_a)
                else:
                    grad_w.addmm_(grad_a.t(), x)
                    grad_s = torch.mm(grad_a, w)
        return (None, None, None, grad_freq, grad_w1_t.t(), grad_b1, grad_w2, grad_b2, grad_w3, grad_b3, grad_w4,
                None, None)


def group_size(B, L, d, N, budget=HEAP_BUFFER_FLOATS):
    """Channels per group of d channels at length L: equal groups, each one's largest buffer (its projections
    (B, (N+1)G, L), or its FFT spectrum (B, G, n/2+1) complex) within `budget` floats, but at least 16 channels
    (thinner groups' matmuls run far below peak)."""
    per_channel = B * max((N + 1) * L, fft_size(2 * L - 1) + 2)
    n_groups = math.ceil(d / max(16, budget // per_channel))
    return math.ceil(d / n_groups)


class FastHyena:
    """HyenaOperator's fast path, with its settings and its kept spectra (one per operator; not a module, so
    it adds nothing to the state_dict).
    - channel_group: channels per group; None chooses them by group_size within group_budget floats (the
      heap's size, HEAP_BUFFER_FLOATS).
    - spectrum_cache_bytes: room for the filters' spectra kept without a gradient (4 GiB per model, shared
      among its layers: the tiny model's at 2^20); 0 switches the cache off.
    - stream_positions: without a gradient on the CPU, the positions a piece of the streams (gated_streams);
      None projects each channel group alone, as with a gradient and off the CPU."""

    def __init__(self, cfg):
        self.channel_group = None
        self.group_budget = HEAP_BUFFER_FLOATS
        self.stream_positions = 2048  # a piece's projections 3 MB at d = 128, in cache (BENCHMARKS.md)
        self.spectrum_cache_bytes = (4 << 30) // cfg.n_layer
        self.spectrum_cache = None  # (key, spectra), see cached_spectrum

    def __call__(self, op, u, checkpoint=False, norm=None):
        """op(u) for the HyenaOperator op, u (B, L, d) -> (B, L, d); op(norm(u)) given `norm`, a LayerNorm
        (FastBlock's norm1), which where the streams come first (streams_first) is applied a piece at a time:
        the normalized input is then never whole in memory. With `checkpoint` (inside a checkpointed block's
        recomputation) the filter and each channel group are recomputed alone in backward."""
        if norm is not None and not self.streams_first(u):
            u, norm = norm(u), None
        B, L, d = u.shape
        N = op.cfg.order
        # the filters h (N-1, d, L), or without a gradient their spectra (N-1, d, n/2+1), kept between calls
        h = None if torch.is_grad_enabled() else self.cached_spectrum(op.filter, L)
        h = (filters(op.filter, L, checkpoint=checkpoint) if h is None else h).view(N - 1, d, -1)
        group = self.channel_group or self.group_size(B, L, d, N)
        groups = [slice(c, min(c + group, d)) for c in range(0, d, group)]
        h_groups = h.split(group, dim=1)  # (not h[:, g]: an index's gradient is full-size zeros, per group)
        mix = lambda u, h_g, g: self.mix_channels(op, self.project(op, u, [g])[0], h_g, g)
        if torch.is_grad_enabled() and not checkpoint:
            # backward keeps every group's projection anyway, so project them all in one call: its backward
            # then adds every group's gradient into one for u
            y = torch.cat([self.mix_channels(op, z, h_g, g)
                           for z, h_g, g in zip(self.project(op, u, groups), h_groups, groups)], dim=1)
        elif torch.is_grad_enabled():
            y = torch.cat([checkpointed(True, mix, u, h_g, g) for h_g, g in zip(h_groups, groups)], dim=1)
        elif self.streams_first(u):
            y = self.mix_from_streams(op, u, h_groups, groups, norm)
        else:  # each group written into y as it is done, its temporaries in buffers the groups share
            y, buffers = u.new_empty(B, d, L), None if torch.is_autocast_enabled(u.device.type) else Buffers(u.device)
            for h_g, g in zip(h_groups, groups):
                self.mix_channels(op, self.project(op, u, [g])[0], h_g, g, out=y[:, g], buffers=buffers)
            del buffers  # before out_proj's output is made
        # out_proj on y transposed, (B, d, L) -> (B, L, d), bias and all in one batched matmul (F.linear on a
        # transposed input adds the bias in a second pass over the output)
        W, b = op.out_proj.weight, op.out_proj.bias
        if torch.is_grad_enabled():
            return ChannelsFirstLinear.apply(y, W, b)
        return torch.baddbmm(b, y.transpose(1, 2), W.t().expand(B, -1, -1))

    def group_size(self, B, L, d, N):
        return group_size(B, L, d, N, self.group_budget)

    def streams_first(self, u):
        """Whether this call makes every channel's streams first (mix_from_streams): without a gradient, on the
        CPU, without autocast, unless stream_positions is None."""
        return (self.stream_positions is not None and not torch.is_grad_enabled() and u.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu"))

    def mix_from_streams(self, op, u, h_groups, groups, norm=None):
        """The recurrence without a gradient, in two stages: the streams of every channel, a piece of positions
        at a time (gated_streams), then each group's long convolutions, their temporaries in buffers the groups
        share, the last gate written over the group's first product (read by then) -> y (B, d, L)."""
        N = op.cfg.order
        y, gates = self.gated_streams(op, u, self.stream_positions, norm)  # y: the first gate's product, for now
        bias, buffers = op.filter.bias.view(N - 1, -1), Buffers(u.device)
        for h_g, g in zip(h_groups, groups):  # gates x_0 .. x_{N-2}, then None: y[:, g] is gated already
            conv = lambda o, v, x_i: GatedCausalConv.compute(v, x_i, h_g[o], bias[o, g], buffers)
            recurrence_into(y[:, g], [x_i[:, g] for x_i in gates] + [None], y[:, g], conv)
        return y

    @staticmethod
    def gated_streams(op, u, positions, norm=None):
        """in_proj, the short convolution and the first gate for every channel, without a gradient: `positions`
        positions at a time (or as many whole sequences as fit in them), a piece's projections kept in cache
        from the product through the convolution to the gate, with the K-1 inputs before the piece. in_proj is
        one product for all channels (a channel group's thinner product reads every position once a group, and
        runs at half the speed). u (B, L, d), normalized a piece at a time by `norm` where given -> the first
        gate's product v * x_{N-1} (B, d, L), and the other gates x_0 .. x_{N-2} (N-1, B, d, L), channels first
        for the FFT."""
        B, L, d = u.shape
        N, K = op.cfg.order, op.cfg.short_filter_order
        W, b = op.in_proj.weight, op.in_proj.bias  # ((N+1)d, d)
        taps, tap_bias = op.short_conv.weight[:, 0], op.short_conv.bias  # ((N+1)d, K)
        first, gates = u.new_empty(B, d, L), u.new_empty(N - 1, B, d, L)
        P, k = min(positions, L), max(1, positions // L)  # positions and sequences a piece
        z, conv = u.new_empty(2, min(k, B) * len(W) * (K - 1 + P))  # a piece's projections, convolved
        for i in range(0, B, k):
            for start in range(0, L, P):
                before = min(K - 1, start)  # the inputs before the piece that its convolution reads
                rows = u[i:i + k, start - before:start + P]  # (k', before + p, d)
                if norm is not None:
                    rows = torch.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                shape = (len(rows), len(W), rows.shape[1])  # (k', (N+1)d, before + p)
                z_piece = torch.baddbmm(b[:, None], W.expand(len(rows), -1, -1), rows.transpose(1, 2),
                                        out=z[:math.prod(shape)].view(shape))
                # (the convolution pads with zeros; its first `before` outputs, which would need inputs from
                # before them, are not used)
                s = CausalShortConv.compute(z_piece, taps, tap_bias, out=conv[:math.prod(shape)].view(shape))
                s, out = s[..., before:], (slice(i, i + k), slice(None), slice(start, start + P))
                torch.mul(s[:, N * d:], s[:, (N - 1) * d:N * d], out=first[out])  # v * x_{N-1}
                gates[(slice(None), *out)].copy_(s[:, :(N - 1) * d].unflatten(1, (N - 1, d)).transpose(0, 1))
        return first, gates

    @staticmethod
    def project(op, u, groups):
        """in_proj for the channels of each group (slices of 0..d), all N+1 streams: per group a
        (B, (N+1)*G, L) tensor, in the layout the FFT wants (GroupedProjection). u: (B, L, d)."""
        N, d = op.cfg.order, op.cfg.d_model
        W, b = op.in_proj.weight.view(N + 1, d, d), op.in_proj.bias.view(N + 1, d)
        W, b = torch.cat([W[:, g].flatten(0, 1) for g in groups]), torch.cat([b[:, g].flatten() for g in groups])
        sizes = [(N + 1) * (g.stop - g.start) for g in groups]
        if torch.is_grad_enabled():
            return GroupedProjection.apply(u, W, b, sizes)
        return GroupedProjection.project(u, W, b, sizes, GroupedProjection.piece_positions(u))

    @staticmethod
    def mix_channels(op, z, h, g, out=None, buffers=None):
        """Channels g (a slice) of the operator, from their projections to before out_proj: the recurrence of
        HyenaOperator.forward. z: (B, (N+1)*G, L), h: their filters (N-1, G, L) -> (B, G, L). Without a
        gradient: into `out` where given (the last gate's product written there, not copied), the short
        convolution's output and the FFT's padded input in `buffers` (a Buffers, without autocast) if given."""
        N, d = op.cfg.order, op.cfg.d_model
        Wc, bc = op.short_conv.weight.view(N + 1, d, -1), op.short_conv.bias.view(N + 1, d)
        Wc, bc = Wc[:, g].flatten(0, 1), bc[:, g].flatten()
        if buffers is None:  # (split by the convolution: its backward then reads each part's gradient as it is)
            *x, v = causal_short_conv(z, Wc, bc, g.stop - g.start)  # x_0 .. x_{N-1}, v: each (B, G, L)
        else:
            z = CausalShortConv.compute(z, Wc, bc, out=buffers("short_conv", z.shape, z.dtype))
            *x, v = z.split(g.stop - g.start, dim=1)
        bias = op.filter.bias.view(N - 1, d)
        # h_o (*) (v * x_i) + bias_o * (v * x_i), gate and convolution in one
        if buffers is None:
            conv = lambda o, v, x_i: gated_causal_conv(v, x_i, h[o], bias[o, g])
        else:  # (no autocast: gated_causal_conv's float32 casts would change nothing)
            conv = lambda o, v, x_i: GatedCausalConv.compute(v, x_i, h[o], bias[o, g], buffers)
        return op.recurrence(x, v, conv) if out is None else recurrence_into(out, x, v, conv)

    def cached_spectrum(self, filt, L, rows=None):
        """The filters' spectra rfft(h, n) (n_filters, n/2+1), n = fft_size(2L-1), each filter's skip term (its
        bias) added to its tap at lag 0 (see GatedCausalConv), or those of the filters `rows` (an index tensor),
        for use without a gradient; None where they would not fit in spectrum_cache_bytes.
        Without a gradient the filters depend only on the weights and L, so a model that reads many inputs of
        one length (scoring, embedding, evaluation) computes them once. They are recomputed when L, the rows,
        the device, autocast or any weight changes (every in-place update of a tensor, an optimizer step or
        load_state_dict, bumps its version counter)."""
        n = fft_size(2 * L - 1)
        tensors = list(filt.parameters()) + list(filt.buffers())
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        n_filters = filt.deltas.numel() if rows is None else len(rows)
        if n_filters * (n // 2 + 1) * 2 * dtype.itemsize > self.spectrum_cache_bytes:
            return None
        device = tensors[0].device.type
        key = (L, None if rows is None else tuple(rows.tolist()),
               torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
               *[(p.data_ptr(), p._version) for p in tensors])
        if self.spectrum_cache is None or self.spectrum_cache[0] != key:
            self.spectrum_cache = None  # free the old spectra before making new ones
            h = filters(filt, L, rows).to(dtype)  # (in float32, as gated_causal_conv runs the FFTs)
            h[:, 0] += filt.bias if rows is None else filt.bias[rows]
            spectrum = h.new_empty(h.shape[0], n // 2 + 1, dtype=dtype.to_complex())
            for i in range(0, h.shape[0], 16):  # 16 filters at a time: all at once would pad a copy of all of
                # them, and MKL's batched FFT is several times slower per row on a few rows
                spectrum[i:i + 16] = torch.fft.rfft(h[i:i + 16], n=n)
            self.spectrum_cache = (key, spectrum)
        return self.spectrum_cache[1]


# ---------------------------------------------------------------------------------------------------------
# The block's fast path.

# Tanh-approximate GELU through the sigmoid: 0.5 (1 + tanh z) = sigmoid(2z), so GELU(h) = h * sigmoid(GELU_SCALE
# (h + 0.044715 h^3)). With x = GELU_SCALE * h, made by fc1 with its weight and bias scaled by GELU_SCALE, the
# sigmoid's argument is x + GELU_CUBIC x^3, one pass fewer; fc2 with its weight divided by GELU_SCALE takes the
# scale back out of GELU_SCALE * GELU(h) = x * sigmoid(...).
GELU_SCALE = 2 * math.sqrt(2 / math.pi)
GELU_CUBIC = 0.044715 / GELU_SCALE ** 2


def scaled_gelu(x, out):
    """GELU_SCALE * F.gelu(h, approximate="tanh") written into `out`, a buffer of x's shape, from x = GELU_SCALE * h
    (x is left as it is). On the CPU these four passes over a piece in cache take under half the time of ATen's
    tanh-based GELU kernel, and 0.7x that of the same five passes on h (BENCHMARKS.md)."""
    torch.mul(x, x, out=out)
    torch.addcmul(x, out, x, value=GELU_CUBIC, out=out)  # x + GELU_CUBIC x^3
    return out.sigmoid_().mul_(x)


def scaled_gelu_with_slope(x, gelu, slope, gate):
    """scaled_gelu(x) into `gelu` and GELU's derivative at h = x / GELU_SCALE into `slope`, all buffers of x's
    shape, `gate` a scratch; x is overwritten. GELU(h) = h s with s = sigmoid(x + GELU_CUBIC x^3), so GELU'(h) =
    s + GELU_SCALE (h + 3 0.044715 h^3) s (1 - s) = s + (x + 3 GELU_CUBIC x^3) s (1 - s): seven passes over a
    piece in cache, x^2 made once for both. Kept for backward where autograd would keep h, the slope leaves
    backward one pass (grad * slope) where it took six (the GELU again, the derivative from h and s), and
    ATen's gelu_backward computes tanh again (BENCHMARKS.md)."""
    torch.mul(x, x, out=slope)  # x^2
    torch.addcmul(x, slope, x, value=GELU_CUBIC, out=gate)
    gate.sigmoid_()  # s
    torch.mul(x, gate, out=gelu)
    torch.addcmul(x, slope, x, value=3 * GELU_CUBIC, out=slope)  # x + 3 GELU_CUBIC x^3
    torch.addcmul(gate, gate, gate, value=-1, out=x)  # s (1 - s), over x
    return torch.addcmul(gate, slope, x, out=slope)


class MLPInPieces(torch.autograd.Function):
    """The block's MLP on the CPU, x (N, d) -> fc2(gelu(fc1(x))) (N, d), `rows` positions at a time from fc1
    through GELU to fc2, so that a piece's hidden activations (4x wider than the stream, the largest tensors
    of a step) are read back while in cache, and each is a heap-sized tensor of its own (see
    HEAP_BUFFER_FLOATS). fc1 and fc2 run scaled by GELU_SCALE and by its inverse (scaled_gelu_with_slope). It
    keeps each piece's scaled GELU and GELU's slope (where autograd would keep fc1's output and the GELU), and
    its backward runs over the same pieces, each piece's weight gradients added in place. Through autograd the
    pieces' outputs would be concatenated, and in backward x's gradient too."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, rows):
        out = x.new_empty(len(x), len(w2))
        h, gate = x.new_empty(2, min(rows, len(x)), len(w1))  # a piece's fc1 output and GELU's gate, in cache
        w1_t, b1, w2_t = w1.t() * GELU_SCALE, b1 * GELU_SCALE, w2.t() / GELU_SCALE
        gelus, slopes = [], []
        for piece, out_piece in zip(x.split(rows), out.split(rows)):
            p = len(piece)
            gelus.append(x.new_empty(p, len(w1)))
            slopes.append(torch.empty_like(gelus[-1]))
            torch.addmm(b1, piece, w1_t, out=h[:p])  # (p, 4d): GELU_SCALE * fc1(piece)
            scaled_gelu_with_slope(h[:p], gelus[-1], slopes[-1], gate[:p])
            torch.addmm(b2, gelus[-1], w2_t, out=out_piece)
        ctx.rows = rows
        ctx.save_for_backward(x, w1, w2, *gelus, *slopes)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (N, d)
        x, w1, w2, *kept = ctx.saved_tensors
        gelus, slopes = kept[:len(kept) // 2], kept[len(kept) // 2:]
        grad_x = torch.empty_like(x)
        grad_w1, grad_b1 = torch.zeros_like(w1), w1.new_zeros(len(w1))
        grad_w2, grad_b2 = torch.zeros_like(w2), w2.new_zeros(len(w2))
        grad_hidden = x.new_empty(min(ctx.rows, len(x)), len(w1))
        pieces = zip(x.split(ctx.rows), grad_out.split(ctx.rows), grad_x.split(ctx.rows), gelus, slopes)
        for piece, grad_piece, grad_x_piece, gelu, slope in pieces:
            grad_w2.addmm_(grad_piece.t(), gelu)
            grad_b2 += grad_piece.sum(0)
            grad_h = torch.mm(grad_piece, w2, out=grad_hidden[:len(piece)]).mul_(slope)  # (p, 4d)
            grad_w1.addmm_(grad_h.t(), piece)
            grad_b1 += grad_h.sum(0)
            torch.mm(grad_h, w1, out=grad_x_piece)
        return grad_x, grad_w1, grad_b1, grad_w2.div_(GELU_SCALE), grad_b2, None  # (the GELUs kept were scaled)


def mlp_in_pieces(mlp, x, rows):
    """mlp(x), x (B, L, d): on the CPU without autocast MLPInPieces, `rows` positions a piece; elsewhere the
    plain MLP (one kernel launch a layer counts more there than the cache)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return mlp(x)
    fc1, fc2 = mlp.fc1, mlp.fc2
    out = MLPInPieces.apply(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias, rows)
    return out.view(*x.shape[:-1], -1)


def mlp_into_stream(block, x, rows_per_piece):
    """x += block.mlp(block.norm2(x)) in place, without a gradient, x (B, L, d) contiguous: rows_per_piece
    positions at a time, each piece's hidden activations (4x wider than the stream) written into one buffer
    that stays in cache from fc1 through GELU to fc2, instead of three fresh 4x-wide tensors in memory. On the
    CPU GELU goes through the sigmoid, fc1 and fc2 scaled (scaled_gelu); elsewhere through ATen's one kernel
    (one launch, not four)."""
    fc1, fc2, norm = block.mlp.fc1, block.mlp.fc2, block.norm2
    scale = GELU_SCALE if x.device.type == "cpu" else None
    w1, b1, w2 = fc1.weight.t(), fc1.bias, fc2.weight.t()  # (d, 4d), (4d,), (4d, d)
    if scale is not None:
        w1, b1, w2 = w1 * scale, b1 * scale, w2 / scale
    rows = x.view(-1, x.shape[-1])  # (B*L, d)
    hidden = x.new_empty(min(rows_per_piece, len(rows)), fc1.out_features)
    scratch = torch.empty_like(hidden) if scale is not None else None
    for piece in rows.split(rows_per_piece):
        h = hidden[:len(piece)]
        u = torch.layer_norm(piece, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.addmm(b1, u, w1, out=h)
        if scratch is None:
            torch.ops.aten.gelu_(h, approximate="tanh")
        else:
            h = scaled_gelu(h, scratch[:len(piece)])
        piece.addmm_(h, w2).add_(fc2.bias)
    return x


class FastBlock:
    """Block's fast path and its settings: mlp_chunk, the positions per MLP call at long L; mlp_rows, the
    positions per MLP piece on the CPU (mlp_into_stream without a gradient, MLPInPieces with one)."""

    def __init__(self):
        self.mlp_chunk = 1 << 16
        self.mlp_rows = 2048  # a 4 MB hidden piece at d = 128, in cache from fc1 to fc2 (BENCHMARKS.md)

    def __call__(self, block, x, checkpoint=False):  # x: (B, L, d)
        mixer = block.mixer
        # norm1 goes to the operator's path, which applies it (a piece at a time where the streams come first)
        branch = block.dropout(mixer.fast(mixer, x, checkpoint, norm=block.norm1))
        # without a gradient, the residual is added into the branch's own fresh tensor (one big tensor fewer);
        # but not into a bf16 branch under autocast, which would round the float32 stream
        x = branch.add_(x) if not torch.is_grad_enabled() and branch.dtype == x.dtype else x + branch
        if self.mlp_in_place(block, x):
            return mlp_into_stream(block, x, self.mlp_rows if x.device.type == "cpu" else self.mlp_chunk)
        # The MLP acts on each position alone and fc1 is 4x wider than the stream (2 GB at L = 2^20, d = 128),
        # so at long L it runs on slices of positions: without a gradient, updating the stream in place one
        # slice at a time; under checkpointing, recomputing one slice at a time in backward.
        if x.shape[1] <= self.mlp_chunk or (torch.is_grad_enabled() and not checkpoint):
            # (with a gradient but no checkpointing, slices would store the same activations, then copy them)
            return x + block.dropout(mlp_in_pieces(block.mlp, block.norm2(x), self.mlp_rows))
        branch = lambda part: block.dropout(mlp_in_pieces(block.mlp, block.norm2(part), self.mlp_rows))
        if not torch.is_grad_enabled():
            for part in x.split(self.mlp_chunk, dim=1):
                part += branch(part)
            return x
        return x + torch.cat([checkpointed(True, branch, part) for part in x.split(self.mlp_chunk, dim=1)], 1)

    @staticmethod
    def mlp_in_place(block, x):
        """Whether the MLP may update the stream x in place (mlp_into_stream): no gradient, no dropout, no
        autocast, and x in the weights' dtype, contiguous (the fresh tensor the residual was just added into)."""
        return (not torch.is_grad_enabled() and not (block.training and block.dropout.p > 0)
                and not torch.is_autocast_enabled(x.device.type) and x.is_contiguous()
                and x.dtype == block.mlp.fc1.weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# Decoding's fast path.

class FastStep:
    """HyenaDNA.step's fast path: the same next-token logits, one position at a time, in fewer operations on
    buffers laid out once. At batch 1 a tiny model's step is about 0.8 MFLOP, so its time is the number of
    operations (each eager operation costs microseconds) and the weights read, not the arithmetic: counted
    by a dispatch mode, HyenaDNA.step makes about 80 operations a position for the tiny model and this 29
    (BENCHMARKS.md). Built from a model and the decoding state that model.prefill filled (decoding_state),
    it owns that state from then on: go on with this step, not with model.step. Call it without a gradient
    (decoding.generate runs it under torch.inference_mode).
    - in_proj writes its output straight into the short convolution's window of its last K inputs, a ring
      (K, B, C), and the convolution is one batched matrix product over the channels, with the tap weights
      in the ring's current rotation and its bias (in_proj's bias with it) as one more tap, on a slot of ones;
    - the streams, the gates and the long convolutions' inputs go into buffers in place, each read through
      views made once (the online convolution's next input is a view of its own buffer:
      decoding.OnlineConv.next_input), and the online convolution adds the skip term itself, as its tap at
      lag 0 (decoding.OnlineConv.add_skip);
    - out_proj and fc2 add their bias in their matrix product, through a row of ones kept beside their inputs,
      and add the residual in the same call;
    - every weight matrix is a row-major (in, out) copy, which a 1-row product reads faster than a transposed
      view;
    - no check of the token ids (decoding.generate draws them) and no dropout (decoding is inference)."""

    def __init__(self, model, state):
        self.t = 0
        cfg = model.cfg
        d, N, K = cfg.d_model, cfg.order, cfg.short_filter_order
        B = len(state[0].recent)
        self.layers = []  # per layer one tuple, read by __call__ in one unpacking (a dict costs a lookup a name)
        for block, layer_state in zip(model.blocks, state):
            op = block.mixer
            w = op.short_conv.weight[:, 0]  # (C, K): tap K-1 weighs the newest input
            # the last K inputs, slot (K-1+s) % K step s's, and a slot of ones after them, whose tap is the bias
            ring = w.new_ones(K + 1, B, w.shape[0])
            # in_proj's bias b rides in the convolution's (every input has it: sum_k w_k (r_k + b) = sum_k w_k r_k
            # + b sum_k w_k), so the ring holds in_proj's outputs less b, written by a plain mm; a zero before the
            # prompt is then held as -b
            in_b = op.in_proj.bias
            ring[:K - 1] = (layer_state.recent - in_b[:, None]).permute(2, 0, 1)  # the last K-1, slots 0 .. K-2
            conv_bias = op.short_conv.bias + in_b * w.sum(1)
            # at step s, slot k < K holds the input (K-1+s - k) % K positions back, which tap K-1 - that weighs
            rotations = [torch.stack([w[:, K - 1 - (K - 1 + s - k) % K] for k in range(K)] + [conv_bias], 1)[..., None]
                         for s in range(K)]  # each (C, K + 1, 1)
            z = w.new_empty(N + 1, d, B, 1)  # the streams x_0 .. x_{N-1}, v, channels first
            *xs, v = z
            # the gates and long convolutions in HyenaOperator.recurrence's order: (x_i, state, skip weight,
            # whether the state takes its input in place and adds the skip term itself: decoding.OnlineConv's
            # next_input, advance and add_skip)
            gates = [(x_i, conv, skip, hasattr(conv, "next_input")) for x_i, conv, skip in
                     zip(reversed(xs[1:]), layer_state.long_convs, op.filter.bias.view(N - 1, d, 1, 1))]
            for _, conv, skip, in_place in gates:
                if in_place:
                    conv.add_skip(skip.flatten())
            gated = w.new_ones(d + 1, B)  # out_proj's input, and a row of ones for its bias
            hidden = w.new_ones(B, cfg.d_inner + 1)  # fc2's input, and a column of ones for its bias
            self.layers.append((
                block.norm1.weight, block.norm1.bias, op.in_proj.weight.t().contiguous(), list(ring[:K]),
                ring.permute(2, 1, 0), rotations, z.view(-1, B, 1), v, gates, xs[0], gated[:d, :, None], gated.t(),
                torch.cat([op.out_proj.weight.t(), op.out_proj.bias[None]]),
                block.norm2.weight, block.norm2.bias, block.mlp.fc1.bias, block.mlp.fc1.weight.t().contiguous(),
                w.new_empty(B, cfg.d_inner), hidden, hidden[:, :cfg.d_inner],
                torch.cat([block.mlp.fc2.weight.t(), block.mlp.fc2.bias[None]])))
        self.d, self.K, self.eps = d, K, cfg.layer_norm_epsilon
        self.embedding, self.ln_f = model.embedding.weight, (model.ln_f.weight, model.ln_f.bias)
        self.lm_head = self.embedding.t().contiguous()  # (d, V), row-major as the other weights
        self.stream = self.embedding.new_empty(B, d)  # the residual stream, updated in place

    def __call__(self, input_ids):
        """input_ids (B,) the tokens at the next position -> next-token logits (B, V), as model.step."""
        d, K, eps, t = self.d, self.K, self.eps, self.t
        self.t += 1
        # (torch.layer_norm: F.layer_norm's own binding, without its Python wrapper's checks, 1-2 us a call here)
        x = torch.index_select(self.embedding, 0, input_ids, out=self.stream)  # (B, d)
        for (norm1_w, norm1_b, in_w, ring_slots, window, rotations, z, v, gates, x_0, gated,
             gated_t, out_w, norm2_w, norm2_b, fc1_b, fc1_w, fc1_out, hidden, hidden_out, fc2_w) in self.layers:
            u = torch.layer_norm(x, (d,), norm1_w, norm1_b, eps)
            torch.mm(u, in_w, out=ring_slots[(K - 1 + t) % K])  # in_proj less its bias, into the ring
            # the short convolution: (C, B, K + 1) window times (C, K + 1, 1) taps and bias, into the streams' buffer
            torch.bmm(window, rotations[t % K], out=z)
            for x_i, conv, skip, in_place in gates:  # v, x_i: (d, B, 1); as HyenaOperator.recurrence
                if in_place:  # the gate's product written into the state's input buffer; the skip term its own
                    torch.mul(v, x_i, out=conv.next_input())
                    v = conv.advance()
                else:  # any other long-convolution state, through its step (B, d) -> (B, d)
                    a = (v * x_i)[..., 0].t()
                    v = torch.addcmul(conv.step(a), a, skip[:, 0, 0]).t()[..., None]
            torch.mul(v, x_0, out=gated)
            x.addmm_(gated_t, out_w)  # out_proj and its bias, added to the stream
            torch.addmm(fc1_b, torch.layer_norm(x, (d,), norm2_w, norm2_b, eps), fc1_w, out=fc1_out)
            torch._C._nn.gelu(fc1_out, approximate="tanh", out=hidden_out)
            x.addmm_(hidden, fc2_w)  # fc2 and its bias, added to the stream
        return torch.mm(torch.layer_norm(x, (d,), *self.ln_f, eps), self.lm_head)
