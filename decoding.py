"""
The model as a recurrence over positions, for sampling DNA one base at a time: `Decoder` (exact, O(L log^2 L)
for L positions) and `generate`. generate.py is its command line.

A causal model predicts each base from the ones before it, so it can write a sequence base by base. Running the
whole forward pass again for every new base would cost O(t log t) per base at length t. Hyena is a recurrence
over positions as well: each layer's short convolution reads its last K projected inputs, and each long
convolution's output at t is y[t] = sum_{s<=t} h[t-s] a[s] over the gated stream a it reads. A `Decoder` keeps,
per layer, the short convolution's K-1 last inputs and, per long convolution, an `OnlineConv`.

The online convolution is exact, and costs O(L log^2 L) for L positions instead of the O(L^2) of summing the
whole history at every step. It is the tiled "relaxed" convolution of Flash Inference (Oncescu et al. 2024,
arXiv 2410.12982). y[t] = h[0] a[t] + (what a[0..t-1] contribute), and the second part can be computed ahead
of time. After the i-th input (i = 1, 2, ...), with U the largest power of two dividing i, the block of the last
U inputs adds its contribution to the next U outputs, by one FFT of size 2U. Each pair (s, t), s < t, falls in
exactly one such block: blocks of size U come every U steps, so L steps cost sum_U (L/U) * O(U log U).
`method="cache"` keeps the whole history and sums it at each step instead (O(t d) per base, the reference the
tests hold the online convolution to); `method="forward"` runs the whole forward pass for every base.
The prompt is read in one pass (`prefill`), by FFT as the model's forward pass does.

Sampling draws bases only (A, C, G, T): the other tokens' probabilities are set to zero. --temperature 0 takes
the most probable base at each step.
"""


import numpy as np
import torch
import torch.nn.functional as F

import fast
import tinyhyena as th

BASE_TOKENS = torch.tensor([th.BASE_IDS[b] for b in "ACGT"])  # what sampling may choose
METHODS = ("online", "cache", "forward")
DIRECT_BLOCK = 64  # blocks up to this size are summed directly: a small Toeplitz product beats three FFT calls


class OnlineConv:
    """The causal convolution y[t] = sum_{s<=t} h[..., t-s] a[..., s] of a stream a that arrives one position at a
    time (see the top of this file). h: (C, total) filters; `prefill(a)` takes the first P positions (B, C, P)
    at once and returns their outputs; then `past(t)` gives what a[0..t-1] contribute to y[t] (B, C), and
    `append(a_t)` takes the input at t (B, C). method "online" adds each block's contribution ahead by FFT;
    "cache" sums the whole history at each position."""

    def __init__(self, h, method):
        self.h, self.method = h, method
        self.C, self.total = h.shape
        self.spectra, self.toeplitz = {}, {}  # per block size U: the filter's lags 1 .. 2U-1

    def prefill(self, a):
        B, _, P = a.shape
        self.a = a.new_zeros(B, self.C, self.total)  # the inputs so far
        self.a[..., :P] = a
        self.start = self.t = P
        if self.method == "cache":
            return th.fft_conv(a, self.h[:, :P])
        # one FFT convolution gives the prompt's outputs and what it contributes to every later position
        n = fast.fft_size(P + self.total - 1)
        y = torch.fft.irfft(torch.fft.rfft(a, n=n) * torch.fft.rfft(self.h, n=n), n=n)[..., :self.total]
        self.ahead = y  # (B, C, total): at t >= P, the contributions of the inputs already added in
        return y[..., :P]

    def past(self, t):
        if self.method == "cache":  # the whole history at once
            return (self.a[..., :t] * self.h[:, 1:t + 1].flip(-1)).sum(-1)
        return self.ahead[..., t]

    def append(self, a_t):
        t = self.t
        self.a[..., t] = a_t
        self.t = t + 1
        if self.method == "cache" or t + 1 >= self.total:
            return
        i = t + 1 - self.start  # inputs appended so far
        U = i & -i  # the largest power of two dividing i: the block a[t-U+1 .. t] reaches y[t+1 .. t+U]
        stop = min(t + 1 + U, self.total)
        self.ahead[..., t + 1:stop] += self.block_contribution(self.a[..., t + 1 - U:t + 1], U)[..., :stop - t - 1]

    def block_contribution(self, block, U):
        """out[j] = sum_m h[U + j - m] block[m], j, m in 0..U-1: a block of U inputs (B, C, U) on the next U
        outputs, through the filter's lags 1 .. 2U-1."""
        if U <= DIRECT_BLOCK:
            if U not in self.toeplitz:
                lags = U + torch.arange(U)[:, None] - torch.arange(U)[None, :]  # (U, U): j, m -> U + j - m
                self.toeplitz[U] = self.lag(lags.to(self.h.device))  # (C, U, U)
            return torch.einsum("bcm,cjm->bcj", block, self.toeplitz[U])
        if U not in self.spectra:  # a linear convolution of lengths U and 2U-1, of which entries U-1 .. 2U-2
            self.spectra[U] = torch.fft.rfft(self.lag(torch.arange(1, 2 * U, device=self.h.device)), n=2 * U)
        # ... are kept: a circular one of size 2U wraps only onto entries below U-1
        return torch.fft.irfft(torch.fft.rfft(block, n=2 * U) * self.spectra[U], n=2 * U)[..., U - 1:2 * U - 1]

    def lag(self, lags):
        """h at the given lags (any shape), zero past the filter's end: (C, *lags.shape)."""
        padded = F.pad(self.h, (0, 1))  # lag `total` and beyond read the appended zero
        return padded[:, lags.clamp(max=self.total)]


