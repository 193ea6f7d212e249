"""
Pretrain HyenaDNA by next-nucleotide prediction, on hg38 or any FASTA (and BED).

    python train.py --seq_len 1048576                       # hg38 prepared by `python data.py hg38`
    python train.py --fasta genome.fa.gz [--bed regions.bed] --preset tiny --seq_len 32768
    torchrun --nproc_per_node 8 train.py --preset large --seq_len 1048576    # data-parallel (DDP), one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id run1 \
        train.py --preset large --seq_len 1048576                           # on each of two machines
    torchrun --nproc_per_node 8 train.py --preset large --seq_len 2097152 --context_parallel 2  # each sequence
                                                                            # over 2 GPUs, 4 such groups (parallel.py)

Pretraining is a `trainer.Job` (`Pretraining`) run by the one training loop (trainer.py: AdamW, schedule,
accumulation, DDP, signals, exact resume): its batches of genome windows, the next-token loss, the validation
loss. It adds sequence-length warm-up stages, activation checkpointing when memory needs it, context
parallelism (parallel.py), and ends with the loss on the held-out test split.
"""

import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import base
import checkpoints
import cli
import fast
import parallel
import tinyhyena as th
import trainer
from data import DataError, Genome, Windows, prepared_hg38, read_bed


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Pretrain HyenaDNA by next-nucleotide prediction.")
    p.add_argument("--fasta", type=cli.existing_file, help="FASTA file (plain or gzipped); prepared on first use")
    p.add_argument("--bed", type=cli.existing_file,
                   help="intervals: BED3 to BED12; a 4th column of train/valid/test in every row is the split")
    p.add_argument("--data", type=cli.existing_path, help="folder prepared by data.py (default: data/hg38 when prepared)")
    p.add_argument("--preset", choices=["tiny", "large", *checkpoints.PRESETS],
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
    """(model, seq_len): the model a run starts from, a fresh one of --preset or the --init_from checkpoint's
    weights, and the training length (--seq_len, or by default 1024 or the checkpoint's l_max - 2). Training
    longer than the checkpoint's l_max - 2 raises l_max to seq_len + 2, and with it the filters' positional
    features (they are scaled by l_max): the run starts from the checkpoint's weights computing a new function,
    which its first steps adapt to. At or below the checkpoint's length, its l_max and function are kept."""
    if not args.init_from:
        seq_len = args.seq_len or 1024
        cfg = th.preset_config(args.preset or "tiny", l_max=seq_len + 2, embed_dropout=args.dropout)
        torch.manual_seed(args.seed)  # the same initial weights in every process
        return th.HyenaDNA(cfg), seq_len
    ckpt = checkpoints.read_checkpoint(args.init_from, th.HyenaConfig)
    seq_len = args.seq_len or ckpt.cfg.l_max - 2
    cfg = dataclasses.replace(ckpt.cfg, l_max=max(ckpt.cfg.l_max, seq_len + 2), embed_dropout=args.dropout)
    model = th.HyenaDNA(cfg)
    state = dict(ckpt.state)
    if cfg.l_max != ckpt.cfg.l_max:  # the positional tables of the new l_max, the model's own
        state.update({k: v for k, v in model.state_dict().items() if k.endswith((".filter.z", ".filter.t"))})
    checkpoints.load_state_dict(model, state, ckpt.weights_path)
    return model, seq_len


def length_stages(seq_len, args):
    """[(length, micro_batch, first_step)]: lengths doubling from --min_seq_len up to seq_len, the batch
    halving as the length doubles so tokens per step stay constant. The warm-up stages share the first
    half of the run equally; the full length gets the rest."""
    lengths = [seq_len]
    while lengths[0] // 2 >= args.min_seq_len and lengths[0] % 2 == 0:
        lengths.insert(0, lengths[0] // 2)
    per_stage = args.max_steps // 2 // len(lengths) if len(lengths) > 1 else 0
    return [(L, args.batch_size * seq_len // L, i * per_stage) for i, L in enumerate(lengths)]


def load_data(args):
    """(genome, bed rows or None), or DataError with what to do."""
    if args.fasta:
        genome = Genome(trainer.prepare_once(args.fasta))
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


def want_checkpointing(args, cfg, tokens, device):
    if args.checkpointing != "auto":
        return args.checkpointing == "on"
    return trainer.checkpointing_needed(cfg, tokens, device)


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
    for i, (L, _, _) in enumerate(stages):
        if L % N:
            raise th.UserError(f"sequence length {L} is not divisible by --context_parallel {N}"
                               + (" (a warm-up stage: set --min_seq_len)" if i < len(stages) - 1 else ""))
    if world % N:
        raise th.UserError(f"--context_parallel {N} does not divide the {world} process(es) of this run "
                           "(start it with torchrun --nproc_per_node)")
    groups = [dist.new_group(list(range(i, i + N))) for i in range(0, world, N)]  # every process makes each
    return parallel.ContextGroup(groups[rank // N])


class Pretraining(trainer.Job):
    """Next-token prediction on genome windows, in length stages: this process's batches (under context
    parallelism, its positions of its group's sequences), the loss, and the validation loss."""

    def __init__(self, model, args, seq_len, stages, genome, bed, device, rank, world, context):
        self.model, self.args, self.seq_len, self.stages = model, args, seq_len, stages
        self.device, self.rank, self.world, self.context = device, rank, world, context
        self.train_sets = {L: Windows(genome, L, "train", bed, args.rc_aug) for L, _, _ in stages}
        self.val_set = Windows(genome, seq_len, "valid", bed)
        # processes of one context group read the same batches: data parallelism is over the groups
        self.data_rank, self.data_world = (rank // context.size, world // context.size) if context else (rank, world)
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        self.start = time.time()
        self.length, self.stream = None, None  # the stage being read, and its batches

    def stage(self, step):
        return [s for s in self.stages if s[2] <= step][-1]

    def next_batch(self, step):
        L, micro_batch, first = self.stage(step)
        if L != self.length:  # a new stage, or resuming: the position in the data follows from the step
            self.length = L
            self.stream = trainer.batches(self.train_sets[L], micro_batch, self.args.seed + L, self.data_rank,
                                          self.data_world, (step - first) * self.args.grad_accum, self.args.workers)
        return next(self.stream)  # the processes of a context group read the same batch (the same data rank)

    def loss(self, model, x, y):
        if self.context:
            return parallel.context_loss(model, self.context.shard(x), self.context.shard(y), self.context)[0], None
        return lm_loss(model, x, y), None

    def tokens(self, step):
        """(length, tokens per step) of step number `step`, the one just taken (its stage's)."""
        L, micro_batch, _ = self.stage(max(step - 1, 0))
        return L, micro_batch * L * self.args.grad_accum * self.data_world

    def log(self, step, split, loss, **more):
        if self.rank == 0:
            trainer.log_metrics(self.metrics_path, {"step": step, "split": split, "loss": loss, **more,
                                                    "tokens": step * self.tokens(step)[1], "seq_len": self.seq_len,
                                                    "elapsed_s": round(time.time() - self.start, 3)})

    def evaluate(self, step):
        self.log(step, "val", evaluate(self.model, self.val_set, self.args, self.device, self.rank, self.world,
                                       self.context))

    def train_row(self, step, records):
        L, per_step = self.tokens(step)
        return {"tokens": step * per_step, "seq_len": L}

    def save_model(self, step):
        th.save_pretrained(self.model, self.args.out)


def pretrain(args, rank, world, device):
    trainer.claim_out_dir(args.out, args.resume, args.overwrite, delete=rank == 0)  # before anything is written
    with base.output_folder(args.out):  # up front; removed again if the run fails before writing into it
        if args.dropout >= 1:
            raise th.UserError(f"--dropout must be below 1, got {args.dropout}")
        model, seq_len = initial_model(args)
        model = model.to(device)
        stages = length_stages(seq_len, args)
        context = context_group(args, stages, rank, world)  # (checked before the data is read)
        genome, bed = load_data(args)
        job = Pretraining(model, args, seq_len, stages, genome, bed, device, rank, world, context)
        if context:
            parallel.enable(model, context)
        model.gradient_checkpointing = want_checkpointing(args, model.cfg, args.batch_size * seq_len, device)
        if model.gradient_checkpointing and device.type == "cpu":
            fast.tune_cpu_memory(memory_first=True)  # memory is what limits the length here (fast.py)
        torch.manual_seed(args.seed * 1000 + rank)  # each process its own dropout draws
        if args.init_from and not args.resume:
            job.evaluate(0)  # where the run starts: the checkpoint's loss on the validation windows
        outcome = trainer.train_loop(job, trainer.Settings.from_args(args), device, rank, world)
        if outcome == "diverged":
            return 1
        if outcome == "done":
            test = evaluate(model, Windows(genome, seq_len, "test", bed), args, device, rank, world, context)
            job.log(args.max_steps, "test", test, bits_per_base=test / math.log(2))
            if rank == 0:
                print(f"step {args.max_steps}: test loss {test:.4f} nats/base ({test / math.log(2):.4f} bits/base)")
        return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
