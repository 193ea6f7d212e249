"""
The fine-tuning tasks' data and metrics: labelled sequences read from the formats users have them in
(genomic-benchmarks folders, CSV/TSV, the Nucleotide Transformer tasks' FASTA, plain sequence files), labels
per base of a genome (BED, bedGraph), and the metrics of the tasks (classify and per_base: accuracy, MCC, F1;
regression and per_base_values: Pearson, Spearman; multilabel: mean AUROC). finetune.py fine-tunes, predicts
and embeds with them.
"""

import csv
import glob
import math
import os

import numpy as np
import torch

import tinyhyena as th
from base import DataError
from classifier import pad_left
from data import bed_intervals, check_nucleotides, fasta_lines, open_maybe_gzipped, read_fasta, reverse_complement

SELECTION_METRIC = {"classify": "mcc", "regression": "pearson", "multilabel": "auroc", "per_base": "mcc",
                    "per_base_values": "pearson"}  # picks the best model



# ---------------------------------------------------------------------------------------------------------
# Reading.

class Examples(torch.utils.data.Dataset):
    """Labelled sequences: (uint8 token ids, label) pairs, reverse-complemented at random with rc_aug. A label
    is a class index, a float32 vector of targets (regression, multilabel), or one label per base (per_base:
    class indices; per_base_values: float32, NaN where none), which reverses with its sequence."""

    def __init__(self, seqs, labels, rc_aug=False):
        self.seqs, self.labels, self.rc_aug = seqs, labels, rc_aug

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):  # with rc_aug, reverse-complemented half the time, by torch's global RNG
        return self.item(i, self.rc_aug and bool(torch.rand(()) < 0.5))

    def item(self, i, flip):
        """Example i, reverse-complemented if flip (trainer.batches draws flip once per epoch)."""
        ids, label = self.seqs[i], self.labels[i]
        if flip:
            ids = reverse_complement(ids)
            if isinstance(label, np.ndarray) and label.shape == ids.shape:  # per base: base i is now base L-1-i
                label = np.ascontiguousarray(label[::-1])
        return ids, label

    def subset(self, index):
        return Examples([self.seqs[i] for i in index], [self.labels[i] for i in index], self.rc_aug)


def collate(items):
    seqs, labels = zip(*items)
    return pad_left(seqs), torch.as_tensor(np.asarray(labels))


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
            with open_maybe_gzipped(path) as f:
                seq = b"".join(f.read().split())
            if not seq:
                raise DataError(f"{path}: holds no sequence")
            check_nucleotides(path, 1, seq)
            rows.append((seq, name))
    return rows


def resolve_label_columns(spec, columns, path):
    """--label_columns "a,b,c" (entries ending in * are prefixes) -> the header's matching columns."""
    found = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        matches = [c for c in columns if c.startswith(entry[:-1])] if entry.endswith("*") else \
            [entry] if entry in columns else []
        if not matches:
            raise DataError(f"{path}:1: no column {'starts with ' + repr(entry[:-1]) if entry.endswith('*') else repr(entry)}"
                            f" (--label_columns; found {', '.join(columns)})")
        found += [c for c in matches if c not in found and c != "sequence"]
    if not found:
        raise DataError(f"{path}: --label_columns {spec!r} names no column")
    return found


def read_labelled_fasta(path, need_label, label_columns):
    """The Nucleotide Transformer tasks' FASTA (train.fna, test.fna): each header ends in |label -> rows as
    read_table gives them (name, sequence, label, line)."""
    if label_columns not in (None, "label"):
        raise DataError(f"{path}: a FASTA's label is the end of each header (>name|label); --label_columns is for CSV/TSV")
    rows, lines = [], []
    for header, bases, lineno in fasta_lines(path):
        if bases is not None:
            lines[-1].append(bases)
            continue
        name, bar, label = header.rpartition("|")
        if need_label and (not bar or not label.strip()):
            raise DataError(f"{path}:{lineno}: header has no label after a '|' (expected >name|label, as in the "
                            "Nucleotide Transformer tasks' .fna files)")
        rows.append({"name": name if bar else label, "label": label.strip() if bar else "", "line": lineno})
        lines.append([])
    for row, parts in zip(rows, lines):
        row["sequence"] = b"".join(parts).decode("ascii", "replace")
        if not row["sequence"]:
            raise DataError(f"{path}:{row['line']}: empty sequence")
    return rows, ["label"] if need_label else []


