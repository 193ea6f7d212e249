"""
Score DNA with a pretrained model: sequence likelihoods and zero-shot variant effects.

    python score.py sequences --checkpoint DIR --input FASTA [--out FILE.tsv] [--per_base FILE.bedGraph]
    python score.py sequences --checkpoint DIR --fasta GENOME --bed REGIONS.bed [--out FILE.tsv]
    python score.py variants --checkpoint DIR --fasta REF --vcf VCF [--window 1024] [--out FILE.tsv] [--both_strands]
    torchrun --nproc_per_node 2 score.py sequences --checkpoint DIR --input long.fa --context_parallel 2
                                          # each window's positions split over 2 processes (parallel.py)

A causal language model is a density over sequences: log P(x) = sum_t log P(x_t | x_<t). `sequences` reports it
per base for every FASTA record. `variants` compares the reference and the alternative allele in their genomic
context: llr = log P(ALT window) - log P(REF window), in nats. Negative means the model finds the ALT allele
less likely than the REF allele there; large negative values are what zero-shot variant-effect ranking looks for.

Checkpoints: a published HyenaDNA folder or one written by train.py / finetune.py (its backbone). Tables are
written atomically to --out, or to standard output without it; progress and counts go to standard error.
"""

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

import base
import cli
import fast
import parallel
import tinyhyena as th
from data import (DataError, find_chrom, load_genome, open_maybe_gzipped, read_fasta, read_inputs,
                  reverse_complement)


# ---------------------------------------------------------------------------------------------------------
# Records of any length: scored in windows of at most the model's l_max, each base once.

def pad_right(sequences):
    """list of 1-D int arrays -> (B, longest) int64 ids, right-padded with [PAD], and (B,) lengths: the causal
    model never sees the padding after a position (see tinyhyena.log_likelihood's lengths)."""
    rows = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in sequences]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=th.PAD_ID), \
        torch.tensor([len(s) for s in rows])


def scoring_windows(length, window, context):
    """Cover positions 1..length-1 of a record with windows of `window` bases so that each position is predicted
    exactly once, with at least `context` bases before it inside its window (fewer only near the record's
    start). Returns [(start, first)]: the window [start, start + window) scores positions [first, its end)."""
    if length <= window:
        return [(0, 1)] if length > 1 else []
    if not 0 <= context < window:
        raise th.UserError(f"context {context} must be in [0, window {window})")
    plan, first = [], 1
    while first < length:
        # base `first` is predicted from the ones before it, so its window starts at least one base earlier;
        # the last window is moved back to end at the record's end
        start = max(0, min(first - max(context, 1), length - window))
        plan.append((start, first))
        first = start + window
    return plan


@torch.no_grad()
def record_log_probs(model, ids, window=None, context=None, batch_size=8):
    """1-D ids of a record of any length -> (length-1,) float32 log-probabilities of its bases 1..length-1,
    scored in windows of at most `window` (default l_max) bases with `context` (default window // 2) bases of
    context before each (see scoring_windows)."""
    window = window or model.cfg.l_max
    context = window // 2 if context is None else context
    if not 1 <= window <= model.cfg.l_max:
        raise th.UserError(f"window {window} is outside [1, {model.cfg.l_max}] (l_max)")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    device = next(model.parameters()).device
    out = torch.zeros(max(0, len(ids) - 1))
    plan = scoring_windows(len(ids), window, context)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        logp = th.log_likelihood(model, torch.stack([ids[s:s + window] for s, _ in chunk]).to(device)).cpu()
        for row, (start, first) in enumerate(chunk):
            stop = min(start + window, len(ids))
            out[first - 1:stop - 1] = logp[row, first - start - 1:stop - start - 1]
    return out



def strand_log_probs(model, ids, window=None, context=None, batch_size=8, rc="none"):
    """(strands, length) float64: in the record's coordinates, each base's log-probability given what comes
    before it on the strand read, NaN where it has none. The forward strand predicts bases 1..length-1; with
    rc "average" a second row, the reverse strand read, predicts bases length-2..0 (record_log_probs)."""
    if rc not in ("none", "average"):
        raise th.UserError(f"rc must be 'none' or 'average', got {rc!r}")
    strands = np.full((1 + (rc == "average"), len(ids)), np.nan)
    strands[0, 1:] = record_log_probs(model, ids, window, context, batch_size).numpy()
    if rc == "average":
        strands[1, :-1] = record_log_probs(model, reverse_complement(ids), window, context, batch_size).numpy()[::-1]
    return strands


