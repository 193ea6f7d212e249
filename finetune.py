"""
Fine-tune a pretrained HyenaDNA to classify sequences; predict with the result; embed sequences.

    python finetune.py fit --checkpoint hyenadna-tiny-1k-seqlen --data human_nontata_promoters --out ft
    python finetune.py fit --checkpoint DIR --data train.csv --test test.csv --out ft     # NT's tasks (MCC)
    python finetune.py fit --checkpoint DIR --species human=hg38.fa.gz worm=ce11.fa.gz --seq_len 16384 --out ft
    python finetune.py fit --checkpoint DIR --data ... --soft_prompt 16 --out ft          # the model frozen
    python finetune.py predict --checkpoint ft --input seqs.fa [--out predictions.tsv]
    python finetune.py embed --checkpoint DIR --input seqs.fa --out embeddings.npy [--pool mean|last]

Two ways to classify, both from the paper:
- a head: the backbone's hidden states pooled over the sequence (`--pool mean`, padding excluded, or `last`,
  the last position, where the causal model has read everything), then one linear layer. The whole model
  trains, or only the head with `--freeze`;
- a soft prompt (`--soft_prompt K`): K learned vectors go before the sequence's token embeddings, and the class
  is read as the next token after the sequence from the language-model logits (class i -> one nucleotide
  token, `--class_tokens`). Only the K x d_model prompt trains: the pretrained model is left untouched.

Training batches are padded on the left, as the published tokenizer does; predictions are made in batches of
equal lengths, so that no padding enters them. The loop is train.py's: AdamW with a cosine
schedule after warm-up, gradient clipping, bf16 on CUDA, atomic checkpoints, exact --resume.
"""

import argparse
import csv
import glob
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tinyhyena as th
from data import DataError, Genome, open_maybe_gzipped, prepare, read_fasta, reverse_complement
from train import (adamw, batches, claim_out_dir, drop_metrics_after, log_metrics, lr_at, restore_rng_state,
                   rng_state)

CLASSIFIER_FILE = "classifier.json"  # marks a fine-tuned folder: the head and what it needs
HEAD_FILE = "head.pt"


# ---------------------------------------------------------------------------------------------------------
# The classifier.

