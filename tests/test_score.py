"""score.py: likelihoods of sequences and regions, windowed scoring, and variant effects."""

import gzip

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classifier
import data
import finetune
import score
import tinyhyena as th
from helpers import FIXTURE, assert_one_line_error, markov_table, random_model, run_script, spearman


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(2, 300), st.data())
def test_scoring_windows_predict_every_base_once(length, window, data):
    context = data.draw(st.integers(0, window - 1))
    plan = score.scoring_windows(length, window, context)
    scored = [t for i, (start, first) in enumerate(plan) for t in range(first, min(start + window, length))]
    assert scored == list(range(1, length))  # each base once, in order; base 0 has no prediction
    for start, first in plan:
        assert 0 <= start < first and start + window <= max(length, window)
        assert first - start >= min(max(context, 1), first)  # at least `context` bases before, as far as exist


def test_windowed_scoring_equals_a_single_pass_where_the_window_covers_the_record():
    model = random_model(th.HyenaConfig(d_model=16, n_layer=2, d_inner=32, filter_order=8, l_max=700), 1)
    ids = np.random.default_rng(0).integers(7, 11, 700)
    with torch.no_grad():
        single = th.log_likelihood(model, torch.from_numpy(ids)[None])[0]
    logits = th.reference_forward(model, ids[None])[0]  # the twin's: no code shared with record_log_probs
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    by_twin = log_probs[np.arange(len(ids) - 1), ids[1:]]  # log P(base t | bases before it), t = 1 .. 699
    assert np.allclose(score.record_log_probs(model, ids).numpy(), by_twin, atol=1e-4)  # window = l_max: one pass
    assert np.allclose(score.record_log_probs(model, ids[:450]).numpy(), by_twin[:449], atol=1e-4)
    windowed = score.record_log_probs(model, ids, window=256, context=100, batch_size=3)
    for start, first in score.scoring_windows(len(ids), 256, 100):  # each window's bases, as that window alone
        stop = min(start + 256, len(ids))
        alone = th.log_likelihood(model, torch.from_numpy(ids[start:stop])[None])[0]
        assert torch.allclose(windowed[first - 1:stop - 1], alone[first - start - 1:], atol=1e-5)
    # right padding changes nothing before it (the model is causal)
    padded, lengths = score.pad_right([ids[:300], ids[:500]])
    assert torch.allclose(th.log_likelihood(model, padded, lengths)[0, :299], single[:299], atol=1e-4)
    assert (th.log_likelihood(model, padded, lengths)[0, 299:] == 0).all()