class Decoder:
    """The model as a recurrence: prefill(ids) reads a prompt (B, P), then step(ids) (B,) takes one more token
    per row; each returns the next-token logits (B, V) at the last position read. `total` is the longest
    sequence it will see (at most l_max): the filters are computed for it once. method: "online" or "cache"
    (see OnlineConv)."""

    def __init__(self, model, total, method="online"):
        if not 1 <= total <= model.cfg.l_max:
            raise th.UserError(f"prompt and generated bases together are {total}, over the model's l_max "
                               f"{model.cfg.l_max}")
        if method not in ("online", "cache"):
            raise th.UserError(f"method must be 'online' or 'cache', got {method!r}")
        self.model, self.cfg, self.total, self.t, self.method = model, model.cfg, total, 0, method
        N, d = self.cfg.order, self.cfg.d_model
        # per layer: its filters h (N-1, d, total)
        self.filters = [block.mixer.filter(total).view(N - 1, d, total) for block in model.blocks]
        self.convs = None  # per layer, per order: the OnlineConv of the gated stream the long convolution reads
        self.recent = None  # per layer: the last K-1 projected inputs (B, (N+1)d, K-1) of the short convolution

    def prefill(self, ids):
        """Read the prompt ids (B, P) in one pass (FFT convolutions, as the model's forward pass); return the
        logits (B, V) after its last position."""
        B, P = ids.shape
        N, d, K = self.cfg.order, self.cfg.d_model, self.cfg.short_filter_order
        self.convs = [[OnlineConv(h_o, self.method) for h_o in h] for h in self.filters]
        self.recent = []
        x = self.model.embedding(ids)  # (B, P, d)
        for layer, block in enumerate(self.model.blocks):
            mixer = block.mixer
            z = mixer.in_proj(block.norm1(x)).transpose(1, 2)  # (B, (N+1)d, P)
            self.recent.append(F.pad(z, (K - 1, 0))[..., P:])  # the last K-1 inputs, zeros before the start
            z = mixer.short_conv(F.pad(z, (K - 1, 0)))
            *streams, v = z.split(d, dim=1)
            bias, convs = mixer.filter.bias.view(N - 1, d, 1), self.convs[layer]

            def gated_long_conv(o, v, x_i):  # as HyenaOperator.forward's, the convolution by FFT
                a = v * x_i
                return convs[o].prefill(a) + bias[o] * a
            x = x + mixer.out_proj(mixer.recurrence(streams, v, gated_long_conv).transpose(1, 2))
            x = x + block.mlp(block.norm2(x))
        self.t = P
        return F.linear(self.model.ln_f(x[:, -1]), self.model.embedding.weight)

    def step(self, ids):
        """Take one token per row (B,) at position t; return the logits (B, V) for position t + 1."""
        t = self.t
        if t >= self.total:
            raise th.UserError(f"the decoder was made for {self.total} positions")
        N, d = self.cfg.order, self.cfg.d_model
        x = self.model.embedding(ids)  # (B, d)
        for layer, block in enumerate(self.model.blocks):
            mixer = block.mixer
            z = mixer.in_proj(block.norm1(x))  # (B, (N+1)d)
            window = torch.cat([self.recent[layer], z[..., None]], -1)  # (B, (N+1)d, K): inputs t-K+1 .. t
            self.recent[layer] = window[..., 1:]
            z = (window * mixer.short_conv.weight[:, 0]).sum(-1) + mixer.short_conv.bias
            *streams, v = z.split(d, dim=1)
            h0, bias, convs = self.filters[layer][..., 0], mixer.filter.bias.view(N - 1, d), self.convs[layer]

            def gated_long_conv(o, v, x_i):  # the long convolution at t, and its skip term
                a = v * x_i
                y = convs[o].past(t) + (h0[o] + bias[o]) * a
                convs[o].append(a)
                return y
            x = x + mixer.out_proj(mixer.recurrence(streams, v, gated_long_conv))
            x = x + block.mlp(block.norm2(x))
        self.t = t + 1
        return F.linear(self.model.ln_f(x), self.model.embedding.weight)


