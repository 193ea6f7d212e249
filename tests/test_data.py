"""data.py: FASTA and BED into training windows, the prepared-genome cache, and the hg38 download."""

import gzip
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import tasks
import tinyhyena as th
import trainer
from helpers import FIXTURE, assert_one_line_error, run_script


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ACGTNacgtn", max_size=200))
def test_reverse_complement_twice_is_identity(seq):
    ids = th.tokenize(seq).astype(np.uint8)
    assert np.array_equal(data.reverse_complement(data.reverse_complement(ids)), ids)
    by_definition = seq.upper()[::-1].translate(str.maketrans("ACGTN", "TGCAN"))  # complement, read backwards
    assert th.detokenize(data.reverse_complement(ids)) == by_definition
    assert th.detokenize(data.reverse_complement(th.tokenize("AACGTN"))) == "NACGTT"


def test_prepare_and_fetch(genome, tmp_path):
    assert genome.chroms == {"chr1": 12, "chr2": 120, "chr3": 8}
    assert th.detokenize(genome.fetch("chr1", -2, 14)) == "[PAD]" * 2 + "ACGTACGTNNAC" + "[PAD]" * 2
    # reused while the source is unchanged: the cache is not rewritten
    stamp = os.stat(Path(genome.directory) / "index.json").st_mtime_ns
    assert data.prepare(str(tmp_path / "g.fa.gz")) == genome.directory
    assert os.stat(Path(genome.directory) / "index.json").st_mtime_ns == stamp


