"""
Pretrain HyenaDNA by next-nucleotide prediction; and the one training loop, which finetune.py uses too.

    python train.py --seq_len 1048576                       # hg38 prepared by `python data.py hg38`
    python train.py --fasta genome.fa.gz [--bed regions.bed] --preset tiny --seq_len 32768
    torchrun --nproc_per_node 8 train.py --preset large --seq_len 1048576    # data-parallel (DDP), one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id run1 \
        train.py --preset large --seq_len 1048576                           # on each of two machines
    torchrun --nproc_per_node 8 train.py --preset large --seq_len 2097152 --context_parallel 2  # each sequence
                                                                            # over 2 GPUs, 4 such groups (parallel.py)

The loop (`train_loop`): AdamW with a cosine schedule after warm-up, gradient accumulation, clipping, bf16 on
CUDA, evaluation and checkpoint intervals, metrics.jsonl, SIGTERM/SIGINT on any rank stopping every rank at the
same step, exact resume, a stop on a non-finite loss, and DDP. A command brings what is its own (a `Job`: its
batches, its loss, its evaluation, its metrics). Pretraining adds sequence-length warm-up stages and
activation checkpointing when memory needs it, and ends with the loss on the held-out test split.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import base
import checkpoints
import cli
import fast
import parallel
import tinyhyena as th
from data import DataError, Genome, Windows, prepare, prepared_hg38, read_bed


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Pretrain HyenaDNA by next-nucleotide prediction.")
    p.add_argument("--fasta", type=cli.existing_file, help="FASTA file (plain or gzipped); prepared on first use")
    p.add_argument("--bed", type=cli.existing_file,
                   help="intervals: BED3 to BED12; a 4th column of train/valid/test in every row is the split")
    p.add_argument("--data", type=cli.existing_path, help="folder prepared by data.py (default: data/hg38 when prepared)")
    p.add_argument("--preset", choices=["tiny", "large", *th.PRESETS],
                   help="model size of a fresh model: tiny (default), large or a published name")
    p.add_argument("--init_from", type=cli.existing_path, metavar="CHECKPOINT",
                   help="start from a pretrained checkpoint folder (published, hub or tinyhyena) instead of random weights")
    p.add_argument("--seq_len", type=cli.positive_int,
                   help="training length (default 1024, or the --init_from checkpoint's: its l_max - 2)")
    p.add_argument("--min_seq_len", type=cli.positive_int, default=1024,
                   help="first length of the warm-up stages, which double up to --seq_len")
    p.add_argument("--batch_size", type=cli.positive_int, default=8, help="sequences per micro-batch at --seq_len")
    p.add_argument("--grad_accum", type=cli.positive_int, default=1)
    p.add_argument("--max_steps", type=cli.positive_int, default=10000)
    p.add_argument("--lr", type=cli.positive_float, default=6e-4)
    p.add_argument("--weight_decay", type=cli.nonnegative_float, default=0.1)
    p.add_argument("--dropout", type=cli.nonnegative_float, default=0.1,
                   help="dropout on the token embeddings (0.1 as published; 0 makes steps deterministic)")
    p.add_argument("--warmup_steps", type=cli.nonnegative_int, default=100)
    p.add_argument("--eval_interval", type=cli.positive_int, default=500)
    p.add_argument("--eval_batches", type=cli.positive_int, default=20,
                   help="validation windows per evaluation (shared out among the processes)")
    p.add_argument("--ckpt_interval", type=cli.positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--context_parallel", type=cli.positive_int, default=1, metavar="N",
                   help="processes that share each sequence, each holding 1/N of its positions (under torchrun; "
                        "the number of processes must be a multiple of N, data parallelism over the rest)")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="activation checkpointing; auto switches it on where activations would not fit")
    p.add_argument("--rc_aug", action="store_true", help="reverse-complement augmentation")
    p.add_argument("--workers", type=cli.nonnegative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default="out")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds another run, deleting that run's files")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other: continue the run in --out, or start over")
    if args.init_from and args.preset:
        p.error("--init_from takes the model's size from the checkpoint: drop --preset")
    return args


def initial_model(args):
    """The model a run starts from: a fresh one of --preset, or the --init_from checkpoint's weights. Training
    longer than that checkpoint's l_max - 2 raises l_max to --seq_len + 2, and with it the filters' positional
    features (they are scaled by l_max): the run starts from the checkpoint's weights computing a new function,
    which its first steps adapt to. At or below the checkpoint's length, its l_max and function are kept."""
    if not args.init_from:
        args.seq_len = args.seq_len or 1024
        cfg = th.preset_config(args.preset or "tiny", l_max=args.seq_len + 2, embed_dropout=args.dropout)
        torch.manual_seed(args.seed)  # the same initial weights in every process
        return th.HyenaDNA(cfg)
    ckpt = checkpoints.read_checkpoint(args.init_from)
    args.seq_len = args.seq_len or ckpt.cfg.l_max - 2
    cfg = dataclasses.replace(ckpt.cfg, l_max=max(ckpt.cfg.l_max, args.seq_len + 2), embed_dropout=args.dropout)
    model = th.HyenaDNA(cfg)
    state = dict(ckpt.state)
    if cfg.l_max != ckpt.cfg.l_max:  # the positional tables of the new l_max, the model's own
        state.update({k: v for k, v in model.state_dict().items() if k.endswith((".filter.z", ".filter.t"))})
    checkpoints.load_state_dict(model, state, ckpt.weights_path)
    return model