def read_table(path, need_label=True, label_columns=None):
    """Labelled sequences -> [dict] (`sequence`, the labels, `line`; `split` and `name` when given) and the
    label columns, from CSV (.csv) or TSV (other names) with a header holding `sequence` or `seq` (and
    `label`, or the --label_columns spec; optional `split`, `name`), or from FASTA whose headers end in
    |label (read_labelled_fasta). DataError naming the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    delimiter = "," if path.lower().removesuffix(".gz").endswith(".csv") else "\t"
    with open_maybe_gzipped(path) as raw:
        text = raw.read().decode("utf-8", errors="replace").splitlines()
    if text and text[0].startswith(">"):
        return read_labelled_fasta(path, need_label, label_columns)
    reader = csv.DictReader(text, delimiter=delimiter)
    columns = reader.fieldnames or []
    if "sequence" not in columns and "seq" in columns:  # the hub copies of the genomic benchmarks
        columns = reader.fieldnames = ["sequence" if c == "seq" else c for c in columns]
    need = ["sequence", "label"] if need_label and not label_columns else ["sequence"]
    missing = [c for c in need if c not in columns]
    if missing:
        raise DataError(f"{path}:1: header has no {' or '.join(repr(c) for c in missing)} column "
                        f"(found {', '.join(columns) or 'nothing'})")
    labels = resolve_label_columns(label_columns, columns, path) if need_label and label_columns else \
        ["label"] if need_label else []
    rows = []
    for lineno, row in enumerate(reader, 2):
        seq = (row.get("sequence") or "").strip()
        if not seq:
            raise DataError(f"{path}:{lineno}: empty sequence")
        check_nucleotides(path, lineno, seq.encode("utf-8", "replace"))
        for column in labels:
            if not (row.get(column) or "").strip():
                raise DataError(f"{path}:{lineno}: empty {column}")
        rows.append({**row, "sequence": seq, "line": lineno})
    if not rows:
        raise DataError(f"{path}: no sequences")
    return rows, labels


def targets_of(row, columns, task, path):
    """A row's label columns as a float32 vector; multilabel targets must be 0 or 1."""
    try:
        values = np.array([float(row[c]) for c in columns], dtype=np.float32)
    except ValueError:
        bad = next(c for c in columns if not is_number(row[c]))
        raise DataError(f"{path}:{row['line']}: {bad} is {row[bad].strip()!r}, not a number") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}:{row['line']}: a label column holds {values[~np.isfinite(values)][0]}")
    if task == "multilabel" and not np.isin(values, (0, 1)).all():
        bad = columns[int(np.flatnonzero(~np.isin(values, (0, 1)))[0])]
        raise DataError(f"{path}:{row['line']}: {bad} is {row[bad].strip()!r}; multilabel targets are 0 or 1")
    return values


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_sequences(path):
    """[(id, uint8 ids)] from FASTA, CSV/TSV with a `sequence` or `seq` column (ids from `name` or `id`, else the row),
    or plain text with one sequence a line (ids are line numbers)."""
    with open_maybe_gzipped(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b">"):
        return read_fasta(path)
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
    if {"sequence", "seq"} & set(first.replace(",", "\t").split("\t")):
        rows, _ = read_table(path, need_label=False)
        key = next((k for k in ("name", "id") if k in rows[0]), None)
        return [(row[key] if key else str(row["line"] - 1), th.tokenize(row["sequence"])) for row in rows]
    if "," in first or "\t" in first:
        raise DataError(f"{path}:1: a table without a 'sequence' or 'seq' column (header {first.strip()[:60]!r}); "
                        "expected FASTA, CSV/TSV with a sequence column, or one sequence a line")
    out = []
    with open_maybe_gzipped(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                check_nucleotides(path, lineno, line.strip())
                out.append((str(lineno), th.BYTE_TO_ID[np.frombuffer(line.strip(), dtype=np.uint8)]))
    if not out:
        raise DataError(f"{path}: no sequences")
    return out


def is_bedgraph(path):
    """A bedGraph (values per interval) rather than a BED (classes), by its name: .bedGraph or .bg, maybe .gz."""
    return path.lower().removesuffix(".gz").endswith((".bedgraph", ".bg"))


def per_base_labels(path, genome):
    """Labels for every base of the genome from a BED or a bedGraph (is_bedgraph) -> (label of chrom: a
    function of the chromosome's name giving its array of labels, the class names or ["value"]).
    - BED3: class "inside" on the intervals, "outside" elsewhere;
    - BED4 and wider: the name column is the class, "background" elsewhere (classes: background, then the
      names in sorted order);
    - bedGraph (chrom, start, end, value): the value on the intervals, NaN (unlabelled) elsewhere.
    Where intervals overlap, the later line's label holds. DataError naming the file and line."""
    rows = bed_intervals(path, genome)
    if is_bedgraph(path):
        values = []
        for lineno, *_, cols in rows:
            if len(cols) < 4 or not is_number(cols[3]) or not math.isfinite(float(cols[3])):
                raise DataError(f"{path}:{lineno}: a bedGraph line is chrom, start, end, value (a finite number), "
                                f"got {cols[3:4] or 'no value'}")
            values.append(float(cols[3]))
        names, fill, dtype = ["value"], np.nan, np.float32
    else:
        named = [len(cols) > 3 and cols[3] not in ("", ".") for *_, cols in rows]
        if any(named) and not all(named):
            lineno = rows[named.index(False)][0]
            raise DataError(f"{path}:{lineno}: no name (class) in column 4, which other lines have")
        names = ["background", *sorted({cols[3] for *_, cols in rows})] if all(named) else ["outside", "inside"]
        index = {name: i for i, name in enumerate(names)}
        values = [index[cols[3]] if all(named) else 1 for *_, cols in rows]
        fill, dtype = 0, np.int16  # every base labelled; int16 (the loss takes int64) for a genome's worth
    by_chrom = {}
    for (_, chrom, start, end, _), value in zip(rows, values):
        by_chrom.setdefault(chrom, []).append((start, end, value))

    def labels_of(chrom):
        out = np.full(genome.chroms[chrom], fill, dtype=dtype)
        for start, end, value in by_chrom.get(chrom, []):
            out[start:end] = value
        return out
    return labels_of, names


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


def average_ranks(x):
    """Ranks 1..n of x, ties sharing their mean rank (what Spearman's r and the AUROC need)."""
    x = np.asarray(x)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / count)[tie]


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator else 0.0


