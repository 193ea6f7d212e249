"""
Sample DNA from a pretrained model: continuations of a prompt, one base at a time.

    python generate.py --checkpoint DIR --prompt ACGTTGCA --length 1000 --num 4 --temperature 0.8 --out gen.fa
    python generate.py --checkpoint DIR --prompt_fasta prompt.fa --length 4096 --top_k 2 --seed 1 --out gen.fa

A causal model predicts each base from the ones before it, so it can write a sequence base by base. Running the
whole forward pass again for every new base would cost O(t log t) per base at length t. Hyena is a recurrence
over positions as well: each layer's short convolution reads its last K projected inputs, and each long
convolution output at t is sum_s h[t-s] a[s] over the gated stream a it reads. So a `Decoder` keeps, per layer,
those K-1 last inputs and the gated streams so far, and a new base costs O(t * d) per layer and order: the sum
at one position, with no FFT. The prompt is read in one pass (`prefill`), which computes the same streams.

Sampling draws bases only (A, C, G, T): the other tokens' probabilities are set to zero. --temperature 0 takes
the most probable base at each step.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import cli
import fast
import tinyhyena as th

BASE_TOKENS = torch.tensor([th.BASE_IDS[b] for b in "ACGT"])  # what sampling may choose


class Decoder:
    """The model as a recurrence: prefill(ids) reads a prompt (B, P), then step(ids) (B,) takes one more token
    per row; each returns the next-token logits (B, V) at the last position read. `total` is the longest
    sequence it will see (at most l_max): the filters are computed for it once."""

    def __init__(self, model, total):
        if not 1 <= total <= model.cfg.l_max:
            raise th.UserError(f"prompt and generated bases together are {total}, over the model's l_max "
                               f"{model.cfg.l_max}")
        self.model, self.cfg, self.total, self.t = model, model.cfg, total, 0
        N, d = self.cfg.order, self.cfg.d_model
        # per layer: its filters h (N-1, d, total) and skip biases (N-1, d)
        self.filters = [block.mixer.filter(total).view(N - 1, d, total) for block in model.blocks]
        self.streams = None  # per layer, per order: the gated stream a (B, d, total) the long convolution reads
        self.recent = None  # per layer: the last K-1 projected inputs (B, (N+1)d, K-1) of the short convolution

    def prefill(self, ids):
        """Read the prompt ids (B, P) in one pass (FFT convolutions, as the model's forward pass); return the
        logits (B, V) after its last position."""
        B, P = ids.shape
        N, d, K = self.cfg.order, self.cfg.d_model, self.cfg.short_filter_order
        dtype = self.model.embedding.weight.dtype
        self.streams = [[ids.new_zeros((B, d, self.total), dtype=dtype) for _ in range(N - 1)] for _ in self.model.blocks]
        self.recent = []
        x = self.model.embedding(ids)  # (B, P, d)
        for layer, block in enumerate(self.model.blocks):
            mixer = block.mixer
            z = mixer.in_proj(block.norm1(x)).transpose(1, 2)  # (B, (N+1)d, P)
            self.recent.append(F.pad(z, (K - 1, 0))[..., P:])  # the last K-1 inputs, zeros before the start
            z = mixer.short_conv(F.pad(z, (K - 1, 0)))
            *streams, v = z.split(d, dim=1)
            h, bias = self.filters[layer][..., :P], mixer.filter.bias.view(N - 1, d, 1)
            for o, x_i in enumerate(reversed(streams[1:])):
                a = v * x_i
                self.streams[layer][o][..., :P] = a
                v = th.fft_conv(a, h[o]) + bias[o] * a
            x = x + mixer.out_proj((v * streams[0]).transpose(1, 2))
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
            h, bias = self.filters[layer], mixer.filter.bias.view(N - 1, d)
            for o, x_i in enumerate(reversed(streams[1:])):
                a = v * x_i
                history = self.streams[layer][o]
                history[..., t] = a
                # the long convolution at t alone: sum over s <= t of h[t - s] a[s]
                v = (history[..., :t + 1] * h[o, :, :t + 1].flip(-1)).sum(-1) + bias[o] * a
            x = x + mixer.out_proj(v * streams[0])
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
def generate(model, prompt, length, num=1, temperature=1.0, top_k=None, seed=0, incremental=True, progress=None):
    """`num` continuations of `length` bases after `prompt` (a DNA string or 1-D ids): (num, length) int64 ids.
    incremental=False runs the whole forward pass for every base instead (the reference the tests compare to)."""
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
    if incremental:
        decoder = Decoder(model, max(total, len(ids)))
        logits = decoder.prefill(seqs)
    for i in range(length):
        if not incremental:
            logits = model(seqs)[:, -1]
        new = choose(logits.float().cpu(), temperature, top_k, generator).to(device)
        seqs = torch.cat([seqs, new[:, None]], 1)
        if incremental and i < length - 1:
            logits = decoder.step(new)
        if progress:
            progress(1)
    return seqs[:, len(ids):].cpu()


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    p = cli.ArgumentParser(description="Sample DNA continuations of a prompt from a pretrained model.")
    p.add_argument("--checkpoint", required=True, type=cli.existing_path, help="published, hub or tinyhyena folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt's bases")
    prompt.add_argument("--prompt_fasta", type=cli.existing_file, help="a FASTA whose first record is the prompt")
    p.add_argument("--length", type=cli.positive_int, required=True, help="bases to generate after the prompt")
    p.add_argument("--num", type=cli.positive_int, default=1, help="continuations to sample")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=1.0, help="0: the most probable base")
    p.add_argument("--top_k", type=int, choices=[1, 2, 3, 4], help="sample among the k most probable bases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=cli.output_file, help="FASTA to write (default: standard output)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.prompt_fasta:
        from data import read_fasta
        records = read_fasta(args.prompt_fasta)
        if not records:
            raise th.UserError(f"{args.prompt_fasta}: no records")
        ids = np.asarray(records[0][1], dtype=np.int64)
    else:
        ids = th.tokenize(args.prompt)
    model = th.from_pretrained(args.checkpoint, cli.pick_device(args.device))
    from tqdm import tqdm
    with tqdm(total=args.length, unit="base", file=sys.stderr) as bar:
        out = generate(model, ids, args.length, args.num, args.temperature, args.top_k, args.seed,
                       progress=bar.update)
    lines = []
    for i, row in enumerate(out.numpy()):
        seq = th.detokenize(row)
        lines.append(f">sample{i + 1} length={args.length} temperature={args.temperature} seed={args.seed}\n")
        lines += [seq[j:j + 70] + "\n" for j in range(0, len(seq), 70)]
    cli.write_text(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
