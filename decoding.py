"""
Sampling DNA one base at a time, exactly and fast: `OnlineConv`, the long convolutions' decoding state in
O(log^2 t) per position, and `generate`. generate.py is its command line.

The model decodes itself (tinyhyena.py: `prefill(prompt, state)` reads a prompt in one pass, then
`step(token, state)` goes on one position at a time), and keeps, per layer, the short convolution's last K-1
inputs and one state per long convolution. Each long convolution's output at t is y[t] = sum_{s<=t} h[t-s] a[s]
over the gated stream a it reads. tinyhyena.ConvHistory sums the whole history at each position: O(t) per
position, O(L^2) for L (`method="cache"`, the reference the tests hold the online convolution to).

The online convolution is exact, and costs O(L log^2 L) for L positions. It is the tiled "relaxed" convolution
of Flash Inference (Oncescu et al. 2024, arXiv 2410.12982). y[t] = h[0] a[t] + (what a[0..t-1] contribute), and
the second part can be computed ahead of time. After the i-th input (i = 1, 2, ...), with U the largest power
of two dividing i, the block of the last U inputs adds its contribution to the next U outputs, by one FFT of
size 2U. Each pair (s, t), s < t, falls in exactly one such block: blocks of size U come every U steps, so L
steps cost sum_U (L/U) * O(U log U). `method="forward"` runs the whole forward pass for every base.

Sampling draws bases only (A, C, G, T): the other tokens' probabilities are set to zero. --temperature 0 takes
the most probable base at each step.
"""


from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import fast
import tinyhyena as th

FIRST_BASE = th.BASE_IDS["A"]  # A, C, G, T have consecutive ids (th.BASE_IDS): what sampling may choose
BASE_COLUMNS = slice(FIRST_BASE, FIRST_BASE + 4)  # their columns of next-token logits
BASE_TOKENS = torch.arange(BASE_COLUMNS.start, BASE_COLUMNS.stop)  # their token ids
METHODS = ("online", "cache", "forward")
DIRECT_BLOCK = 64  # blocks up to this size are summed directly: a small Toeplitz product beats three FFT calls


