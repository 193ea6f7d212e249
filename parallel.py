"""
Many processes: joining torchrun's process group (DDP's and everyone's), and context parallelism, one sequence
split across processes, so that a sequence too long for one device's memory is read by several.

The scheme of Evo 2's trainer (savanna) for Hyena. A group of N processes holds the positions of each sequence
in N equal shards: process r holds positions [r L/N, (r+1) L/N) of every sequence, through the embedding, the
norms, the MLP and the loss, which act on each position alone. Only the Hyena operator looks along the
sequence, and it does so in two ways:
- the short convolution reads the K-1 positions before each one: each process receives the last K-1 projected
  positions of the process before it (a halo; zeros for the first), and sends its own to the next;
- the long convolutions read the whole sequence, but each channel alone: an all-to-all turns the N+1 projected
  streams from position shards (all channels, L/N positions) into channel shards (d/N channels, all L
  positions). Each process runs the gates and FFT convolutions of its channels over the full length, as the
  model does, and a second all-to-all turns the result back into position shards for out_proj.
Each exchange is an autograd Function whose backward is the opposite exchange, so gradients are exact. Every
process holds every parameter, and each computes its share of their gradients: summed over the group (DDP's
average, with each process's loss scaled by N: see `context_loss`), they are the gradients of one process
reading the whole sequence.

Memory per process: activations of L/N positions, and the operator's temporaries of one step's channels (see
ContextParallelHyena) at length L.

Shapes: B batch, L the whole sequence's length, S = L/N the positions a process holds, d d_model, G = d/N.
"""

import dataclasses
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fast
import tinyhyena as th


# ---------------------------------------------------------------------------------------------------------
# The process group: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK. One process is world 1, rank 0.

