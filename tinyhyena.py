"""
tinyhyena: HyenaDNA in one file.

HyenaDNA (Nguyen et al. 2023, arXiv 2306.15794) is a causal language model of DNA that reads one nucleotide
per token and replaces attention with the Hyena operator, so its cost grows as O(L log L) in the sequence
length L instead of O(L^2). That is what lets it read a million bases at once.

What Hyena computes
-------------------
A Hyena operator of order N takes u of shape (B, L, D) and
  1. projects it to N+1 streams of width D (`in_proj`), and mixes each stream over its last 3 positions with
     a causal depthwise convolution (`short_conv`): x_0, ..., x_{N-1}, v, each (B, D, L);
  2. alternates gating and long convolution N-1 times:
         v = v * x_i                          (elementwise gate, i = N-1 down to 1)
         v = h_o (*) v + bias_o * v          (causal convolution with a filter as long as the sequence)
  3. gates once more, y = v * x_0, and projects back with `out_proj`.
Attention's all-pairs interaction is replaced by the long convolutions (global, but input-independent) and
the gates (input-dependent, but local). Their alternation is what makes the operator data-controlled.

Why the convolution is computed by FFT, padded to 2L
----------------------------------------------------
A direct causal convolution y[t] = sum_{s<=t} h[t-s] v[s] costs O(L^2). By the convolution theorem,
multiplying spectra costs O(L log L), but the FFT computes a *circular* convolution: output t also receives
the terms that wrap around from t + n. The linear convolution of two length-L signals is 2L-1 long, so
zero-padding both to n >= 2L-1 leaves nothing to wrap onto the first L outputs, which we keep. The output
at t then depends only on inputs at positions <= t: the model stays causal.

The implicit filter and its window
----------------------------------
A filter of length L per channel would be L*D free parameters, tied to one length. Hyena instead *computes*
the filter: each position t gets a few positional features z(t) (t itself and some sines and cosines), a
small MLP with sine activations maps them to D values, so h[t] = MLP(z(t)) for every t at once. Parameters
no longer grow with L. A window exp(-alpha*t) + 0.05, with a different decay alpha per channel, multiplies
the filter: some channels look mostly at the recent past, others far back, and none is exactly zero.

The rest is a standard pre-norm residual network: token embedding -> blocks of (LayerNorm -> Hyena ->
residual, LayerNorm -> MLP -> residual) -> LayerNorm -> logits from the tied embedding matrix.

Reading order: tokenizer, config, memory on the CPU (why big tensors go in pieces), FFT convolution, implicit
filter, Hyena operator, block, model, using a trained model (likelihoods, embeddings), loading and saving
checkpoints (published, Hugging Face hub, own), the scripts' command-line conventions, and finally the NumPy
twin (the same forward pass written again, used by the tests).
"""

import argparse
import ctypes
import dataclasses
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass, field

# Large tensors on 2 MB pages (transparent huge pages) instead of 4 KB ones: at L = 2^20 the page faults of
# fresh allocations were a third of the run time on the 2-core CPU machine (20.9 s -> 18.1 s). torch's CPU
# allocator reads this variable once, at the process's first tensor allocation (importing torch makes none),
# so setting it here reaches every script that imports tinyhyena before making a tensor; after that it is
# too late, and has no effect. Safe: only buffers of 2 MB and more are aligned and madvise'd. A value the
# user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def keep_freed_memory_on_the_heap():
    """Have glibc's malloc, which serves torch's CPU tensors, keep the memory that tensors under 32 MB free for
    the next ones, instead of handing it back to the kernel. By default glibc serves such a buffer from its heap
    but trims the heap's free top whenever it passes 64 MB (and buffers of 128 KB and more are mmapped afresh
    until frees raise that bar), so a training step's buffers, freed in backward, are faulted in afresh (and
    zeroed by the kernel) in the next step: 0.5-1.0 s of system time in a 1.2-1.6 s step at batch 32 x 1,024 on
    the 2-core CPU machine. Two settings of mallopt fix it: buffers up to 32 MB always on the heap (where
    glibc's own bar ends up at most), and a free top of up to 2 GB kept, not trimmed (glibc's largest value).
    Measured there, steps past the tenth: 0.86 s against 0.94-1.02 s at 32 x 1,024, 5.7 s against 6.2 s at
    L = 2^17. The cost is memory: the heap keeps what it has grown to, and as it fragments it grows slowly: at
    32 x 1,024 peak RSS 1.48 GB after 15 steps and 2.05 GB after 150, against 1.40 GB; at 2^17, 5.23 against
    5.12 GB after 12 steps (malloc_trim(0) gives the free part back). The growth comes from the 2 MB alignment
    of huge pages, above: without them the heap stays flat, and short sequences train as fast. Linux with glibc
    only; a MALLOC_* or GLIBC_TUNABLES variable the user set wins, and TINYHYENA_KEEP_FREED_MEMORY=0 leaves
    glibc as it is."""
    user_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    if not sys.platform.startswith("linux") or user_set or os.environ.get("TINYHYENA_KEEP_FREED_MEMORY") == "0":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


keep_freed_memory_on_the_heap()

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__version__ = "0.1.0"


class UserError(ValueError):
    """Bad input the user can fix (a flag, a file, a value, a tensor), with a message that names it. Scripts
    print it as one line, `error: <message>`, and exit 1 (see run_command); any other exception is a bug and
    keeps its traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named is not there."""

# ---------------------------------------------------------------------------------------------------------
# Tokenizer: one id per nucleotide, the ids of the published HyenaDNA tokenizer.

SPECIAL_TOKENS = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[MASK]": 3, "[PAD]": 4, "[RESERVED]": 5, "[UNK]": 6}
BASES = "ACGTN"
BASE_IDS = {base: 7 + i for i, base in enumerate(BASES)}  # A=7 C=8 G=9 T=10 N=11
PAD_ID = SPECIAL_TOKENS["[PAD]"]
N_ID = BASE_IDS["N"]
VOCAB_SIZE = 12

# A 256-entry byte table makes tokenizing a gigabase a single vectorised lookup. Lowercase (soft-masked)
# bases are ordinary bases; any other byte (IUPAC codes, digits, ...) is an unknown base, N.
BYTE_TO_ID = np.full(256, N_ID, dtype=np.uint8)
for _base, _id in BASE_IDS.items():
    BYTE_TO_ID[ord(_base)] = BYTE_TO_ID[ord(_base.lower())] = _id
_ID_TO_TEXT = [""] * VOCAB_SIZE
for _tok, _id in {**SPECIAL_TOKENS, **BASE_IDS}.items():
    _ID_TO_TEXT[_id] = _tok


def tokenize(seq):
    """DNA string (or bytes) -> int64 ids, one per letter."""
    raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq)
    return BYTE_TO_ID[np.frombuffer(raw, dtype=np.uint8)].astype(np.int64)


def detokenize(ids):
    """ids -> string; bases come back uppercase, special tokens as their names ("[PAD]")."""
    ids = np.asarray(ids).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise UserError(f"token ids must be in [0, {VOCAB_SIZE}), got values in [{ids.min()}, {ids.max()}]")
    return "".join(_ID_TO_TEXT[i] for i in ids.tolist())


# ---------------------------------------------------------------------------------------------------------
# Config: the fields of the published config.json, flattened (the published file nests the operator's
# fields under "layer"; `from_dict`/`to_dict` translate).

