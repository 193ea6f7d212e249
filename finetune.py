"""
Fine-tune a pretrained HyenaDNA to classify sequences (or predict numbers, or many yes/no targets); predict
with the result; embed sequences.

    python finetune.py fit --checkpoint hyenadna-tiny-1k-seqlen --data human_nontata_promoters --out ft
    python finetune.py fit --checkpoint DIR --data train.csv --test test.csv --out ft     # NT's tasks (MCC)
    python finetune.py fit --checkpoint DIR --data train.fna --test test.fna --out ft     # NT's own files
    python finetune.py fit --checkpoint DIR --species human=hg38.fa.gz worm=ce11.fa.gz --seq_len 16384 --out ft
    python finetune.py fit --checkpoint DIR --data ... --soft_prompt 16 --out ft          # the model frozen
    python finetune.py fit --checkpoint DIR --data expr.csv --task regression --label_columns expression
    python finetune.py fit --checkpoint DIR --data chromatin.csv --task multilabel --label_columns 'dnase_*'
    python finetune.py predict --checkpoint ft --input seqs.fa [--out predictions.tsv]
    python finetune.py embed --checkpoint DIR --input seqs.fa --out embeddings.npy [--pool mean|last]
    torchrun --nproc_per_node 2 finetune.py embed ... --context_parallel 2   # each sequence over 2 processes
    python finetune.py predict --checkpoint ft --fasta hg38.fa --bed promoters.bed     # regions of a genome
    python finetune.py fit --checkpoint DIR --task per_base --fasta hg38.fa --labels peaks.bed --seq_len 1024
    python finetune.py predict --checkpoint ft --fasta hg38.fa --bed regions.bed --rc average --out pred  # bedGraphs

Two ways to classify, both from the paper:
- a head: the backbone's hidden states pooled over the sequence (`--pool mean`, padding excluded, or `last`,
  the last position, where the causal model has read everything), then one linear layer. The whole model
  trains, or only the head with `--freeze`;
- a soft prompt (`--soft_prompt K`): K learned vectors go before the sequence's token embeddings, and the class
  is read as the next token after the sequence from the language-model logits (class i -> one nucleotide
  token, `--class_tokens`). Only the K x d_model prompt trains: the pretrained model is left untouched.

Three tasks, the problem types of the published Hugging Face port: `classify` (one class per sequence, cross
entropy; accuracy, MCC, F1), `regression` (one or more numbers per sequence, mean squared error on targets
standardized by the training set's mean and spread; Pearson and Spearman r) and `multilabel` (many binary
targets per sequence, as in the DeepSEA-style chromatin-profile experiment, binary cross entropy; mean AUROC).
The targets of the last two are CSV/TSV columns (`--label_columns a,b,c`, or `prefix*` for every column whose
name starts with prefix). And per base (`--task per_base`): the head on every position's hidden state, for
a class (from a BED) or a value (from a bedGraph) at each base of a genome, the loss over labelled bases only.

Training batches are padded on the left, as the published tokenizer does; predictions are made in batches of
equal lengths, so that no padding enters them. The loop is trainer.py's: AdamW with a cosine
schedule after warm-up, gradient clipping, bf16 on CUDA, atomic checkpoints, exact --resume.
"""

import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch

import base
import checkpoints
import cli
import fast
import parallel
import tinyhyena as th
from classifier import (CLASSIFIER_FILE, HEAD_FILE, PER_BASE, SequenceClassifier, load_classifier, predict_logits,
                        predict_outputs, read_classifier_info, save_classifier, strands)
from data import DataError, Genome, bed_intervals, load_genome, read_inputs, reverse_complement
from parallel import barrier, run_distributed
from tasks import (SELECTION_METRIC, Examples, class_names, collate, cut, is_bedgraph, per_base_labels, read_benchmark_split,
                   read_sequences, read_table, targets_of, task_metrics)
from trainer import Job, Settings, batches, claim_out_dir, log_metrics, prepare_once, train_loop

# ---------------------------------------------------------------------------------------------------------
# Training settings: ours, and the published ones. A flag given on the command line overrides either.

