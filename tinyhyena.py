"""
tinyhyena: HyenaDNA in one file.

HyenaDNA (Nguyen et al. 2023, "HyenaDNA: Long-Range Genomic Sequence Modeling at Single Nucleotide
Resolution", arXiv 2306.15794) is a causal language model of DNA that reads one nucleotide per token and
replaces attention with the Hyena operator (Poli et al. 2023, arXiv 2302.10866), so its cost grows as
O(L log L) in the sequence length L instead of O(L^2). That is what lets it read a million bases at once.

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

Shapes: B batch, L sequence length (at most l_max), d (D above) d_model, N the operator's order, K the short
convolution's taps, V the padded vocabulary (16).

Reading order: config, FFT convolution, implicit filter, Hyena operator, block, model, decoding (`prefill`
and `step` beside `forward`), tokenizer, using a trained model, loading and saving, and the NumPy twin.

This file is the plain path, the function itself; fast.py computes it in less time and memory, held to this
file by property tests. Each HyenaOperator and Block has one attribute, `fast`, that chooses: None runs the
code below, anything else is called in its place as `fast(module, input)`. HyenaDNA(cfg) puts fast.py's paths
there, HyenaDNA(cfg, fast=False) None (same parameters, same state_dict). That attribute is the file's one
seam, where parallel.py puts context parallelism; onnx_graph.py and checkpoints.py build from the modules.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
from base import UserError  # (th.UserError: the error type every module raises)
from fast import FastBlock, FastHyena

__version__ = "0.1.0"  # written into exported ONNX graphs


# ---------------------------------------------------------------------------------------------------------
# The config: the fields of the published config.json, flattened (checkpoints.py reads and writes its layouts).

@dataclass
class HyenaConfig:
    d_model: int = 128
    n_layer: int = 2
    d_inner: int = 512  # MLP hidden width, 4 * d_model in every published model
    vocab_size: int = 12  # the tokenizer's ids (below)
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
    short_filter_order: int = 3  # K, the taps of the causal depthwise conv ("local_order")
    # published fields this implementation reads but that do not change the function
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self):  # -> self
        lowest = dict(d_model=1, n_layer=1, d_inner=1, vocab_size=1, pad_vocab_size_multiple=1, l_max=2, order=2,
                      filter_order=1, emb_dim=3, short_filter_order=1)
        for name, low in lowest.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"config field {name} must be an integer >= {low}, got {value!r}")
        if self.emb_dim % 2 == 0:
            raise UserError(f"config field emb_dim must be odd (t plus cos/sin pairs), got {self.emb_dim}")
        return self


# ---------------------------------------------------------------------------------------------------------
# The long convolution.

def fft_conv(u, k):
    """Causal convolution of u (B, C, L) with one filter per channel k (C, L), by FFT:
    y[..., t] = sum_{s<=t} k[..., t-s] u[..., s]. Zero-padded to n = 2L, so nothing wraps onto the L outputs
    kept. In float32 at least: a sum of up to a million products needs its mantissa."""
    L, dtype = u.shape[-1], torch.promote_types(u.dtype, torch.float32)
    n = 2 * L
    u_f = torch.fft.rfft(u.to(dtype), n=n)  # (B, C, n/2+1) complex
    k_f = torch.fft.rfft(k.to(dtype), n=n)  # (C, n/2+1)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :L]  # (B, C, L)


# ---------------------------------------------------------------------------------------------------------
# The implicit filter.

def positional_features(l_max, emb_dim, length=None, dtype=torch.float32):
    """z (length, emb_dim): [t, cos(f*w), -sin(f*w)], the real and imaginary parts of exp(-i*f*w), with
    t = position/(l_max-1) and w = 2*pi*position/l_max; and t (length, 1), for positions 0..length-1 (default
    l_max), as published. They depend on l_max, not on length: a short sequence gets the long one's first rows."""
    position = torch.arange(l_max if length is None else length, dtype=dtype)[:, None]  # (length, 1)
    t = position / (l_max - 1)
    w = 2 * math.pi * position / l_max
    bands = (emb_dim - 1) // 2
    f = torch.linspace(1e-4, bands - 1, bands, dtype=dtype)[None, :]  # (1, bands)
    return torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1), t