@dataclass
class HyenaConfig:
    d_model: int = 128
    n_layer: int = 2
    d_inner: int = 512  # MLP hidden width, 4 * d_model in every published model
    vocab_size: int = VOCAB_SIZE
    pad_vocab_size_multiple: int = 8  # embedding rows are padded to a multiple of this
    embed_dropout: float = 0.1
    resid_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # the Hyena operator ("layer" in the published config)
    l_max: int = 1026  # longest sequence; the filter's positional features are scaled by it
    order: int = 2  # N: N+1 projected streams, N-1 long convolutions
    filter_order: int = 64  # width of the filter MLP
    emb_dim: int = 5  # positional features: t, and (emb_dim-1)//2 cosine/sine pairs
    w: float = 10.0  # initial frequency of the sine activations
    short_filter_order: int = 3  # kernel of the causal depthwise conv ("local_order")
    # published fields this implementation reads but that do not change the function
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        layer = dict(d.pop("layer", {}))
        flat = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        renamed = {"local_order": "short_filter_order"}
        for k, v in list(d.items()) + list(layer.items()):
            k = renamed.get(k, k)
            if k in names:
                flat[k] = v
        extra = {k: v for k, v in d.items() if k not in names}
        extra["layer"] = {k: v for k, v in layer.items() if renamed.get(k, k) not in names}
        cfg = cls(**flat, extra=extra)
        cfg.validate()
        return cfg

    def to_dict(self):
        """The published config.json layout (operator fields nested under "layer")."""
        extra = dict(self.extra)
        layer = dict(extra.pop("layer", {}))
        layer.update(_name_="hyena", l_max=self.l_max, order=self.order, filter_order=self.filter_order,
                     emb_dim=self.emb_dim, w=self.w, local_order=self.short_filter_order)
        out = dict(extra)
        out.update(d_model=self.d_model, n_layer=self.n_layer, d_inner=self.d_inner, vocab_size=self.vocab_size,
                   pad_vocab_size_multiple=self.pad_vocab_size_multiple, embed_dropout=self.embed_dropout,
                   resid_dropout=self.resid_dropout, layer_norm_epsilon=self.layer_norm_epsilon,
                   residual_in_fp32=True, layer=layer)
        return out

    def validate(self):
        positive = ["d_model", "n_layer", "d_inner", "vocab_size", "pad_vocab_size_multiple", "l_max",
                    "filter_order", "emb_dim", "short_filter_order"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if not isinstance(self.order, int) or self.order < 2:
            raise UserError(f"config field order must be an integer >= 2, got {self.order!r}")
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise UserError(f"config field emb_dim must be odd and >= 3 (t plus cos/sin pairs), got {self.emb_dim}")
        if self.l_max < 2:
            raise UserError(f"config field l_max must be >= 2, got {self.l_max}")


# The published checkpoints (LongSafari/hyenadna-*); l_max is the trained length + 2.
PRESETS = {
    "tiny-1k": dict(d_model=128, n_layer=2, l_max=1024 + 2),
    "tiny-1k-d256": dict(d_model=256, n_layer=2, l_max=1024 + 2),
    "tiny-16k-d128": dict(d_model=128, n_layer=2, l_max=16384 + 2),
    "small-32k": dict(d_model=256, n_layer=4, l_max=32768 + 2),
    "medium-160k": dict(d_model=256, n_layer=8, l_max=160000 + 2),
    "medium-450k": dict(d_model=256, n_layer=8, l_max=450000 + 2),
    "large-1m": dict(d_model=256, n_layer=8, l_max=1_000_000 + 2),
}


def preset_config(name, **overrides):
    """HyenaConfig of a published model by name (see PRESETS); `tiny` and `large` are short for tiny-1k
    and large-1m. Overrides (l_max=..., say) replace fields."""
    name = {"tiny": "tiny-1k", "large": "large-1m"}.get(name, name)
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: tiny, large, {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields["d_inner"] = 4 * fields["d_model"]
    fields.update(overrides)
    cfg = HyenaConfig(**fields)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Memory on the CPU. torch's CPU tensors come from glibc's malloc, which serves a buffer under 32 MB from its
# heap and hands a freed one back out to the next request (kept there: keep_freed_memory_on_the_heap, at the
# top of this file), but mmaps a bigger one fresh every time, and each fresh page costs a page fault when
# first written. On the 2-core CPU machine (a VM) that is 0.5-1 s per GB, and it was most of a training step's
# time. So the model works through its biggest tensors in pieces that stay under this size: the channel
# groups of the Hyena operator (which also bound memory, on any device), and the MLP's rows (on the CPU only:
# CUDA's caching allocator reuses memory itself). Splitting the FFTs' channels further did not pay: at
# L = 2^20, pieces of 3 channels cost more CPU time than the faults saved.
# The pieces stay well under 32 MB: with huge pages on (top of this file) torch asks for 2 MB-aligned buffers,
# and glibc still mmapped 31 MB pieces fresh on every call (a training step at L = 2^17 spent 0.5-0.7 s
# first-touching the MLP's 31 MB pieces, 0.05-0.2 s with 15 MB ones; torch.profiler, 2-core CPU).

HEAP_BUFFER_FLOATS = (15 << 20) // 4  # 15 MB of float32


def cpu_pieces(tensor, per_item):
    """tensor split along its first dimension into pieces whose rows, per_item floats each, fit in
    HEAP_BUFFER_FLOATS together (one piece off the CPU). A split, not slices: the gradient of a slice is a
    zero-filled tensor of the whole's size, one per slice (at L = 2^17, the MLP's 18 pieces made 2.3 GB of
    them per training step), while the gradient of a split is one concatenation."""
    step = tensor.shape[0] if tensor.device.type != "cpu" else max(1, HEAP_BUFFER_FLOATS // per_item)
    return tensor.split(step)


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
    instead, rfft(k, n) (C, n/2+1) complex, n = fft_size(2L-1): see ImplicitFilter.cached_spectrum.

    Written as one autograd Function for speed and memory. The gate's product is written straight into the
    zero-padded buffer the FFT reads: torch.fft.rfft(u, n) would copy u into a fresh padded tensor, a pass
    over 2L per call (at L = 2^20 these copies were 13% of an inference). For backward we keep only the
    inputs: autograd's own rfft/irfft would keep the complex spectra (4x the size of v) and the product a;
    backward recomputes them. The gradients are correlations, convolutions with the conjugate spectrum:
        grad_a = corr(grad_y, k) + bias * grad_y,   grad_v = grad_a * x,   grad_x = grad_a * v,
        grad_k = sum_b corr(grad_y, a),   grad_bias = sum_{b,t} grad_y * a."""

    @staticmethod
    def forward(ctx, v, x, k, bias):
        L = v.shape[-1]
        n = fft_size(2 * L - 1)
        a = GatedCausalConv.padded_product(v, x, n)  # (B, C, n): v * x, then zeros
        k_spectrum = k if k.is_complex() else torch.fft.rfft(k, n=n)  # k may come as its spectrum (C, n/2+1)
        spectrum = torch.fft.rfft(a).mul_(k_spectrum)  # in place: no third spectrum-sized buffer
        ctx.save_for_backward(v, x, k, bias)
        return torch.addcmul(torch.fft.irfft(spectrum, n=n)[..., :L], a[..., :L], bias[:, None])

    @staticmethod
    def backward(ctx, grad_y):
        v, x, k, bias = ctx.saved_tensors
        L = v.shape[-1]
        n = fft_size(2 * L - 1)
        grad_spectrum = torch.fft.rfft(grad_y, n=n)
        grad_v = grad_x = grad_k = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # (conj_physical_ in place: a lazy .conj() is copied whole by the product that reads it)
            grad_a = torch.fft.irfft(grad_spectrum * torch.fft.rfft(k, n=n).conj_physical_(), n=n)[..., :L]
            grad_a = grad_a.addcmul_(grad_y, bias[:, None])
            grad_v = grad_a * x if ctx.needs_input_grad[0] else None
            grad_x = grad_a * v if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            a = GatedCausalConv.padded_product(v, x, n)
            if ctx.needs_input_grad[3]:
                grad_bias = (grad_y * a[..., :L]).sum((0, 2))
            if ctx.needs_input_grad[2]:
                grad_spectrum = grad_spectrum.mul_(torch.fft.rfft(a).conj_physical_()).sum(0)
                grad_k = torch.fft.irfft(grad_spectrum, n=n)[..., :L]
        return grad_v, grad_x, grad_k, grad_bias

    @staticmethod
    def padded_product(v, x, n):
        """v * x (B, C, L) followed by zeros up to length n: the FFT's input, with no copy."""
        L = v.shape[-1]
        a = v.new_empty(*v.shape[:-1], n)
        a[..., L:].zero_()
        torch.mul(v, x, out=a[..., :L])
        return a


def gated_causal_conv(v, x, k, bias):
    """GatedCausalConv in float32 even under bf16 autocast: a sum of up to a million products needs float32's
    mantissa (bf16 FFTs are also unsupported on most backends)."""
    dtype = torch.promote_types(v.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
    k = k if k.is_complex() else k.to(dtype)  # a spectrum is float32's (or float64's) already
    with torch.autocast(v.device.type, enabled=False):
        return GatedCausalConv.apply(v.to(dtype), x.to(dtype), k, bias.to(dtype)).to(v.dtype)


# ---------------------------------------------------------------------------------------------------------
# The implicit filter.

def positional_features(l_max, emb_dim, length=None):
    """z (length, emb_dim): [t, cos(f*w), -sin(f*w)] with t = position/(l_max-1) in [0, 1] and
    w = 2*pi*position/l_max; and t (length, 1), for positions 0..length-1 (default l_max). As published (the
    columns are the real and imaginary parts of exp(-i*f*w)). The features of a position depend on l_max,
    not on length: a short sequence gets the first rows of the long one's."""
    position = torch.arange(l_max if length is None else length, dtype=torch.float32)[:, None]  # (length, 1)
    t = position / (l_max - 1)
    w = 2 * math.pi * position / l_max
    bands = (emb_dim - 1) // 2
    f = torch.linspace(1e-4, bands - 1, bands)[None, :]  # (1, bands)
    return torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1), t


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature."""

    def __init__(self, width, w):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, width))

    def forward(self, x):
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Produces the long filters h (n_filters, L) from positional features, and holds their skip `bias`."""

    def __init__(self, cfg):
        super().__init__()
        n_filters = (cfg.order - 1) * cfg.d_model  # one filter per channel per long convolution
        self.l_max, self.emb_dim = cfg.l_max, cfg.emb_dim
        z, t = positional_features(cfg.l_max, cfg.emb_dim)
        self.register_buffer("z", z)  # (l_max, emb_dim)
        self.register_buffer("t", t)  # (l_max, 1)
        sin = Sin(cfg.filter_order, cfg.w)  # one module at all three places: the frequency is shared
        self.mlp = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, n_filters, bias=False),
        )
        # window decay rates per filter, t = position / l_max: from 1% left at t = 1.5 (slow: past the end,
        # the filter reaches across the whole context) to 1% left at t = 0.3 (fast: a local filter)
        fast, slow = math.log(1e-2) / 0.3, math.log(1e-2) / 1.5
        self.register_buffer("deltas", torch.linspace(slow, fast, n_filters))  # (n_filters,)
        self.bias = nn.Parameter(torch.randn(n_filters))  # the skip term D of the paper
        # The published checkpoints store the positional features (z, t) as tables of l_max rows; the model
        # reads them. An exported graph computes them for the input's length instead (export.py), so that
        # it holds no l_max-long constants: the two agree to float rounding (positional_features).
        self.features_from_positions = False
        # Room for the spectra of the filters to be kept between calls without a gradient (cached_spectrum):
        # 4 GiB per model, shared among its layers. That holds the tiny model's at L = 2^20 (1 GiB a layer),
        # and none that the large model's 8 layers need past 2^17; 0 switches the cache off.
        self.spectrum_cache_bytes = (4 << 30) // cfg.n_layer
        self.spectrum_cache = None  # (key, spectra), see cached_spectrum

    def forward(self, L):
        if self.features_from_positions:
            z, t = positional_features(self.l_max, self.emb_dim, L)
        else:
            z, t = self.z[:L], self.t[:L]
        # The last layer is applied as W @ features^T, straight into (n_filters, L): each channel's filter is
        # then a contiguous row, which the FFT reads (from the transposed (L, n_filters) product, padding the
        # rows for the FFT was a strided copy, 1.1 s of a 23 s inference at 2^20). The window's exp and product
        # run in place: each full-size temporary costs 0.5 GB at 2^20, and fresh memory costs page faults.
        features = self.mlp[:-1](z)  # (L, filter_order)
        h = torch.mm(self.mlp[-1].weight, features.t())  # (n_filters, L)
        window = torch.outer(-self.deltas.abs(), t[:, 0]).exp_().add_(0.05)  # (n_filters, L)
        return h.mul_(window)

    def cached_spectrum(self, L):
        """The filters' spectra rfft(h, n) (n_filters, n/2+1), n = fft_size(2L-1), for use without a gradient;
        None where they would not fit in `spectrum_cache_bytes`. Without a gradient the filters depend only on
        the weights and L, so a model that reads many inputs of one length (scoring, embedding, evaluation)
        computes them once: the filter MLP, its window and the filters' FFTs were about a quarter of an
        inference at L = 2^20. They are recomputed when L, the device, autocast or any weight changes (every
        in-place update of a tensor, an optimizer step or load_state_dict, bumps its version counter)."""
        n = fft_size(2 * L - 1)
        tensors = list(self.parameters()) + list(self.buffers())
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        n_bytes = self.deltas.numel() * (n // 2 + 1) * 2 * dtype.itemsize
        if n_bytes > self.spectrum_cache_bytes:
            return None
        device = tensors[0].device.type
        key = (L, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
               self.features_from_positions, *[(p.data_ptr(), p._version) for p in tensors])
        if self.spectrum_cache is None or self.spectrum_cache[0] != key:
            self.spectrum_cache = None  # free the old spectra before making new ones
            h = self(L).to(dtype)  # (in float32, as gated_causal_conv runs the FFTs)
            spectrum = h.new_empty(h.shape[0], n // 2 + 1, dtype=dtype.to_complex())
            for i in range(0, h.shape[0], 16):  # 16 filters at a time: all at once would pad a copy of all of
                # them, and MKL's batched FFT is several times slower per row on a few rows (measured at 2^21)
                spectrum[i:i + 16] = torch.fft.rfft(h[i:i + 16], n=n)
            self.spectrum_cache = (key, spectrum)
        return self.spectrum_cache[1]


# ---------------------------------------------------------------------------------------------------------
# The Hyena operator.

class CausalShortConv(torch.autograd.Function):
    """Depthwise causal convolution over the last K positions. z: (B, C, L), weight: (C, K), bias: (C,).
    out[t] = bias + sum_j weight[K-1-j] * z[t-j], written as K shifted multiply-adds: at long L this is about
    3x faster on CPU than the depthwise conv1d kernel (measured), and reads as the formula. Its own backward,
    the same shifted multiply-adds read the other way, because autograd through the in-place updates of
    slices would clone the gradient at each one and expand each slice's gradient to full size (4 full-size
    buffers per call; at L = 2^17 these were 2.6 GB of a training step's 22 GB of allocations)."""

    @staticmethod
    def forward(ctx, z, weight, bias):
        K = weight.shape[-1]
        out = torch.addcmul(bias[:, None], z, weight[:, K - 1:])  # the tap on z[t]
        for j in range(1, K):  # (at L <= j both slices are empty)
            out[..., j:].addcmul_(z[..., :-j], weight[:, K - 1 - j, None])  # the tap on z[t - j]
        ctx.save_for_backward(z, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight = ctx.saved_tensors
        K = weight.shape[-1]
        grad_z = grad_out * weight[:, K - 1:]
        grad_weight = torch.empty_like(weight)
        grad_weight[:, K - 1] = (grad_out * z).sum((0, 2))
        for j in range(1, K):  # z[t - j] reached out[t]
            grad_z[..., :-j].addcmul_(grad_out[..., j:], weight[:, K - 1 - j, None])
            grad_weight[:, K - 1 - j] = (grad_out[..., j:] * z[..., :-j]).sum((0, 2))
        return grad_z.to(z.dtype), grad_weight, grad_out.sum((0, 2)).to(weight.dtype)


causal_short_conv = CausalShortConv.apply  # (z, weight, bias) -> out, as in the docstring above


class GroupedProjection(torch.autograd.Function):
    """A linear layer whose output rows come in groups, each group its own tensor, laid out for the FFT:
    u (B, L, d), weight (R, d), bias (R,), sizes (rows per group, summing to R) -> per group a (B, rows, L)
    tensor. Each group is one matmul against u transposed (no copy), written straight into its own tensor.
    Its own backward, because autograd's would first concatenate the groups' gradients into one (B, R, L)
    tensor. One such tensor (as would be one projection holding every group) is 48 MB at batch 32 x 1,024:
    past the heap's 32 MB (see HEAP_BUFFER_FLOATS), so fresh memory in every step. Here the gradient of u is one
    (B, L, d) tensor that each group's matmul adds into in place, and each group's output is a buffer the heap
    serves: training steps at batch 32 x 1,024 past the first few, 0.95 -> 0.85 s (medians, 2-core CPU)."""

    @staticmethod
    def forward(ctx, u, weight, bias, sizes):
        ctx.save_for_backward(u, weight)
        ctx.sizes = sizes
        return tuple(GroupedProjection.project(u, weight, bias, sizes))

    @staticmethod
    def backward(ctx, *grad_groups):
        u, weight = ctx.saved_tensors
        grad_u = None
        for grad, w in zip(grad_groups, weight.split(ctx.sizes)):  # grad (B, rows, L), w (rows, d)
            rows_to_u = (grad.transpose(1, 2), w.expand(u.shape[0], -1, -1))  # (B, L, rows) @ (B, rows, d)
            grad_u = torch.bmm(*rows_to_u) if grad_u is None else grad_u.baddbmm_(*rows_to_u)
        grad_weight = torch.cat([torch.bmm(grad, u).sum(0) for grad in grad_groups])  # (R, d)
        grad_bias = torch.cat([grad.sum((0, 2)) for grad in grad_groups])
        return grad_u, grad_weight, grad_bias, None

    @staticmethod
    def project(u, weight, bias, sizes):
        """The forward pass, usable without autograd (and by the exporter, which traces it)."""
        u_t = u.transpose(1, 2)  # (B, d, L)
        return [torch.baddbmm(b[:, None], w.expand(u.shape[0], -1, -1), u_t)
                for w, b in zip(weight.split(sizes), bias.split(sizes))]


def checkpointed(enabled, fn, *args):
    """fn(*args), but when `enabled` (and a gradient is being taken) its intermediates are not kept for
    backward: they are recomputed there. Trades about a third more compute for memory at long L."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class HyenaOperator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, N = cfg.d_model, cfg.order
        self.in_proj = nn.Linear(d, (N + 1) * d)
        # holds the published depthwise conv's weights ((N+1)d, 1, K); applied by causal_short_conv
        self.short_conv = nn.Conv1d((N + 1) * d, (N + 1) * d, cfg.short_filter_order, groups=(N + 1) * d)
        self.filter = ImplicitFilter(cfg)
        self.out_proj = nn.Linear(d, d)
        # Floats in a channel group's largest buffer (its projections, or its FFT spectrum), to stay on the
        # heap (see HEAP_BUFFER_FLOATS). Measured at batch 32 x 1,024 (training step, 2-core CPU): 1.2-1.5 s
        # here against 1.7-2.2 s at 128 MB; bounding the projections too made no measurable difference at 2^17.
        self.group_budget = HEAP_BUFFER_FLOATS
        self.channel_group = None  # channels per group; None: chosen from group_budget
        self.gated_conv = gated_causal_conv  # export.py swaps in the formulation its target runs best
        self.short_conv_fn = causal_short_conv  # likewise

    def forward(self, u, checkpoint=False):
        B, L, d = u.shape  # u: (B, L, d)
        N = self.cfg.order
        # the long filters h (N-1, d, L), or without a gradient their spectra (N-1, d, n/2+1), kept between calls
        h = None if torch.is_grad_enabled() or torch.compiler.is_exporting() else self.filter.cached_spectrum(L)
        h = (checkpointed(checkpoint, self.filter, L) if h is None else h).view(N - 1, d, -1)
        # Everything between in_proj and out_proj acts on each channel separately: channel c of y needs only
        # channel c of x_0..x_{N-1} and v. Processing channels in groups bounds the big temporaries (the
        # projected streams and the FFT buffers) to one group's worth: at L = 2^20 the whole width at once
        # would need several GB, a group of 16 channels a few hundred MB, and runs faster (cache-sized FFTs).
        # Under checkpointing each group is recomputed alone in backward, so training memory is bounded too.
        group = self.channel_group
        if group is None:  # equal groups, each buffer within group_budget floats: the projections (B, (N+1)G, L)
            # and the FFT spectrum (B, G, n/2+1) complex; but at least 16 channels: in_proj's slice of a group is
            # a matmul, and thinner ones run far below peak (at L = 2^20, groups of 3 took inference from 22 to 30 s)
            per_channel = B * max((N + 1) * L, fft_size(2 * L - 1) + 2)
            n_groups = math.ceil(d / max(16, self.group_budget // per_channel))
            group = math.ceil(d / n_groups)
        groups = [slice(c, min(c + group, d)) for c in range(0, d, group)]
        h_groups = h.split(group, dim=1)  # (not h[:, g]: an index's gradient is full-size zeros, per group)
        mix = lambda u, h_g, g: self.mix_channels(self.project(u, [g])[0], h_g, g)
        if torch.is_grad_enabled() and not checkpoint:
            # backward keeps every group's projection anyway, so project them all in one call: its backward
            # then adds every group's gradient into one for u (per call, each would be a full-size tensor)
            y = torch.cat([self.mix_channels(z, h_g, g)
                           for z, h_g, g in zip(self.project(u, groups), h_groups, groups)], dim=1)
        elif torch.is_grad_enabled():
            y = torch.cat([checkpointed(checkpoint, mix, u, h_g, g) for h_g, g in zip(h_groups, groups)], dim=1)
        else:  # each group written into y as it is done: no list of groups to concatenate
            y = u.new_empty(B, d, L)
            for h_g, g in zip(h_groups, groups):
                y[:, g] = mix(u, h_g, g)
        # out_proj on y transposed, (B, d, L) -> (B, L, d), bias and all in one batched matmul (F.linear on a
        # transposed input adds the bias in a second pass over the output)
        W, b = self.out_proj.weight, self.out_proj.bias
        return torch.baddbmm(b, y.transpose(1, 2), W.t().expand(B, -1, -1))

    def project(self, u, groups):
        """in_proj for the channels of each group (slices of 0..d), all N+1 streams: per group a (B, (N+1)*G, L)
        tensor, computed straight into the layout the FFT wants (GroupedProjection). u: (B, L, d)."""
        N, d = self.cfg.order, self.cfg.d_model
        W, b = self.in_proj.weight.view(N + 1, d, d), self.in_proj.bias.view(N + 1, d)
        W, b = torch.cat([W[:, g].flatten(0, 1) for g in groups]), torch.cat([b[:, g].flatten() for g in groups])
        sizes = [(N + 1) * (g.stop - g.start) for g in groups]
        if torch.is_grad_enabled():
            return GroupedProjection.apply(u, W, b, sizes)
        return GroupedProjection.project(u, W, b, sizes)

    def mix_channels(self, z, h, g):
        """Channels g (a slice) of the operator, from their projections to before out_proj. z: (B, (N+1)*G, L),
        h: their filters (N-1, G, L) -> (B, G, L)."""
        N, d = self.cfg.order, self.cfg.d_model
        Wc, bc = self.short_conv.weight.view(N + 1, d, -1), self.short_conv.bias.view(N + 1, d)
        z = self.short_conv_fn(z, Wc[:, g].flatten(0, 1), bc[:, g].flatten())
        *x, v = z.split(g.stop - g.start, dim=1)  # x_0 .. x_{N-1}, v: each (B, G, L)
        bias = self.filter.bias.view(N - 1, d)
        for o, x_i in enumerate(reversed(x[1:])):  # x_{N-1} first, as published
            v = self.gated_conv(v, x_i, h[o], bias[o, g])  # h_o (*) (v * x_i) + bias_o * (v * x_i)
        return v * x[0]


# ---------------------------------------------------------------------------------------------------------
# Blocks and the model.

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_inner)
        self.fc2 = nn.Linear(cfg.d_inner, cfg.d_model)

    def forward(self, x, in_pieces=True):  # x: (B, L, d)
        # The hidden activations, 4x wider than the stream, are the largest tensors of a step: on the CPU they
        # are made (and, in backward, their gradients) for a piece of the positions at a time, which the heap
        # serves (HEAP_BUFFER_FLOATS). A training step at L = 2^17 (2-core CPU, medians of 4 steps, 3 runs):
        # 7.4-9.1 s -> 6.3-6.6 s. The heap keeps what it has served, though: where memory comes first (Block's
        # slices at long L), in_pieces=False (at 2^19 under checkpointing, pieces took 0.56 GB more).
        rows = x.reshape(-1, x.shape[-1])  # (B*L, d)
        pieces = cpu_pieces(rows, self.fc1.out_features) if in_pieces else [rows]
        if len(pieces) == 1 or torch.compiler.is_exporting():
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        out = torch.cat([self.fc2(F.gelu(self.fc1(piece), approximate="tanh")) for piece in pieces])
        return out.view(*x.shape[:-1], -1)


class Block(nn.Module):
    """Pre-norm residual block. The residual stream stays float32 under bf16 autocast (adding a bf16 branch
    to a float32 stream gives float32), as the published `residual_in_fp32` asks."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mixer = HyenaOperator(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)
        self.mlp_chunk = 1 << 16  # positions per MLP call at long L, see forward

    def forward(self, x, checkpoint=False):  # x: (B, L, d)
        branch = self.dropout(self.mixer(self.norm1(x), checkpoint))
        # without a gradient, the residual is added into the branch's own fresh tensor (one big tensor fewer);
        # but not into a bf16 branch under autocast, which would round the float32 stream
        x = branch.add_(x) if not torch.is_grad_enabled() and branch.dtype == x.dtype else x + branch
        # The MLP acts on each position alone and fc1 is 4x wider than the stream (2 GB at L = 2^20, d = 128),
        # so at long L it runs on slices of positions: without a gradient, updating the stream in place one
        # slice at a time; under checkpointing, recomputing one slice at a time in backward.
        if x.shape[1] <= self.mlp_chunk or (torch.is_grad_enabled() and not checkpoint):
            # (with a gradient but no checkpointing, slices would store the same activations, then copy them)
            return x + self.dropout(self.mlp(self.norm2(x)))
        if not torch.is_grad_enabled():
            for part in x.split(self.mlp_chunk, dim=1):
                part += self.dropout(self.mlp(self.norm2(part), in_pieces=False))
            return x
        branch = lambda part: self.dropout(self.mlp(self.norm2(part), in_pieces=False))
        return x + torch.cat([checkpointed(checkpoint, branch, part) for part in x.split(self.mlp_chunk, dim=1)], 1)


class HyenaDNA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)  # also the LM head (tied)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        # Recompute activations in backward instead of storing them: whole blocks, and inside a block's
        # recomputation the filter, each channel group of the mixer and each slice of the MLP, so that
        # memory at L = 2^20 stays at a few activations of the residual stream's size.
        self.gradient_checkpointing = False
        # As published: N(0, 0.02) for every linear and embedding weight, zero biases, and the projections
        # that write into the residual stream scaled down by sqrt(2 * n_layer) so its variance stays put.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.mixer.out_proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def check_input_ids(self, input_ids):
        """ValueError naming the problem unless input_ids is an integer (B, L) tensor of token ids with
        1 <= L <= l_max."""
        if not isinstance(input_ids, torch.Tensor):
            raise UserError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"input_ids must be an integer tensor (int64), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must have shape (batch, length), got {input_ids.dim()} dims "
                             f"{tuple(input_ids.shape)}")
        if torch.compiler.is_exporting():  # a traced graph has no concrete values to check
            return
        B, L = input_ids.shape
        if not 1 <= L <= self.cfg.l_max:
            raise UserError(f"sequence length {L} is outside the allowed range [1, {self.cfg.l_max}] (l_max)")
        if B < 1:
            raise UserError("input_ids has an empty batch")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise UserError(f"token ids must be in [0, {self.cfg.vocab_size}), got values in [{lo}, {hi}]")

    def hidden_states(self, input_ids):
        """(B, L) token ids -> (B, L, d_model), after the final LayerNorm."""
        self.check_input_ids(input_ids)
        return self.hidden_states_from_embeddings(self.embedding(input_ids.long()))

    def hidden_states_from_embeddings(self, x):
        """(B, L, d_model) input embeddings -> (B, L, d_model) hidden states. Soft prompting enters here, with
        learned vectors in place of some token embeddings."""
        if x.shape[1] > self.cfg.l_max:
            raise UserError(f"sequence length {x.shape[1]} is outside the allowed range [1, {self.cfg.l_max}] (l_max)")
        x = self.dropout(x)
        for block in self.blocks:
            x = checkpointed(self.gradient_checkpointing, block, x, self.gradient_checkpointing)
        return self.ln_f(x)

    def forward(self, input_ids):
        """(B, L) token ids -> next-token logits (B, L, padded_vocab_size)."""
        return F.linear(self.hidden_states(input_ids), self.embedding.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------------
# Using a trained model: likelihoods and embeddings. Batches of unequal lengths are padded on the RIGHT here:
# the model is causal, so a position never sees the padding after it, and every score and embedding is the
# one the sequence gets alone (up to float rounding), whatever it is batched with.

def pad_right(sequences, pad_id=PAD_ID):
    """list of 1-D int arrays -> (B, max length) int64 tensor, padded with pad_id, and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return ids, lengths


@torch.no_grad()
def log_likelihood(model, input_ids, lengths=None):
    """(B, L) ids -> (B, L-1) float32, entry t-1 = log P(ids[:, t] | ids[:, :t]): each base's log-probability
    given the bases before it (the first has none). With `lengths`, rows are right-padded to L and entries
    past a row's end are 0, so a row's sum is its sequence's log-likelihood."""
    logits = model(input_ids)[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None].long())[..., 0]
    if lengths is not None:
        logp = logp.masked_fill(torch.arange(logp.shape[1], device=logp.device) >= lengths.to(logp.device)[:, None] - 1, 0.0)
    return logp


def scoring_windows(length, window, context):
    """Cover positions 1..length-1 of a record with windows of `window` bases so that each position is predicted
    exactly once, with at least `context` bases before it inside its window (fewer only near the record's
    start). Returns [(start, first)]: the window [start, start + window) scores positions [first, its end)."""
    if length <= window:
        return [(0, 1)] if length > 1 else []
    if not 0 <= context < window:
        raise UserError(f"context {context} must be in [0, window {window})")
    plan, first = [], 1
    while first < length:
        # base `first` is predicted from the ones before it, so its window starts at least one base earlier;
        # the last window is moved back to end at the record's end
        start = max(0, min(first - max(context, 1), length - window))
        plan.append((start, first))
        first = start + window
    return plan


@torch.no_grad()
def record_log_probs(model, ids, window=None, context=None, batch_size=8):
    """1-D ids of a record of any length -> (length-1,) float32 log-probabilities of its bases 1..length-1,
    scored in windows of at most `window` (default l_max) bases with `context` (default window // 2) bases of
    context before each (see scoring_windows)."""
    window = window or model.cfg.l_max
    context = window // 2 if context is None else context
    if not 1 <= window <= model.cfg.l_max:
        raise UserError(f"window {window} is outside [1, {model.cfg.l_max}] (l_max)")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    device = next(model.parameters()).device
    out = torch.zeros(max(0, len(ids) - 1))
    plan = scoring_windows(len(ids), window, context)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        logp = log_likelihood(model, torch.stack([ids[s:s + window] for s, _ in chunk]).to(device)).cpu()
        for row, (start, first) in enumerate(chunk):
            stop = min(start + window, len(ids))
            out[first - 1:stop - 1] = logp[row, first - start - 1:stop - start - 1]
    return out


@torch.no_grad()
def embed(model, sequences, pool="mean", batch_size=32):
    """One vector per sequence: (N, d_model) float32 NumPy, in input order. sequences: DNA strings or 1-D id
    arrays. pool "mean" averages the hidden states over the sequence; "last" takes its last position, where
    the causal model has read all of it. Sequences are batched by similar length to waste little on padding."""
    if pool not in ("mean", "last"):
        raise UserError(f"pool must be 'mean' or 'last', got {pool!r}")
    seqs = [tokenize(s) if isinstance(s, (str, bytes)) else np.asarray(s) for s in sequences]
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= model.cfg.l_max:
            raise UserError(f"sequence {i} has length {len(s)}, outside [1, {model.cfg.l_max}] (l_max)")
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), model.cfg.d_model), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, lengths = pad_right([seqs[r] for r in rows])
        hidden = model.hidden_states(ids.to(device)).float()  # (B, L, d)
        lengths = lengths.to(device)
        if pool == "mean":
            real = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).float()  # (B, L)
            vectors = (hidden * real[..., None]).sum(1) / lengths[:, None]
        else:
            vectors = hidden[torch.arange(len(rows), device=device), lengths - 1]
        out[rows] = vectors.cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading and saving checkpoints. A checkpoint is a folder holding config.json and weights, in one of three