def regression_metrics(targets, predictions):
    """Pearson r, Spearman r and mean squared error, each averaged over the targets (columns)."""
    targets, predictions = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
    columns = range(targets.shape[1])
    return {"pearson": float(np.mean([pearson(targets[:, j], predictions[:, j]) for j in columns])),
            "spearman": float(np.mean([pearson(average_ranks(targets[:, j]), average_ranks(predictions[:, j]))
                                       for j in columns])),
            "mse": float(((targets - predictions) ** 2).mean())}


def auroc(labels, scores):
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half), from the rank sum of the positives (Mann-Whitney)."""
    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((average_ranks(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_metrics(targets, logits):
    """Mean AUROC over the targets that have both positives and negatives here (others have none), and how
    many those were."""
    targets, logits = np.asarray(targets), np.asarray(logits)
    scored = [j for j in range(targets.shape[1]) if 0 < targets[:, j].sum() < len(targets)]
    mean = float(np.mean([auroc(targets[:, j], logits[:, j]) for j in scored])) if scored else float("nan")
    return {"auroc": mean, "targets_scored": len(scored)}


def task_metrics(task, targets, outputs):
    """The task's metrics of forward's outputs (N, n_outputs), or (N, L, n_outputs) per base (every base one
    example; values: the labelled bases only), against targets."""
    targets, outputs = np.asarray(targets), np.asarray(outputs)
    if task in ("classify", "per_base"):
        return classification_metrics(targets.ravel(), outputs.argmax(-1).ravel(), outputs.shape[-1])
    if task == "per_base_values":
        labelled = np.isfinite(targets)
        return regression_metrics(targets[labelled][:, None], outputs[..., 0][labelled][:, None])
    return regression_metrics(targets, outputs) if task == "regression" else multilabel_metrics(targets, outputs)