def filter_window(t, rates):
    """The window exp(-|rate| * t) + 0.05 (L, n) at positions t (L, 1), one decay rate per filter (n,): it
    fades each filter with distance, to a floor of 0.05 that keeps every lag reachable."""
    return torch.exp(-t * rates.abs()) + 0.05


def window_decay_rates(n_filters, dtype=torch.float32):
    """One decay rate per filter, for the window exp(-|rate| * t): from 1% left at t = 1.5 (slow: the filter
    reaches across the whole context) to 1% left at t = 0.3 (fast: a local filter)."""
    return torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, n_filters, dtype=dtype)


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature."""

    def __init__(self, width, w):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, width))

    def forward(self, x):
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Computes the long filters h (n_filters, L) from positional features, and holds their skip `bias`."""

    def __init__(self, cfg):
        super().__init__()
        n_filters = (cfg.order - 1) * cfg.d_model  # one filter per channel per long convolution
        self.l_max, self.emb_dim = cfg.l_max, cfg.emb_dim
        z, t = positional_features(cfg.l_max, cfg.emb_dim)
        self.register_buffer("z", z)  # (l_max, emb_dim), stored in checkpoints as published
        self.register_buffer("t", t)  # (l_max, 1)
        sin = Sin(cfg.filter_order, cfg.w)  # one module at all three places: the frequency is shared
        self.mlp = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, cfg.filter_order), sin,
            nn.Linear(cfg.filter_order, n_filters, bias=False),
        )
        self.register_buffer("deltas", window_decay_rates(n_filters))  # (n_filters,)
        self.bias = nn.Parameter(torch.randn(n_filters))  # the skip term D of the paper

    def forward(self, L):
        z, t = self.z[:L], self.t[:L]  # (L, emb_dim), (L, 1)
        return (self.mlp(z) * filter_window(t, self.deltas)).t()  # (n_filters, L)


# ---------------------------------------------------------------------------------------------------------
# The Hyena operator.

class HyenaOperator(nn.Module):
    """The Hyena operator of order N (see the top of this file): u (B, L, d) -> (B, L, d)."""

    def __init__(self, cfg, fast=True):
        super().__init__()
        self.cfg = cfg
        d, N, K = cfg.d_model, cfg.order, cfg.short_filter_order
        self.in_proj = nn.Linear(d, (N + 1) * d)
        self.short_conv = nn.Conv1d((N + 1) * d, (N + 1) * d, K, groups=(N + 1) * d)  # depthwise
        self.filter = ImplicitFilter(cfg)
        self.out_proj = nn.Linear(d, d)
        self.fast = FastHyena(cfg) if fast else None  # the fast path, or None: this class's code (see the top)

    def forward(self, u):
        if self.fast is not None:
            return self.fast(self, u)
        B, L, d = u.shape
        N, K = self.cfg.order, self.cfg.short_filter_order
        z = self.in_proj(u).transpose(1, 2)  # (B, (N+1)d, L): channels first, as convolutions want
        z = self.short_conv(F.pad(z, (K - 1, 0)))  # left padding: output t sees inputs t-K+1 .. t, causal
        *x, v = z.split(d, dim=1)  # x_0 .. x_{N-1}, v: each (B, d, L)
        h = self.filter(L).view(N - 1, d, L)  # one long filter per order and channel
        bias = self.filter.bias.view(N - 1, d, 1)

        def gated_long_conv(o, v, x_i):
            v = v * x_i  # gate
            return fft_conv(v, h[o]) + bias[o] * v  # long convolution, and its skip term
        y = self.recurrence(x, v, gated_long_conv)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d)

    @staticmethod
    def recurrence(x, v, gated_long_conv):
        """The recurrence over the streams x_0 .. x_{N-1} and v: gated by x_{N-1} and convolved with the first
        long filter, then by x_{N-2} and the second, ..., and gated by x_0 last. gated_long_conv(o, v, x_i) is
        the o-th gate and long convolution with its skip term: each way of computing the operator (forward,
        prefill, step, fast.py, parallel.py, onnx_graph.py) brings its own, in this order of operations."""
        for o, x_i in enumerate(reversed(x[1:])):  # x_{N-1} first, as published
            v = gated_long_conv(o, v, x_i)
        return v * x[0]  # the last gate

    def prefill(self, u, state):
        """forward(u) over a prompt u (B, P, d) -> (B, P, d), leaving in `state` what step needs to go on."""
        _, P, d = u.shape
        N, K = self.cfg.order, self.cfg.short_filter_order
        z = F.pad(self.in_proj(u).transpose(1, 2), (K - 1, 0))  # (B, (N+1)d, K-1+P)
        state.recent = z[..., P:]  # the short convolution's last K-1 inputs
        *x, v = self.short_conv(z).split(d, dim=1)
        bias = self.filter.bias.view(N - 1, d, 1)

        def gated_long_conv(o, v, x_i):
            v = v * x_i
            return state.long_convs[o].prefill(v) + bias[o] * v
        return self.out_proj(self.recurrence(x, v, gated_long_conv).transpose(1, 2))

    def step(self, u, state):
        """The operator at the next position t: u (B, d) -> (B, d), from the state the positions before t left."""
        d, N = self.cfg.d_model, self.cfg.order
        window = torch.cat([state.recent, self.in_proj(u)[..., None]], -1)  # (B, (N+1)d, K): inputs t-K+1 .. t
        state.recent = window[..., 1:]
        z = (window * self.short_conv.weight[:, 0]).sum(-1) + self.short_conv.bias  # the short convolution at t
        *x, v = z.split(d, dim=1)  # each (B, d)
        bias = self.filter.bias.view(N - 1, d)

        def gated_long_conv(o, v, x_i):
            v = v * x_i
            return state.long_convs[o].step(v) + bias[o] * v
        return self.out_proj(self.recurrence(x, v, gated_long_conv))