def length_stages(args):
    """[(seq_len, micro_batch, first_step)]: lengths doubling from min_seq_len up to seq_len, the batch
    halving as the length doubles so tokens per step stay constant. The warm-up stages share the first
    half of the run equally; the full length gets the rest."""
    lengths = [args.seq_len]
    while lengths[0] // 2 >= args.min_seq_len and lengths[0] % 2 == 0:
        lengths.insert(0, lengths[0] // 2)
    per_stage = args.max_steps // 2 // len(lengths) if len(lengths) > 1 else 0
    return [(L, args.batch_size * args.seq_len // L, i * per_stage) for i, L in enumerate(lengths)]


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def load_data(args):
    """(genome, bed rows or None), or DataError with what to do."""
    if args.fasta:
        genome = Genome(prepare_once(args.fasta))
        return genome, (read_bed(args.bed, genome) if args.bed else None)
    directory = args.data or "data/hg38"
    if os.path.isfile(os.path.join(prepared_hg38(directory), "index.json")):
        genome = Genome(prepared_hg38(directory))
        bed = args.bed or os.path.join(directory, "sequences_human.bed")
        return genome, read_bed(bed, genome)
    if args.data and os.path.isfile(os.path.join(directory, "index.json")):
        genome = Genome(directory)
        return genome, (read_bed(args.bed, genome) if args.bed else None)
    raise DataError(f"no training data: {directory} is not prepared. Run `python data.py hg38` "
                    "(downloads hg38), or pass --fasta FILE [--bed FILE]")


def batches(dataset, batch, seed, rank, world, skip, workers, collate_fn=None):
    """Endless micro-batches of this rank's shard: each epoch a fresh permutation (seeded by seed and epoch)
    dealt out across ranks. `skip` micro-batches are passed over, so a resumed run sees what it would have."""
    per_rank = len(dataset) // world
    if per_rank < batch:
        raise DataError(f"{len(dataset)} training examples are fewer than {world} rank(s) x one batch of {batch}")
    per_epoch = per_rank // batch
    epoch, start = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        shard = order[rank::world][:per_epoch * batch][start * batch:]
        # the loader's own generator seeds its workers' random draws (augmentation): its own per process and
        # epoch; the global generator is dropout's
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard.tolist()), batch_size=batch,
                                             num_workers=workers, collate_fn=collate_fn,
                                             generator=torch.Generator().manual_seed(epoch * 1009 + rank))
        yield from loader
        epoch, start = epoch + 1, 0


def lm_loss(model, x, y):
    logits = model(x)  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=th.PAD_ID)


