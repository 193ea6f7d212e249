"""
Genomes into training windows.

    python data.py hg38 [--dir data/hg38]     download hg38 and the paper's intervals, verify, prepare
    python data.py prepare FASTA [--out DIR]   prepare any FASTA (plain or gzipped)

Preparing turns a FASTA into one flat uint8 file of token ids per chromosome plus `index.json`; training reads
windows from those files through numpy memmaps, so a window costs O(seq_len) whatever the genome's size.
"""

import gzip
import json
import os
import shutil
import sys
import tempfile
import urllib.request
import zlib

import numpy as np
import torch

from cli import ArgumentParser, existing_file, run_command
from base import DataError
from tinyhyena import BYTE_TO_ID, N_ID, PAD_ID

HG38_FASTA_URL = "https://storage.googleapis.com/basenji_barnyard2/hg38.ml.fa.gz"
HG38_BED_URL = "https://storage.googleapis.com/basenji_barnyard2/sequences_human.bed"


# ---------------------------------------------------------------------------------------------------------
# Download, resumable.

def download(url, path, quiet=False):
    """Fetch url to path, resuming from `path.part` if an earlier download was cut off."""
    from tqdm import tqdm
    if os.path.exists(path):
        return path
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already complete
            os.replace(part, path)
            return path
        raise DataError(f"{url}: download failed (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                             desc=os.path.basename(path), disable=quiet) as bar:
            try:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, ConnectionError) as e:
                raise DataError(f"{url}: download interrupted after {f.tell()} bytes ({e}); "
                                "run the same command again to resume") from None
    if total is not None and os.path.getsize(part) < total:
        raise DataError(f"{url}: download interrupted at {os.path.getsize(part)} of {total} bytes; "
                        "run the same command again to resume")
    os.replace(part, path)
    return path


def verify_gzip(path):
    """Read a gzip file to its end: a truncated or corrupt file raises DataError naming it."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# Preparing a FASTA: streamed, so a 3.1 GB genome needs little memory.

def open_maybe_gzipped(path):
    """The input file at path, opened for reading bytes (gunzipped when it is gzip): every reader of a sequence,
    table, BED or VCF file opens it here. Its first 64 KiB are checked first, so that what is not a text file is
    refused before any work: DataError naming the file when it is missing, a gzip that does not decompress, or
    binary (NUL bytes, or more than 10% of its bytes outside printable ASCII)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            head = f.read(1 << 16)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: a gzip file that does not decompress ({e})") from None
    if b"\0" in head or len(head.translate(None, TEXT_BYTES)) > 0.1 * len(head):
        what = "gzipped binary data" if gzipped else "binary data"
        raise DataError(f"{path}: {what}, not a text file (expected FASTA, CSV/TSV or one sequence a line)")
    return opener(path, "rb")


TEXT_BYTES = bytes(range(32, 127)) + b"\t\n\r"  # what a text file is made of
# What a sequence may hold: the IUPAC nucleotide codes in either case (N and the ambiguity codes are read as
# N), and gaps. A record with more than MAX_OTHER of anything else is not DNA (protein, a wrong file).
NUCLEOTIDE_CODES = b"ACGTUNRYSWKMBDHVacgtunryswkmbdhv-.*"
MAX_OTHER = 0.1


def check_nucleotides(path, where, bases, count=None):
    """DataError naming the file and `where` (its line or record) unless at most MAX_OTHER of the bytes `bases`
    are outside NUCLEOTIDE_CODES. count: (other bytes, all bytes) when the caller has counted them already."""
    other, total = count or (len(bases.translate(None, NUCLEOTIDE_CODES)), len(bases))
    if other > MAX_OTHER * total:
        raise DataError(f"{path}:{where}: {other} of {total} characters are not nucleotide codes (IUPAC: "
                        "ACGTN, RYSWKMBDHV, any case); not a DNA sequence")


def _source_stamp(path):
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


GENOME_FORMAT = "tinyhyena prepared genome"  # marks index.json: a folder prepare() may replace