# layouts:
#   - published HyenaDNA (PyTorch Lightning): config.json with the operator's fields nested under "layer",
#     weights.ckpt with keys model.backbone.*;
#   - Hugging Face hub (the "-hf" repositories, loaded there with trust_remote_code): a flat config.json
#     (max_seq_len, hyena_order, activation_freq, ...), model.safetensors or pytorch_model.bin with keys
#     hyena.backbone.*; a sequence classifier adds score.weight;
#   - this project's: config.json in the published layout, model.pt with this module's own keys.
# Both foreign layouts name the modules alike below "backbone.", so one table translates both.

class _Opaque:
    """Stands in for any class a checkpoint names outside the allow-list below (omegaconf's DictConfig,
    Lightning's AttributeDict, ...). It records what the pickle hands it and runs nothing, so loading
    needs neither those libraries nor trust in the file."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": "opaque." + module})


class _RestrictedPickleModule:  # what torch.load expects of a `pickle_module`
    Unpickler = _RestrictedUnpickler
    __name__ = "tinyhyena_restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def load_torch_file(path):
    """torch.load that never executes code from the file: tensors and plain containers come back as they
    are, objects of any other class as inert placeholders. Errors name the file."""
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


# safetensors, the hub's weight format, is simple enough to read and write with torch alone: an 8-byte
# little-endian header size, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (plus an optional
# "__metadata__" of strings), then the tensors' raw little-endian bytes, offsets counted from the header's end.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file. ValueError naming the file if it is not one."""
    blob = bytearray(os.path.getsize(path))  # writable, so the tensors can view it without a copy
    with open(path, "rb") as f:
        f.readinto(blob)
    try:
        size = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or size > len(blob) - 8:
            raise UserError(f"header size {size} exceeds the file's {len(blob)} bytes")
        header = json.loads(blob[8:8 + size])
        data = memoryview(blob)[8 + size:]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
            begin, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
                raise UserError(f"tensor {name!r}: byte range {begin}..{end} does not fit shape {shape}")
            flat = torch.frombuffer(data[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors, atomically. metadata: {str: str} (the hub's loader wants
    {"format": "pt"})."""
    dtype_names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset, chunks = {}, 0, []
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for raw in chunks:
                f.write(raw)
    atomic_write(path, write)


# This module's names <-> the published ones (after "backbone."), one substitution per key at most. Reading
# applies them right to left, writing left to right; the filter MLP comes first, so that its ".bias" keys are
# not taken for the filter's own bias.
_PUBLISHED_NAMES = [
    ("embedding.", "embeddings.word_embeddings."),
    ("blocks.", "layers."),
    (".short_conv.", ".short_filter."),
    (".filter.mlp.", ".filter_fn.implicit_filter."),
    (".filter.z", ".filter_fn.pos_emb.z"),
    (".filter.t", ".filter_fn.pos_emb.t"),
    (".filter.deltas", ".filter_fn.modulation.deltas"),
    (".filter.bias", ".filter_fn.bias"),
]
# runs trained with checkpoint_mixer / checkpoint_mlp wrap the modules in one more layer
_PUBLISHED_WRAPPERS = [(".mixer.layer.", ".mixer."), (".mlp.layer.", ".mlp.")]
# the published filter tables carry leading dimensions of size 1, which this module drops: z (1, L, emb_dim),
# t (1, L, 1), deltas (1, 1, n_filters)
_PUBLISHED_LEADING_ONES = {".filter.z": 1, ".filter.t": 1, ".filter.deltas": 2}


def _published_name(key):
    """This module's key -> its name below "backbone." in the published and hub layouts."""
    for ours, theirs in _PUBLISHED_NAMES:
        key = key.replace(ours, theirs, 1)
    return key


def _our_name(key):
    for theirs, ours in _PUBLISHED_WRAPPERS:
        key = key.replace(theirs, ours)
    for ours, theirs in _PUBLISHED_NAMES:
        key = key.replace(theirs, ours, 1)
    return key.replace(".filter_fn.", ".filter.")  # filter tables some versions keep on the filter itself


def convert_published_state_dict(state_dict, source="checkpoint"):
    """Split a published or hub state dict into (backbone state in this module's keys, other tensors by their
    own names: `score.weight` of a hub classifier, say). Keys are read after "backbone." (model.backbone.*,
    hyena.backbone.*). The LM head is the tied embedding, so `lm_head.weight` is checked, not loaded."""
    out, rest, head = {}, {}, None
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.endswith("lm_head.weight"):
            head = value
        elif "backbone." in key:
            out[_our_name(key.split("backbone.", 1)[1])] = value
        else:
            rest[key] = value
    if head is not None and "embedding.weight" in out and not torch.equal(head, out["embedding.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from the token embedding; tinyhyena ties them")
    return out, rest


def _load_state_dict(model, state_dict, source):
    """load_state_dict with errors that name the file, shapes of published buffers reconciled
    ((1, L, 5) vs (L, 5)), and the shared sine frequency checked."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: keys do not match the model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                         f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    fixed = {}
    for key, value in state_dict.items():
        if value.numel() != own[key].numel():
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the config implies "
                             f"{tuple(own[key].shape)}")
        fixed[key] = value.reshape(own[key].shape).to(own[key].dtype)
    for i in range(len(model.blocks)):
        freqs = [fixed[f"blocks.{i}.mixer.filter.mlp.{j}.freq"] for j in (1, 3, 5)]
        if not all(torch.equal(freqs[0], f) for f in freqs[1:]):
            raise UserError(f"{source}: block {i}'s three sine frequencies differ; the published model shares one")
    model.load_state_dict(fixed)


# The hub port's config.json: its field -> ours. Fields it has that change nothing here (dropouts of the
# operator, initializer_range, ...) are kept aside and written back.
_HF_FIELDS = {"d_model": "d_model", "n_layer": "n_layer", "d_inner": "d_inner", "vocab_size": "vocab_size",
              "pad_vocab_size_multiple": "pad_vocab_size_multiple", "embed_dropout": "embed_dropout",
              "layer_norm_epsilon": "layer_norm_epsilon", "max_seq_len": "l_max", "hyena_order": "order",
              "filter_order": "filter_order", "emb_dim": "emb_dim", "short_filter_order": "short_filter_order",
              "activation_freq": "w"}
# What the port computes that tinyhyena does not represent: field -> (the one value both share, why).
_HF_REQUIRED = {
    "hyena_order": (2, "the port's window has d_model decay rates, one filter set's worth"),
    "num_inner_mlps": (2, "tinyhyena's filter MLP has three sine layers"),
    "use_bias": (True, "tinyhyena always adds the filter's skip bias, as the port's fftconv does"),
    "short_filter_order": (3, "the port pads its short convolution by 2, which is causal only for 3 taps"),
    "layer_norm_epsilon": (1e-5, "the port's block norms use 1e-5 whatever the config says"),
}
HF_CODE_REPO = "LongSafari/hyenadna-tiny-1k-seqlen-hf"  # where the port's configuration and modeling code live


def is_hf_config(d):
    return isinstance(d, dict) and "max_seq_len" in d and "layer" not in d


def config_from_hf(d):
    """HyenaConfig from a hub config.json dict. ValueError naming the field for what tinyhyena cannot
    represent."""
    for name, (value, why) in _HF_REQUIRED.items():
        if name in d and d[name] != value and not (isinstance(value, float) and isinstance(d[name], (int, float))
                                                   and math.isclose(d[name], value)):
            raise UserError(f"config field {name} is {d[name]!r}; tinyhyena reads only {value!r} ({why})")
    fields = {ours: d[theirs] for theirs, ours in _HF_FIELDS.items() if d.get(theirs) is not None}
    fields.setdefault("d_inner", 4 * fields.get("d_model", HyenaConfig.d_model))
    fields["resid_dropout"] = 0.0  # the port's blocks have no residual dropout
    if not isinstance(fields.get("w", 1), (int, float)):
        raise UserError(f"config field activation_freq must be a number, got {fields['w']!r}")
    extra = {k: v for k, v in d.items() if k not in _HF_FIELDS}
    cfg = HyenaConfig(**fields, extra={"hf": extra})
    cfg.validate()
    return cfg


def config_to_hf(cfg, **fields):
    """The hub config.json dict of cfg; `fields` (architectures, num_labels, ...) are added last."""
    out = {k: v for k, v in cfg.extra.get("hf", {}).items() if k not in ("architectures", "auto_map")}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in _HF_FIELDS.items()})
    out.update(model_type="hyenadna", num_inner_mlps=2, use_bias=True, train_freq=True,
               tie_word_embeddings=True, torch_dtype="float32",
               auto_map={"AutoConfig": f"{HF_CODE_REPO}--configuration_hyena.HyenaConfig",
                         "AutoModel": f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAModel",
                         "AutoModelForCausalLM": f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAForCausalLM",
                         "AutoModelForSequenceClassification":
                             f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAForSequenceClassification"},
               architectures=["HyenaDNAForCausalLM"])
    out.update(fields)
    return out


def _restore_shared_freqs(state, cfg):
    """The port's three sine layers share one `freq` tensor, which safetensors saves once (or, with
    train_freq false, not at all: the port then uses activation_freq). Fill in the missing copies."""
    for i in range(cfg.n_layer):
        keys = [f"blocks.{i}.mixer.filter.mlp.{j}.freq" for j in (1, 3, 5)]
        present = [state[k] for k in keys if k in state]
        fill = present[0] if present else torch.full((1, cfg.filter_order), float(cfg.w))
        for k in keys:
            state.setdefault(k, fill)


WEIGHT_FILES = ("model.pt", "weights.ckpt", "model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read but not yet built into a model."""
    cfg: HyenaConfig
    state: dict  # the backbone's tensors in this module's names
    rest: dict  # tensors outside the backbone, by their own names (a hub classifier's score.weight)
    config: dict  # config.json as written
    weights_path: str


def read_checkpoint(path):
    """Read a checkpoint folder in any of the three layouts (see above). Errors name the file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingFileError(f"{path}: checkpoint folder not found")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        cfg = config_from_hf(config) if is_hf_config(config) else HyenaConfig.from_dict(config)
    except FileNotFoundError:
        raise MissingFileError(f"{config_path}: file not found (a checkpoint folder holds config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{config_path}: malformed config ({e})") from None
    name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if name is None:
        raise MissingFileError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)})")
    weights_path = os.path.join(path, name)
    blob = read_safetensors(weights_path) if name.endswith(".safetensors") else load_torch_file(weights_path)
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # a Lightning file: the rest is optimizer state and hyper-parameters
    if not isinstance(blob, dict) or not blob:
        raise UserError(f"{weights_path}: holds no state dict")
    if name == "model.pt":
        return Checkpoint(cfg, blob, {}, config, weights_path)
    state, rest = convert_published_state_dict(blob, source=weights_path)
    if is_hf_config(config):
        _restore_shared_freqs(state, cfg)
    return Checkpoint(cfg, state, rest, config, weights_path)


def from_pretrained(path, device="cpu"):
    """Load a checkpoint folder: a published HyenaDNA one (config.json + weights.ckpt), a Hugging Face hub
    one (config.json + model.safetensors or pytorch_model.bin) or one written by this project (config.json +
    model.pt). In eval mode."""
    ckpt = read_checkpoint(path)
    model = HyenaDNA(ckpt.cfg)
    _load_state_dict(model, ckpt.state, ckpt.weights_path)
    return model.to(device).eval()


def pick_device(name="auto"):
    """torch.device from a command-line name: "auto" is the GPU when there is one, else the CPU. UserError
    naming --device for one that torch cannot use here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UserError(f"--device {name}: CUDA requested but this torch build has no CUDA")
        visible = torch.cuda.device_count()
        if visible == 0:
            raise UserError(f"--device {name}: CUDA requested but no GPU is visible")
        if device.index is not None and device.index >= visible:
            raise UserError(f"--device {name}: {name} requested, {visible} GPU{'s' if visible > 1 else ''} visible")
    return device


def atomic_write(path, write):
    """write(tmp) then rename tmp to path: readers see the old file or the new one, never half of one. A
    path that cannot be written is a UserError naming it (not the temporary file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, lines):
    """Text lines to path atomically, or to standard output when path is None."""
    if path is None:
        sys.stdout.writelines(lines)
        return

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    atomic_write(path, write)


def hf_state_dict(model, prefix="hyena.backbone."):
    """The model's tensors under the hub port's names and shapes, the tied LM head included."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        ones = next((n for suffix, n in _PUBLISHED_LEADING_ONES.items() if key.endswith(suffix)), 0)
        out[prefix + _published_name(key)] = value.reshape((1,) * ones + value.shape).clone()
    out["lm_head.weight"] = model.embedding.weight.detach().cpu().clone()
    return out


def save_pretrained(model, path, layout="tinyhyena"):
    """Write the model into the folder `path`, each file atomically (temp file, then rename). layout
    "tinyhyena": config.json + model.pt, what this project reads fastest. layout "hf": config.json +
    model.safetensors for the Hugging Face hub, which transformers loads with the published port's code
    (AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)); from_pretrained reads it too."""
    if layout not in ("tinyhyena", "hf"):
        raise UserError(f"layout must be 'tinyhyena' or 'hf', got {layout!r}")
    os.makedirs(path, exist_ok=True)
    if layout == "hf":
        write_safetensors(os.path.join(path, "model.safetensors"), hf_state_dict(model), {"format": "pt"})
        config = config_to_hf(model.cfg)
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_write(os.path.join(path, "model.pt"), lambda tmp: torch.save(state, tmp))
        config = model.cfg.to_dict()
    write_text(os.path.join(path, "config.json"), [json.dumps(config, indent=2)])


# ---------------------------------------------------------------------------------------------------------
# Command lines. Every script parses with ArgumentParser, checks values with the types below and runs its main
# through run_command: what the user got wrong is one line, `error: <what, naming the flag or path>`, exit 1.

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line, exit 1) rather than usage text and exit 2."""

    def error(self, message):
        raise UserError(message)


def _checked(convert, test, wanted):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
open_fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: file not found" if not os.path.exists(text) else f"{text}: not a file")
    return text


def output_file(text):
    """A file to write: its folder must exist, and it must not be a folder itself (checked before any work)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: folder {os.path.dirname(text) or folder} does not exist")
    return text


def existing_path(text):
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: not found")
    return text


def make_out_dir(path, flag="--out"):
    """Create an output folder up front; UserError naming the flag and folder if it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None


def run_command(main, argv=None):
    """A script's entry point: main(argv) -> exit status, with a UserError printed as one line, status 1."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------
# The NumPy twin: the same forward pass written again in float64 NumPy from the model's weights, sharing no
# code with the torch path above. Tests hold the two against each other; it is a specification, not fast.

def _np_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_causal_conv(v, h):
    """v (B, L, C), h (L, C): y[:, t] = sum_{s<=t} h[t-s] v[:, s], by a power-of-two FFT over axis 1."""
    L = v.shape[1]
    n = 1 << (2 * L).bit_length()  # > 2L, a different size from the torch path's on purpose
    spectrum = np.fft.rfft(v, n=n, axis=1) * np.fft.rfft(h, n=n, axis=0)[None]
    return np.fft.irfft(spectrum, n=n, axis=1)[:, :L]


def _np_hyena(p, x, cfg):
    B, L, d = x.shape
    N = cfg.order
    z = x @ p["in_proj.weight"].T + p["in_proj.bias"]  # (B, L, (N+1)d)
    w = p["short_conv.weight"][:, 0, :]  # ((N+1)d, K); output t sees inputs t-K+1 .. t
    K = w.shape[1]
    padded = np.concatenate([np.zeros((B, K - 1, z.shape[2])), z], axis=1)
    z = sum(w[:, j] * padded[:, j:j + L] for j in range(K)) + p["short_conv.bias"]
    streams = [z[..., i * d:(i + 1) * d] for i in range(N + 1)]  # x_0 .. x_{N-1}, v
    # the implicit filter
    f = p["filter.z"][:L]
    for j in (0, 2, 4):
        f = np.sin(p[f"filter.mlp.{j + 1}.freq"] * (f @ p[f"filter.mlp.{j}.weight"].T + p[f"filter.mlp.{j}.bias"]))
    f = f @ p["filter.mlp.6.weight"].T  # (L, (N-1)d)
    f = f * (np.exp(-p["filter.t"][:L] * np.abs(p["filter.deltas"])) + 0.05)
    v = streams[N]
    for o, i in enumerate(range(N - 1, 0, -1)):
        v = v * streams[i]
        v = _np_causal_conv(v, f[:, o * d:(o + 1) * d]) + v * p["filter.bias"][o * d:(o + 1) * d]
    y = v * streams[0]
    return y @ p["out_proj.weight"].T + p["out_proj.bias"]


def reference_forward(model, input_ids, return_hidden=False):
    """float64 logits (B, L, padded_vocab) of `model` on `input_ids`, computed in NumPy (eval mode: no
    dropout). With return_hidden, the hidden states after the final LayerNorm instead."""
    cfg = model.cfg
    p = {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    eps = cfg.layer_norm_epsilon
    x = p["embedding.weight"][ids]  # (B, L, d)
    for i in range(cfg.n_layer):
        q = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        mixer = {k[len("mixer."):]: v for k, v in q.items() if k.startswith("mixer.")}
        x = x + _np_hyena(mixer, _np_layer_norm(x, q["norm1.weight"], q["norm1.bias"], eps), cfg)
        hidden = _np_layer_norm(x, q["norm2.weight"], q["norm2.bias"], eps) @ q["mlp.fc1.weight"].T + q["mlp.fc1.bias"]
        x = x + _np_gelu_tanh(hidden) @ q["mlp.fc2.weight"].T + q["mlp.fc2.bias"]
    x = _np_layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x if return_hidden else x @ p["embedding.weight"].T