@dataclass
class OperatorState:
    """What one Hyena operator carries from a position to the next while decoding: the short convolution's
    last K-1 inputs, and one state per long convolution (ConvHistory, or decoding.OnlineConv)."""
    long_convs: list
    recent: torch.Tensor = None  # (B, (N+1)d, K-1)


class ConvHistory:
    """fft_conv over a stream that arrives one position at a time, as decoding reads it: y[t] = sum_{s<=t}
    h[..., t-s] a[..., s], summed over the whole history, O(t) per position. h: (C, total), total the most
    positions the stream will have. decoding.OnlineConv gives the same outputs in O(log^2 t) per position."""

    def __init__(self, h):
        self.h, self.a = h, None  # the inputs so far, (B, C, t)

    def prefill(self, a):
        """Start the stream with its first P inputs a (B, C, P) at once -> their outputs (B, C, P), by FFT."""
        self.a = a[..., :0]
        return fft_conv(self.take(a), self.h[:, :a.shape[-1]])

    def step(self, a):
        """The input at the next position t (B, C) -> y[t] (B, C)."""
        a = self.take(a[..., None])
        return (a * self.h[:, :a.shape[-1]].flip(-1)).sum(-1)

    def take(self, a):
        """The inputs so far, with a (B, C, P) appended."""
        self.a = torch.cat([self.a, a], -1)
        if self.a.shape[-1] > self.h.shape[-1]:
            raise UserError(f"the decoding state has room for {self.h.shape[-1]} positions, not {self.a.shape[-1]}")
        return self.a