def is_prepared_genome(directory):
    """Whether directory holds a prepared genome and nothing else: an index.json that prepare() wrote and
    only the token files it lists. Only such a folder may be replaced; anything else could be a user's."""
    try:
        with open(os.path.join(directory, "index.json")) as f:
            index = json.load(f)
        entries = set(os.listdir(directory))
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict) or not isinstance(index.get("chroms"), dict):
        return False
    # earlier versions wrote index.json without the marker, with exactly these two keys
    if index.get("format") != GENOME_FORMAT and set(index) != {"source", "chroms"}:
        return False
    return entries <= {"index.json"} | {name + ".u8" for name in index["chroms"]}


def check_replaceable(directory):
    """DataError unless directory is absent, empty, or a prepared genome (see is_prepared_genome)."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise DataError(f"{directory}: exists and is not a folder; choose another folder")
    if os.path.isdir(directory) and os.listdir(directory) and not is_prepared_genome(directory):
        raise DataError(f"{directory}: folder is not empty and is not a genome prepared by tinyhyena; "
                        "nothing was changed (choose another folder, or empty it)")


def fasta_lines(path):
    """(header, line, line number) for each line of a FASTA, plain or gzipped, the one FASTA parser: at a record's
    header line, its text after '>' (the name, then any description) and None; after it, the record's header
    and the line's bases (bytes, stripped). Blank lines are skipped. DataError naming the file and line on bad
    input: a first line that is not a '>' header, a record without a name, or a record of which more than
    MAX_OTHER is not nucleotide codes (check_nucleotides)."""
    try:
        with open_maybe_gzipped(path) as f:
            header, seen, start, other, total = None, 0, 0, 0, 0
            for lineno, line in enumerate(f, 1):
                if line.startswith(b">"):
                    if header is not None:
                        check_nucleotides(path, f"{start}: record {record_name(header)!r}", b"", (other, total))
                    header = line[1:].strip().decode("utf-8", "replace")
                    if not header:
                        raise DataError(f"{path}:{lineno}: record without a name")
                    seen, start, other, total = seen + 1, lineno, 0, 0
                    yield header, None, lineno
                    continue
                bases = line.strip()
                if not bases:
                    continue
                if header is None:
                    raise DataError(f"{path}:{lineno}: not a FASTA file: its first line should be a '>' header, "
                                    f"not {line.strip()[:20].decode('utf-8', 'replace')!r}")
                other, total = other + len(bases.translate(None, NUCLEOTIDE_CODES)), total + len(bases)
                yield header, bases, lineno
            if not seen:
                raise DataError(f"{path}: not a FASTA file (no '>' record)")
            check_nucleotides(path, f"{start}: record {record_name(header)!r}", b"", (other, total))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None


def record_name(header):
    """A record's name: its header's first word (">chr1 AC:CM000663.2 ..." -> "chr1")."""
    return header.split()[0]


def read_fasta(path):
    """[(name, uint8 token ids)] of every record, in file order. For files that fit in memory; prepare()
    streams a genome of any size to disk instead."""
    records = []
    for header, bases, _ in fasta_lines(path):
        if bases is None:
            records.append((record_name(header), []))
        else:
            records[-1][1].append(BYTE_TO_ID[np.frombuffer(bases, dtype=np.uint8)])
    return [(name, np.concatenate(parts) if parts else np.zeros(0, np.uint8)) for name, parts in records]


def prepare(fasta, out=None, quiet=False):
    """FASTA -> DIR/<chrom>.u8 (token ids) + DIR/index.json. Reused while the FASTA is unchanged. Returns DIR.
    DIR must be absent, empty, or an earlier prepared genome: a folder holding anything else is refused, never
    replaced. The work happens in a fresh temporary folder beside DIR that is renamed into place at the end,
    so a failure leaves no cache that looks finished."""
    out = out or fasta + ".tinyhyena"
    index_path = os.path.join(out, "index.json")
    stamp = _source_stamp(fasta) if os.path.isfile(fasta) else None
    if stamp and is_prepared_genome(out):
        with open(index_path) as f:
            if json.load(f).get("source") == stamp:
                return out
    check_replaceable(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp", dir=parent)
    chroms, current, written = {}, None, 0
    try:
        for header, bases, lineno in fasta_lines(fasta):
            if bases is None:  # a new record
                name = record_name(header)
                if name in chroms or "/" in name or name.startswith("."):
                    raise DataError(f"{fasta}:{lineno}: bad or repeated record name {name!r}")
                if current:
                    current.close()
                chroms[name] = 0
                current = open(os.path.join(tmp, name + ".u8"), "wb")
                continue
            ids = BYTE_TO_ID[np.frombuffer(bases, dtype=np.uint8)]
            current.write(ids.tobytes())
            chroms[name] += len(ids)
            written += len(ids)
            if not quiet and lineno % 2_000_000 == 0:
                print(f"prepare: {written / 1e6:.0f} Mbp", file=sys.stderr)
        current.close()
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"format": GENOME_FORMAT, "source": stamp, "chroms": chroms}, f)
        check_replaceable(out)  # again: the folder may have changed while we worked
        if os.path.isdir(out):  # an earlier prepared genome: set it aside, move the new one in, then delete
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old", dir=parent)
            os.replace(out, os.path.join(old, "genome"))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except UnicodeDecodeError as e:
        raise DataError(f"{fasta}: not a FASTA file ({e})") from None
    finally:
        if current:
            current.close()
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made by mkdtemp above
    return out


class Genome:
    """Prepared token arrays. Memmaps are opened lazily, in each process that reads, so the object can be
    sent to DataLoader workers."""

    def __init__(self, directory):
        index_path = os.path.join(directory, "index.json")
        if not os.path.isfile(index_path):
            raise DataError(f"{directory}: not a prepared genome (no index.json); run `python data.py prepare FASTA`")
        with open(index_path) as f:
            self.chroms = json.load(f)["chroms"]  # name -> length
        self.directory = directory
        self._arrays = {}

    def array(self, chrom):
        if chrom not in self._arrays:
            path = os.path.join(self.directory, chrom + ".u8")
            self._arrays[chrom] = np.memmap(path, dtype=np.uint8, mode="r") if self.chroms[chrom] else np.zeros(0, np.uint8)
        return self._arrays[chrom]

    def fetch(self, chrom, start, end):
        """ids of chrom[start:end]; positions outside the chromosome are the pad id."""
        out = np.full(end - start, PAD_ID, dtype=np.uint8)
        lo, hi = max(start, 0), min(end, self.chroms[chrom])
        if lo < hi:
            out[lo - start:hi - start] = self.array(chrom)[lo:hi]
        return out


# ---------------------------------------------------------------------------------------------------------
# Windows.

_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[[7, 8, 9, 10]] = [10, 9, 8, 7]  # A<->T, C<->G; N and specials stay


def reverse_complement(ids):
    return _COMPLEMENT[np.asarray(ids, dtype=np.uint8)][::-1]


SPLITS = ("train", "valid", "test")
MITOCHONDRION = ("M", "MT")  # UCSC's chrM, Ensembl's MT


def find_chrom(genome, name):
    """The genome's name for a chromosome named elsewhere (a BED, a VCF), with or without the "chr" prefix,
    and the mitochondrion as M or MT; None if absent."""
    bare = name[3:] if name.startswith("chr") else name
    for base in (bare,) + (MITOCHONDRION if bare in MITOCHONDRION else ()):
        for candidate in (base, "chr" + base):
            if candidate in genome.chroms:
                return candidate
    return None


def bed_intervals(path, genome):
    """[(line number, chrom, start, end, columns)] of a BED (3 to 12 tab-separated columns; headers, track
    and browser lines skipped), chromosomes matched to the genome's names (find_chrom). An interval that is
    malformed or lies outside its chromosome is a DataError naming the line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    with open_maybe_gzipped(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            cols = line.split("\t")
            if len(cols) < 3:
                raise DataError(f"{path}:{lineno}: expected at least 3 tab-separated columns "
                                f"(chrom, start, end), got {len(cols)}")
            name, start, end = cols[0], cols[1], cols[2]
            if not (start.isdigit() and end.isdigit()) or int(start) >= int(end):
                raise DataError(f"{path}:{lineno}: start and end must be integers with start < end, "
                                f"got {start!r} {end!r}")
            chrom = find_chrom(genome, name)
            if chrom is None:
                raise DataError(f"{path}:{lineno}: chromosome {name!r} is not in the FASTA")
            if int(end) > genome.chroms[chrom]:
                raise DataError(f"{path}:{lineno}: interval {name}:{start}-{end} lies outside the chromosome "
                                f"(length {genome.chroms[chrom]})")
            rows.append((lineno, chrom, int(start), int(end), cols))
    if not rows:
        raise DataError(f"{path}: no intervals")
    return rows


def read_bed(path, genome):
    """[(chrom, start, end, split)] from a BED3 to BED12 for training: the 4th column is a split (Basenji's
    layout) when every row holds train, valid or test there, and otherwise the name (ignored); without a
    split column, split is None."""
    rows = bed_intervals(path, genome)
    fourth = [cols[3] if len(cols) > 3 else None for *_, cols in rows]
    if all(value in SPLITS for value in fourth):
        return [(chrom, start, end, value) for (_, chrom, start, end, _), value in zip(rows, fourth)]
    if any(value in SPLITS for value in fourth):  # a split column with a typo, most likely
        lineno, value = next((row[0], value) for row, value in zip(rows, fourth) if value not in SPLITS)
        print(f"warning: {path}:{lineno}: column 4 is {value!r}, not train, valid or test, so column 4 is read "
              "as names and the split is by chromosome", file=sys.stderr)
    return [(chrom, start, end, None) for _, chrom, start, end, _ in rows]


def read_regions(bed, genome):
    """[(id, token ids)] of every BED interval cut from the genome, as scoring, prediction and embedding read
    them: the id is the name column (BED4 and wider, when not ".") or chrom:start-end, and an interval on
    the "-" strand (6th column) is read as its reverse complement. A BED12's blocks are not spliced: the
    whole interval is read."""
    out = []
    for _, chrom, start, end, cols in bed_intervals(bed, genome):
        name = cols[3] if len(cols) > 3 and cols[3] not in ("", ".") else f"{cols[0]}:{start}-{end}"
        ids = genome.fetch(chrom, start, end)
        out.append((name, reverse_complement(ids) if len(cols) > 5 and cols[5] == "-" else ids))
    return out


def read_inputs(args, read_input):
    """[(id, token ids)]: the sequences of a command's --input FILE, read by read_input, or its --bed regions
    cut from --fasta (cli.add_sequence_inputs)."""
    if args.bed is not None:
        return read_regions(args.bed, load_genome(args.fasta))
    return read_input(args.input)


def load_genome(path):
    """A prepared genome folder as it is; a FASTA prepared once into FASTA.tinyhyena (as train.py does)."""
    if os.path.isdir(path) and is_prepared_genome(path):
        return Genome(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, but not a genome prepared by tinyhyena (pass the FASTA file)")
    return Genome(prepare(path, quiet=True))


def held_out_split(names, split):
    """Without a split column: the last chromosome (in file order) is the test set, the one before it the
    validation set, the rest training. With fewer than 3 chromosomes, None: split by position instead."""
    if len(names) < 3:
        return None
    return {"valid": names[-2:-1], "test": names[-1:]}.get(split, names[:-2])


class Windows(torch.utils.data.Dataset):
    """Next-token pairs (input (seq_len,), target (seq_len,)) of int64, from a prepared genome.

    With a BED, one window per interval of the split, of seq_len+1 bases grown (or shrunk) around the
    interval's centre, clipped at chromosome ends and padded with the pad id (targets that are padding are
    ignored by the loss). Without a BED, consecutive windows of the split's chromosomes (see
    `held_out_split`), skipping windows that are mostly N (assembly gaps)."""

    def __init__(self, genome, seq_len, split="train", bed=None, rc_aug=False):
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.genome, self.seq_len, self.rc_aug = genome, seq_len, rc_aug
        names = list(genome.chroms)
        held_out = held_out_split(names, split)
        span = seq_len + 1
        if bed is not None:
            rows = read_bed(bed, genome) if isinstance(bed, str) else bed
            self.starts = [(c, (s + e) // 2 - span // 2) for c, s, e, sp in rows
                           if (sp == split if sp is not None else held_out is None or c in held_out)]
        else:
            self.starts = []
            for chrom in (held_out if held_out is not None else names):
                length = genome.chroms[chrom]
                lo, hi = 0, length
                if held_out is None:  # by position: 90% train, then 5% valid, 5% test
                    cut = {"train": (0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}[split]
                    lo, hi = int(cut[0] * length), int(cut[1] * length)
                n = (hi - lo) // span
                if n == 0:
                    continue
                mostly_n = (genome.array(chrom)[lo:lo + n * span].reshape(n, span) == N_ID).mean(1) > 0.5
                self.starts += [(chrom, lo + i * span) for i in np.flatnonzero(~mostly_n)]
        if not self.starts:
            raise DataError(f"no {split} windows of length {seq_len} in the data")

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):  # with rc_aug, reverse-complemented half the time, by torch's global RNG
        return self.item(i, self.rc_aug and bool(torch.rand(()) < 0.5))

    def item(self, i, flip):
        """Window i, reverse-complemented if flip (trainer.batches draws flip once per epoch)."""
        chrom, start = self.starts[i]
        ids = self.genome.fetch(chrom, start, start + self.seq_len + 1)
        ids = torch.from_numpy((reverse_complement(ids) if flip else ids).astype(np.int64))
        return ids[:-1], ids[1:]


def prepared_hg38(directory):
    return os.path.join(directory, "tokens")


# Everything `data.py hg38` writes into its folder: a folder holding anything else is not used.
HG38_FILES = {"hg38.ml.fa.gz", "hg38.ml.fa.gz.part", "sequences_human.bed", "sequences_human.bed.part", "tokens"}


def setup_hg38(directory, fasta_url=HG38_FASTA_URL, bed_url=HG38_BED_URL, quiet=False):
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise DataError(f"{directory}: exists and is not a folder; choose another --dir")
    if os.path.isdir(directory) and not set(os.listdir(directory)) <= HG38_FILES:
        raise DataError(f"{directory}: folder holds files that `data.py hg38` did not write; nothing was changed "
                        "(choose another --dir, or empty it)")
    check_replaceable(prepared_hg38(directory))
    os.makedirs(directory, exist_ok=True)
    fasta = download(fasta_url, os.path.join(directory, "hg38.ml.fa.gz"), quiet)
    bed = download(bed_url, os.path.join(directory, "sequences_human.bed"), quiet)
    verify_gzip(fasta)
    genome = Genome(prepare(fasta, prepared_hg38(directory), quiet))
    rows = read_bed(bed, genome)
    if any(split is None for *_, split in rows):
        raise DataError(f"{bed}: expected Basenji's 4 columns (chrom, start, end, split)")
    return genome, rows


def main(argv=None):
    p = ArgumentParser(description="Download and prepare genomes for train.py.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hg38", help="download hg38 and the paper's intervals, verify and prepare them")
    h.add_argument("--dir", default="data/hg38")
    h.add_argument("--fasta_url", default=HG38_FASTA_URL)
    h.add_argument("--bed_url", default=HG38_BED_URL)
    q = sub.add_parser("prepare", help="prepare a FASTA (plain or gzipped) into token arrays")
    q.add_argument("fasta", type=existing_file)
    q.add_argument("--out", default=None, help="output folder (default: FASTA.tinyhyena)")
    args = p.parse_args(argv)
    if args.command == "hg38":
        genome, rows = setup_hg38(args.dir, args.fasta_url, args.bed_url)
        print(f"hg38 ready in {args.dir}: {len(genome.chroms)} chromosomes, {len(rows)} intervals")
    else:
        genome = Genome(prepare(args.fasta, args.out))
        print(f"prepared {len(genome.chroms)} records, {sum(genome.chroms.values())} bp in {genome.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