class OnlineConv:
    """The causal convolution y[t] = sum_{s<=t} h[..., t-s] a[..., s] of a stream a that arrives one position at a
    time, in O(log^2 t) per position (see the top of this file): tinyhyena.ConvHistory's outputs, by its
    methods. h: (C, total) filters; `prefill(a)` takes the first P positions (B, C, P) at once and returns their
    outputs; `step(a_t)` takes the input at the next position (B, C) and returns its output.

    The lags below `window` (a power of two) are summed directly, one batched product over the last `window`
    inputs per position; the blocks of the tiling then start at `window` inputs and carry the lags from `window`
    up. Blocks below that size reach only lags below it, so each pair (s, t) is still counted once, and a
    position costs two operations but every `window`-th. 16 measured best of 8, 16 and 64 (BENCHMARKS.md)."""

    def __init__(self, h, window=16):
        if window < 1 or window & (window - 1):
            raise th.UserError(f"window must be a power of two, got {window}")
        self.h, self.total, self.window = h, h.shape[-1], window
        # the window's last `window` inputs in a ring (C, B, window): input i after the prompt in slot i % window;
        # at input i the slot s is lag (i - s) % window, so each rotation r = i % window has its own taps (C,
        # window, 1). Slots not written yet hold zeros, the inputs before the first.
        lags = (torch.arange(window)[:, None] - torch.arange(window)[None, :]) % window  # (r, s) -> lag
        self.taps = list(self.lag(lags.to(h.device), h)[..., None].unbind(1))  # per r: (C, window, 1)
        self.far = h.clone()  # the lags the blocks carry: from `window` up
        self.far[:, :window] = 0
        # inputs after the prompt are kept channels first, (C, B, ...), so that a window's or a block's product is
        # one batched matrix product over the channels; the contributions ahead position first, (total, C, B, 1),
        # so that the window's product adds into a position's in place
        self.inputs, self.ahead, self.t = None, None, 0  # t: how many inputs there are
        self.spectra, self.toeplitz = {}, {}  # per block size U: the far filter's lags 1 .. 2U-1

    def prefill(self, a):
        B, C, P = a.shape
        if P > self.total:
            raise th.UserError(f"the decoding state has room for {self.total} positions, not {P}")
        self.inputs = a.new_zeros(C, B, self.total - P)  # input i after the prompt: index i
        self.ring = a.new_zeros(C, B, self.window)
        self.slots = [self.ring[..., s:s + 1] for s in range(self.window)]  # each (C, B, 1)
        self.t = self.start = P
        # one FFT convolution gives the prompt's outputs and what it contributes to every later position
        n = fast.fft_size(P + self.total - 1)
        y = torch.fft.irfft(torch.fft.rfft(a, n=n) * torch.fft.rfft(self.h, n=n), n=n)[..., :self.total]
        # (total, C, B, 1): at each t >= P, what the inputs taken so far contribute to y[t]
        self.ahead = y.permute(2, 1, 0)[..., None].contiguous()
        return y[..., :P]

    def step(self, a):
        self.next_input().copy_(a.t()[..., None])
        return self.advance()[..., 0].t()  # (B, C)

    def next_input(self):
        """Where the input at the next position goes: a (C, B, 1) view of the kept inputs, to be written in place
        before advance() (fast.FastStep writes its gate's product there; step(a) copies a)."""
        if self.t >= self.total:
            raise th.UserError(f"the decoding state has room for {self.total} positions, not {self.t + 1}")
        return self.slots[(self.t - self.start) % self.window]

    def advance(self):
        """The output (C, B, 1) at the next position, whose input next_input() holds; then on to the position
        after."""
        t, i = self.t, self.t - self.start  # i: inputs taken after the prompt
        # lags below the window: its ring of last `window` inputs, on top of what is ahead
        y = self.ahead[t].baddbmm_(self.ring, self.taps[i % self.window])  # (position t's row is not read again)
        self.t, i = t + 1, i + 1
        if i % self.window == 0:  # the ring holds inputs i-window .. i-1 in order: into the kept inputs
            self.inputs[..., i - self.window:i] = self.ring
            if t + 1 < self.total:
                U = i & -i  # the largest power of two dividing i: the block a[t-U+1 .. t] reaches y[t+1 .. t+U]
                stop = min(t + 1 + U, self.total)
                block = self.inputs[..., i - U:i]
                reach = self.block_contribution(block, U)[..., :stop - t - 1]  # (C, B, stop - t - 1)
                self.ahead[t + 1:stop] += reach.permute(2, 0, 1)[..., None]
        return y

    def add_skip(self, skip):
        """From now on advance() gives y[t] + skip * a[t], skip (C,): a gate's skip term is a tap at lag 0, so it
        can ride in the window's product (fast.FastStep: one operation a position fewer). step() too."""
        self.taps = [taps.clone() for taps in self.taps]
        for r, taps in enumerate(self.taps):  # in rotation r the newest input, lag 0, is in slot r
            taps[:, r, 0] += skip

    def block_contribution(self, block, U):
        """out[j] = sum_m far[U + j - m] block[m], j, m in 0..U-1: a block of U inputs (C, B, U) on the next U
        outputs, through the far filter's lags 1 .. 2U-1."""
        if U <= DIRECT_BLOCK:
            if U not in self.toeplitz:
                lags = U + torch.arange(U)[None, :] - torch.arange(U)[:, None]  # (U, U): m, j -> U + j - m
                self.toeplitz[U] = self.lag(lags.to(self.h.device), self.far)  # (C, U, U): out = block @ toeplitz
            return torch.bmm(block, self.toeplitz[U])
        if U not in self.spectra:  # a linear convolution of lengths U and 2U-1, of which entries U-1 .. 2U-2
            lags = torch.arange(1, 2 * U, device=self.h.device)
            self.spectra[U] = torch.fft.rfft(self.lag(lags, self.far), n=2 * U)[:, None]
        # ... are kept: a circular one of size 2U wraps only onto entries below U-1
        return torch.fft.irfft(torch.fft.rfft(block, n=2 * U) * self.spectra[U], n=2 * U)[..., U - 1:2 * U - 1]

    def lag(self, lags, h):
        """h at the given lags (any shape), zero past the filter's end: (C, *lags.shape)."""
        padded = F.pad(h, (0, 1))  # lag `total` and beyond read the appended zero
        return padded[:, lags.clamp(max=self.total)]