@pytest.mark.slow
def test_regions_of_a_genome_as_input(tmp_path, fixture_classifier):
    """score.py sequences and finetune.py predict read --bed regions of --fasta as the sequences cut out by
    hand: BED3 to BED6, the name or chrom:start-end as the id, a - strand reverse-complemented, chromosome
    names with or without chr and the mitochondrion as M or MT."""
    rng = np.random.default_rng(5)
    chr1, chrM = ("".join(rng.choice(list("ACGT"), n)) for n in (300, 120))
    (tmp_path / "g.fa").write_text(f">chr1\n{chr1}\n>chrM\n{chrM}\n")
    (tmp_path / "r.bed").write_text("track name=peaks\n1\t10\t80\tpeakA\t0\t+\nchr1\t100\t170\tpeakB\t0\t-\n"
                                    "MT\t5\t60\n")
    complement = str.maketrans("ACGT", "TGCA")
    by_hand = {"peakA": chr1[10:80], "peakB": chr1[100:170].translate(complement)[::-1], "MT:5-60": chrM[5:60]}
    result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "s.tsv", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(by_hand)
    model = th.from_pretrained(FIXTURE)
    for row, seq in zip(rows, by_hand.values()):
        logp = score.record_log_probs(model, th.tokenize(seq), model.cfg.l_max, model.cfg.l_max // 2, 32).numpy()
        assert int(row[1]) == len(seq) and abs(float(row[2]) + logp.mean()) < 1e-5
    result = run_script("finetune.py", "predict", "--checkpoint", fixture_classifier, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "p.tsv")
    assert result.returncode == 0, result.stderr[-2000:]
    clf = classifier.load_classifier(fixture_classifier)
    expected = classifier.readout(clf.task, classifier.predict_logits(clf, [th.tokenize(s) for s in by_hand.values()], 8,
                                                                    torch.device("cpu")))
    rows = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(by_hand)
    assert np.allclose([[float(x) for x in r[2:]] for r in rows], expected.numpy(), atol=1e-5)
    result = run_script("finetune.py", "embed", "--checkpoint", FIXTURE, "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "r.bed", "--out", tmp_path / "e.npy", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.allclose(np.load(tmp_path / "e.npy"), th.embed(model, list(by_hand.values())), atol=1e-5)


@pytest.mark.slow
def test_score_sequence_by_hand_on_the_published_fixture(tmp_path):
    seq = "ACGTTGACCATGGCAATTGCCGATAGGCTA" * 5
    (tmp_path / "in.fa").write_text(f">s1 a record\n{seq[:70]}\n{seq[70:]}\n>s2\nA\n")
    result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--input", tmp_path / "in.fa",
                        "--out", tmp_path / "s.tsv", "--per_base", tmp_path / "s.bedGraph", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    model = th.from_pretrained(FIXTURE)
    ids = torch.from_numpy(th.tokenize(seq))[None]
    with torch.no_grad():
        logits = model(ids)
    by_hand = [float(torch.log_softmax(logits[0, t - 1], -1)[ids[0, t]]) for t in range(1, len(seq))]
    header, s1, s2 = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()]
    assert header == ["id", "length", "nats_per_base", "bits_per_base", "perplexity"]
    nats = -np.mean(by_hand)
    assert s1[:2] == ["s1", str(len(seq))] and abs(float(s1[2]) - nats) < 1e-4
    assert abs(float(s1[3]) - nats / np.log(2)) < 1e-4 and abs(float(s1[4]) - np.exp(nats)) < 1e-3 * np.exp(nats)
    assert s2 == ["s2", "1", "NA", "NA", "NA"]  # one base: nothing to predict
    bedgraph = [line.split("\t") for line in (tmp_path / "s.bedGraph").read_text().splitlines()]
    assert [(c, int(a), int(b)) for c, a, b, _ in bedgraph] == [("s1", t, t + 1) for t in range(1, len(seq))]
    assert np.allclose([float(v) for *_, v in bedgraph], by_hand, atol=1e-5)
    # --rc average: the reverse complement scored too, by hand; each strand's nats beside their mean, and per
    # base the mean of the strands that predict it (base 0 only the reverse strand, the last only the forward)
    rc = torch.from_numpy(th.tokenize(seq[::-1].translate(str.maketrans("ACGT", "TGCA"))))[None]
    with torch.no_grad():
        logits = model(rc)
    reverse = [float(torch.log_softmax(logits[0, t - 1], -1)[rc[0, t]]) for t in range(1, len(seq))][::-1]
    result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--input", tmp_path / "in.fa", "--rc",
                        "average", "--out", tmp_path / "rc.tsv", "--per_base", tmp_path / "rc.bedGraph", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    header, s1, s2 = [line.split("\t") for line in (tmp_path / "rc.tsv").read_text().splitlines()]
    assert header[-2:] == ["nats_forward", "nats_reverse"] and s2[2:] == ["NA"] * 5
    strands = [nats, -np.mean(reverse)]
    np.testing.assert_allclose([float(x) for x in s1[5:]], strands, atol=1e-5)
    assert abs(float(s1[2]) - np.mean(strands)) < 1e-5 and abs(strands[0] - strands[1]) > 1e-3
    per_base = np.array([reverse[0]] + [(f + r) / 2 for f, r in zip(by_hand[:-1], reverse[1:])] + [by_hand[-1]])
    bedgraph = [line.split("\t") for line in (tmp_path / "rc.bedGraph").read_text().splitlines()]
    assert [(c, int(a)) for c, a, *_ in bedgraph] == [("s1", t) for t in range(len(seq))]
    np.testing.assert_allclose([float(v) for *_, v in bedgraph], per_base, atol=1e-5)


VCF = """##fileformat=VCFv4.2
##contig=<ID=chr1>
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO
chr1\t100\trs1\tA\tC,G\t.\tPASS\t.
1\t200\trs2\tC\tCTT\t.\t.\t.
chr1\t300\t.\tGAC\tG\t.\t.\t.
chr1\t50\tbad\tT\tA\t.\t.\t.
chr2\t10\t.\tA\tT\t.\t.\t.
chr1\t3000\t.\tAC\tA\t.\t.\t.
chr1\t400\t.\tA\t<DEL>\t.\t.\t.
"""


def test_vcf_parsing_and_variant_windows(tmp_path):
    rng = np.random.default_rng(0)
    ref = list(rng.choice(list("ACGT"), 3000))
    ref[99], ref[199], ref[299:302], ref[49] = "A", "C", list("GAC"), "G"
    (tmp_path / "ref.fa").write_text(">chr1\n" + "".join(ref) + "\n")
    with gzip.open(tmp_path / "v.vcf.gz", "wt") as f:
        f.write(VCF)
    variants = score.read_vcf(str(tmp_path / "v.vcf.gz"))
    assert [(v.chrom, v.pos, v.ref, v.alt) for v in variants][:3] == [("chr1", 100, "A", "C"), ("chr1", 100, "A", "G"),
                                                                     ("1", 200, "C", "CTT")]
    genome = data.load_genome(str(tmp_path / "ref.fa"))
    windows = [score.variant_windows(genome, v, 64, 66) for v in variants]
    r, a = windows[0]
    assert len(r) == len(a) == 64 and (r != a).sum() == 1 and th.detokenize(r[32]) == "A" and th.detokenize(a[32]) == "C"
    r, a = windows[2]  # "1" found as "chr1"; an insertion makes the ALT window longer, within l_max
    assert len(a) == 66 and th.detokenize(a[32:35]) == "CTT" and np.array_equal(a[35:], r[33:])
    r, a = windows[3]
    assert len(a) == 62 and np.array_equal(a[:33], r[:33]) and np.array_equal(a[33:], r[35:])
    notes = [w for w in windows if isinstance(w, str)]
    assert [n.split(":")[0] for n in notes] == ["REF mismatch", "missing chromosome", "outside the chromosome",
                                              "symbolic ALT"]
    assert "the FASTA has G" in notes[0]
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=66), 0)
    scores = score.score_variants(model, genome, variants, 64, both_strands=True, batch_size=2)
    for (llr, forward, reverse, note), w in zip(scores, windows):
        assert np.isnan(llr) == isinstance(w, str) and (note == "") == (not isinstance(w, str))
        if not isinstance(w, str):  # each strand's llr is log P(alt) - log P(ref), computed here directly
            for ids, strand_llr in ((w, forward), ([data.reverse_complement(x).astype(np.int64) for x in w], reverse)):
                whole = [th.log_likelihood(model, torch.from_numpy(x)[None])[0].sum().item() for x in ids]
                assert abs((whole[1] - whole[0]) - strand_llr) < 1e-4  # sums of ~200 nats in float32: 1 ulp is 1.5e-5
            assert abs(llr - (forward + reverse) / 2) < 1e-9