class SequenceClassifier(nn.Module):
    """ids (B, L), padded on the left with [PAD] -> class logits (B, n_classes)."""

    def __init__(self, backbone, n_classes, pool="mean", soft_prompt=0, class_tokens=None, freeze=False):
        super().__init__()
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be mean or last, got {pool!r}")
        self.backbone, self.pool, self.n_classes = backbone, pool, n_classes
        self.frozen = freeze or soft_prompt > 0
        if soft_prompt:
            tokens = class_tokens or "ACGTN"[:n_classes]
            if len(tokens) != n_classes or not set(tokens) <= set(th.BASES) or len(set(tokens)) != n_classes:
                raise ValueError(f"soft prompting maps each of the {n_classes} classes to its own nucleotide token "
                                 f"(at most 5: ACGTN), got class tokens {tokens!r}")
            self.class_tokens = tokens
            self.register_buffer("class_ids", torch.tensor([th.BASE_IDS[t] for t in tokens]))
            self.prompt = nn.Parameter(torch.randn(soft_prompt, backbone.cfg.d_model) * 0.02)  # (K, d)
            self.head = None
        else:
            self.class_tokens, self.prompt = None, None
            self.head = nn.Linear(backbone.cfg.d_model, n_classes)
        if self.frozen:
            self.backbone.requires_grad_(False)

    @property
    def max_len(self):
        """The longest sequence the classifier takes (the prompt needs room within l_max)."""
        return self.backbone.cfg.l_max - (len(self.prompt) if self.prompt is not None else 0)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:  # a frozen backbone computes fixed features: no dropout
            self.backbone.eval()
        return self

    def forward(self, input_ids):
        real = input_ids != th.PAD_ID  # (B, L); left padding: the real bases are the last ones of a row
        if self.prompt is None:
            hidden = self.backbone.hidden_states(input_ids)  # (B, L, d)
            if self.pool == "last":
                pooled = hidden[:, -1]
            else:
                weights = real.to(hidden.dtype)
                pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
            return self.head(pooled)
        return self.prompted_logits(input_ids, real)

    def prompted_logits(self, input_ids, real):
        """The prompt goes between a row's padding and its bases, so no padding separates them: row i with n_i
        pads becomes [n_i pads, K prompt vectors, bases]. Then the next-token logits at the last position,
        restricted to the class tokens."""
        self.backbone.check_input_ids(input_ids)
        B, L = input_ids.shape
        K = len(self.prompt)
        emb = self.backbone.embedding
        padded = torch.cat([input_ids.new_full((B, K), th.PAD_ID), input_ids], 1)  # bases shifted right by K
        x = emb(padded)  # (B, K+L, d)
        slot = torch.arange(K + L, device=x.device) - (~real).sum(1, keepdim=True)  # (B, K+L): index in prompt
        in_prompt = (slot >= 0) & (slot < K)
        x = torch.where(in_prompt[..., None], self.prompt[slot.clamp(0, K - 1)].to(x.dtype), x)
        hidden = self.backbone.hidden_states_from_embeddings(x)[:, -1]  # (B, d)
        return F.linear(hidden, emb.weight[self.class_ids])  # (B, C): the LM head's rows of the class tokens

    def trained_state(self):
        """What fine-tuning changed besides the backbone: the head's or the prompt's weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") and k != "class_ids"}


def save_classifier(model, out, class_names, meta):
    """config.json + model.pt (the backbone: from_pretrained and embed read it), head.pt, classifier.json,
    each written atomically; classifier.json last, so the folder is a classifier only once complete."""
    th.save_pretrained(model.backbone, out)
    th.atomic_write(os.path.join(out, HEAD_FILE), lambda tmp: torch.save(
        {k: v.detach().cpu() for k, v in model.trained_state().items()}, tmp))
    info = {"class_names": class_names, "pool": model.pool, "class_tokens": model.class_tokens,
            "soft_prompt": 0 if model.prompt is None else len(model.prompt), **meta}
    th.write_text(os.path.join(out, CLASSIFIER_FILE), [json.dumps(info, indent=2)])


def read_classifier_info(path):
    info_path = os.path.join(path, CLASSIFIER_FILE)
    if not os.path.isfile(info_path):
        kind = "a language model" if os.path.isfile(os.path.join(path, "config.json")) else "no checkpoint"
        raise ValueError(f"{path}: not a fine-tuned classifier (no {CLASSIFIER_FILE}; it holds {kind}); "
                         "make one with `python finetune.py fit`")
    try:
        with open(info_path) as f:
            info = json.load(f)
        info["class_names"] = [str(c) for c in info["class_names"]]
        return info
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: malformed ({e})") from None


def load_classifier(path, device="cpu"):
    """The fine-tuned classifier in folder `path` (written by `finetune.py fit`), in eval mode: a module that
    maps ids (B, L), left-padded, to class logits (B, C). Its `class_names` attribute names the columns."""
    path = os.fspath(path)
    info = read_classifier_info(path)
    backbone = th.from_pretrained(path)
    model = SequenceClassifier(backbone, len(info["class_names"]), info["pool"], info["soft_prompt"],
                               info["class_tokens"])
    head_path = os.path.join(path, HEAD_FILE)
    state = th.load_torch_file(head_path)
    try:
        model.load_state_dict({**model.state_dict(), **state})
    except RuntimeError as e:
        raise ValueError(f"{head_path}: does not fit {CLASSIFIER_FILE} ({str(e).splitlines()[0]})") from None
    model.class_names = info["class_names"]
    model.truncate = info.get("truncate", "center")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Data: labelled sequences in the formats users have.

class Examples(torch.utils.data.Dataset):
    """Labelled sequences: (uint8 token ids, class index) pairs, reverse-complemented at random with rc_aug."""

    def __init__(self, seqs, labels, rc_aug=False):
        self.seqs, self.labels, self.rc_aug = seqs, labels, rc_aug

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        ids = self.seqs[i]
        if self.rc_aug and torch.rand(()) < 0.5:  # torch's RNG: seeded per loader, restored on --resume
            ids = reverse_complement(ids)
        return ids, self.labels[i]

    def subset(self, index):
        return Examples([self.seqs[i] for i in index], [self.labels[i] for i in index], self.rc_aug)


def pad_left(seqs):
    """list of 1-D id arrays -> (B, max length) int64, padded on the left with [PAD], as published."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), th.PAD_ID, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, -len(s):] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return ids