LONG_CONVS = {"online": OnlineConv, "cache": th.ConvHistory}  # each method's long-convolution state


class Sampler:
    """One base per row from next-token logits (B, V), by the Gumbel-max trick: with g iid Gumbel(0, 1), the
    argmax over the bases of logits / temperature + g is distributed as softmax(base logits / temperature)
    (Gumbel 1954; Maddison et al. 2014, arXiv 1411.0030). A, C, G and T only: every other token's noise is -inf.
    temperature 0 takes the most probable base (no noise); top_k keeps the k most probable bases.

    `sampler(logits, out)` writes the bases' token ids (B,) into out (int64). The noise comes from `generator`,
    drawn for NOISE_ROWS positions at once, so that a position costs an add and an argmax whatever the batch."""

    NOISE_ROWS = 256  # positions whose noise is drawn at once: (256, B, V) float64

    def __init__(self, temperature, top_k, generator):
        self.greedy, self.scale = temperature == 0, 1 / temperature if temperature > 0 else 1.0
        self.top_k = top_k if top_k is not None and top_k < 4 else None
        self.generator, self.noise, self.row = generator, None, 0

    def __call__(self, logits, out):
        scores = torch.add(self.next_noise(*logits.shape), logits, alpha=self.scale)  # (B, V) float64
        if self.top_k is not None:  # the bases below the k-th best (ties with it kept) cannot be drawn
            bases = logits[:, BASE_COLUMNS]
            scores[:, BASE_COLUMNS].masked_fill_(bases < bases.topk(self.top_k, -1).values[:, -1:], -torch.inf)
        return torch.argmax(scores, -1, out=out)

    def next_noise(self, B, V):
        """The next position's noise (B, V): greedy's is zero on the bases, and -inf elsewhere as every other's
        (drawn afresh for logits of another shape: one row of noise broadcast over a batch would draw alike)."""
        if self.noise is None or self.row == len(self.noise) or self.noise.shape[1:] != (B, V):
            rows = 1 if self.greedy else self.NOISE_ROWS
            self.noise, self.row = torch.full((rows, B, V), -torch.inf, dtype=torch.float64), 0
            if self.greedy:
                self.noise[..., BASE_COLUMNS] = 0.0
            else:  # Gumbel(0, 1) = -log(Exp(1)), and Exp(1) = -log(1 - uniform), kept above 0: finite, below 709
                uniform = torch.rand(rows, B, 4, generator=self.generator, dtype=torch.float64)
                exponential = torch.log1p(-uniform).neg_().clamp_(min=torch.finfo(torch.float64).tiny)
                self.noise[..., BASE_COLUMNS] = exponential.log_().neg_()
        noise = self.noise[self.row]
        self.row += not self.greedy  # greedy's one row serves every position
        return noise


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
    # inference mode, not just no_grad: no autograd bookkeeping on any tensor, about a tenth of a base's time at
    # batch 1 (BENCHMARKS.md)
    with torch.inference_mode():
        device = next(model.parameters()).device
        sampler = Sampler(temperature, top_k, torch.Generator().manual_seed(seed))
        seqs = ids.to(device)[None].repeat(num, 1)  # (num, P)
        out = torch.empty(length, num, dtype=torch.long)  # position-major: each position's bases one row
        if method != "forward":
            state = model.decoding_state(max(total, len(ids)), LONG_CONVS[method])
            logits = model.prefill(seqs, state)[:, -1]  # the prompt in one pass
            # then each base by the fast path's step on a fast model (fast.FastStep), the plain one otherwise
            step = fast.FastStep(model, state) if model.blocks[0].fast is not None else partial(model.step, state=state)
        for i in range(length):
            if method == "forward":
                logits = model(torch.cat([seqs, out[:i].t().to(device)], 1))[:, -1]
            bases = sampler(logits.cpu(), out[i])  # (num,)
            if method != "forward" and i < length - 1:
                logits = step(bases.to(device))
            if progress:
                progress(1)
    return out.t().clone(memory_format=torch.contiguous_format)  # (made outside inference mode: an ordinary tensor)