def test_long_alleles_keep_both_windows_within_l_max_or_say_why(tmp_path):
    rng = np.random.default_rng(2)
    ref = "".join(rng.choice(list("ACGT"), 400))
    (tmp_path / "ref.fa").write_text(">chr1\n" + ref + "\n")
    genome = data.load_genome(str(tmp_path / "ref.fa"))
    insertion = "".join(rng.choice(list("ACGT"), 20))
    v = score.Variant("chr1", 200, ".", ref[199], ref[199] + insertion, 0)
    r, a = score.variant_windows(genome, v, 64, 70)  # the ALT window would be 84 bases: 14 over l_max
    assert len(r) == 64 - 14 and len(a) == 70  # both gave up the same 14 bases on the left
    offset = 199 - (199 - 32) - 14  # the variant's place in the trimmed windows
    assert th.detokenize(r) == ref[199 - 32 + 14:199 + 32]
    assert th.detokenize(a) == ref[199 - 32 + 14:200] + insertion + ref[200:199 + 32]
    assert np.array_equal(r[:offset], a[:offset])  # they differ only from the variant on
    too_long = score.Variant("chr1", 200, ".", ref[199], ref[199] + "A" * 60, 0)
    assert score.variant_windows(genome, too_long, 64, 70).startswith("ALT too long")
    long_ref = score.Variant("chr1", 100, ".", ref[99:99 + 64], "A", 0)
    assert score.variant_windows(genome, long_ref, 64, 70).startswith("REF too long: 64 bp")
    assert not isinstance(score.variant_windows(genome, score.Variant("chr1", 100, ".", ref[99:99 + 63], "A", 0),
                                                64, 70), str)