def init_distributed(device):
    """(rank, world, device): joins the process group that torchrun set up (gloo on the CPU, NCCL on GPUs),
    with each process on its own GPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_distributed(work, args, device):
    """work(args, rank, world, device) in the process group torchrun set up (if any), which it leaves at the end."""
    rank, world, device = init_distributed(device)
    try:
        return work(args, rank, world, device)
    finally:
        if dist.is_initialized():
            # free what still holds the group (DDP's reducer, finished works, in reference cycles) while the
            # interpreter is whole: gloo's threads met at its shutdown abort the process (SIGABRT)
            gc.collect()
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# Context parallelism.


class ContextGroup:
    """The processes that share each sequence: a torch.distributed process group, this process's rank in it and
    its size N."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.size))

    def shard(self, x, dim=1):
        """This process's positions of x along dim (a full-length tensor that every process holds)."""
        L = x.shape[dim]
        if L % self.size:
            raise th.UserError(f"sequence length {L} is not divisible by --context_parallel {self.size}")
        return x.narrow(dim, self.rank * (L // self.size), L // self.size)


def exchange(pieces, group):
    """All-to-all by point-to-point messages (gloo has no all-to-all): pieces[j] goes to the group's rank j;
    returns what each rank sent here, in rank order."""
    pieces = [p.contiguous() for p in pieces]  # (messages are whole buffers)
    received = [torch.empty_like(p) for p in pieces]
    received[group.rank] = pieces[group.rank]
    ops = []
    for j, piece in enumerate(pieces):
        if j != group.rank:
            ops.append(dist.P2POp(dist.isend, piece, group.ranks[j], group.group))
            ops.append(dist.P2POp(dist.irecv, received[j], group.ranks[j], group.group))
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    return received


def to_channels(z, group):
    """(B, streams, d, S) position shard -> (B, streams, G, L) channel shard."""
    return torch.cat(exchange(list(z.chunk(group.size, dim=2)), group), dim=3)


def to_positions(y, group):
    """(B, streams, G, L) channel shard -> (B, streams, d, S) position shard: to_channels read backwards."""
    return torch.cat(exchange(list(y.chunk(group.size, dim=3)), group), dim=2)


class Reshard(torch.autograd.Function):
    """to_channels (forward=to_channels) or to_positions, each one's gradient being the other's exchange."""

    @staticmethod
    def forward(ctx, x, group, direction):
        ctx.group, ctx.back = group, to_positions if direction is to_channels else to_channels
        return direction(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad.contiguous(), ctx.group), None, None


def shift(piece, group, step):
    """Send `piece` to the rank `step` (+1 or -1) away; return what the rank `step` the other way sent (zeros where
    there is none: before the first rank, after the last)."""
    piece = piece.contiguous()
    ops, received = [], torch.zeros_like(piece)
    if 0 <= group.rank + step < group.size:
        ops.append(dist.P2POp(dist.isend, piece, group.ranks[group.rank + step], group.group))
    if 0 <= group.rank - step < group.size:
        ops.append(dist.P2POp(dist.irecv, received, group.ranks[group.rank - step], group.group))
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    return received


class WithHalo(torch.autograd.Function):
    """z (B, C, S) -> (B, C, K-1 + S): the previous rank's last K-1 positions, then this rank's."""

    @staticmethod
    def forward(ctx, z, width, group):
        ctx.width, ctx.group = width, group
        return torch.cat([shift(z[..., z.shape[-1] - width:], group, +1), z], dim=-1)  # the last K-1, forward

    @staticmethod
    def backward(ctx, grad):
        width = ctx.width
        grad_z = grad[..., width:].clone()
        grad_z[..., grad_z.shape[-1] - width:] += shift(grad[..., :width], ctx.group, -1)  # their gradient, back
        return grad_z, None, None


class ContextParallelHyena(fast.FastHyena):
    """HyenaOperator's path under context parallelism, in place of FastHyena (see enable): u (B, S, d), this
    process's positions -> (B, S, d). Without a gradient it keeps its filters' spectra between calls, as
    FastHyena does.

    It runs the channels in steps, as the fast path runs them in groups, so that no process holds all (N+1) d
    projected channels of its positions at once (N the operator's order): with n processes, step k takes
    d_k = n g_k channels, g_k of each process's, through in_proj, the halo and short convolution, the exchange,
    the recurrence and the exchange back. Process r owns channels [c_k + r g_k, c_k + (r+1) g_k) of the step
    starting at channel c_k. Under checkpointing each
    step is recomputed alone in backward, its exchanges with it (in the same order in every process).
    channel_group: g_k, the channels per step of each process; None chooses them as fast.group_size does."""

    def __init__(self, cfg, group):
        super().__init__(cfg)
        self.group = group

    def __call__(self, op, u, checkpoint=False, norm=None):  # (norm: see FastHyena)
        u = u if norm is None else norm(u)
        group, cfg = self.group, op.cfg
        B, S, d = u.shape
        N, K, G = cfg.order, cfg.short_filter_order, d // group.size
        L = S * group.size
        if L > cfg.l_max:
            raise th.UserError(f"sequence length {L} is outside the allowed range [1, {cfg.l_max}] (l_max)")
        if K > 1 and S < K - 1:
            raise th.UserError(f"{S} positions per process are fewer than the short convolution's {K - 1}-"
                               "position halo: use a smaller --context_parallel")
        sizes = [len(c) for c in torch.arange(G).split(self.channel_group or fast.group_size(B, L, G, N))]
        starts = [group.size * sum(sizes[:k]) for k in range(len(sizes))]  # each step's first channel
        channels = torch.cat([torch.arange(c + group.rank * g, c + (group.rank + 1) * g) for c, g in zip(starts, sizes)])
        rows = (torch.arange(N - 1)[:, None] * d + channels).flatten().to(u.device)  # this process's filters
        h = None if torch.is_grad_enabled() else self.cached_spectrum(op.filter, L, rows)  # (spectra)
        h = (fast.filters(op.filter, L, rows, checkpoint) if h is None else h).view(N - 1, G, -1)
        bias = op.filter.bias[rows].view(N - 1, G)
        y = torch.cat([fast.checkpointed(checkpoint, self.channel_step, op, u, h_k, bias_k, slice(c, c + group.size * g))
                       for h_k, bias_k, c, g in zip(h.split(sizes, 1), bias.split(sizes, 1), starts, sizes)], dim=1)
        return op.out_proj(y.transpose(1, 2))  # y (B, d, S)

    def channel_step(self, op, u, h, bias, channels):
        """One step: the d_k channels `channels` (a slice) of this process's positions, u (B, S, d) -> (B, d_k, S);
        h (N-1, g_k, L), bias (N-1, g_k): the filters of this process's g_k of them."""
        group, N, K = self.group, op.cfg.order, op.cfg.short_filter_order
        B, S, d = u.shape
        z = fast.FastHyena.project(op, u, [channels])[0]  # (B, (N+1) d_k, S)
        weight = op.short_conv.weight.view(N + 1, d, K)[:, channels].flatten(0, 1)
        if K > 1:
            z = WithHalo.apply(z, K - 1, group)  # (B, (N+1) d_k, K-1+S)
        z = fast.causal_short_conv(z, weight, op.short_conv.bias.view(N + 1, d)[:, channels].flatten())
        z = z[..., z.shape[-1] - S:]  # (B, (N+1) d_k, S): the halo stood in for the left padding
        z = Reshard.apply(z.reshape(B, N + 1, -1, S), group, to_channels)  # (B, N+1, g_k, L)
        *x, v = z.unbind(1)  # x_0 .. x_{N-1}, v: each (B, g_k, L)
        y = op.recurrence(x, v, lambda o, v, x_i: fast.gated_causal_conv(v, x_i, h[o], bias[o]))  # (B, g_k, L)
        return Reshard.apply(y[:, None], group, to_positions)[:, 0]  # (B, d_k, S)


def enable(model, group):
    """Run `model`'s Hyena operators under context parallelism over `group` (a ContextGroup). d_model must be
    divisible by the group's size. The model then takes each process's shard of positions (group.shard)."""
    if model.cfg.d_model % group.size:
        raise th.UserError(f"d_model {model.cfg.d_model} is not divisible by --context_parallel {group.size}")
    for block in model.blocks:  # the model's one seam (tinyhyena.py): each operator's `fast` runs in its place
        block.mixer.fast = ContextParallelHyena(model.cfg, group)
    return model


def context_loss(model, x, y, group):
    """Next-token cross-entropy of this process's positions x, y (B, S), over the whole sequences' tokens and
    times the group's size: DDP's average over the processes then gives the gradient of the mean loss over
    every token (the group's processes each add their positions' share). Returns (that loss, the mean loss
    over every token of the group's sequences, for logging)."""
    logits = model(x)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, S, V); bf16 -> float32
    mask = y != th.PAD_ID
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")[mask.flatten()].sum()
    counts = torch.stack([mask.sum().float(), total.detach()])
    dist.all_reduce(counts, group=group.group)
    return total / counts[0] * group.size, counts[1] / counts[0]


class WholeSequences(torch.nn.Module):
    """A model under context parallelism over `group` (every process of it), seen as the model it computes, for
    inference (score.py, finetune.py embed): every process calls it on the same whole sequences (B, L), runs its
    shard of positions, and gets the whole output, gathered from the group. The sequences are right-padded to a
    multiple of N, which a causal model's outputs before the padding do not see; so cfg.l_max, the longest
    sequence it takes, is the model's rounded down to a multiple of N."""

    def __init__(self, model, group):
        super().__init__()
        self.model, self.group = enable(model, group), group
        N, halo = group.size, model.cfg.short_filter_order - 1
        self.cfg = dataclasses.replace(model.cfg, l_max=model.cfg.l_max - model.cfg.l_max % N)
        if halo * N > self.cfg.l_max:
            raise th.UserError(f"l_max {model.cfg.l_max} is too short for --context_parallel {N}: each process "
                               f"needs at least the short convolution's {halo}-position halo")

    def forward(self, input_ids):  # (B, L) -> (B, L, V)
        return self.whole(self.model, input_ids)

    def hidden_states(self, input_ids):  # (B, L) -> (B, L, d)
        return self.whole(self.model.hidden_states, input_ids)

    def whole(self, fn, input_ids):
        N, L = self.group.size, input_ids.shape[1]
        if not 1 <= L <= self.cfg.l_max:
            raise th.UserError(f"sequence length {L} is outside [1, {self.cfg.l_max}]: under --context_parallel {N} "
                               f"the longest is l_max ({self.model.cfg.l_max}) rounded down to a multiple of {N}")
        padded = max(-(-L // N), self.cfg.short_filter_order - 1) * N  # (at least a halo's positions each)
        part = fn(self.group.shard(F.pad(input_ids, (0, padded - L), value=th.PAD_ID))).contiguous()
        parts = [torch.empty_like(part) for _ in range(N)]
        dist.all_gather(parts, part, group=self.group.group)
        return torch.cat(parts, dim=1)[:, :L]


def for_inference(model, n, world):
    """`model` as WholeSequences over every process under --context_parallel n (which must be the number of
    processes torchrun started: inference shares each sequence, not the sequences), or as it is for n = 1 in one
    process. UserError otherwise."""
    if n != world:
        raise th.UserError(f"--context_parallel {n} must equal the number of processes ({world}): start "
                           f"{n} with torchrun --nproc_per_node {n}")
    return WholeSequences(model, ContextGroup()) if n > 1 else model