# ---------------------------------------------------------------------------------------------------------
# VCF

@dataclass
class Variant:
    chrom: str
    pos: int  # 1-based, as in the VCF
    id: str
    ref: str
    alt: str
    line: int  # where it came from, for messages


def read_vcf(path):
    """Variants of a VCF 4.x file (plain or gzipped), one per ALT allele, in file order. DataError naming the
    file and line for a missing #CHROM header line or a malformed row."""
    variants, header_seen = [], False
    with open_maybe_gzipped(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("##") or not line.strip():
                    continue
                if line.startswith("#"):
                    if not line.startswith("#CHROM"):
                        raise DataError(f"{path}:{lineno}: expected the #CHROM header line, got {line[:40]!r}")
                    header_seen = True
                    continue
                if not header_seen:
                    raise DataError(f"{path}:{lineno}: data row before the #CHROM header line (not a VCF?)")
                cols = line.split("\t")
                if len(cols) < 5:
                    raise DataError(f"{path}:{lineno}: expected at least 5 tab-separated columns "
                                    f"(CHROM POS ID REF ALT), got {len(cols)}")
                chrom, pos, vid, ref, alts = cols[:5]
                if not pos.isdigit() or int(pos) < 1:
                    raise DataError(f"{path}:{lineno}: POS must be a positive integer, got {pos!r}")
                if not ref or not set(ref.upper()) <= set("ACGTN"):
                    raise DataError(f"{path}:{lineno}: REF must be bases (ACGTN), got {ref!r}")
                for alt in alts.split(","):
                    variants.append(Variant(chrom, int(pos), vid, ref, alt, lineno))
        except (UnicodeDecodeError, EOFError, OSError) as e:
            raise DataError(f"{path}: not a readable VCF ({type(e).__name__}: {e})") from None
    if not header_seen:
        raise DataError(f"{path}: no #CHROM header line (not a VCF?)")
    return variants


# ---------------------------------------------------------------------------------------------------------
# Variant windows and scores

def variant_windows(genome, v, window, l_max):
    """(REF window ids, ALT window ids), or a note saying why the variant cannot be scored.

    The REF window is `window` bases of the reference centred on the REF allele (moved inward at a chromosome's
    ends); the ALT window is the same with REF replaced by ALT. An insertion can make the ALT window longer
    than l_max: then both windows give up the same number of bases on the left, so they still differ only
    from the variant on."""
    if not set(v.alt.upper()) <= set("ACGTN") or not v.alt:
        return f"symbolic ALT: {v.alt!r} is not a sequence of bases"
    chrom = find_chrom(genome, v.chrom)
    if chrom is None:
        return f"missing chromosome: {v.chrom} is not in the FASTA"
    length, p, n_ref = genome.chroms[chrom], v.pos - 1, len(v.ref)
    if p + n_ref > length:
        return f"outside the chromosome: position {v.pos} (REF {n_ref} bp) on {chrom} of length {length}"
    if n_ref >= window:
        return f"REF too long: {n_ref} bp, not shorter than the window of {window}"
    have = genome.fetch(chrom, p, p + n_ref).astype(np.int64)
    if not np.array_equal(have, th.tokenize(v.ref)):
        return f"REF mismatch: the FASTA has {th.detokenize(have)}"
    span = min(window, length)
    start = min(max(0, p + n_ref // 2 - span // 2), length - span)
    ref_ids = genome.fetch(chrom, start, start + span).astype(np.int64)
    offset = p - start
    alt_ids = np.concatenate([ref_ids[:offset], th.tokenize(v.alt), ref_ids[offset + n_ref:]])
    excess = len(alt_ids) - l_max
    if excess > 0:
        if excess >= offset:
            return f"ALT too long: no window within l_max {l_max} holds it"
        ref_ids, alt_ids = ref_ids[excess:], alt_ids[excess:]
    return ref_ids, alt_ids


def llr_of_pair(logp_ref, logp_alt, ref_ids, alt_ids):
    """log P(alt) - log P(ref) from their per-position log-probabilities (entry t-1 predicts base t). The
    terms before the first base where the two differ are equal and are left out of both sums, so rounding
    in those shared positions cannot blur a small effect."""
    n = min(len(ref_ids), len(alt_ids))
    differ = np.flatnonzero(ref_ids[:n] != alt_ids[:n])
    shared = int(differ[0]) if differ.size else n
    first = max(shared, 1) - 1  # logp index of the first base that can differ
    return float(logp_alt[first:len(alt_ids) - 1].sum() - logp_ref[first:len(ref_ids) - 1].sum())


@torch.no_grad()
def score_variants(model, genome, variants, window=1024, both_strands=False, batch_size=32, progress=None):
    """[(llr, llr_forward, llr_reverse, note)] per variant, in order. llr is in nats (forward strand, or the
    mean of both strands with both_strands); unscored variants have NaN scores and a note. REF and ALT windows
    of `batch_size` variants go through the model together, right-padded (exact: the model is causal)."""
    device = next(model.parameters()).device
    results = [None] * len(variants)
    pending = []  # (variant index, strand, ref ids, alt ids)

    def flush():
        seqs = [ids for *_, r, a in pending for ids in (r, a)]
        ids, lengths = pad_right(seqs)
        logp = th.log_likelihood(model, ids.to(device), lengths.to(device)).cpu().numpy()
        for k, (i, strand, r, a) in enumerate(pending):
            results[i][strand] = llr_of_pair(logp[2 * k], logp[2 * k + 1], r, a)
        pending.clear()

    for i, v in enumerate(variants):
        windows = variant_windows(genome, v, window, model.cfg.l_max)
        if isinstance(windows, str):
            results[i] = [math.nan, math.nan, windows]
        else:
            results[i] = [math.nan, math.nan, ""]
            ref_ids, alt_ids = windows
            pending.append((i, 0, ref_ids, alt_ids))
            if both_strands:  # the other strand reads the variant after its downstream context
                pending.append((i, 1, reverse_complement(ref_ids).astype(np.int64),
                                reverse_complement(alt_ids).astype(np.int64)))
        if len(pending) >= (2 if both_strands else 1) * batch_size:
            flush()
        if progress:
            progress(1)
    if pending:
        flush()
    out = []
    for forward, reverse, note in results:
        llr = (forward + reverse) / 2 if both_strands else forward
        out.append((llr, forward, reverse if both_strands else math.nan, note))
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line

def fmt(x):
    return "NA" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6f}"


def load_model(args, world, device):
    model = parallel.for_inference(th.from_pretrained(args.checkpoint, device), args.context_parallel, world)
    window = args.window or model.cfg.l_max
    if not 2 <= window <= model.cfg.l_max:
        raise th.UserError(f"--window {window} is outside [2, {model.cfg.l_max}] (the checkpoint's l_max"
                           + (", rounded down to a multiple of --context_parallel)" if args.context_parallel > 1 else ")"))
    return model, window


def write(args, rank, path, lines):
    """base.write_text by the first process only (every process computes the same rows)."""
    if rank == 0:
        base.write_text(path, lines)


def cmd_sequences(args, rank, world, device):
    from tqdm import tqdm
    records = read_inputs(args, read_fasta)
    model, window = load_model(args, world, device)
    context = window // 2 if args.context is None else args.context
    if not 0 <= context < window:
        raise th.UserError(f"--context {context} must be in [0, --window {window})")
    both = args.rc == "average"
    rows = ["id\tlength\tnats_per_base\tbits_per_base\tperplexity" + ("\tnats_forward\tnats_reverse" if both else "")
            + "\n"]
    per_base = []
    for name, ids in tqdm(records, desc="records", unit="rec", file=sys.stderr, disable=args.quiet or rank > 0):
        strands = strand_log_probs(model, ids, window, context, args.batch_size, args.rc)
        nats = [-float(np.nanmean(s)) if len(ids) > 1 else math.nan for s in strands]  # per strand
        mean = sum(nats) / len(nats)  # both strands: the mean of their nats per base
        rows.append(f"{name}\t{len(ids)}\t{fmt(mean)}\t{fmt(mean / math.log(2))}\t{fmt(math.exp(mean))}"
                    + "".join(f"\t{fmt(n)}" for n in (nats if both else [])) + "\n")
        if args.per_base and len(ids) > 1:  # bedGraph: 0-based start, end exclusive; each base's mean over the
            # strands that predict it (one strand alone: base 0 has no prediction)
            predicted = (~np.isnan(strands)).sum(0)  # (length,): how many strands predict each base
            values = np.where(predicted > 0, np.nansum(strands, 0) / np.maximum(predicted, 1), np.nan)
            per_base.extend(f"{name}\t{t}\t{t + 1}\t{value:.6f}\n" for t, value in enumerate(values.tolist())
                            if not math.isnan(value))
    if args.per_base:
        write(args, rank, args.per_base, per_base)
    write(args, rank, args.out, rows)
    return 0


def cmd_variants(args, rank, world, device):
    from tqdm import tqdm
    variants = read_vcf(args.vcf)
    genome = load_genome(args.fasta)
    model, window = load_model(args, world, device)
    with tqdm(total=len(variants), desc="variants", unit="var", file=sys.stderr, disable=args.quiet or rank > 0) as bar:
        scores = score_variants(model, genome, variants, window, args.both_strands, args.batch_size, bar.update)
    header = ["chrom", "pos", "id", "ref", "alt", "llr"] + (["llr_forward", "llr_reverse"] if args.both_strands else [])
    rows = ["\t".join(header + ["note"]) + "\n"]
    for v, (llr, forward, reverse, note) in zip(variants, scores):
        cells = [v.chrom, str(v.pos), v.id, v.ref, v.alt, fmt(llr)] + ([fmt(forward), fmt(reverse)] if args.both_strands else [])
        rows.append("\t".join(cells + [note]) + "\n")
    write(args, rank, args.out, rows)
    if rank > 0:
        return 0
    skipped = [note.split(":")[0] for *_, note in scores if note]
    summary = f"scored {len(variants) - len(skipped)} of {len(variants)} variants"
    if skipped:
        kinds = {k: skipped.count(k) for k in dict.fromkeys(skipped)}
        summary += "; not scored (see the note column): " + ", ".join(f"{n} x {k}" for k, n in kinds.items())
    print(summary, file=sys.stderr)
    return 0


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    p = cli.ArgumentParser(description="Sequence likelihoods and zero-shot variant effects.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sequences", help="nats and bits per base, perplexity, of every FASTA record")
    cli.add_sequence_inputs(s, "FASTA (plain or gzipped)")
    s.add_argument("--per_base", type=cli.output_file, help="also write every base's log-probability as bedGraph")
    s.add_argument("--rc", default="none", choices=["none", "average"],
                   help="average: score each record on both strands; nats_per_base is their mean, and the strands' "
                        "own are reported beside it (per base: the mean of the strands that predict the base)")
    s.add_argument("--context", type=cli.nonnegative_int, help="bases of context before each scored base in long records "
                                               "(default: half the window)")
    v = sub.add_parser("variants", help="llr = log P(ALT window) - log P(REF window) per VCF allele")
    v.add_argument("--fasta", required=True, type=cli.existing_path, help="reference FASTA (plain or gzipped), or a prepared genome folder")
    v.add_argument("--vcf", required=True, type=cli.existing_file, help="VCF 4.x, plain or gzipped")
    v.add_argument("--both_strands", action="store_true", help="average with the reverse complement's score")
    for q in (s, v):
        q.add_argument("--checkpoint", required=True, type=cli.existing_path, help="published HyenaDNA folder or one of ours")
        q.add_argument("--out", type=cli.output_file, help="TSV to write (default: standard output)")
        q.add_argument("--window", type=cli.positive_int, default=1024 if q is v else None,
                       help="bases per window (variants: 1024; sequences: the model's l_max)")
        q.add_argument("--batch_size", type=cli.positive_int, default=32)
        q.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.add_argument("--context_parallel", type=cli.positive_int, default=1, metavar="N",
                       help="processes that share each window, each holding 1/N of its positions (under torchrun "
                            "--nproc_per_node N)")
    args = p.parse_args(argv)
    if args.command == "sequences":
        cli.check_sequence_inputs(s, args)
    command = cmd_sequences if args.command == "sequences" else cmd_variants
    return parallel.run_distributed(command, args, cli.pick_device(args.device))


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
