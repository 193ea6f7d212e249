"""
The one training loop, and what it stands on: every kind of training (train.py's pretraining, finetune.py's
fine-tuning) subclasses `Job` with its batches, loss and evaluation, and runs `train_loop` with its `Settings`.

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
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

import base
import parallel
from base import DataError
from data import prepare


# ---------------------------------------------------------------------------------------------------------
# Data, memory and the run folder.

class EpochItems(torch.utils.data.Dataset):
    """dataset.item(i, flip) for each (i, flip) of `items`: the items at i, reverse-complemented where flip."""

    def __init__(self, dataset, items):
        self.dataset, self.items = dataset, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.dataset.item(*self.items[k])


def batches(dataset, batch, seed, rank, world, skip, workers, collate_fn=None):
    """Endless micro-batches of this rank's shard: each epoch a fresh permutation (seeded by seed and epoch)
    dealt out across ranks, and with dataset.rc_aug which items are reverse-complemented, drawn from the same
    seed: every process, DataLoader worker and resumed run reads the same items. `skip` micro-batches are
    passed over, so a resumed run sees what it would have."""
    per_rank = len(dataset) // world
    if per_rank < batch:
        raise DataError(f"{len(dataset)} training examples are fewer than {world} rank(s) x one batch of {batch}")
    per_epoch = per_rank // batch
    epoch, start = divmod(skip, per_epoch)
    while True:
        draws = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(dataset), generator=draws)
        flips = (torch.rand(len(dataset), generator=draws) < 0.5) & getattr(dataset, "rc_aug", False)
        shard = order[rank::world][:per_epoch * batch][start * batch:]
        items = list(zip(shard.tolist(), flips[shard].tolist()))  # this rank's (index, flip) pairs
        # the loader's own generator, so that starting it draws nothing from the global one (dropout's)
        loader = torch.utils.data.DataLoader(EpochItems(dataset, items), batch_size=batch,
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
class Settings:
    """What train_loop runs by: a command's flags, its defaults resolved (`from_args`)."""
    out: str  # the run folder: metrics.jsonl, train_state.pt and the command's model files
    max_steps: int  # optimizer steps
    lr: float  # the peak learning rate
    weight_decay: float
    warmup_steps: int
    grad_accum: int  # micro-batches per optimizer step
    eval_interval: int  # steps between evaluations
    ckpt_interval: int  # steps between checkpoints (the end, and a stop by signal, save one too)
    resume: bool = False  # continue from out/train_state.pt
    betas: tuple = (0.9, 0.95)  # AdamW's moment decay rates
    flags: dict = field(default_factory=dict)  # the command line as run, saved with each checkpoint

    @classmethod
    def from_args(cls, args, **resolved):
        """Settings from an argparse namespace; `resolved` gives fields whose flag was left to a default
        computed by the command (fine-tuning's steps per epoch, say). Fields without a flag keep their default."""
        names = {f.name for f in fields(cls)} - {"flags"}
        values = {name: getattr(args, name) for name in names - resolved.keys() if hasattr(args, name)}
        return cls(**values, **resolved, flags={k: v for k, v in vars(args).items() if k != "func"})


class Job:
    """What a training command brings to train_loop, which does the rest: a subclass names its model and
    defines next_batch and loss; the other methods are for what it adds."""

    model: torch.nn.Module  # trained in place; its trainable parameters go to AdamW

    def next_batch(self, step):
        """One micro-batch (inputs, targets) of this process's shard, for the given step."""
        raise NotImplementedError

    def loss(self, model, inputs, targets):
        """(loss, record) of a micro-batch through `model` (job.model, or its DDP wrapper); the step's records
        go to train_row."""
        raise NotImplementedError

    def evaluate(self, step):
        """Every eval_interval steps and at the end: evaluate, log (main rank), keep what is best."""

    def train_row(self, step, records):
        """Extra fields of a step's train row in metrics.jsonl."""
        return {}

    def save_model(self, step):
        """Write the model folder (main rank), at each checkpoint."""

    def state_dict(self):
        """The command's own state to checkpoint beside the model's (fine-tuning's best score)."""
        return {}

    def load_state_dict(self, state):
        pass