# --recipe paper: the published fine-tuning of HazyResearch/hyena-dna (commit d553021), the same for the
# GenomicBenchmarks and the Nucleotide Transformer tasks: configs/experiment/hg38/genomic_benchmark.yaml and
# nucleotide_transformer.yaml (optimizer lr 6e-4 and weight_decay 0.1, dataset batch_size 128, trainer
# max_epochs 100, model embed_dropout 0.1), configs/optimizer/adamw.yaml (betas 0.9, 0.999). What both
# recipes share is trainer.py's for every run: cosine decay to 10% of the peak after a 1% warm-up
# (scheduler cosine_warmup_timm), no weight decay on the Hyena filters (layer wd 0), biases and norms
# (src/utils/optim_groups.py), gradient clipping at 1.0 and mixed precision on GPU (bf16 here, fp16 there).
RECIPES = {
    "default": {"lr": 6e-4, "weight_decay": 0.1, "batch_size": 32, "epochs": 10, "dropout": None, "betas": (0.9, 0.95)},
    "paper": {"lr": 6e-4, "weight_decay": 0.1, "batch_size": 128, "epochs": 100, "dropout": 0.1, "betas": (0.9, 0.999)},
}


# ---------------------------------------------------------------------------------------------------------
# Data: labelled sequences in the formats users have.

def load_labelled(args):
    """{split: [(sequence bytes, label)]} with split in train / valid / test (valid and test may be missing),
    from --data DIR or --data TABLE [--test TABLE], and the label columns. A label is a class name (task
    classify) or a float32 vector of the label columns."""
    if os.path.isdir(args.data):
        splits = {"train": read_benchmark_split(args.data, "train")}
        if os.path.isdir(os.path.join(args.data, "test")):
            splits["test"] = read_benchmark_split(args.data, "test")
        return splits, ["label"]

    def labelled(path, rows, columns):
        if args.task == "classify":
            return [(r["sequence"].encode(), r[columns[0]].strip()) for r in rows]
        return [(r["sequence"].encode(), targets_of(r, columns, args.task, path)) for r in rows]
    rows, columns = read_table(args.data, label_columns=args.label_columns)
    if args.task == "classify" and len(columns) != 1:
        raise DataError(f"--label_columns: classification reads one label column, {args.data} gives {len(columns)}")
    splits = {}
    for row, example in zip(rows, labelled(args.data, rows, columns)):
        split = (row.get("split") or "train").strip().lower()
        split = {"val": "valid", "validation": "valid", "dev": "valid"}.get(split, split)
        if split not in ("train", "valid", "test"):
            raise DataError(f"{args.data}:{row['line']}: split must be train, valid or test, got {split!r}")
        splits.setdefault(split, []).append(example)
    if args.test:
        test_rows, test_columns = read_table(args.test, label_columns=args.label_columns)
        if test_columns != columns:
            raise DataError(f"{args.test}: label columns {', '.join(test_columns)} differ from {args.data}'s "
                            f"({', '.join(columns)})")
        splits["test"] = labelled(args.test, test_rows, columns)
    if "train" not in splits:
        raise DataError(f"{args.data}: no training rows (split column has no 'train')")
    return splits, columns


CUTS = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}  # each record's stretch of each split


def evenly(items, n):
    """At most n of items, evenly spread (the first and the last among them)."""
    return [items[k] for k in np.linspace(0, len(items) - 1, min(len(items), n)).round().astype(int)] if items else []