# ---------------------------------------------------------------------------------------------------------
# Blocks and the model.

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_inner)
        self.fc2 = nn.Linear(cfg.d_inner, cfg.d_model)

    def forward(self, x):  # x: (B, L, d)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block. The residual stream stays float32 under bf16 autocast (adding a bf16 branch
    to a float32 stream gives float32), as the published `residual_in_fp32` asks."""

    def __init__(self, cfg, fast=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mixer = HyenaOperator(cfg, fast)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)
        self.fast = FastBlock() if fast else None  # the fast path, or None: this class's code

    def forward(self, x, checkpoint=False):  # x: (B, L, d)
        # (checkpoint: this call recomputes a checkpointed block; the fast path then recomputes its pieces alone)
        if self.fast is not None:
            return self.fast(self, x, checkpoint)
        x = x + self.dropout(self.mixer(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))

    def prefill(self, x, state):  # decoding is inference: no dropout
        x = x + self.mixer.prefill(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))

    def step(self, x, state):  # x: (B, d), one position
        x = x + self.mixer.step(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


class HyenaDNA(nn.Module):
    """The language model: (B, L) token ids -> next-token logits (B, L, V). fast=False builds the same model
    (same parameters, same state_dict) on this file's plain path alone."""

    def __init__(self, cfg, fast=True):
        super().__init__()
        self.cfg = cfg.validate()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)  # also the LM head (tied)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(Block(cfg, fast) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        # Recompute each block's activations in backward instead of storing them: memory for long sequences.
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

    def forward(self, input_ids):
        """(B, L) token ids -> next-token logits (B, L, padded_vocab_size)."""
        return F.linear(self.hidden_states(input_ids), self.embedding.weight)

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
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, True, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    def check_input_ids(self, input_ids):
        """UserError naming the problem unless input_ids is an integer (B, L) tensor of token ids, 1 <= L <= l_max."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
            what = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise UserError(f"input_ids must be an integer torch.Tensor (int64), got {what}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1:
            raise UserError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if not 1 <= input_ids.shape[1] <= self.cfg.l_max:
            raise UserError(f"sequence length {input_ids.shape[1]} is outside the allowed range "
                            f"[1, {self.cfg.l_max}] (l_max)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise UserError(f"token ids must be in [0, {self.cfg.vocab_size}), got values in [{lo}, {hi}]")

    # Decoding. A causal model writes a sequence one token at a time, and Hyena is a recurrence over
    # positions: each layer's short convolution needs its last K-1 inputs, and each long convolution its
    # history. So instead of a whole forward pass per new token, prefill(prompt, state) reads the prompt once
    # and step(token, state) goes on from there, with exactly forward's logits (decoding.py samples with it).
    # Decoding is inference: prefill and step apply no dropout, so decode in eval mode.

    def decoding_state(self, total, long_conv=ConvHistory):
        """An empty decoding state for sequences of up to `total` positions (prompt and tokens taken after
        it): one OperatorState per layer. long_conv: ConvHistory (O(t) per position), or decoding.OnlineConv
        (the same outputs in O(log^2 t))."""
        if not 1 <= total <= self.cfg.l_max:
            raise UserError(f"a decoding state for {total} positions: must be in [1, {self.cfg.l_max}] (l_max)")
        N, d = self.cfg.order, self.cfg.d_model  # each filter computed once, for every position decoded
        return [OperatorState([long_conv(h) for h in block.mixer.filter(total).view(N - 1, d, total)])
                for block in self.blocks]

    def prefill(self, input_ids, state):
        """forward(input_ids) over a prompt (B, P) -> logits (B, P, V), filling `state` for step."""
        self.check_input_ids(input_ids)
        x = self.embedding(input_ids.long())
        for block, block_state in zip(self.blocks, state):
            x = block.prefill(x, block_state)
        return F.linear(self.ln_f(x), self.embedding.weight)

    def step(self, input_ids, state):
        """The model at the next position t: input_ids (B,) the tokens at t -> next-token logits (B, V) for
        t + 1, from the state that prefill and the steps since left."""
        if state[0].recent is None:
            raise UserError("the decoding state is empty: read a prompt into it with prefill(prompt, state) first")
        B = len(state[0].recent)  # the prefill's batch
        if not isinstance(input_ids, torch.Tensor) or input_ids.shape != (B,):
            what = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise UserError(f"step takes one token per sequence of the prefill, input_ids of shape ({B},), got {what}")
        self.check_input_ids(input_ids[:, None])
        x = self.embedding(input_ids.long())  # (B, d)
        for block, block_state in zip(self.blocks, state):
            x = block.step(x, block_state)
        return F.linear(self.ln_f(x), self.embedding.weight)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: one id per nucleotide, the ids of the published HyenaDNA tokenizer.

SPECIAL_TOKENS = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[MASK]": 3, "[PAD]": 4, "[RESERVED]": 5, "[UNK]": 6}
BASES = "ACGTN"
BASE_IDS = {base: 7 + i for i, base in enumerate(BASES)}  # A=7 C=8 G=9 T=10 N=11
PAD_ID, N_ID, VOCAB_SIZE = SPECIAL_TOKENS["[PAD]"], BASE_IDS["N"], 12

# A 256-entry byte table makes tokenizing a gigabase a single vectorised lookup. Lowercase (soft-masked)
# bases are ordinary bases; any other byte (IUPAC codes, digits, ...) is an unknown base, N.
BYTE_TO_ID = np.full(256, N_ID, dtype=np.uint8)
for _base, _id in BASE_IDS.items():
    BYTE_TO_ID[ord(_base)] = BYTE_TO_ID[ord(_base.lower())] = _id
_ID_TO_TEXT = sorted({**SPECIAL_TOKENS, **BASE_IDS}, key={**SPECIAL_TOKENS, **BASE_IDS}.get)  # id -> text


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


def preset_config(name, **overrides):
    """HyenaConfig of a published model by name (checkpoints.PRESETS: tiny-1k ... large-1m; `tiny` and
    `large` are short for tiny-1k and large-1m). Overrides (l_max=..., say) replace fields."""
    name = {"tiny": "tiny-1k", "large": "large-1m"}.get(name, name)
    if name not in checkpoints.PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: tiny, large, {', '.join(checkpoints.PRESETS)}")
    sizes = checkpoints.PRESETS[name]
    return HyenaConfig(**{"d_inner": 4 * sizes["d_model"], **sizes, **overrides}).validate()


# ---------------------------------------------------------------------------------------------------------
# Using a trained model: likelihoods and embeddings. Batches of unequal lengths are padded on the RIGHT: a
# causal model never sees the padding after a position, so each sequence gets the scores it gets alone.

@torch.no_grad()
def log_likelihood(model, input_ids, lengths=None):
    """(B, L) ids -> (B, L-1) float32, entry t-1 = log P(ids[:, t] | ids[:, :t]): each base's log-probability
    given the bases before it (the first has none). With `lengths`, rows are right-padded to L and entries
    past a row's end are 0, so a row's sum is its sequence's log-likelihood."""
    logits = model(input_ids)[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None].long())[..., 0]
    if lengths is not None:
        past_end = torch.arange(logp.shape[1], device=logp.device) >= lengths.to(logp.device)[:, None] - 1
        logp = logp.masked_fill(past_end, 0.0)
    return logp