def choose(logits, temperature, top_k, generator):
    """One base per row from next-token logits (B, V): A, C, G or T only; temperature 0 takes the most probable;
    top_k keeps the k most probable bases. Draws by inverse CDF from `generator`'s uniforms."""
    scores = logits[:, BASE_TOKENS].double()  # (B, 4)
    if temperature == 0:
        return BASE_TOKENS[scores.argmax(-1)]
    scores = scores / temperature
    if top_k is not None and top_k < 4:
        kth = scores.topk(top_k, -1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    cdf = torch.softmax(scores, -1).cumsum(-1)
    u = torch.rand(len(scores), 1, generator=generator, dtype=torch.float64)
    return BASE_TOKENS[(cdf < u * cdf[:, -1:]).sum(-1).clamp(max=3)]


@torch.no_grad()
def generate(model, prompt, length, num=1, temperature=1.0, top_k=None, seed=0, method="online", progress=None):
    """`num` continuations of `length` bases after `prompt` (a DNA string or 1-D ids): (num, length) int64 ids.
    method: "online" (default: exact, O(log^2 t) per base), "cache" (exact, O(t) per base) or "forward" (the
    whole forward pass for every base); all three draw the same bases from the same seed."""
    if method not in METHODS:
        raise th.UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    ids = torch.as_tensor(th.tokenize(prompt) if isinstance(prompt, (str, bytes)) else np.asarray(prompt)).long()
    if len(ids) < 1:
        raise th.UserError("the prompt is empty: give at least one base")
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= 4):
        raise th.UserError(f"temperature must be >= 0 and top_k in 1..4, got {temperature} and {top_k}")
    total = len(ids) + length - 1  # positions the model reads: the last base is sampled, never read
    if len(ids) + length > model.cfg.l_max:  # the whole sequence stays within what the model takes
        raise th.UserError(f"prompt ({len(ids)}) and length ({length}) reach {len(ids) + length} bases, over the "
                           f"model's l_max {model.cfg.l_max}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    seqs = ids.to(device)[None].repeat(num, 1)  # (num, P)
    out = seqs.new_empty(num, length)
    if method != "forward":
        decoder = Decoder(model, max(total, len(ids)), method)
        logits = decoder.prefill(seqs)
    for i in range(length):
        if method == "forward":
            logits = model(torch.cat([seqs, out[:, :i]], 1))[:, -1]
        out[:, i] = choose(logits.float().cpu(), temperature, top_k, generator).to(device)
        if method != "forward" and i < length - 1:
            logits = decoder.step(out[:, i])
        if progress:
            progress(1)
    return out.cpu()