def test_windows_from_bed_and_dataloader_workers(genome, tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr2\t40\t60\ttrain\nchr1\t0\t4\ttrain\nchr3\t0\t8\tvalid\n")
    ds = data.Windows(genome, 16, "train", str(bed))
    assert len(ds) == 2
    x, y = ds[0]
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert th.detokenize(torch.cat([x, y[-1:]])) == ("ACGT" * 30)[50 - 8:50 + 9]  # centred on the interval
    x, y = ds[1]  # clipped at the chromosome's start, padded on the left
    assert th.detokenize(x[:6]) == "[PAD]" * 6 and th.detokenize(x[6:]) == "ACGTACGTNN"
    assert len(data.Windows(genome, 16, "valid", str(bed))) == 1
    # worker processes (train.py --workers) read the same windows, in the same order, as this process does
    windows = data.Windows(genome, 5, "train")  # chr1's 12 bases: windows at several starts
    in_process, in_workers = trainer.batches(windows, 2, 7, 0, 1, 0, 0), trainer.batches(windows, 2, 7, 0, 1, 0, 2)
    for _ in range(2 * len(windows) // 2):  # two epochs
        (x0, y0), (x2, y2) = next(in_process), next(in_workers)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(7 * 100003))[:2].tolist()
    (xb, _), = [next(trainer.batches(windows, 2, 7, 0, 1, 0, 2))]
    assert torch.equal(xb, torch.stack([windows[i][0] for i in order]))  # the epoch's first two, by the seed


def test_windows_without_bed_hold_out_chromosomes(genome):
    assert {c for c, _ in data.Windows(genome, 7, "train").starts} == {"chr1"}
    assert {c for c, _ in data.Windows(genome, 7, "valid").starts} == {"chr2"}
    assert {c for c, _ in data.Windows(genome, 7, "test").starts} == {"chr3"}


def test_bed6_and_chromosome_names_without_chr(genome, tmp_path):
    """A standard BED6 (name, score, strand) is read past its third column, and chromosomes match with or
    without "chr"; Basenji's 4th column is a split only where it holds train/valid/test."""
    (tmp_path / "peaks.bed").write_text("track name=peaks\n2\t40\t60\tpeak1\t500\t-\nchr1\t0\t4\tpeak2\t0\t+\n")
    assert data.read_bed(str(tmp_path / "peaks.bed"), genome) == [("chr2", 40, 60, None), ("chr1", 0, 4, None)]
    (tmp_path / "named.bed").write_text("chr2\t40\t60\tpeak1\n")
    assert data.read_bed(str(tmp_path / "named.bed"), genome) == [("chr2", 40, 60, None)]
    (tmp_path / "split.bed").write_text("chr2\t40\t60\ttrain\n3\t0\t8\tvalid\n")
    assert data.read_bed(str(tmp_path / "split.bed"), genome) == [("chr2", 40, 60, "train"), ("chr3", 0, 8, "valid")]
    peaks = str(tmp_path / "peaks.bed")  # no split column: by held-out chromosome (chr2 valid, chr3 test)
    assert [c for c, _ in data.Windows(genome, 16, "train", peaks).starts] == ["chr1"]
    assert [c for c, _ in data.Windows(genome, 16, "valid", peaks).starts] == ["chr2"]


def test_data_errors(genome, tmp_path, capsys):
    def bed(text):
        (tmp_path / "b.bed").write_text(text)
        return str(tmp_path / "b.bed")
    with pytest.raises(data.DataError, match=r"b.bed:2: expected at least 3 tab-separated columns"):
        data.read_bed(bed("chr1\t0\t4\nchr1 0 4\n"), genome)
    # a 4th column is a split only where every row holds one: otherwise names, with a warning for a typo
    assert data.read_bed(bed("chr1\t0\t4\ttrain\nchr1\t4\t8\ttrian\n"), genome) == [("chr1", 0, 4, None), ("chr1", 4, 8, None)]
    assert "b.bed:2: column 4 is 'trian'" in capsys.readouterr().err
    with pytest.raises(data.DataError, match=r"b.bed:1: start and end must be integers"):
        data.read_bed(bed("chr1\tx\t4\n"), genome)
    with pytest.raises(data.DataError, match=r"b.bed:1: chromosome 'chrX' is not in the FASTA"):
        data.read_bed(bed("chrX\t0\t4\n"), genome)
    with pytest.raises(data.DataError, match=r"b.bed:1: interval chr1:0-99 lies outside the chromosome"):
        data.read_bed(bed("chr1\t0\t99\n"), genome)
    with pytest.raises(data.DataError, match="seq_len must be a positive integer"):
        data.Windows(genome, 0)


def test_prepare_cli_errors(tmp_path):
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "missing.fa"), "missing.fa: file not found")
    (tmp_path / "notfasta.txt").write_text("hello\nworld\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "notfasta.txt"), "not a FASTA file")
    raw = gzip.compress((">chr1\n" + "ACGT" * 50000 + "\n").encode())
    (tmp_path / "cut.fa.gz").write_bytes(raw[:len(raw) // 2])
    result = run_script("data.py", "prepare", tmp_path / "cut.fa.gz")
    assert_one_line_error(result, "cut.fa.gz: truncated or corrupt gzip")
    assert not (tmp_path / "cut.fa.gz.tinyhyena").exists()  # no cache that looks finished


def test_prepare_never_replaces_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    (tmp_path / "small.fa").write_text(">chr1\nACGTACGT\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa", "--out", precious),
                          str(precious), "not a genome prepared by tinyhyena")
    assert sorted(os.listdir(precious)) == ["thesis.txt"] and (precious / "thesis.txt").read_text() == "my thesis"
    # an earlier prepared genome is replaced when the FASTA changes; no temporary folders are left behind
    out = tmp_path / "genome"
    assert run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out).returncode == 0
    (tmp_path / "small.fa").write_text(">chrA\nGGGG\n")
    assert run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out).returncode == 0
    assert data.Genome(str(out)).chroms == {"chrA": 4} and sorted(os.listdir(out)) == ["chrA.u8", "index.json"]
    assert sorted(os.listdir(tmp_path)) == ["genome", "precious", "small.fa"]
    # ... but not once a user's file sits in it; the default folder FASTA.tinyhyena follows the same rule
    (out / "notes.txt").write_text("mine")
    (tmp_path / "small.fa").write_text(">chrB\nTTTT\n")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa", "--out", out), str(out))
    assert (out / "notes.txt").read_text() == "mine" and data.Genome(str(out)).chroms == {"chrA": 4}
    (tmp_path / "small.fa.tinyhyena").mkdir()
    (tmp_path / "small.fa.tinyhyena" / "x").write_text("mine")
    assert_one_line_error(run_script("data.py", "prepare", tmp_path / "small.fa"), "small.fa.tinyhyena")
    # hg38 --dir: a folder holding anything that `data.py hg38` does not write is not used
    assert_one_line_error(run_script("data.py", "hg38", "--dir", precious, "--fasta_url", "http://127.0.0.1:9/x"),
                          str(precious), "did not write")
    assert sorted(os.listdir(precious)) == ["thesis.txt"]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first request for a file in `cut` is cut off halfway."""
    files, cut = {}, set()

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.cut:
            self.cut.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # cut off midway
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_hg38_download_resumes_and_prepares(tmp_path):
    fasta = gzip.compress(("".join(f">chr{i}\n" + "ACGTN" * 4000 + "\n" for i in range(3))).encode())
    bed = "chr0\t0\t100\ttrain\nchr1\t0\t100\tvalid\nchr2\t5\t105\ttest\n".encode()
    _RangeHandler.files = {"/hg38.ml.fa.gz": fasta, "/sequences_human.bed": bed}
    _RangeHandler.cut = {"/hg38.ml.fa.gz"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        args = ["data.py", "hg38", "--dir", tmp_path / "hg38", "--fasta_url", url + "/hg38.ml.fa.gz",
                "--bed_url", url + "/sequences_human.bed"]
        first = run_script(*args)
        assert_one_line_error(first, "download interrupted", "run the same command again to resume")
        assert 0 < os.path.getsize(tmp_path / "hg38" / "hg38.ml.fa.gz.part") < len(fasta)
        second = run_script(*args)
        assert second.returncode == 0, second.stderr
        assert (tmp_path / "hg38" / "hg38.ml.fa.gz").read_bytes() == fasta
        assert "3 chromosomes, 3 intervals" in second.stdout
    finally:
        server.shutdown()


def test_reverse_complement_augmentation_flips_about_half_the_windows(genome):
    """--rc_aug (train.py's Windows, finetune.py's Examples): each item is its sequence or, about half the time,
    the reverse complement of it, with targets still the next base of what the model reads."""
    plain, augmented = data.Windows(genome, 20, "valid"), data.Windows(genome, 20, "valid", rc_aug=True)
    torch.manual_seed(0)
    flipped = 0
    for draw in range(400):
        i = draw % len(plain)
        (x, y), (xa, ya) = plain[i], augmented[i]
        assert torch.equal(xa[1:], ya[:-1])  # still next-token pairs
        whole, seen = torch.cat([x, y[-1:]]).numpy(), torch.cat([xa, ya[-1:]]).numpy()
        is_flipped = np.array_equal(seen, data.reverse_complement(whole.astype(np.uint8)).astype(np.int64))
        assert is_flipped or np.array_equal(seen, whole)
        flipped += is_flipped
    assert 160 <= flipped <= 240, flipped  # binomial(400, 0.5): 200 +- 40 is over 4 sigma
    seqs = [th.tokenize("AACGTTTGCA").astype(np.uint8)]
    examples = tasks.Examples(seqs, [1], rc_aug=True)
    outcomes = [th.detokenize(examples[0][0]) for _ in range(400)]
    assert set(outcomes) == {"AACGTTTGCA", "TGCAAACGTT"} and 160 <= outcomes.count("TGCAAACGTT") <= 240


# ---------------------------------------------------------------------------------------------------------
# Every reader refuses what is not a sequence file: in one line naming the file, before any work, writing nothing.

def write_bad(kind, folder):
    """A file of the given kind of wrongness; returns its path."""
    rng = np.random.default_rng(0)
    path = folder / {"table without sequence": "x.csv", "corrupt gzip": "x.fa.gz"}.get(kind, "x.fa")
    content = {
        "random bytes": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),  # what the issue gave embed
        "binary": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}" + bytes(200),  # a .npy
        "mostly binary": bytes(range(128, 256)) * 8 + b">x\nACGT\n",  # no NUL, but not text
        "corrupt gzip": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "not FASTA": b"chrom\tstart\tend\nchr1\t10\t20\n",  # a BED, given where a FASTA is needed
        "protein": b">sp|P69905|HBA_HUMAN\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHV\n",
        "table without sequence": b"name,label\nx,1\ny,0\n",
        "text": b"hello this is a letter\nnot DNA at all\n",
    }[kind]
    path.write_bytes(content)
    return path


def command_reading(name, bad, tmp_path):
    """The command line `name` run on the file `bad` (and whatever else it needs, written beside it)."""
    out = tmp_path / "out"
    if name == "score variants":
        (tmp_path / "v.vcf").write_text("#CHROM\tPOS\tID\tREF\tALT\nchr1\t2\t.\tA\tC\n")
    return {
        "train": ["train.py", "--fasta", bad, "--preset", "tiny", "--seq_len", 64, "--max_steps", 1, "--out", out],
        "score sequences": ["score.py", "sequences", "--checkpoint", FIXTURE, "--input", bad, "--out", tmp_path / "s.tsv"],
        "score variants": ["score.py", "variants", "--checkpoint", FIXTURE, "--fasta", bad, "--vcf", tmp_path / "v.vcf",
                           "--out", tmp_path / "llr.tsv"],
        "generate": ["generate.py", "--checkpoint", FIXTURE, "--prompt_fasta", bad, "--length", 5, "--out", tmp_path / "g.fa"],
        "embed": ["finetune.py", "embed", "--checkpoint", FIXTURE, "--input", bad, "--out", tmp_path / "e.npy"],
        "predict": ["finetune.py", "predict", "--checkpoint", FIXTURE, "--input", bad, "--out", tmp_path / "p.tsv"],
        "fit": ["finetune.py", "fit", "--checkpoint", FIXTURE, "--data", bad, "--max_steps", 1, "--out", out],
    }[name]


BINARY = {"random bytes": "binary data", "binary": "binary data", "mostly binary": "binary data",
          "corrupt gzip": "gzip file that does not decompress"}
FASTA_READERS = {**BINARY, "not FASTA": "not a FASTA file", "protein": "not nucleotide codes"}
SEQUENCE_READERS = {**BINARY, "protein": "not nucleotide codes", "text": "not nucleotide codes",
                    "table without sequence": "without a 'sequence' or 'seq' column"}
CASES = [(command, kind, message) for command, kinds in (
    ("train", FASTA_READERS), ("score sequences", FASTA_READERS), ("score variants", FASTA_READERS),
    ("generate", FASTA_READERS), ("embed", SEQUENCE_READERS), ("predict", SEQUENCE_READERS),
    ("fit", {**BINARY, "table without sequence": "no 'sequence' column", "protein": "not nucleotide codes"}),
) for kind, message in kinds.items()]


@pytest.mark.parametrize("command, kind, message", CASES, ids=[f"{c}-{k}" for c, k, _ in CASES])
def test_every_reader_refuses_what_is_not_a_sequence_file(command, kind, message, tmp_path):
    bad = write_bad(kind, tmp_path)
    argv = command_reading(command, bad, tmp_path)
    before = set(tmp_path.rglob("*"))
    result = run_script(*argv)
    assert result.returncode == 1
    assert_one_line_error(result, str(bad), message)
    assert set(tmp_path.rglob("*")) == before  # no output, no empty out/, no prepared genome, no temporary file


def test_lowercase_n_and_iupac_codes_stay_accepted(tmp_path):
    path = tmp_path / "ok.fa"
    path.write_text(">a soft-masked\nacgtnNNNNRYSWKMBDHV\nACGT-acgt\n>b\n" + "ACGT" * 10 + "\n")
    assert [(name, len(ids)) for name, ids in data.read_fasta(str(path))] == [("a", 28), ("b", 40)]
    (tmp_path / "lines.txt").write_text("acgtRYacgt\nACGTN\n")
    assert len(tasks.read_sequences(str(tmp_path / "lines.txt"))) == 2
    # at most a tenth of a record may be other characters (a stray digit or space); one more is refused
    (tmp_path / "edge.fa").write_text(">e\n" + "A" * 90 + "1" * 10 + "\n>f\n" + "A" * 89 + "1" * 11 + "\n")
    with pytest.raises(data.DataError, match=r"edge.fa:3: record 'f': 11 of 100 characters"):
        data.read_fasta(str(tmp_path / "edge.fa"))