def collate(items):
    seqs, labels = zip(*items)
    return pad_left(seqs), torch.tensor(labels)


def cut(ids, max_len, side):
    """ids shortened to max_len: `left` drops bases at the left end, `right` at the right, `center` both."""
    extra = len(ids) - max_len
    if extra <= 0:
        return ids
    start = {"left": extra, "right": 0, "center": extra // 2}[side]
    return ids[start:start + max_len]


def class_names(labels):
    """The classes in order: integer labels numerically, then other labels alphabetically."""
    return sorted(set(labels), key=lambda x: (int(x), x) if x.lstrip("-").isdigit() else (math.inf, x))


def read_benchmark_split(root, split):
    """genomic-benchmarks layout: root/split/<class>/*.txt, one sequence per file -> [(sequence, class)]."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: folder not found (a genomic-benchmarks dataset has train/ and test/)")
    rows = []
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(f"{folder}: no class folders")
    for name in classes:
        files = sorted(glob.glob(os.path.join(folder, name, "*.txt")))
        if not files:
            raise DataError(f"{os.path.join(folder, name)}: empty class folder (no .txt sequence files)")
        for path in files:
            with open(path, "rb") as f:
                seq = b"".join(f.read().split())
            if not seq:
                raise DataError(f"{path}: holds no sequence")
            rows.append((seq, name))
    return rows


def read_table(path, need_label=True):
    """CSV (.csv) or TSV (other names) with a header holding `sequence` (and `label`; optional `split`, `name`)
    -> [dict]. DataError naming the file and line on bad input."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    delimiter = "," if path.lower().removesuffix(".gz").endswith(".csv") else "\t"
    with open_maybe_gzipped(path) as raw:
        text = raw.read().decode("utf-8", errors="replace").splitlines()
    reader = csv.DictReader(text, delimiter=delimiter)
    columns = reader.fieldnames or []
    need = ["sequence", "label"] if need_label else ["sequence"]
    missing = [c for c in need if c not in columns]
    if missing:
        raise DataError(f"{path}:1: header has no {' or '.join(repr(c) for c in missing)} column "
                        f"(found {', '.join(columns) or 'nothing'})")
    rows = []
    for lineno, row in enumerate(reader, 2):
        seq = (row.get("sequence") or "").strip()
        if not seq:
            raise DataError(f"{path}:{lineno}: empty sequence")
        if need_label and not (row.get("label") or "").strip():
            raise DataError(f"{path}:{lineno}: empty label")
        rows.append({**row, "sequence": seq, "line": lineno})
    if not rows:
        raise DataError(f"{path}: no sequences")
    return rows


def load_labelled(args):
    """{split: [(sequence bytes or ids, class name)]} with split in train / valid / test (valid and test
    may be missing), from --data DIR or --data TABLE [--test TABLE]."""
    if os.path.isdir(args.data):
        splits = {"train": read_benchmark_split(args.data, "train")}
        if os.path.isdir(os.path.join(args.data, "test")):
            splits["test"] = read_benchmark_split(args.data, "test")
        return splits, args.data
    rows = read_table(args.data)
    splits = {}
    for row in rows:
        split = (row.get("split") or "train").strip().lower()
        split = {"val": "valid", "validation": "valid", "dev": "valid"}.get(split, split)
        if split not in ("train", "valid", "test"):
            raise DataError(f"{args.data}:{row['line']}: split must be train, valid or test, got {split!r}")
        splits.setdefault(split, []).append((row["sequence"].encode(), row["label"].strip()))
    if args.test:
        splits["test"] = [(r["sequence"].encode(), r["label"].strip()) for r in read_table(args.test)]
    if "train" not in splits:
        raise DataError(f"{args.data}: no training rows (split column has no 'train')")
    return splits, args.data


def species_windows(args, max_len):
    """--species NAME=FASTA ...: {split: Examples of seq_len windows}, classes in the order given. Every record
    is cut by position: training windows from its first 90%, validation from the next 5%, test from the last
    5%, so no window of one split overlaps another's. Training windows start at random (seeded) positions, as
    many per species as the smallest species' training bases hold; validation and test windows tile their
    stretches, evenly spread, at most --eval_windows per species."""
    names, genomes = [], []
    for spec in args.species:
        if "=" not in spec:
            raise DataError(f"--species {spec!r}: expected NAME=FASTA")
        name, path = spec.split("=", 1)
        if not name or not path:
            raise DataError(f"--species {spec!r}: expected NAME=FASTA")
        if name in names:
            raise DataError(f"--species: {name!r} is given twice")
        names.append(name)
        genomes.append(Genome(prepare(path, quiet=True)))
    if len(names) < 2:
        raise DataError("--species needs at least two NAME=FASTA pairs (one class each)")
    L = args.seq_len
    if L is None or not 1 <= L <= max_len:
        raise DataError(f"--species needs --seq_len in [1, {max_len}] (the window length the model takes)")
    cuts = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}
    rng = np.random.default_rng(args.seed)
    stretches = {}  # (species, split) -> [(chrom, lo, hi)] that hold at least one window
    for s, g in enumerate(genomes):
        for split, (a, b) in cuts.items():
            spans = [(c, int(a * n), int(b * n)) for c, n in g.chroms.items()]
            stretches[s, split] = [(c, lo, hi) for c, lo, hi in spans if hi - lo >= L]
    n_train = min(sum(hi - lo for _, lo, hi in stretches[s, "train"]) // L for s in range(len(names)))
    out = {}
    for split in cuts:
        seqs, labels = [], []
        for s, g in enumerate(genomes):
            spans = stretches[s, split]
            if split == "train":
                room = np.array([hi - lo - L + 1 for _, lo, hi in spans], dtype=np.float64)
                for k in rng.choice(len(spans), n_train, p=room / room.sum()) if spans and n_train else []:
                    c, lo, hi = spans[k]
                    start = lo + int(rng.integers(hi - lo - L + 1))
                    seqs.append(g.fetch(c, start, start + L))
                    labels.append(s)
            else:
                tiles = [(c, lo + i * L) for c, lo, hi in spans for i in range((hi - lo) // L)]
                for k in np.linspace(0, len(tiles) - 1, min(len(tiles), args.eval_windows)).round().astype(int) if tiles else []:
                    c, start = tiles[k]
                    seqs.append(g.fetch(c, start, start + L))
                    labels.append(s)
        if seqs:
            out[split] = Examples(seqs, labels)
    if "train" not in out:
        raise DataError(f"--species: no record holds a training window of --seq_len {L} in its first 90%")
    return out, names


def prepare_splits(args, max_len):
    """{split: Examples}, class names. Sequences longer than max_len are cut (--truncate) and counted."""
    if args.species:
        splits, names = species_windows(args, max_len)
    else:
        raw, source = load_labelled(args)
        names = class_names([label for _, label in raw["train"]])
        index = {name: i for i, name in enumerate(names)}
        if len(names) < 2:
            raise DataError(f"{source}: training data has a single class ({names[0]!r}); a classifier needs two")
        splits, n_cut = {}, 0
        for split, rows in raw.items():
            unseen = sorted({label for _, label in rows} - set(index))
            if unseen:
                raise DataError(f"{args.test or source}: {split} label {unseen[0]!r} is unseen in training "
                                f"(classes: {', '.join(names)})")
            seqs = [th.BYTE_TO_ID[np.frombuffer(seq, dtype=np.uint8)] for seq, _ in rows]
            n_cut += sum(len(s) > max_len for s in seqs)
            splits[split] = Examples([cut(s, max_len, args.truncate) for s in seqs], [index[l] for _, l in rows])
        if n_cut:
            print(f"{n_cut} sequences longer than {max_len} were cut (--truncate {args.truncate})", file=sys.stderr)
    if "valid" not in splits:  # hold out a seeded fraction of train
        train = splits["train"]
        order = np.random.default_rng(args.seed).permutation(len(train))
        n_val = max(1, int(round(args.val_fraction * len(train))))
        if len(train) - n_val < 1:
            raise DataError(f"{len(train)} training examples are too few to hold out a validation set")
        splits["valid"], splits["train"] = train.subset(order[:n_val]), train.subset(np.sort(order[n_val:]))
    splits["train"].rc_aug = args.rc_aug
    return splits, names


# ---------------------------------------------------------------------------------------------------------
# Metrics

def classification_metrics(labels, predictions, n_classes):
    """accuracy, Matthews correlation (multi-class, Gorodkin's form) and macro F1."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    confusion = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    total, correct = confusion.sum(), np.trace(confusion)
    true, predicted = confusion.sum(1), confusion.sum(0)
    denominator = math.sqrt((total ** 2 - (predicted ** 2).sum()) * (total ** 2 - (true ** 2).sum()))
    mcc = (correct * total - (predicted * true).sum()) / denominator if denominator else 0.0
    tp = np.diag(confusion)
    f1 = np.divide(2 * tp, true + predicted, out=np.zeros(n_classes), where=(true + predicted) > 0)
    return {"accuracy": float(correct / max(total, 1)), "mcc": float(mcc), "f1_macro": float(f1.mean())}


@torch.no_grad()
def predict_logits(model, seqs, batch_size, device):
    """(N, C) float32 logits in input order. Padding is an input like any other (it sits before the sequence
    of a causal model), so a batch here holds sequences of one length only: each prediction is the one the
    sequence gets alone, whatever else is being predicted."""
    was_training = model.training
    model.eval()
    by_length = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    batches_ = [rows[i:i + batch_size] for rows in by_length.values() for i in range(0, len(rows), batch_size)]
    out = torch.zeros(len(seqs), model.n_classes)
    for rows in batches_:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out[rows] = model(pad_left([seqs[r] for r in rows]).to(device)).float().cpu()
    model.train(was_training)
    return out


def evaluate(model, examples, batch_size, device):
    logits = predict_logits(model, examples.seqs, batch_size, device)
    labels = torch.tensor(examples.labels)
    loss = F.cross_entropy(logits, labels).item()
    return {"loss": loss, **classification_metrics(labels.numpy(), logits.argmax(1).numpy(), model.n_classes)}


# ---------------------------------------------------------------------------------------------------------
# fit

RUN_FILES = ("metrics.jsonl", "train_state.pt", "model.pt", "config.json", HEAD_FILE, CLASSIFIER_FILE)


def build_backbone(args):
    if args.checkpoint:
        return th.from_pretrained(args.checkpoint)
    if args.seq_len is None:
        raise ValueError("--preset needs --seq_len (it sets the model's l_max)")
    torch.manual_seed(args.seed)
    return th.HyenaDNA(th.preset_config(args.preset, l_max=args.seq_len + args.soft_prompt + 2))


def fit(args):
    from tqdm import tqdm
    device = th.pick_device(args.device)
    claim_out_dir(args.out, args.resume, args.overwrite, RUN_FILES)  # before anything is written
    backbone = build_backbone(args)  # first: its l_max bounds the sequences
    max_len = backbone.cfg.l_max - args.soft_prompt
    if max_len < 1:
        raise ValueError(f"--soft_prompt {args.soft_prompt} leaves no room for a sequence within l_max {backbone.cfg.l_max}")
    max_len = min(max_len, args.seq_len or max_len)
    splits, names = prepare_splits(args, max_len)
    torch.manual_seed(args.seed)
    model = SequenceClassifier(backbone, len(names), args.pool, args.soft_prompt, args.class_tokens,
                               args.freeze).to(device)
    train_set = splits["train"]
    micro_per_step = args.grad_accum
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * micro_per_step))
    if len(train_set) < args.batch_size:
        what = "windows" if args.species else "training sequences"
        raise DataError(f"{len(train_set)} {what} are fewer than one batch (--batch_size {args.batch_size})")
    args.max_steps = args.max_steps or args.epochs * steps_per_epoch
    args.warmup_steps = max(1, args.max_steps // 100) if args.warmup_steps is None else args.warmup_steps
    eval_interval = args.eval_interval or steps_per_epoch
    optimizer = adamw(model, args)
    os.makedirs(args.out, exist_ok=True)
    metrics_path, state_path = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "train_state.pt")
    meta = {"truncate": args.truncate, "max_len": max_len, "trained_on": args.species or args.data}
    step, best = 0, -math.inf
    if args.resume:
        if not os.path.isfile(state_path):
            raise DataError(f"{state_path}: nothing to resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best_mcc"]
        restore_rng_state(state)
        drop_metrics_after(metrics_path, step)

    def save_state():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best_mcc": best,
                 "args": {k: v for k, v in vars(args).items() if k != "func"}, **rng_state()}
        th.atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{len(names)} classes ({', '.join(names)}); train {len(train_set)}, valid {len(splits['valid'])}, "
          f"test {len(splits['test']) if 'test' in splits else 0}; {trainable:,} trainable parameters; "
          f"{args.max_steps} steps", file=sys.stderr)
    data = batches(train_set, args.batch_size, args.seed, 0, 1, step * micro_per_step, args.workers, collate)
    bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True, file=sys.stderr)
    start_time = time.time()
    model.train()
    while step < args.max_steps and stop["signal"] is None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss_sum, labels, predictions = 0.0, [], []
        for _ in range(micro_per_step):
            x, y = next(data)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x).float()
            loss = F.cross_entropy(logits, y)
            (loss / micro_per_step).backward()
            loss_sum += loss.item() / micro_per_step
            labels += y.tolist()
            predictions += logits.argmax(1).tolist()
        if not math.isfinite(loss_sum):
            print(f"error: loss is {loss_sum} at step {step}; stopping (try a lower --lr)", file=sys.stderr)
            return 1
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
        log_metrics(metrics_path, {"step": step, "split": "train", "loss": loss_sum,
                                   **classification_metrics(labels, predictions, len(names)),
                                   "lr": lr_at(step - 1, args), "elapsed_s": round(time.time() - start_time, 3)})
        if step % eval_interval == 0 or step == args.max_steps:
            val = evaluate(model, splits["valid"], args.eval_batch_size, device)
            log_metrics(metrics_path, {"step": step, "split": "valid", **val,
                                       "elapsed_s": round(time.time() - start_time, 3)})
            if val["mcc"] > best:  # the model folder holds the best model by validation MCC
                best = val["mcc"]
                save_classifier(model, args.out, names, {**meta, "step": step, "valid_mcc": best})
            save_state()
    bar.close()
    if stop["signal"] is not None:
        save_state()
        print(f"stopped by signal {stop['signal']} at step {step}; state saved in {args.out} "
              "(continue with --resume)")
        return 0
    if "test" not in splits:
        print(f"best validation MCC {best:.4f}; no test set given (--test FILE or a split column), so no test row")
        return 0
    best_model = load_classifier(args.out, device)
    test = evaluate(best_model, splits["test"], args.eval_batch_size, device)
    log_metrics(metrics_path, {"step": step, "split": "test", **test, "elapsed_s": round(time.time() - start_time, 3)})
    print(f"test (best validation checkpoint): accuracy {test['accuracy']:.4f}, MCC {test['mcc']:.4f}, "
          f"F1 {test['f1_macro']:.4f}; model in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# predict and embed

def read_sequences(path):
    """[(id, uint8 ids)] from FASTA, CSV/TSV with a `sequence` column (ids from `name` or `id`, else the row),
    or plain text with one sequence a line (ids are line numbers)."""
    with open_maybe_gzipped(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b">"):
        return read_fasta(path)
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
    if "sequence" in first.replace(",", "\t").split("\t"):
        rows = read_table(path, need_label=False)
        key = next((k for k in ("name", "id") if k in rows[0]), None)
        return [(row[key] if key else str(row["line"] - 1), th.tokenize(row["sequence"])) for row in rows]
    out = []
    with open_maybe_gzipped(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append((str(lineno), th.BYTE_TO_ID[np.frombuffer(line.strip(), dtype=np.uint8)]))
    if not out:
        raise DataError(f"{path}: no sequences")
    return out


def predict(args):
    device = th.pick_device(args.device)
    model = load_classifier(args.checkpoint, device)
    records = read_sequences(args.input)
    seqs = [cut(ids, model.max_len, model.truncate) for _, ids in records]
    n_cut = sum(len(ids) > model.max_len for _, ids in records)
    if n_cut:
        print(f"{n_cut} sequences longer than {model.max_len} were cut ({model.truncate})", file=sys.stderr)
    if any(len(s) == 0 for s in seqs):
        raise DataError(f"{args.input}: record {records[[len(s) for s in seqs].index(0)][0]!r} is empty")
    probs = torch.softmax(predict_logits(model, seqs, args.batch_size, device), -1).numpy()
    lines = ["\t".join(["id", "predicted"] + [f"p_{c}" for c in model.class_names]) + "\n"]
    for (name, _), p in zip(records, probs):
        lines.append("\t".join([name, model.class_names[int(p.argmax())]] + [f"{x:.6f}" for x in p]) + "\n")
    th.write_text(args.out, lines)
    return 0


def embed(args):
    from tqdm import tqdm
    device = th.pick_device(args.device)
    model = th.from_pretrained(args.checkpoint, device)
    records = read_sequences(args.input)
    limit = model.cfg.l_max
    n_cut = sum(len(ids) > limit for _, ids in records)
    if n_cut:
        print(f"{n_cut} sequences longer than l_max {limit} were cut (--truncate {args.truncate})", file=sys.stderr)
    seqs = [cut(ids, limit, args.truncate) for _, ids in records]
    if any(len(s) == 0 for s in seqs):
        raise DataError(f"{args.input}: record {records[[len(s) for s in seqs].index(0)][0]!r} is empty")
    out = np.zeros((len(seqs), model.cfg.d_model), dtype=np.float32)
    chunk = 16 * args.batch_size  # th.embed sorts each chunk by length; the bar moves chunk by chunk
    with tqdm(total=len(seqs), unit="seq", file=sys.stderr, disable=args.quiet) as bar:
        for i in range(0, len(seqs), chunk):
            out[i:i + chunk] = th.embed(model, seqs[i:i + chunk], args.pool, args.batch_size)
            bar.update(len(seqs[i:i + chunk]))
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
            np.save(f, out)
    th.atomic_write(args.out, save)
    print(f"wrote {args.out}: {out.shape[0]} x {out.shape[1]} float32 ({args.pool} pooling)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune HyenaDNA to classify sequences; predict; embed.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fine-tune a classifier")
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="genomic-benchmarks folder (train/<class>/*.txt, test/...) or CSV/TSV "
                                       "with sequence and label columns (optional split column)")
    source.add_argument("--species", nargs="+", metavar="NAME=FASTA", help="species classification: windows of "
                                                                           "--seq_len from each FASTA")
    f.add_argument("--test", help="CSV/TSV test set for --data FILE")
    model = f.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="pretrained folder: published HyenaDNA or one of ours")
    model.add_argument("--preset", help="train from scratch at a published size (with --seq_len)")
    f.add_argument("--seq_len", type=int, help="longest sequence / species window (default: the model's l_max)")
    f.add_argument("--pool", default="mean", choices=["mean", "last"])
    f.add_argument("--freeze", action="store_true", help="train the head only")
    f.add_argument("--soft_prompt", type=int, default=0, metavar="K", help="train K prompt vectors only")
    f.add_argument("--class_tokens", help="soft prompting: one nucleotide per class (default ACGTN in order)")
    f.add_argument("--truncate", default="center", choices=["left", "right", "center"],
                   help="where to cut sequences longer than the model takes")
    f.add_argument("--val_fraction", type=float, default=0.1)
    f.add_argument("--eval_windows", type=int, default=256, help="species: validation/test windows per species")
    f.add_argument("--batch_size", type=int, default=32)
    f.add_argument("--eval_batch_size", type=int, default=64)
    f.add_argument("--grad_accum", type=int, default=1)
    f.add_argument("--epochs", type=int, default=10)
    f.add_argument("--max_steps", type=int, help="optimizer steps (default: --epochs over the training set)")
    f.add_argument("--eval_interval", type=int, help="steps between validations (default: one epoch)")
    f.add_argument("--lr", type=float, default=6e-4)
    f.add_argument("--weight_decay", type=float, default=0.1)
    f.add_argument("--warmup_steps", type=int, help="default: 1%% of the steps")
    f.add_argument("--rc_aug", action="store_true", help="reverse-complement augmentation")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--workers", type=int, default=0)
    f.add_argument("--out", default="finetuned")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    for name, help_text in (("predict", "classify sequences with a fine-tuned folder"),
                            ("embed", "one vector per sequence from any checkpoint")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--checkpoint", required=True)
        q.add_argument("--input", required=True, help="FASTA, CSV/TSV with a sequence column, or one sequence a line")
        q.add_argument("--out", required=name == "embed", help="output file" + (" (.npy)" if name == "embed" else
                                                                                " (TSV; default: standard output)"))
        q.add_argument("--batch_size", type=int, default=32)
        q.add_argument("--device", default="auto")
        if name == "embed":
            q.add_argument("--pool", default="mean", choices=["mean", "last"])
            q.add_argument("--truncate", default="center", choices=["left", "right", "center"])
            q.add_argument("--quiet", action="store_true")
    f.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    positive = ["batch_size"] + (["eval_batch_size", "grad_accum", "epochs", "eval_windows"] if args.command == "fit" else [])
    for name in positive + [n for n in ("seq_len", "max_steps", "eval_interval") if getattr(args, n, None) is not None]:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.command == "fit":
        if args.resume and args.overwrite:
            p.error("--resume and --overwrite exclude each other: continue the run in --out, or start over")
        if not args.checkpoint and not args.preset:
            p.error("give --checkpoint DIR (a pretrained model) or --preset NAME --seq_len N (from scratch)")
        if args.soft_prompt and args.freeze:
            p.error("--soft_prompt already freezes the model; --freeze is for the head")
        if args.soft_prompt < 0 or not 0 < args.val_fraction < 1 or args.lr <= 0:
            p.error("--soft_prompt must be >= 0, --val_fraction in (0, 1), --lr positive")
        if args.test and (args.species or os.path.isdir(args.data)):
            p.error("--test goes with --data FILE (a folder has its own test/, species their held-out 5%)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return {"fit": fit, "predict": predict, "embed": embed}[args.command](args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