@torch.no_grad()
def evaluate(model, dataset, args, device, rank, world, context=None):
    """Mean loss per token over args.eval_batches windows spread evenly over the dataset: the same windows at
    every evaluation and whatever the number of processes, which share them out. Under context parallelism
    (context: this process's parallel.ContextGroup) each group reads a window, each process its positions."""
    model.eval()
    total = torch.zeros(2, device=device)
    n = min(len(dataset), args.eval_batches)
    share, shares = (rank // context.size, world // context.size) if context else (rank, world)
    for i in range(share, n, shares):
        x, y = dataset[i * len(dataset) // n]
        x, y = x[None].to(device), y[None].to(device)
        if context:
            x, y = context.shard(x), context.shard(y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = lm_loss(model, x, y)
        if torch.isfinite(loss):
            total += torch.stack([loss * (y != th.PAD_ID).sum(), (y != th.PAD_ID).sum().float()])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def checkpointing_needed(cfg, tokens, device):
    """Whether activations for `tokens` tokens a step would take more than a quarter of the memory: about
    40 floats per token, channel and layer are stored without checkpointing (measured on the tiny preset)."""
    need = 40 * 4 * tokens * cfg.d_model * cfg.n_layer
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need > have / 4


def want_checkpointing(args, cfg, micro_batch, device):
    if args.checkpointing != "auto":
        return args.checkpointing == "on"
    return checkpointing_needed(cfg, micro_batch * args.seq_len, device)


# ---------------------------------------------------------------------------------------------------------
# Many processes (the process group itself is parallel.py's).

def prepare_once(fasta, quiet=False):
    """data.prepare(fasta), written by one process: rank 0 prepares while the others wait; then the first process
    of each other machine prepares only if that machine does not share rank 0's folder (prepare reuses a prepared
    genome), and the rest of its processes wait. Two processes never write the same files."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0:
        prepare(fasta, quiet=quiet)
    parallel.barrier()
    if rank != 0 and local_rank == 0:
        prepare(fasta, quiet=True)
    parallel.barrier()
    return prepare(fasta, quiet=True)


def rng_state():
    """Every random state a process draws from, for an exact resume."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


RUN_FILES = ("metrics.jsonl", "train_state.pt", "model.pt", "config.json")  # what a run writes into --out


def claim_out_dir(out, resume, overwrite, run_files=RUN_FILES, delete=True):
    """Make --out safe to write a run into, before anything is written. A fresh run refuses an --out that
    holds another run's files (its checkpoint may be days of compute); --overwrite deletes those files (and
    only those); --resume needs them. Files of other names in --out are left alone."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} exists and is not a folder")
    found = [name for name in run_files if os.path.lexists(os.path.join(out, name))]
    if resume or not found:
        return
    if not overwrite:
        raise DataError(f"{out} holds another run ({', '.join(found)}); pass --resume to continue it, or "
                        "--overwrite to start over and delete it")
    if delete:
        for name in found:
            os.remove(os.path.join(out, name))  # the run's own files, named above; nothing else


def drop_metrics_after(path, step):
    """On resume: forget what was logged after the checkpoint, which the resumed run logs again. A torn last
    line (the process was killed while writing it) is dropped with a warning; a malformed line before it is
    an error naming the line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                print(f"warning: {path}: dropped a torn last line (the run was killed while writing it)",
                      file=sys.stderr)
                break
            raise DataError(f"{path}:{i + 1}: not a JSON line; the metrics file is damaged") from None
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    base.write_text(path, kept)


def log_metrics(path, record):
    """One JSON line appended to metrics.jsonl and put on disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# The loop.

@dataclass
class Job:
    """What a training command brings to train_loop; the loop does the rest."""
    model: torch.nn.Module  # trained in place; its trainable parameters go to AdamW
    next_batch: Callable  # step -> one micro-batch (inputs, targets) of this process's shard, for that step
    loss: Callable  # (model, inputs, targets) -> (loss, record); the step's records go to train_row
    evaluate: Callable  # step -> None: evaluate, log rows (main rank), save what is best; every eval_interval
    train_row: Callable = lambda step, records: {}  # extra fields of a step's train row in metrics.jsonl
    save_model: Callable = lambda step: None  # write the model folder (main rank), at each checkpoint
    state: Callable = lambda: {}  # the command's own state to checkpoint (fine-tuning's best score)
    restore: Callable = lambda state: None


def adamw(model, args):
    """AdamW as the paper: weight decay on the matrices, none on biases, norms and the implicit filter's
    parameters (its MLP is a function of position, not a feature map). Frozen parameters are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and ".filter." not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and ".filter." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def accumulate_gradients(ddp, job, step, grad_accum, device, world=1):
    """One optimizer step's gradients, in the parameters' .grad: grad_accum micro-batches of job.next_batch(step),
    each loss divided by grad_accum, and (under DDP, ddp being the wrapped model) averaged over the processes
    once, at the last micro-batch. The gradient is that of the mean loss over every sequence of the step, in
    all processes. Returns (that mean loss, job.loss's records)."""
    total, records = torch.zeros((), device=device), []
    for micro in range(grad_accum):
        x, y = job.next_batch(step)
        x, y = x.to(device), y.to(device)
        last = micro == grad_accum - 1
        with ddp.no_sync() if world > 1 and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, record = job.loss(ddp, x, y)
            (loss / grad_accum).backward()
        total += loss.detach().float() / grad_accum
        records.append(record)
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return total.item(), records


@contextlib.contextmanager
def stop_requests():
    """While the loop runs, SIGTERM or SIGINT asks it to stop at the end of the step (stop["signal"] is set); the
    caller's own handlers are back afterwards."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loop(job, args, device, rank=0, world=1):
    """Train job.model for args.max_steps optimizer steps (args: lr, weight_decay, warmup_steps, grad_accum,
    eval_interval, ckpt_interval, out, resume). Returns "done", "stopped" (by a signal: checkpoint saved) or
    "diverged" (a non-finite loss: the last checkpoint kept)."""
    model, main_rank = job.model, rank == 0
    optimizer = adamw(model, args)
    metrics_path, state_path = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "train_state.pt")
    step = 0
    if args.resume:
        if not os.path.isfile(state_path):
            raise DataError(f"{state_path}: nothing to resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        rng = state.get("rng", [state])  # (one process's state, as older checkpoints hold it)
        if len(rng) != world:
            raise DataError(f"{state_path} was written by {len(rng)} process(es); resume it with the same number "
                            f"(this run has {world}): each process's data shard and random state are its own")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        restore_rng_state(rng[rank])
        job.restore(state.get("job", {}))
        if main_rank:
            drop_metrics_after(metrics_path, step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint():  # every process's random state, gathered; the files written by the main rank
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if main_rank:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": states,
                     "args": {k: v for k, v in vars(args).items() if k != "func"}, "job": job.state()}
            base.atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            job.save_model(step)
        parallel.barrier()

    with stop_requests() as stop:
        def stop_requested():  # a stop asked of any process stops them all at the same step
            flag = torch.tensor([float(stop["signal"] is not None)], device=device)
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0

        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=step, disable=not main_rank, dynamic_ncols=True, file=sys.stderr)
        start_time = time.time()
        model.train()
        outcome = "done"
        while step < args.max_steps:
            if stop_requested():
                outcome = "stopped"
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss, records = accumulate_gradients(ddp, job, step, args.grad_accum, device, world)
            if not math.isfinite(loss):
                print(f"error: loss is {loss} at step {step}; stopping. The last good checkpoint in {args.out} "
                      "is kept (try a lower --lr)", file=sys.stderr)
                outcome = "diverged"
                break
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if main_rank:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                log_metrics(metrics_path, {"step": step, "split": "train", "loss": loss, **job.train_row(step, records),
                                           "lr": lr_at(step - 1, args), "grad_norm": grad_norm,
                                           "elapsed_s": round(time.time() - start_time, 3)})
            if step % args.eval_interval == 0 or step == args.max_steps:
                job.evaluate(step)
            if step % args.ckpt_interval == 0 and step < args.max_steps:
                checkpoint()
        bar.close()
        if outcome != "diverged":
            checkpoint()
        if outcome == "stopped" and main_rank:
            print(f"stopped by a signal at step {step}; checkpoint saved in {args.out} (continue with --resume)")
        return outcome


# ---------------------------------------------------------------------------------------------------------
# Pretraining.

def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    args = parse_args(argv)
    return parallel.run_distributed(pretrain, args, cli.pick_device(args.device))


def context_group(args, stages, rank, world):
    """This process's parallel.ContextGroup under --context_parallel N (None for 1): processes rank // N * N ..
    + N - 1 share each sequence. UserError for a world or a warm-up length that N does not divide."""
    N = args.context_parallel
    if N == 1:
        return None
    for L, _, _ in stages:
        if L % N:
            raise th.UserError(f"sequence length {L} is not divisible by --context_parallel {N}"
                               + (" (a warm-up stage: set --min_seq_len)" if L != args.seq_len else ""))
    if world % N:
        raise th.UserError(f"--context_parallel {N} does not divide the {world} process(es) of this run "
                           "(start it with torchrun --nproc_per_node)")
    groups = [dist.new_group(list(range(i, i + N))) for i in range(0, world, N)]  # every process makes each
    return parallel.ContextGroup(groups[rank // N])


def pretrain(args, rank, world, device):
    main_rank = rank == 0
    claim_out_dir(args.out, args.resume, args.overwrite, delete=main_rank)  # before anything is written
    base.make_out_dir(args.out)  # up front: a folder that cannot be made fails now, not after loading the data
    if args.dropout >= 1:
        raise th.UserError(f"--dropout must be below 1, got {args.dropout}")
    model = initial_model(args).to(device)  # (sets --seq_len where it was left to the checkpoint)
    cfg = model.cfg
    stages = length_stages(args)
    context = context_group(args, stages, rank, world)  # (checked before the data is read)
    genome, bed = load_data(args)
    train_sets = {L: Windows(genome, L, "train", bed, args.rc_aug) for L, _, _ in stages}
    val_set = Windows(genome, args.seq_len, "valid", bed)
    if context:
        parallel.enable(model, context)
    data_rank, data_world = (rank // context.size, world // context.size) if context else (rank, world)
    model.gradient_checkpointing = want_checkpointing(args, cfg, args.batch_size, device)
    if model.gradient_checkpointing and device.type == "cpu":
        fast.tune_cpu_memory(memory_first=True)  # memory is what limits the length here (fast.py)
    torch.manual_seed(args.seed * 1000 + rank)  # each process its own dropout and augmentation draws
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = time.time()
    stream = {"length": None, "batches": None}

    def next_batch(step):
        L, micro_batch, first = [s for s in stages if s[2] <= step][-1]
        if L != stream["length"]:  # a new stage, or resuming: the position in the data follows from the step
            stream["length"] = L
            stream["batches"] = batches(train_sets[L], micro_batch, args.seed + L, data_rank, data_world,
                                        (step - first) * args.grad_accum, args.workers)
        x, y = next(stream["batches"])
        return context.same_batch(x, y) if context else (x, y)

    def tokens(step):
        L, micro_batch, _ = [s for s in stages if s[2] <= max(step - 1, 0)][-1]
        return L, micro_batch * L * args.grad_accum * data_world

    def evaluate_val(step):
        val = evaluate(model, val_set, args, device, rank, world, context)
        if main_rank:
            log_metrics(metrics_path, {"step": step, "split": "val", "loss": val, "tokens": step * tokens(step)[1],
                                       "seq_len": args.seq_len, "elapsed_s": round(time.time() - start, 3)})

    def train_row(step, records):
        L, per_step = tokens(step)
        return {"tokens": step * per_step, "seq_len": L}

    if context:
        loss = lambda m, x, y: (parallel.context_loss(m, context.shard(x), context.shard(y), context)[0], None)
    else:
        loss = lambda m, x, y: (lm_loss(m, x, y), None)
    job = Job(model=model, next_batch=next_batch, loss=loss,
                       evaluate=evaluate_val, train_row=train_row,
                       save_model=lambda step: th.save_pretrained(model, args.out))
    if args.init_from and not args.resume:
        evaluate_val(0)  # where the run starts: the checkpoint's loss on the validation windows
    outcome = train_loop(job, args, device, rank, world)
    if outcome == "diverged":
        return 1
    if outcome == "done":
        test = evaluate(model, Windows(genome, args.seq_len, "test", bed), args, device, rank, world, context)
        if main_rank:
            log_metrics(metrics_path, {"step": args.max_steps, "split": "test", "loss": test,
                                       "bits_per_base": test / math.log(2),
                                       "tokens": args.max_steps * tokens(args.max_steps)[1], "seq_len": args.seq_len,
                                       "elapsed_s": round(time.time() - start, 3)})
            print(f"step {args.max_steps}: test loss {test:.4f} nats/base ({test / math.log(2):.4f} bits/base)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