def lr_at(step, settings):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def adamw(model, settings):
    """AdamW as the paper: weight decay on the matrices, none on biases, norms and the implicit filter's
    parameters (its MLP is a function of position, not a feature map). Frozen parameters are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and ".filter." not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and ".filter." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=settings.betas)


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
def stop_requests(device, world=1):
    """While the loop runs, SIGTERM or SIGINT asks it to stop at the end of the step; the caller's own handlers
    are back afterwards. Yields stop_requested(): whether any process was asked, so that all stop at the same
    step."""
    asked = []
    previous = {sig: signal.signal(sig, lambda signum, frame: asked.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop_requested():
        flag = torch.tensor([float(bool(asked))], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
    try:
        yield stop_requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_train_state(path, model, optimizer, job, rank, world):
    """Restore a run from its train_state.pt: the model, the optimizer, this process's random state and the
    job's own state. Returns the step it had reached."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: nothing to resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    rng = state.get("rng", [state])  # (one process's state, as older checkpoints hold it)
    if len(rng) != world:
        raise DataError(f"{path} was written by {len(rng)} process(es); resume it with the same number (this run "
                        f"has {world}): each process's data shard and random state are its own")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(rng[rank])
    job.load_state_dict(state.get("job", {}))
    return state["step"]


def save_train_state(path, step, model, optimizer, job, settings, rank, world):
    """Checkpoint the run at `step`: every process's random state is gathered, and the main rank writes
    train_state.pt (atomically) and the job's model folder."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": states,
                 "args": settings.flags, "job": job.state_dict()}
        base.atomic_write(path, lambda tmp: torch.save(state, tmp))
        job.save_model(step)
    parallel.barrier()


def train_loop(job, settings, device, rank=0, world=1):
    """Train job.model for settings.max_steps optimizer steps. Returns "done", "stopped" (by a signal:
    checkpoint saved) or "diverged" (a non-finite loss: the last checkpoint kept)."""
    model, main_rank = job.model, rank == 0
    optimizer = adamw(model, settings)
    metrics_path = os.path.join(settings.out, "metrics.jsonl")
    state_path = os.path.join(settings.out, "train_state.pt")
    step = 0
    if settings.resume:
        step = load_train_state(state_path, model, optimizer, job, rank, world)
        if main_rank:
            drop_metrics_after(metrics_path, step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    from tqdm import tqdm
    bar = tqdm(total=settings.max_steps, initial=step, disable=not main_rank, dynamic_ncols=True, file=sys.stderr)
    start_time = time.time()
    model.train()
    outcome = "done"
    with stop_requests(device, world) as stop_requested:
        while step < settings.max_steps:
            if stop_requested():
                outcome = "stopped"
                break
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, records = accumulate_gradients(ddp, job, step, settings.grad_accum, device, world)
            if not math.isfinite(loss):
                print(f"error: loss is {loss} at step {step}; stopping. The last good checkpoint in {settings.out} "
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
                                           "lr": lr, "grad_norm": grad_norm,
                                           "elapsed_s": round(time.time() - start_time, 3)})
            if step % settings.eval_interval == 0 or step == settings.max_steps:
                job.evaluate(step)
            if step % settings.ckpt_interval == 0 and step < settings.max_steps:
                save_train_state(state_path, step, model, optimizer, job, settings, rank, world)
        bar.close()
        if outcome != "diverged":
            save_train_state(state_path, step, model, optimizer, job, settings, rank, world)
    if outcome == "stopped" and main_rank:
        print(f"stopped by a signal at step {step}; checkpoint saved in {settings.out} (continue with --resume)")
    return outcome