@torch.no_grad()
def embed(model, sequences, pool="mean", batch_size=32):
    """One vector per sequence: (N, d_model) float32 NumPy, in input order. sequences: DNA strings or 1-D id
    arrays. pool "mean" averages the hidden states over the sequence; "last" takes its last position, where
    the causal model has read all of it. Sequences are batched by similar length to waste little on padding."""
    if pool not in ("mean", "last"):
        raise UserError(f"pool must be 'mean' or 'last', got {pool!r}")
    seqs = [tokenize(s) if isinstance(s, (str, bytes)) else np.ascontiguousarray(s) for s in sequences]
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= model.cfg.l_max:
            raise UserError(f"sequence {i} has length {len(s)}, outside [1, {model.cfg.l_max}] (l_max)")
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), model.cfg.d_model), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids = nn.utils.rnn.pad_sequence([torch.as_tensor(seqs[r]) for r in rows], True, PAD_ID).long()
        hidden = model.hidden_states(ids.to(device)).float()  # (B, L, d)
        lengths = torch.tensor([len(seqs[r]) for r in rows], device=device)
        real = torch.arange(ids.shape[1], device=device) < lengths[:, None]  # (B, L): not padding
        mean = (hidden * real[..., None]).sum(1) / lengths[:, None]
        out[rows] = (mean if pool == "mean" else hidden[torch.arange(len(rows), device=device), lengths - 1]).cpu()
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading and saving. checkpoints.py reads and writes the folders' layouts; here they become a model.

def from_pretrained(path, device="cpu", fast=True):
    """The model of a checkpoint folder, in eval mode: a published HyenaDNA one (config.json + weights.ckpt),
    a Hugging Face hub one (+ model.safetensors or pytorch_model.bin) or this project's (+ model.pt)."""
    ckpt = checkpoints.read_checkpoint(path, HyenaConfig)
    model = HyenaDNA(ckpt.cfg, fast=fast)
    checkpoints.load_state_dict(model, ckpt.state, ckpt.weights_path)
    return model.to(device).eval()


def save_pretrained(model, path, layout="tinyhyena"):
    """Write the model into the folder `path`, each file atomically. layout "tinyhyena": config.json + model.pt,
    what this project reads fastest. "hf": config.json + model.safetensors for the Hugging Face hub, which
    transformers loads (AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)), as does ours."""
    checkpoints.save_model(model, path, layout, SPECIAL_TOKENS, BASES)


