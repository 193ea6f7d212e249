"""
Pretrain HyenaDNA by next-nucleotide prediction.

    python train.py --seq_len 1048576                       # hg38 prepared by `python data.py hg38`
    python train.py --fasta genome.fa.gz [--bed regions.bed] --preset tiny --seq_len 32768
    torchrun --nproc_per_node 8 train.py --preset large --seq_len 1048576    # data-parallel (DDP)

One straight loop: sequence-length warm-up stages, AdamW with a cosine schedule, gradient clipping, bf16 on
CUDA, activation checkpointing when memory needs it, atomic checkpoints, exact resume.
"""

import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import fast
import tinyhyena as th
from data import DataError, Genome, Windows, prepare, prepared_hg38, read_bed


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Pretrain HyenaDNA by next-nucleotide prediction.")
    p.add_argument("--fasta", type=cli.existing_file, help="FASTA file (plain or gzipped); prepared on first use")
    p.add_argument("--bed", type=cli.existing_file,
                   help="intervals (3 columns, or Basenji's 4 with a train/valid/test split)")
    p.add_argument("--data", type=cli.existing_path, help="folder prepared by data.py (default: data/hg38 when prepared)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "large", *th.PRESETS],
                   help="model size: tiny, large or a published name")
    p.add_argument("--seq_len", type=cli.positive_int, default=1024)
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
    p.add_argument("--eval_batches", type=cli.positive_int, default=20)
    p.add_argument("--ckpt_interval", type=cli.positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:1, ...")
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
    return args


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
        genome = Genome(prepare(args.fasta))
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
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard.tolist()), batch_size=batch,
                                             num_workers=workers, collate_fn=collate_fn,  # its own generator: the global RNG
                                             generator=torch.Generator().manual_seed(epoch))  # is dropout's
        yield from loader
        epoch, start = epoch + 1, 0


def lm_loss(model, x, y):
    logits = model(x)  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=th.PAD_ID)


@torch.no_grad()
def evaluate(model, dataset, args, device, rank, world):
    model.eval()
    total = torch.zeros(2, device=device)
    n = min(len(dataset), args.eval_batches * world)
    for i in range(rank, n, world):  # a fixed spread of windows: every evaluation sees the same ones
        x, y = dataset[i * len(dataset) // n]
        x, y = x[None].to(device), y[None].to(device)
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


def adamw(model, args):
    """AdamW as the paper: weight decay on the matrices, none on biases, norms and the implicit filter's
    parameters (its MLP is a function of position, not a feature map). Frozen parameters are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and ".filter." not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and ".filter." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def rng_state():
    """Every random state a run draws from, for an exact resume."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def save_checkpoint(model, optimizer, step, args, out):
    raw = model.module if hasattr(model, "module") else model
    state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "args": vars(args),
             **rng_state()}
    cli.atomic_write(os.path.join(out, "train_state.pt"), lambda tmp: torch.save(state, tmp))
    th.save_pretrained(raw, out)  # config.json + model.pt, what from_pretrained(out) reads


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
    """On resume: forget what was logged after the checkpoint, which the resumed run logs again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= step]
    cli.write_text(path, kept)


def log_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = cli.pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    claim_out_dir(args.out, args.resume, args.overwrite, delete=main_rank)  # before anything is written
    cli.make_out_dir(args.out)  # up front: a folder that cannot be made fails now, not after loading the data

    genome, bed = load_data(args)
    stages = length_stages(args)
    train_sets = {L: Windows(genome, L, "train", bed, args.rc_aug) for L, _, _ in stages}
    val_set = Windows(genome, args.seq_len, "valid", bed)

    if args.dropout >= 1:
        raise th.UserError(f"--dropout must be below 1, got {args.dropout}")
    cfg = th.preset_config(args.preset, l_max=args.seq_len + 2, embed_dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = th.HyenaDNA(cfg).to(device)
    model.gradient_checkpointing = want_checkpointing(args, cfg, args.batch_size, device)
    optimizer = adamw(model, args)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    step = 0
    if args.resume:
        state_path = os.path.join(args.out, "train_state.pt")
        if not os.path.isfile(state_path):
            raise DataError(f"{state_path}: nothing to resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        restore_rng_state(state)
        if main_rank:
            drop_metrics_after(metrics_path, step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, initial=step, disable=not main_rank, dynamic_ncols=True)
    start_time, data, stage_len, loss = time.time(), None, None, None
    model.train()
    while step < args.max_steps and stop["signal"] is None:
        L, micro_batch, first = [s for s in stages if s[2] <= step][-1]
        if L != stage_len:  # a new stage, or resuming: position in the data is a function of the step
            stage_len = L
            data = batches(train_sets[L], micro_batch, args.seed + L, rank, world,
                           (step - first) * args.grad_accum, args.workers)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        t0 = time.time()
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = next(data)
            x, y = x.to(device), y.to(device)
            sync = micro == args.grad_accum - 1 or world == 1
            with (ddp.no_sync() if not sync else torch.enable_grad()):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    micro_loss = lm_loss(ddp, x, y)
                (micro_loss / args.grad_accum).backward()
            total += micro_loss.detach() / args.grad_accum
        if world > 1:
            dist.all_reduce(total)
            total /= world
        loss = total.item()
        if not math.isfinite(loss):
            print(f"error: loss is {loss} at step {step}; stopping. The last good checkpoint in {args.out} "
                  "is kept (try a lower --lr)", file=sys.stderr)
            return 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens = micro_batch * L * args.grad_accum * world
        if main_rank:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.time() - t0):.0f}", seq_len=L)
            log_metrics(metrics_path, {"step": step, "split": "train", "loss": loss, "tokens": step * tokens,
                                       "seq_len": L, "lr": lr_at(step - 1, args),
                                       "elapsed_s": round(time.time() - start_time, 3)})
        if step % args.eval_interval == 0 and step < args.max_steps:
            val = evaluate(ddp, val_set, args, device, rank, world)
            if main_rank:
                log_metrics(metrics_path, {"step": step, "split": "val", "loss": val, "tokens": step * tokens,
                                           "seq_len": args.seq_len, "elapsed_s": round(time.time() - start_time, 3)})
        if main_rank and step % args.ckpt_interval == 0:
            save_checkpoint(model, optimizer, step, args, args.out)
    bar.close()
    if stop["signal"] is None:
        val = evaluate(ddp, val_set, args, device, rank, world)
        if main_rank:
            log_metrics(metrics_path, {"step": step, "split": "val", "loss": val,
                                       "tokens": step * args.batch_size * args.seq_len * args.grad_accum * world,
                                       "seq_len": args.seq_len, "elapsed_s": round(time.time() - start_time, 3)})
            print(f"step {step}: train loss {loss}, val loss {val:.4f}")
    if main_rank:
        save_checkpoint(model, optimizer, step, args, args.out)
        if stop["signal"] is not None:
            print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {args.out} "
                  "(continue with --resume)")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