def per_base_windows(args, max_len):
    """--fasta GENOME --labels BED|bedGraph (task per_base or per_base_values): {split: Examples of --seq_len
    windows with a label per base}, the class names. Each chromosome is tiled by windows and cut by position
    as --species does (training windows from its first 90%, validation from the next 5%, test from the last
    5%, at most --eval_windows of each, evenly spread); a window without a labelled base is left out."""
    genome = Genome(prepare_once(args.fasta, quiet=True))
    labels_of, names = per_base_labels(args.labels, genome)
    L = args.seq_len
    if L is None or not 1 <= L <= max_len:
        raise DataError(f"--task per_base needs --seq_len in [1, {max_len}] (the window length the model takes)")
    windows = {split: [] for split in CUTS}
    for chrom, n in genome.chroms.items():
        labels = labels_of(chrom)
        for split, (a, b) in CUTS.items():
            for start in range(int(a * n), int(b * n) - L + 1, L):
                y = labels[start:start + L]
                if args.task == "per_base" or np.isfinite(y).any():
                    windows[split].append((genome.fetch(chrom, start, start + L), y.copy()))
    if not windows["train"]:
        raise DataError(f"{args.labels}: no labelled window of --seq_len {L} in the first 90% of any chromosome "
                        f"of {args.fasta}")
    out = {split: Examples(*map(list, zip(*(w if split == "train" else evenly(w, args.eval_windows)))))
           for split, w in windows.items() if w}
    return out, names


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
        genomes.append(Genome(prepare_once(path, quiet=True)))
    if len(names) < 2:
        raise DataError("--species needs at least two NAME=FASTA pairs (one class each)")
    L = args.seq_len
    if L is None or not 1 <= L <= max_len:
        raise DataError(f"--species needs --seq_len in [1, {max_len}] (the window length the model takes)")
    rng = np.random.default_rng(args.seed)
    stretches = {}  # (species, split) -> [(chrom, lo, hi)] that hold at least one window
    for s, g in enumerate(genomes):
        for split, (a, b) in CUTS.items():
            spans = [(c, int(a * n), int(b * n)) for c, n in g.chroms.items()]
            stretches[s, split] = [(c, lo, hi) for c, lo, hi in spans if hi - lo >= L]
    n_train = min(sum(hi - lo for _, lo, hi in stretches[s, "train"]) // L for s in range(len(names)))
    out = {}
    for split in CUTS:
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
                for c, start in evenly(tiles, args.eval_windows):
                    seqs.append(g.fetch(c, start, start + L))
                    labels.append(s)
        if seqs:
            out[split] = Examples(seqs, labels)
    if "train" not in out:
        raise DataError(f"--species: no record holds a training window of --seq_len {L} in its first 90%")
    return out, names


def prepare_splits(args, max_len):
    """{split: Examples}, class names. Sequences longer than max_len are cut (--truncate) and counted."""
    if args.labels:
        splits, names = per_base_windows(args, max_len)
    elif args.species:
        splits, names = species_windows(args, max_len)
    else:
        raw, columns = load_labelled(args)
        source = args.data
        if args.task == "classify":
            names = class_names([label for _, label in raw["train"]])
            index = {name: i for i, name in enumerate(names)}
            if len(names) < 2:
                raise DataError(f"{source}: training data has a single class ({names[0]!r}); a classifier needs two")
        else:
            names = columns
        splits, n_cut = {}, 0
        for split, rows in raw.items():
            if args.task == "classify":
                unseen = sorted({label for _, label in rows} - set(index))
                if unseen:
                    raise DataError(f"{args.test or source}: {split} label {unseen[0]!r} is unseen in training "
                                    f"(classes: {', '.join(names)})")
            seqs = [th.BYTE_TO_ID[np.frombuffer(seq, dtype=np.uint8)] for seq, _ in rows]
            n_cut += sum(len(s) > max_len for s in seqs)
            labels = [index[l] for _, l in rows] if args.task == "classify" else [l for _, l in rows]
            splits[split] = Examples([cut(s, max_len, args.truncate) for s in seqs], labels)
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


def evaluate(model, examples, batch_size, device):
    outputs = predict_logits(model, examples.seqs, batch_size, device)
    outputs = torch.stack(outputs) if model.task in PER_BASE else outputs  # (N, L, n): windows of one length
    targets = torch.as_tensor(np.asarray(examples.labels))
    with torch.no_grad():
        loss = model.loss(outputs.to(device), targets.to(device)).item()
    return {"loss": loss, **task_metrics(model.task, targets.numpy(), outputs.numpy())}


# ---------------------------------------------------------------------------------------------------------
# fit

RUN_FILES = ("metrics.jsonl", "train_state.pt", "model.pt", "config.json", HEAD_FILE, CLASSIFIER_FILE,
             "model.safetensors", *checkpoints.HF_TOKENIZER_FILES)


def build_backbone(args):
    if args.checkpoint:
        return th.from_pretrained(args.checkpoint)
    if args.seq_len is None:
        raise th.UserError("--preset needs --seq_len (it sets the model's l_max)")
    torch.manual_seed(args.seed)
    return th.HyenaDNA(th.preset_config(args.preset, l_max=args.seq_len + args.soft_prompt + 2))


class FineTuning(Job):
    """Fine-tuning as trainer.py's loop runs it: this process's batches of labelled sequences, the task's loss,
    and the validation that keeps the best model in the run folder."""

    def __init__(self, model, args, splits, names, meta, device, rank, world):
        self.model, self.args, self.splits, self.names, self.meta = model, args, splits, names, meta
        self.device, self.rank, self.world = device, rank, world
        self.metric = SELECTION_METRIC[args.task]
        self.best = -math.inf  # the best validation score so far, by self.metric
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        self.start = time.time()
        self.stream = None

    def next_batch(self, step):
        if self.stream is None:  # the position in the data follows from the step (resume)
            self.stream = batches(self.splits["train"], self.args.batch_size, self.args.seed, self.rank, self.world,
                                  step * self.args.grad_accum, self.args.workers, collate)
        return next(self.stream)

    def loss(self, model, x, y):
        out = model(x).float()
        return self.model.loss(out, y), (y.cpu(), out.detach().cpu())

    def train_row(self, step, records):  # a batch is too small a sample for r or the AUROC: classification only
        if self.args.task not in ("classify", "per_base"):
            return {}
        labels, outputs = zip(*records)
        return task_metrics(self.args.task, torch.cat(labels).numpy(), torch.cat(outputs).numpy())

    def log(self, step, split, scores):
        if self.rank == 0:
            log_metrics(self.metrics_path, {"step": step, "split": split, **scores,
                                            "elapsed_s": round(time.time() - self.start, 3)})

    def evaluate(self, step):  # every process evaluates (the same model, the same data); the main rank writes
        val = evaluate(self.model, self.splits["valid"], self.args.eval_batch_size, self.device)
        score = val[self.metric] if math.isfinite(val[self.metric]) else -math.inf  # NaN: no target could be scored
        improved = score > self.best or self.best == -math.inf
        if improved:
            self.best = score
        self.log(step, "valid", val)
        if improved and self.rank == 0:  # the model folder holds the best model on validation
            save_classifier(self.model, self.args.out, self.names,
                            {**self.meta, "step": step, f"valid_{self.metric}": val[self.metric]}, self.args.layout)
        barrier()

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def fit(args):
    return run_distributed(fit_on, args, cli.pick_device(args.device))


def fit_on(args, rank, world, device):
    """Fine-tune in this process (one of `world`, under torchrun) with trainer.py's loop: this command brings its
    batches, the task's loss, the validation that keeps the best model, and the final test row."""
    main_rank = rank == 0
    claim_out_dir(args.out, args.resume, args.overwrite, RUN_FILES, delete=main_rank)  # before anything is written
    with base.output_folder(args.out):  # up front; removed again if the run fails before writing into it
        written = "hf" if os.path.isfile(os.path.join(args.out, "model.safetensors")) else \
            "tinyhyena" if os.path.isfile(os.path.join(args.out, CLASSIFIER_FILE)) else None
        if args.resume and written not in (None, args.layout):  # one folder, one layout: no stale weights beside
            raise th.UserError(f"{args.out} holds a run written with --layout {written}; resume it with --layout {written}")
        backbone = build_backbone(args)  # first: its l_max bounds the sequences
        if args.dropout is not None:  # the embedding dropout of this run, written into the config it saves
            if args.dropout >= 1:
                raise th.UserError(f"--dropout must be below 1, got {args.dropout}")
            backbone.cfg = dataclasses.replace(backbone.cfg, embed_dropout=args.dropout)
            backbone.dropout.p = args.dropout
        hub = args.layout == "hf"  # the hub's classifier: the last token's state after an appended [SEP], no bias
        max_len = backbone.cfg.l_max - args.soft_prompt - hub
        if max_len < 1:
            raise th.UserError(f"--soft_prompt {args.soft_prompt} leaves no room for a sequence within l_max {backbone.cfg.l_max}")
        max_len = min(max_len, args.seq_len or max_len)
        splits, names = prepare_splits(args, max_len)
        torch.manual_seed(args.seed)  # the same head in every process
        model = SequenceClassifier(backbone, len(names), args.pool, args.soft_prompt, args.class_tokens,
                                   args.freeze, args.task, end_token=th.SPECIAL_TOKENS["[SEP]"] if hub else None).to(device)
        if hub:
            torch.nn.init.zeros_(model.head.bias)
            model.head.bias.requires_grad_(False)
        torch.manual_seed(args.seed * 1000 + rank)  # each process its own dropout draws
        train_set = splits["train"]
        if args.task == "regression" and not hub:  # (the hub's head has no scale: it learns the raw targets)
            targets = torch.as_tensor(np.asarray(train_set.labels))
            model.target_mean.copy_(targets.mean(0))
            model.target_std.copy_(targets.std(0).clamp(min=1e-6) if len(targets) > 1 else torch.ones(len(names)))
        if args.task == "per_base_values":  # the labelled bases' mean and spread
            values = torch.as_tensor(np.concatenate(train_set.labels))
            values = values[values.isfinite()]
            model.target_mean.fill_(values.mean())
            model.target_std.fill_(values.std().clamp(min=1e-6) if len(values) > 1 else 1.0)
        steps_per_epoch = max(1, len(train_set) // (args.batch_size * args.grad_accum * world))
        if len(train_set) < args.batch_size * world:
            what = "windows" if args.species or args.labels else "training sequences"
            raise DataError(f"{len(train_set)} {what} are fewer than one batch (--batch_size {args.batch_size}"
                            f"{f' in each of {world} processes' if world > 1 else ''})")
        max_steps = args.max_steps or args.epochs * steps_per_epoch
        eval_interval = args.eval_interval or steps_per_epoch
        warmup_steps = max(1, max_steps // 100) if args.warmup_steps is None else args.warmup_steps
        settings = Settings.from_args(args, max_steps=max_steps, warmup_steps=warmup_steps, eval_interval=eval_interval,
                                      ckpt_interval=eval_interval)  # the state is saved with each validation
        meta = {"truncate": args.truncate, "max_len": max_len, "trained_on": args.species or args.data or args.labels}
        if main_rank:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            what = "classes" if args.task in ("classify", "per_base") else f"{args.task} targets"
            print(f"{len(names)} {what} ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); train {len(train_set)}, "
                  f"valid {len(splits['valid'])}, test {len(splits['test']) if 'test' in splits else 0}; {trainable:,} "
                  f"trainable parameters; {max_steps} steps", file=sys.stderr)
        job = FineTuning(model, args, splits, names, meta, device, rank, world)
        outcome = train_loop(job, settings, device, rank, world)
        if outcome != "done":
            return 1 if outcome == "diverged" else 0
        if "test" not in splits:
            if main_rank:
                print(f"best validation {job.metric} {job.best:.4f}; no test set given (--test FILE or a split column), "
                      "so no test row")
            return 0
        if main_rank:
            best_model = load_classifier(args.out, device)
            test = evaluate(best_model, splits["test"], args.eval_batch_size, device)
            job.log(max_steps, "test", test)
            shown = {"classify": ("accuracy", "mcc", "f1_macro"), "regression": ("pearson", "spearman", "mse"),
                     "multilabel": ("auroc",), "per_base": ("accuracy", "mcc", "f1_macro"),
                     "per_base_values": ("pearson", "spearman", "mse")}[args.task]
            print(f"test (best validation checkpoint): {', '.join(f'{k} {test[k]:.4f}' for k in shown)}; model in {args.out}")
        return 0


# ---------------------------------------------------------------------------------------------------------
# predict and embed

def predict(args):
    device = cli.pick_device(args.device)
    if os.path.isfile(os.path.join(args.checkpoint, CLASSIFIER_FILE)) and \
            read_classifier_info(args.checkpoint)["task"] in PER_BASE:
        return predict_per_base(args, device)
    records = read_inputs(args, read_sequences)  # first: a bad file is refused before the model is loaded
    model = load_classifier(args.checkpoint, device)
    seqs = [cut(ids, model.max_len, model.truncate) for _, ids in records]
    n_cut = sum(len(ids) > model.max_len for _, ids in records)
    if n_cut:
        print(f"{n_cut} sequences longer than {model.max_len} were cut ({model.truncate})", file=sys.stderr)
    if any(len(s) == 0 for s in seqs):
        raise DataError(f"{args.input or args.bed}: record {records[[len(s) for s in seqs].index(0)][0]!r} is empty")
    values = predict_outputs(model, seqs, args.batch_size, args.rc).numpy()  # probabilities or values
    if model.task == "classify":  # the most probable class, then each class's probability
        lines = ["\t".join(["id", "predicted"] + [f"p_{c}" for c in model.class_names]) + "\n"]
        for (name, _), p in zip(records, values):
            lines.append("\t".join([name, model.class_names[int(p.argmax())]] + [f"{x:.6f}" for x in p]) + "\n")
    else:  # regression: each target's value; multilabel: each target's probability
        prefix = "" if model.task == "regression" else "p_"
        lines = ["\t".join(["id"] + [prefix + c for c in model.class_names]) + "\n"]
        lines += ["\t".join([name] + [f"{x:.6g}" for x in v]) + "\n" for (name, _), v in zip(records, values)]
    base.write_text(args.out, lines)
    return 0


def bedgraph_lines(chrom, start, values):
    """bedGraph lines of values at chrom:start, start+1, ...: runs of equal printed values in one line."""
    text = [f"{v:.4g}" for v in values.tolist()]
    lines, run = [], 0
    for j in range(1, len(text) + 1):
        if j == len(text) or text[j] != text[run]:
            lines.append(f"{chrom}\t{start + run}\t{start + j}\t{text[run]}\n")
            run = j
    return lines


def predict_per_base(args, device):
    """A per-base model's outputs at every base of the --input records (positions from each record's start)
    or of the --bed regions of --fasta (genome positions; the forward strand, whatever a region's strand
    column says): one bedGraph per output, OUT.<class>.bedGraph (the class's probability) or OUT.value.bedGraph.
    A record longer than the model takes is read in consecutive windows, each on its own."""
    if args.out is None:
        raise th.UserError("a per-base model writes a bedGraph per class: give --out PREFIX")
    if args.input is not None:  # first: a bad file is refused before the model is loaded
        records = [(name, 0, ids) for name, ids in read_sequences(args.input)]
    else:
        genome = load_genome(args.fasta)
        records = [(chrom, start, genome.fetch(chrom, start, end)) for _, chrom, start, end, _ in
                   bed_intervals(args.bed, genome)]
    model = load_classifier(args.checkpoint, device)
    L = model.max_len
    windows = [(k, i) for k, (_, _, ids) in enumerate(records) for i in range(0, len(ids), L)]
    seqs = [records[k][2][i:i + L] for k, i in windows]
    values = [v.numpy() for v in predict_outputs(model, seqs, args.batch_size, args.rc)]  # (length, n) each
    for j, name in enumerate(model.class_names):
        lines = [f'track type=bedGraph name="{name}"\n']
        for (k, i), v in zip(windows, values):
            lines += bedgraph_lines(records[k][0], records[k][1] + i, v[:, j])
        base.write_text(f"{args.out}.{name.replace(os.sep, '_')}.bedGraph", lines)
    print(f"wrote {', '.join(f'{args.out}.{n}.bedGraph' for n in model.class_names)}", file=sys.stderr)
    return 0


def embed(args):
    return run_distributed(embed_on, args, cli.pick_device(args.device))


def embed_on(args, rank, world, device):
    from tqdm import tqdm
    records = read_inputs(args, read_sequences)  # first: a bad file is refused before the model is loaded
    model = parallel.for_inference(th.from_pretrained(args.checkpoint, device), args.context_parallel, world)
    limit = model.cfg.l_max
    n_cut = sum(len(ids) > limit for _, ids in records)
    if n_cut:
        print(f"{n_cut} sequences longer than l_max {limit} were cut (--truncate {args.truncate})", file=sys.stderr)
    seqs = [cut(ids, limit, args.truncate) for _, ids in records]
    if any(len(s) == 0 for s in seqs):
        raise DataError(f"{args.input or args.bed}: record {records[[len(s) for s in seqs].index(0)][0]!r} is empty")
    out = np.zeros((len(seqs), model.cfg.d_model), dtype=np.float32)
    chunk = 16 * args.batch_size  # th.embed sorts each chunk by length; the bar moves chunk by chunk
    with tqdm(total=len(seqs), unit="seq", file=sys.stderr, disable=args.quiet or rank > 0) as bar:
        for i in range(0, len(seqs), chunk):
            out[i:i + chunk] = np.mean([th.embed(model, s, args.pool, args.batch_size)
                                        for s in strands(seqs[i:i + chunk], args.rc)], axis=0)
            bar.update(len(seqs[i:i + chunk]))
    if rank > 0:  # every process computed the same vectors; the first writes them
        return 0
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
            np.save(f, out)
    base.atomic_write(args.out, save)
    print(f"wrote {args.out}: {out.shape[0]} x {out.shape[1]} float32 ({args.pool} pooling)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = cli.ArgumentParser(description="Fine-tune HyenaDNA to classify sequences; predict; embed.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fine-tune a classifier")
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=cli.existing_path, help="genomic-benchmarks folder (train/<class>/*.txt, test/...), CSV/TSV "
                                       "with sequence (or seq) and label columns (optional split column), or FASTA "
                                       "whose headers end in |label (the Nucleotide Transformer tasks' .fna)")
    source.add_argument("--species", nargs="+", metavar="NAME=FASTA", help="species classification: windows of "
                                                                           "--seq_len from each FASTA")
    source.add_argument("--labels", type=cli.existing_file, help="--task per_base: a label for each base of --fasta, "
                        "from a BED (class inside on its intervals, outside elsewhere; or the name column's class, "
                        "background elsewhere) or a bedGraph (.bedGraph/.bg: values; bases it leaves out are "
                        "unlabelled)")
    f.add_argument("--fasta", type=cli.existing_path, help="--task per_base: the genome the --labels annotate")
    f.add_argument("--test", type=cli.existing_file, help="test set for --data FILE, in the same formats")
    f.add_argument("--task", default="classify", choices=["classify", "regression", "multilabel", "per_base"],
                   help="classify (default): one class per sequence; regression: numbers; multilabel: many 0/1 "
                        "targets; per_base: a class or value at every base (--fasta, --labels, --seq_len)")
    f.add_argument("--label_columns", help="CSV/TSV columns holding the labels: a,b,c, or prefix* for all that "
                                           "start with prefix (default: label)")
    model = f.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=cli.existing_path, help="pretrained folder: published HyenaDNA or one of ours")
    model.add_argument("--preset", choices=["tiny", "large", *checkpoints.PRESETS],
                       help="train from scratch at a published size (with --seq_len)")
    f.add_argument("--seq_len", type=cli.positive_int, help="longest sequence / species window (default: the model's l_max)")
    f.add_argument("--pool", choices=["mean", "last"], help="mean (default) or last token's hidden state")
    f.add_argument("--freeze", action="store_true", help="train the head only")
    f.add_argument("--soft_prompt", type=cli.nonnegative_int, default=0, metavar="K", help="train K prompt vectors only")
    f.add_argument("--class_tokens", help="soft prompting: one nucleotide per class (default ACGTN in order)")
    f.add_argument("--truncate", choices=["left", "right", "center"],
                   help="where to cut sequences longer than the model takes (default: center; right with --layout hf)")
    f.add_argument("--layout", default="tinyhyena", choices=["tinyhyena", "hf"],
                   help="hf: write the Hugging Face hub's HyenaDNAForSequenceClassification folder (the head reads "
                        "the last token after an appended [SEP], without bias), with the tokenizer's files")
    f.add_argument("--val_fraction", type=cli.open_fraction, default=0.1)
    f.add_argument("--eval_windows", type=cli.positive_int, default=256, help="species: validation/test windows per species")
    f.add_argument("--recipe", default="default", choices=list(RECIPES),
                   help="paper: the published fine-tuning settings (batch 128, 100 epochs, lr 6e-4, weight decay 0.1, "
                        "embedding dropout 0.1, AdamW betas 0.9/0.999; from HazyResearch/hyena-dna's "
                        "configs/experiment/hg38/genomic_benchmark.yaml); default: batch 32, 10 epochs, lr 6e-4, weight "
                        "decay 0.1, the checkpoint's dropout, betas 0.9/0.95. A flag given here overrides its recipe value")
    f.add_argument("--batch_size", type=cli.positive_int, help="default: the recipe's")
    f.add_argument("--eval_batch_size", type=cli.positive_int, default=64)
    f.add_argument("--grad_accum", type=cli.positive_int, default=1)
    f.add_argument("--epochs", type=cli.positive_int, help="default: the recipe's")
    f.add_argument("--max_steps", type=cli.positive_int, help="optimizer steps (default: --epochs over the training set)")
    f.add_argument("--eval_interval", type=cli.positive_int, help="steps between validations (default: one epoch)")
    f.add_argument("--lr", type=cli.positive_float, help="the peak learning rate (default: the recipe's)")
    f.add_argument("--weight_decay", type=cli.nonnegative_float, help="on the weight matrices (default: the recipe's)")
    f.add_argument("--warmup_steps", type=cli.nonnegative_int, help="default: 1%% of the steps")
    f.add_argument("--dropout", type=cli.nonnegative_float,
                   help="dropout on the token embeddings (default: the recipe's: the checkpoint's, 0.1 as published; 0 "
                        "makes steps deterministic)")
    f.add_argument("--rc_aug", action="store_true", help="reverse-complement augmentation")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--workers", type=cli.nonnegative_int, default=0)
    f.add_argument("--out", default="finetuned")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    for name, help_text in (("predict", "classify sequences with a fine-tuned folder"),
                            ("embed", "one vector per sequence from any checkpoint")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--checkpoint", required=True, type=cli.existing_path)
        cli.add_sequence_inputs(q, "FASTA, CSV/TSV with a sequence column, or one sequence a line")
        q.add_argument("--out", required=name == "embed", type=cli.output_file, help="output file" + (" (.npy)" if name == "embed" else
                                                                                " (TSV; default: standard output)"))
        q.add_argument("--batch_size", type=cli.positive_int, default=32)
        q.add_argument("--device", default="auto")
        q.add_argument("--rc", default="none", choices=["none", "average"],
                       help="average: read each sequence on both strands (as given, and reverse-complemented) and "
                            "average the two " + ("class probabilities or values" if name == "predict" else "vectors"))
        if name == "embed":
            q.add_argument("--pool", default="mean", choices=["mean", "last"])
            q.add_argument("--truncate", default="center", choices=["left", "right", "center"])
            q.add_argument("--quiet", action="store_true")
            q.add_argument("--context_parallel", type=cli.positive_int, default=1, metavar="N",
                           help="processes that share each sequence, each holding 1/N of its positions (under "
                                "torchrun --nproc_per_node N)")
    f.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if args.command != "fit":
        cli.check_sequence_inputs(sub.choices[args.command], args)
    else:
        if args.resume and args.overwrite:
            p.error("--resume and --overwrite exclude each other: continue the run in --out, or start over")
        if not args.checkpoint and not args.preset:
            p.error("give --checkpoint DIR (a pretrained model) or --preset NAME --seq_len N (from scratch)")
        if args.soft_prompt and args.freeze:
            p.error("--soft_prompt already freezes the model; --freeze is for the head")
        if (args.task == "per_base") != bool(args.labels) or bool(args.labels) != bool(args.fasta):
            p.error("--task per_base, --labels LABELS and --fasta GENOME go together: the labels of each base of a genome")
        if args.task in ("regression", "multilabel") and (args.species or os.path.isdir(args.data)):
            p.error(f"--task {args.task} reads its targets from a CSV/TSV (--data FILE --label_columns ...)")
        if args.task == "per_base" and (args.layout == "hf" or args.pool):
            p.error("--task per_base reads every position's hidden state: drop " + ("--layout hf" if args.layout == "hf" else "--pool"))
        if args.task == "per_base" and is_bedgraph(args.labels):
            args.task = "per_base_values"  # values per base: regression at each position
        if args.task != "classify" and (args.soft_prompt or args.class_tokens):
            p.error("--soft_prompt reads classes as next tokens: it goes with --task classify only")
        if args.layout == "hf" and (args.soft_prompt or args.pool == "mean"):
            p.error("--layout hf writes the hub's classifier, which reads the last token (after [SEP]) through a "
                    "linear head: drop " + ("--soft_prompt" if args.soft_prompt else "--pool mean"))
        for name, value in RECIPES[args.recipe].items():  # each recipe setting the command line left unset
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        args.pool = args.pool or ("last" if args.layout == "hf" else "mean")
        args.truncate = args.truncate or ("right" if args.layout == "hf" else "center")
        if args.test and not (args.data and os.path.isfile(args.data)):
            p.error("--test goes with --data FILE (a folder has its own test/; species and per-base windows their "
                    "held-out 5%)")
    return args


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    args = parse_args(argv)
    return {"fit": fit, "predict": predict, "embed": embed}[args.command](args)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