@pytest.mark.slow
def test_variants_cli_and_its_errors(tmp_path):
    (tmp_path / "ref.fa").write_text(">chr1\n" + "ACGT" * 40 + "\n")
    (tmp_path / "v.vcf").write_text("#CHROM\tPOS\tID\tREF\tALT\nchr1\t3\tx\tG\tT\nchr1\t4\ty\tA\tC\n")
    args = ["score.py", "variants", "--checkpoint", FIXTURE, "--fasta", tmp_path / "ref.fa", "--window", 32]
    result = run_script(*args, "--vcf", tmp_path / "v.vcf", "--out", tmp_path / "o.tsv")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "o.tsv").read_text().splitlines()]
    assert rows[0][:6] == ["chrom", "pos", "id", "ref", "alt", "llr"] and len(rows) == 3
    assert rows[1][:5] == ["chr1", "3", "x", "G", "T"] and rows[2][-1] == "REF mismatch: the FASTA has T"
    assert "1 x REF mismatch" in result.stderr
    both = run_script(*args, "--vcf", tmp_path / "v.vcf", "--out", tmp_path / "both.tsv", "--both_strands")
    assert both.returncode == 0, both.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "both.tsv").read_text().splitlines()]
    assert rows[0] == ["chrom", "pos", "id", "ref", "alt", "llr", "llr_forward", "llr_reverse", "note"]
    llr, forward, reverse = map(float, rows[1][5:8])
    single = float((tmp_path / "o.tsv").read_text().splitlines()[1].split("\t")[5])
    assert forward == pytest.approx(single, abs=2e-6) and llr == pytest.approx((forward + reverse) / 2, abs=2e-6)
    assert abs(forward - reverse) > 1e-4  # the other strand is scored, not the same one twice
    assert rows[2][5:8] == ["NA", "NA", "NA"] and rows[2][-1].startswith("REF mismatch")
    (tmp_path / "nohead.vcf").write_text("chr1\t3\tx\tG\tT\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "nohead.vcf"), "nohead.vcf:1", "#CHROM header")
    (tmp_path / "bad.vcf").write_text("##x\n#CHROM\tPOS\tID\tREF\tALT\nchr1\tthree\tx\tG\tT\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "bad.vcf"), "bad.vcf:3", "POS must be")
    (tmp_path / "short.vcf").write_text("#CHROM\tPOS\tID\tREF\tALT\nchr1\t3\tx\n")
    assert_one_line_error(run_script(*args, "--vcf", tmp_path / "short.vcf"), "short.vcf:2", "5 tab-separated")
    assert_one_line_error(run_script("score.py", "variants", "--checkpoint", FIXTURE, "--fasta", tmp_path / "no.fa",
                                     "--vcf", tmp_path / "v.vcf"), "--fasta", "no.fa: not found")
    assert_one_line_error(run_script(*args[:-2], "--window", 5000, "--vcf", tmp_path / "v.vcf"),
                          "--window 5000 is outside [2, 1026]")


@pytest.mark.slow
def test_variant_scores_rank_snps_like_the_true_source(markov_model, markov):
    """The model trained on an order-2 Markov source ranks SNPs as the source's exact log-likelihood ratios do."""
    probs = np.log(markov_table(0))
    genome = data.load_genome(markov[0])
    chrom = genome.array("chr3")
    rng = np.random.default_rng(1)
    variants, truth = [], []
    for pos in rng.choice(np.arange(200, len(chrom) - 200), 150, replace=False):
        seq = [int(b) - 7 for b in chrom[pos - 2:pos + 3]]  # two bases before the SNP, three from it
        alt = int(rng.choice([b for b in range(4) if b != seq[2]]))
        mutated = seq[:2] + [alt] + seq[3:]

        def logp(s):  # the terms that the SNP touches: positions pos, pos+1, pos+2
            return sum(probs[s[t - 2] * 4 + s[t - 1], s[t]] for t in (2, 3, 4))
        truth.append(logp(mutated) - logp(seq))
        variants.append(score.Variant("chr3", int(pos) + 1, ".", "ACGT"[seq[2]], "ACGT"[alt], 0))
    model = th.from_pretrained(markov_model)
    scores = score.score_variants(model, genome, variants, window=128, batch_size=50)
    llr = [s[0] for s in scores]
    rho = spearman(llr, truth)
    print(f"Spearman {rho:.3f}")
    assert rho >= 0.7, rho


def test_context_at_its_limits(tmp_path):
    """sequences --context: 0 and window - 1 are its limits, window is refused in one line; more context
    changes the scores of the bases after a window's first (each sees more before it)."""
    rng = np.random.default_rng(3)
    (tmp_path / "r.fa").write_text(">r\n" + "".join(rng.choice(list("ACGT"), 300)) + "\n")
    nats = {}
    for context in (0, 63):
        out = tmp_path / f"c{context}.tsv"
        result = run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--input", tmp_path / "r.fa",
                            "--window", 64, "--context", context, "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        nats[context] = float(out.read_text().splitlines()[1].split("\t")[2])
    assert nats[0] != nats[63]
    assert_one_line_error(run_script("score.py", "sequences", "--checkpoint", FIXTURE, "--input", tmp_path / "r.fa",
                                     "--window", 64, "--context", 64), "--context 64 must be in [0, --window 64)")