# ---------------------------------------------------------------------------------------------------------
# The NumPy twin: the same forward pass written again in float64 NumPy from the config and the learned
# weights alone (the positional features and window rates are computed here from their formulas), sharing no
# code with the torch path above. Tests hold the two against each other; it is a specification, not fast.

def _np_layer_norm(x, weight, bias, eps):  # over the last axis, with the biased variance, as torch's
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_causal_conv(v, h):
    """v (B, L, C), h (L, C): y[:, t] = sum_{s<=t} h[t-s] v[:, s], by a power-of-two FFT over axis 1."""
    L = v.shape[1]
    n = 1 << (2 * L).bit_length()  # > 2L, a different size from the torch path's on purpose
    spectrum = np.fft.rfft(v, n=n, axis=1) * np.fft.rfft(h, n=n, axis=0)[None]
    return np.fft.irfft(spectrum, n=n, axis=1)[:, :L]


def _np_filter(p, cfg, L):
    """The implicit filters (L, (N-1)d): the MLP over positional features, times the window."""
    pos = np.arange(L)[:, None]
    t = pos / (cfg.l_max - 1)  # (L, 1) in [0, 1] over l_max
    bands = (cfg.emb_dim - 1) // 2
    angle = np.linspace(1e-4, bands - 1, bands)[None] * 2 * np.pi * pos / cfg.l_max  # (L, bands)
    f = np.concatenate([t, np.cos(angle), -np.sin(angle)], axis=1)  # (L, emb_dim)
    for j in (0, 2, 4):
        f = np.sin(p[f"filter.mlp.{j + 1}.freq"] * (f @ p[f"filter.mlp.{j}.weight"].T + p[f"filter.mlp.{j}.bias"]))
    f = f @ p["filter.mlp.6.weight"].T  # (L, (N-1)d)
    rates = np.linspace(np.log(1e-2) / 1.5, np.log(1e-2) / 0.3, f.shape[1])  # slow to fast decay
    return f * (np.exp(-t * np.abs(rates)) + 0.05)


def _np_hyena(p, x, cfg):
    (B, L, d), N = x.shape, cfg.order
    z = x @ p["in_proj.weight"].T + p["in_proj.bias"]  # (B, L, (N+1)d)
    w = p["short_conv.weight"][:, 0, :]  # ((N+1)d, K); output t sees inputs t-K+1 .. t
    K = w.shape[1]
    padded = np.concatenate([np.zeros((B, K - 1, z.shape[2])), z], axis=1)
    z = sum(w[:, j] * padded[:, j:j + L] for j in range(K)) + p["short_conv.bias"]
    streams = [z[..., i * d:(i + 1) * d] for i in range(N + 1)]  # x_0 .. x_{N-1}, v
    f = _np_filter(p, cfg, L)
    v = streams[N]
    for o, i in enumerate(range(N - 1, 0, -1)):
        v = v * streams[i]
        v = _np_causal_conv(v, f[:, o * d:(o + 1) * d]) + v * p["filter.bias"][o * d:(o + 1) * d]
    y = v * streams[0]
    return y @ p["out_proj.weight"].T + p["out_proj.bias"]


def reference_forward(model, input_ids, return_hidden=False):
    """float64 logits (B, L, padded_vocab) of `model` on `input_ids`, computed in NumPy (eval mode: no
    dropout). With return_hidden, the hidden states after the final LayerNorm instead."""
    cfg, eps = model.cfg, model.cfg.layer_norm_epsilon
    p = {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    x = p["embedding.weight"][ids]  # (B, L, d)
    for i in range(cfg.n_layer):
        q = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        mixer = {k[len("mixer."):]: v for k, v in q.items() if k.startswith("mixer.")}
        x = x + _np_hyena(mixer, _np_layer_norm(x, q["norm1.weight"], q["norm1.bias"], eps), cfg)
        hidden = _np_layer_norm(x, q["norm2.weight"], q["norm2.bias"], eps) @ q["mlp.fc1.weight"].T + q["mlp.fc1.bias"]
        x = x + _np_gelu_tanh(hidden) @ q["mlp.fc2.weight"].T + q["mlp.fc2.bias"]
    x = _np_layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x if return_hidden else x @ p["embedding.weight"].T
