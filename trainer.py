"""
The one training loop, and what it stands on: every kind of training (train.py's pretraining, finetune.py's
fine-tuning) brings a `Job` and runs `train_loop`.

The loop: AdamW (`adamw`: the paper's weight-decay groups) with a cosine schedule after warm-up (`lr_at`),
gradient accumulation (`accumulate_gradients`), clipping, bf16 on CUDA, evaluation and checkpoint intervals,
metrics.jsonl, SIGTERM/SIGINT on any process stopping every process at the same step (`stop_requests`), exact
resume (each process's random state: `rng_state`), a stop on a non-finite loss, and DDP. Around it: each
process's endless shard of micro-batches (`batches`), a run folder that never takes over another run's files
(`claim_out_dir`), the metrics file (`log_metrics`), a FASTA prepared by one process (`prepare_once`), and
whether activations need checkpointing (`checkpointing_needed`).
"""

import contextlib
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

import base
import parallel
from base import DataError
from data import prepare


# ---------------------------------------------------------------------------------------------------------
# Data, memory and the run folder.

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


def checkpointing_needed(cfg, tokens, device):
    """Whether activations for `tokens` tokens a step would take more than a quarter of the memory: about
    40 floats per token, channel and layer are stored without checkpointing (measured on the tiny preset)."""
    need = 40 * 4 * tokens * cfg.d_model * cfg.n_layer
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need > have / 4


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


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
