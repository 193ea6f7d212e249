"""finetune.py and classifier.py: fine-tuning on each data format and task, frozen and soft-prompted
runs, resume, predict and embed, and the hub's classifier folders."""

import gzip
import math
import json
import signal
import subprocess
import sys
import time
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import checkpoints
import classifier
import data
import finetune
import tasks
import tinyhyena as th
from helpers import (FIT, FIXTURE, ROOT, SOURCES, assert_one_line_error, composition_rows, free_port, hf_folder,
    labelled, markov_sequence, random_model, read_metrics, rel_err, run_process, run_script, write_benchmark,
    write_species_fasta, write_table)


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_under_torchrun_is_one_data_parallel_run(tmp_path):
    """Two processes of 8 sequences each take the steps one process takes on the same 16: the same gradient at
    step 1, the same losses, the same validation and test scores."""
    write_table(tmp_path / "train.csv", labelled(200, 0, lengths=(100, 120)))  # all cut to 100: no padding
    write_table(tmp_path / "test.csv", labelled(40, 1))
    fit = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv",
           "--max_steps", 4, "--eval_interval", 2, "--dropout", 0, "--device", "cpu"]
    result = run_process("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(), *fit,
                         "--batch_size", 8, "--out", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    one = run_script(*fit, "--batch_size", 16, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [m["step"] for m in ddp if m["split"] == "train"] == [1, 2, 3, 4]  # each step once
    assert [m["split"] for m in ddp if m["split"] != "train"] == ["valid", "valid", "test"]
    assert ddp[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-5)  # averaged, not summed
    for a, b in zip(ddp, single):
        assert (a["step"], a["split"]) == (b["step"], b["split"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a
    assert len(torch.load(tmp_path / "ddp" / "train_state.pt", weights_only=True)["rng"]) == 2  # two processes
    assert finetune.load_classifier(tmp_path / "ddp").class_names == ["neg", "pos"]


@pytest.mark.slow
def test_finetune_learns_each_data_format(tmp_path):
    train, test = labelled(400, 0), labelled(100, 1)
    write_table(tmp_path / "train.csv", train)  # Nucleotide Transformer style: CSV + --test
    write_table(tmp_path / "test.csv", test)
    write_table(tmp_path / "all.tsv", train + test, sep="\t", labels=("0", "1"),  # integer labels, split column
                split=lambda i: "train" if i < 360 else "valid" if i < 400 else "test")
    write_benchmark(tmp_path / "gb", "train", train)  # genomic-benchmarks folders
    write_benchmark(tmp_path / "gb", "test", test)
    write_species_fasta(tmp_path / "a.fa", SOURCES[0], 2)
    with gzip.open(tmp_path / "b.fa.gz", "wt") as f:
        write_species_fasta(tmp_path / "b.fa", SOURCES[1], 3)
        f.write((tmp_path / "b.fa").read_text())
    with open(tmp_path / "train.fna", "w") as f:  # the Nucleotide Transformer tasks' own files: >name|label
        f.writelines(f">seq{i}|{c}\n{seq[:60]}\n{seq[60:]}\n" for i, (seq, c) in enumerate(train))
    with open(tmp_path / "test_hub.csv", "w") as f:  # the hub copies of the genomic benchmarks: a seq column
        f.writelines(["seq,label\n"] + [f"{seq},{c}\n" for seq, c in test])
    runs = {"csv": ["--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"],
            "fna": ["--data", tmp_path / "train.fna", "--test", tmp_path / "test_hub.csv"],
            "tsv": ["--data", tmp_path / "all.tsv"],
            "benchmark": ["--data", tmp_path / "gb"],
            "species": ["--species", f"alpha={tmp_path / 'a.fa'}", f"beta={tmp_path / 'b.fa.gz'}", "--eval_windows", 50]}
    for name, data_args in runs.items():
        out = tmp_path / name
        result = run_script(*FIT, "--preset", "tiny", "--seq_len", 100, *data_args, "--max_steps", 20, "--eval_interval",
                            10, "--out", out)  # (accuracy 1.0 at the first validation, with 40 steps)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        # every sequence longer than the model takes is cut and counted once; species windows are made to fit
        too_long = 0 if name == "species" else sum(len(seq) > 100 for seq, _ in train + test)
        assert (f"{too_long} sequences longer than 100 were cut" in result.stderr if too_long
                else "sequences longer than" not in result.stderr), (name, result.stderr[-2000:])
        metrics = read_metrics(out)
        assert all({"step", "split", "loss", "accuracy", "mcc", "f1_macro", "elapsed_s"} <= set(m) for m in metrics)
        assert [m["split"] for m in metrics if m["split"] != "train"] == ["valid", "valid", "test"]
        assert metrics[-1]["accuracy"] >= 0.9, (name, metrics[-1])
        classifier = finetune.load_classifier(out)
        assert classifier.class_names == {"tsv": ["0", "1"], "fna": ["0", "1"], "benchmark": ["negative", "positive"],
                                          "species": ["alpha", "beta"]}.get(name, ["neg", "pos"])
        with torch.no_grad():
            assert classifier(torch.from_numpy(th.tokenize(test[0][0]))[None]).shape == (1, 2)
    # sequences longer than the model takes are cut, and counted
    long_rows = labelled(40, 5, lengths=(150, 200))
    write_table(tmp_path / "long.csv", long_rows)
    result = run_script(*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "long.csv",
                        "--max_steps", 1, "--out", tmp_path / "long", "--truncate", "left")
    assert result.returncode == 0 and "40 sequences longer than 100 were cut (--truncate left)" in result.stderr


def test_labelled_fasta_and_seq_column_errors(tmp_path):
    """The .fna and seq-column readers: ids, labels and sequences as written, errors naming file and line."""
    (tmp_path / "a.fna").write_text(">chr1:5-9|promoter\nACGT\nAC\n>x|y|0\nGG\n\n>r 7 minus strand|1\nacgN\n")
    rows, columns = tasks.read_table(str(tmp_path / "a.fna"))
    assert columns == ["label"] and [(r["name"], r["sequence"], r["label"], r["line"]) for r in rows] == \
        [("chr1:5-9", "ACGTAC", "promoter", 1), ("x|y", "GG", "0", 4), ("r 7 minus strand", "acgN", "1", 7)]
    (tmp_path / "b.fna").write_text(">s1|1\nACGT\n>s2\nACGT\n")
    with pytest.raises(data.DataError, match=r"b.fna:3: header has no label after a '\|'"):
        tasks.read_table(str(tmp_path / "b.fna"))
    assert [r["name"] for r in tasks.read_table(str(tmp_path / "b.fna"), need_label=False)[0]] == ["s1", "s2"]
    with pytest.raises(data.DataError, match=r"--label_columns is for CSV/TSV"):
        tasks.read_table(str(tmp_path / "b.fna"), label_columns="a,b")
    (tmp_path / "c.tsv").write_text("seq\tlabel\nACGT\tx\n\tx\n")
    with pytest.raises(data.DataError, match=r"c.tsv:3: empty sequence"):
        tasks.read_table(str(tmp_path / "c.tsv"))
    (tmp_path / "d.csv").write_text("id,seq\nr1,ACGT\n")
    assert [(n, list(ids)) for n, ids in tasks.read_sequences(str(tmp_path / "d.csv"))] == [("r1", [7, 8, 9, 10])]


@pytest.mark.slow
def test_finetune_regression_and_multilabel_learn(tmp_path):
    rows = composition_rows(500, 0)
    with open(tmp_path / "train.csv", "w") as f:
        f.write("name,sequence,gc,t_gc,t_at,t_gcskew,split\n")
        for i, (seq, gc, t) in enumerate(rows):
            split = "train" if i < 400 else "valid" if i < 450 else "test"
            f.write(f"s{i},{seq},{gc},{t[0]},{t[1]},{t[2]},{split}\n")
    common = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 40]
    result = run_script(*common, "--task", "regression", "--label_columns", "gc", "--out", tmp_path / "reg")
    assert result.returncode == 0, result.stderr[-2000:]
    test = read_metrics(tmp_path / "reg")[-1]
    assert test["split"] == "test" and test["pearson"] > 0.8 and test["spearman"] > 0.8, test
    result = run_script(*common, "--task", "multilabel", "--label_columns", "t_*", "--out", tmp_path / "multi")
    assert result.returncode == 0, result.stderr[-2000:]
    test = read_metrics(tmp_path / "multi")[-1]
    assert test["split"] == "test" and test["auroc"] > 0.9 and test["targets_scored"] == 3, test
    # predict: one value per target; probabilities per binary target
    with open(tmp_path / "new.fa", "w") as f:
        f.writelines(f">r{i}\n{seq}\n" for i, (seq, _, _) in enumerate(rows[450:]))
    for name, header in (("reg", ["id", "gc"]), ("multi", ["id", "p_t_gc", "p_t_at", "p_t_gcskew"])):
        result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / name, "--input", tmp_path / "new.fa")
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert lines[0] == header and len(lines) == 51
        values = np.array([[float(x) for x in line[1:]] for line in lines[1:]])
        if name == "reg":  # de-standardized: on the targets' own scale
            assert np.corrcoef(values[:, 0], [gc for _, gc, _ in rows[450:]])[0, 1] > 0.8
        else:
            assert ((0 <= values) & (values <= 1)).all()
    # the exported graph of a regression model outputs values
    result = run_script("export.py", "--checkpoint", tmp_path / "reg", "--target", "cpu", "--out", tmp_path / "r.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["values"]
    ids = torch.from_numpy(th.tokenize(rows[460][0]))[None]
    with torch.no_grad():
        expect = finetune.load_classifier(tmp_path / "reg")(ids).numpy()
    assert rel_err(session.run(None, {"input_ids": ids.numpy()})[0], expect) <= 1e-4


def test_regression_and_auroc_metrics():
    assert tasks.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert tasks.auroc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5  # ties count half
    m = tasks.regression_metrics(np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([[1.0], [4.0], [9.0], [16.0]]))
    assert m["spearman"] == pytest.approx(1.0) and 0.9 < m["pearson"] < 1.0 and m["mse"] == pytest.approx(46.0)
    assert list(tasks.average_ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.slow
def test_label_column_errors(tmp_path):
    (tmp_path / "t.csv").write_text("sequence,y1,y2\nACGT,1,0\nACGA,1,x\n")
    for extra, needle in ((["--task", "regression", "--label_columns", "z*"], "no column starts with 'z'"),
                          (["--task", "regression", "--label_columns", "y1,y2"], "t.csv:3: y2 is 'x', not a number"),
                          (["--task", "multilabel", "--label_columns", "y1", "--batch_size", 1], None),
                          (["--task", "regression", "--soft_prompt", 4, "--label_columns", "y1"], "--soft_prompt")):
        result = run_script(*FIT, "--preset", "tiny", "--seq_len", 10, "--data", tmp_path / "t.csv", *extra,
                            "--max_steps", 1, "--out", tmp_path / "o", "--overwrite")
        if needle is None:  # 0/1 targets in y1: a valid multilabel run
            assert result.returncode == 0, result.stderr[-2000:]
            assert finetune.load_classifier(tmp_path / "o").task == "multilabel"
        else:
            assert_one_line_error(result, needle)
    (tmp_path / "m.csv").write_text("sequence,y1\nACGT,1\nACGA,2\n")
    assert_one_line_error(run_script(*FIT, "--preset", "tiny", "--seq_len", 10, "--data", tmp_path / "m.csv",
                                     "--task", "multilabel", "--label_columns", "y1", "--out", tmp_path / "o2"),
                          "m.csv:3: y1 is '2'; multilabel targets are 0 or 1")


def hf_classifier_folder(tmp_path, n_labels=2, **config):
    folder = hf_folder(tmp_path, "hf_clf", architectures=["HyenaDNAForSequenceClassification"],
                       id2label={str(i): f"label{i}" for i in range(n_labels)}, **config)
    state = checkpoints.read_safetensors(folder / "model.safetensors")
    state["score.weight"] = torch.randn(n_labels, 128, generator=torch.Generator().manual_seed(0))
    del state["lm_head.weight"]
    checkpoints.write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    return folder, state["score.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("problem_type, task", [("single_label_classification", "classify"),
                                                ("multi_label_classification", "multilabel"),
                                                ("regression", "regression")])
def test_hf_sequence_classifier_loads_with_its_score_head(tmp_path, problem_type, task):
    folder, score = hf_classifier_folder(tmp_path, problem_type=problem_type)
    clf = finetune.load_classifier(folder)
    assert clf.task == task and clf.class_names == ["label0", "label1"] and clf.pool == "last"
    assert clf.max_len == th.from_pretrained(FIXTURE).cfg.l_max - 1  # room for the [SEP]
    ids = torch.from_numpy(np.random.default_rng(0).integers(7, 12, (3, 50)))
    lm = th.from_pretrained(FIXTURE)
    with_sep = torch.cat([ids, torch.full((3, 1), th.SPECIAL_TOKENS["[SEP]"])], 1)  # what the port's tokenizer gives
    with torch.no_grad():  # the port: score (no bias) of the last token's hidden state, the [SEP]'s
        torch.testing.assert_close(clf(ids), lm.hidden_states(with_sep)[:, -1] @ score.T, rtol=1e-5, atol=1e-5)
    if task == "classify":
        (tmp_path / "in.txt").write_text("ACGTACGTAC\nGGGGCCCCAA\n")
        result = run_script("finetune.py", "predict", "--checkpoint", folder, "--input", tmp_path / "in.txt")
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert lines[0] == ["id", "predicted", "p_label0", "p_label1"]
        with torch.no_grad():
            expect = classifier.readout("classify", clf(torch.from_numpy(th.tokenize("GGGGCCCCAA"))[None]))[0]
        assert np.allclose([float(x) for x in lines[2][2:]], expect.numpy(), atol=1e-5)
        # the exported graph appends the [SEP] itself: an app sends the bases, as to any classifier's graph
        result = run_script("export.py", "--checkpoint", folder, "--target", "cpu", "--out", tmp_path / "c.onnx")
        assert result.returncode == 0 and "max relative error" in result.stdout, result.stderr[-2000:]
        session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
        ids[1:, :20] = th.PAD_ID  # left-padded, as in fine-tuning
        (probs,) = session.run(["probabilities"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            assert rel_err(probs, classifier.readout("classify", clf(ids)).numpy()) <= 1e-4
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "c.onnx")).metadata_props}
        assert json.loads(meta["class_names"]) == ["label0", "label1"] and meta["outputs"] == "probabilities"


def test_hf_folder_without_a_score_head_is_no_classifier(tmp_path):
    folder = hf_folder(tmp_path, architectures=["HyenaDNAForSequenceClassification"])
    with pytest.raises(ValueError, match="no score.weight"):
        finetune.load_classifier(folder)
    folder, _ = hf_classifier_folder(tmp_path, problem_type="ranking")
    with pytest.raises(ValueError, match="config field problem_type is 'ranking'"):
        finetune.load_classifier(folder)


def test_classification_metrics():
    m = tasks.classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 3)
    assert abs(m["accuracy"] - 5 / 6) < 1e-12
    f1 = np.mean([1.0, 2 / 3, 0.8])
    assert abs(m["f1_macro"] - f1) < 1e-12
    # binary MCC against its textbook formula
    tp, tn, fp, fn = 3, 4, 1, 2
    labels = [1] * (tp + fn) + [0] * (tn + fp)
    preds = [1] * tp + [0] * fn + [0] * tn + [1] * fp
    expect = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert abs(tasks.classification_metrics(labels, preds, 2)["mcc"] - expect) < 1e-12
    assert tasks.classification_metrics([0, 1], [1, 1], 2)["mcc"] == 0.0


@pytest.fixture(scope="module")
def mixed_lm(tmp_path_factory):
    """A tiny language model pretrained on a genome from both sources: to predict well it must tell, from
    context, which source it is reading. Soft prompting can then draw the class from its next-token logits."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    with open(root / "mix.fa", "w") as f:
        for c in range(6):
            text = markov_sequence(SOURCES[c % 2], 30000, rng)
            f.write(f">chr{c}\n" + "\n".join(text[i:i + 70] for i in range(0, len(text), 70)) + "\n")
    result = run_script("train.py", "--fasta", root / "mix.fa", "--seq_len", 256, "--min_seq_len", 256,
                        "--batch_size", 8, "--max_steps", 100, "--lr", 3e-3, "--warmup_steps", 10,
                        "--eval_interval", 1000, "--eval_batches", 4, "--out", root / "lm")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "lm"


@pytest.mark.slow
def test_freeze_and_soft_prompt_leave_the_backbone_untouched(mixed_lm, tmp_path):
    write_table(tmp_path / "train.csv", labelled(400, 0), labels=("0", "1"))
    write_table(tmp_path / "test.csv", labelled(200, 1), labels=("0", "1"))
    before = th.from_pretrained(mixed_lm).state_dict()
    data_args = ["--checkpoint", mixed_lm, "--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"]
    for name, mode in (("frozen", ["--freeze"]), ("prompt", ["--soft_prompt", 8, "--class_tokens", "CA", "--lr", 1e-2])):
        result = run_script(*FIT, *data_args, "--max_steps", 60, *mode, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        after = finetune.load_classifier(tmp_path / name).backbone.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: nothing of the backbone trained
        state = torch.load(tmp_path / name / "train_state.pt", weights_only=True)["model"]
        assert all(torch.equal(before[k], state["backbone." + k]) for k in before)
    # ... and what may train did: the head and the prompt moved from where the runs started them, the frozen
    # run's loss fell, and the prompt reads the class above chance
    torch.manual_seed(0)  # (the runs' --seed: the head and prompt each run starts from)
    start_head = classifier.SequenceClassifier(th.from_pretrained(mixed_lm), 2, freeze=True).head
    torch.manual_seed(0)
    start_prompt = classifier.SequenceClassifier(th.from_pretrained(mixed_lm), 2, soft_prompt=8, class_tokens="CA").prompt
    frozen, prompt = finetune.load_classifier(tmp_path / "frozen"), finetune.load_classifier(tmp_path / "prompt")
    assert (frozen.head.weight - start_head.weight).abs().max() > 1e-3
    assert prompt.prompt.shape == (8, 128) and prompt.head is None
    assert (prompt.prompt - start_prompt).abs().max() > 1e-3
    losses = [m["loss"] for m in read_metrics(tmp_path / "frozen") if m["split"] == "train"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.02, (losses[:10], losses[-10:])  # the head learned
    test = read_metrics(tmp_path / "prompt")[-1]
    assert test["split"] == "test" and test["accuracy"] >= 0.6 and test["mcc"] > 0.2, test  # chance: 0.5, 0


def test_soft_prompt_sits_between_padding_and_sequence():
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=40), 0)
    clf = finetune.SequenceClassifier(model, 2, soft_prompt=3, class_tokens="AC").eval()
    seqs = [th.tokenize("ACGTAC"), th.tokenize("GGATTACAGT")]
    classes = [th.BASE_IDS["A"], th.BASE_IDS["C"]]

    def class_logits(*pieces):  # the LM's logits of the class tokens after the embeddings `pieces`
        x = torch.cat(pieces)[None]
        return (model.hidden_states_from_embeddings(x)[0, -1] @ model.embedding.weight.T)[classes]
    with torch.no_grad():
        batched = clf(classifier.pad_left(seqs))
        width = max(len(s) for s in seqs)
        for row, seq in enumerate(seqs):  # [its pads, the prompt, its bases], built by hand
            pads = model.embedding(torch.full((width - len(seq),), th.PAD_ID))
            bases = model.embedding(torch.from_numpy(seq))
            assert torch.allclose(batched[row], class_logits(pads, clf.prompt, bases), atol=1e-5), row
            alone = clf(torch.from_numpy(seq)[None])[0]  # no padding: [the prompt, its bases]
            assert torch.allclose(alone, class_logits(clf.prompt, bases), atol=1e-5), row
        # the checks tell the layouts apart: row 0 is padded, so neither the prompt before its padding nor no
        # padding at all gives its batched logits
        pads = model.embedding(torch.full((width - len(seqs[0]),), th.PAD_ID))
        bases = model.embedding(torch.from_numpy(seqs[0]))
        assert not torch.allclose(batched[0], class_logits(clf.prompt, pads, bases), atol=1e-3)
        assert not torch.allclose(batched[0], class_logits(clf.prompt, bases), atol=1e-3)


@pytest.mark.slow
def test_finetune_overwrite_deletes_only_the_runs_own_files(tmp_path):
    write_table(tmp_path / "train.csv", labelled(40, 0))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "embeddings.npy").write_bytes(b"not the run's")
    args = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 2,
            "--out", out]
    assert run_script(*args).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run_script(*args), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # a refused run touches nothing
    over = run_script(*args, "--max_steps", 1, "--overwrite", "--seed", 1)
    assert over.returncode == 0, over.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1]  # started over
    assert (out / "notes.txt").read_text() == "mine" and (out / "embeddings.npy").read_bytes() == b"not the run's"
    assert set(first) <= {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_finetune_resume_reproduces_an_uninterrupted_run(tmp_path):
    write_table(tmp_path / "train.csv", labelled(300, 0))
    args = [*FIT, "--preset", "tiny", "--seq_len", 100, "--data", tmp_path / "train.csv", "--max_steps", 30,
            "--eval_interval", 5, "--rc_aug"]
    full = run_script(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run = subprocess.Popen(list(map(str, [sys.executable, *args, "--out", tmp_path / "cut"])), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while run.poll() is None and not (metrics.exists() and '"valid"' in metrics.read_text()
                                      and len(metrics.read_text().splitlines()) >= 9):
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "continue with --resume" in out, err[-2000:]
    assert 5 <= torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"] < 30
    resumed = run_script(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    drop = lambda rows: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in rows]
    assert drop(read_metrics(tmp_path / "cut")) == drop(read_metrics(tmp_path / "full"))
    assert (tmp_path / "cut" / "head.pt").read_bytes() == (tmp_path / "full" / "head.pt").read_bytes()


@pytest.mark.slow
def test_predict_and_embed_round_trips(fixture_classifier, tmp_path):
    rows = labelled(7, 3)
    (tmp_path / "in.fa").write_text("".join(f">r{i} x\n{seq}\n" for i, (seq, _) in enumerate(rows)))
    (tmp_path / "in.txt").write_text("".join(seq + "\n" for seq, _ in rows))
    write_table(tmp_path / "in.csv", rows)
    clf = finetune.load_classifier(fixture_classifier)
    with torch.no_grad():
        expect = [torch.softmax(clf(torch.from_numpy(th.tokenize(s))[None])[0], -1).numpy() for s, _ in rows]
    for name, ids in (("in.fa", [f"r{i}" for i in range(7)]), ("in.txt", [str(i) for i in range(1, 8)]),
                      ("in.csv", [f"s{i}" for i in range(7)])):
        result = run_script("finetune.py", "predict", "--checkpoint", fixture_classifier, "--input", tmp_path / name,
                            "--out", tmp_path / "p.tsv", "--batch_size", 3)
        assert result.returncode == 0, result.stderr[-2000:]
        table = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()]
        assert table[0] == ["id", "predicted", "p_neg", "p_pos"] and [r[0] for r in table[1:]] == ids
        probs = np.array([[float(x) for x in r[2:]] for r in table[1:]])
        assert np.allclose(probs, expect, atol=1e-5)  # batched, yet each as it is alone
        assert [r[1] for r in table[1:]] == [["neg", "pos"][int(p.argmax())] for p in probs]
    # embed: any checkpoint, the published fixture included; rows in input order, batching irrelevant
    for checkpoint in (FIXTURE, fixture_classifier):
        for pool in ("mean", "last"):
            result = run_script("finetune.py", "embed", "--checkpoint", checkpoint, "--input", tmp_path / "in.fa",
                                "--out", tmp_path / "e.npy", "--pool", pool, "--batch_size", 2)
            assert result.returncode == 0, result.stderr[-2000:]
            got = np.load(tmp_path / "e.npy")
            model = th.from_pretrained(checkpoint)
            with torch.no_grad():
                hidden = [model.hidden_states(torch.from_numpy(th.tokenize(s))[None])[0] for s, _ in rows]
            expect_e = np.stack([(h.mean(0) if pool == "mean" else h[-1]).numpy() for h in hidden])
            assert got.shape == (7, 128) and np.allclose(got, expect_e, atol=1e-4)
    model = th.from_pretrained(FIXTURE)
    with torch.no_grad():
        last = np.stack([model.hidden_states(torch.from_numpy(th.tokenize(s))[None])[0, -1].numpy() for s, _ in rows])
    assert np.allclose(th.embed(model, [s for s, _ in rows], "last", batch_size=3), last, atol=1e-4)


@pytest.mark.slow
def test_rc_average_is_the_same_for_a_sequence_and_its_reverse_complement(fixture_classifier, tmp_path):
    """predict and embed --rc average: the mean of the two strands' class probabilities (vectors), so a file of
    sequences and the file of their reverse complements give the same table (up to float error); --rc none
    (the default) reads one strand, and there the two files differ."""
    rows = labelled(6, 4)
    flip = lambda s: s[::-1].translate(str.maketrans("ACGT", "TGCA"))
    (tmp_path / "fwd.fa").write_text("".join(f">r{i}\n{s}\n" for i, (s, _) in enumerate(rows)))
    (tmp_path / "rev.fa").write_text("".join(f">r{i}\n{flip(s)}\n" for i, (s, _) in enumerate(rows)))

    def outputs(command, checkpoint, strand, rc):
        out = tmp_path / f"{command}_{strand}_{rc}.{'npy' if command == 'embed' else 'tsv'}"
        result = run_script("finetune.py", command, "--checkpoint", checkpoint, "--input", tmp_path / f"{strand}.fa",
                            "--out", out, "--rc", rc, "--batch_size", 4)
        assert result.returncode == 0, result.stderr[-2000:]
        if command == "embed":
            return np.load(out)
        return np.array([[float(x) for x in r.split("\t")[2:]] for r in out.read_text().splitlines()[1:]])
    for command, checkpoint in (("predict", fixture_classifier), ("embed", FIXTURE)):
        fwd, rev = outputs(command, checkpoint, "fwd", "average"), outputs(command, checkpoint, "rev", "average")
        np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-6)
        one, other = outputs(command, checkpoint, "fwd", "none"), outputs(command, checkpoint, "rev", "none")
        assert np.abs(one - other).max() > 1e-4, command  # one strand alone is not symmetric
        np.testing.assert_allclose(fwd, (one + other) / 2, rtol=1e-5, atol=1e-6)  # the two strands' mean
    assert_one_line_error(run_script("finetune.py", "predict", "--checkpoint", fixture_classifier, "--input",
                                     tmp_path / "fwd.fa", "--rc", "both"), "--rc", "invalid choice")
    model = classifier.load_classifier(fixture_classifier)  # the Python API: classifier.predict_outputs
    api = [classifier.predict_outputs(model, [th.tokenize(f(s)) for s, _ in rows], 4, rc="average").numpy()
           for f in (str, flip)]
    np.testing.assert_allclose(api[0], api[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(api[0], outputs("predict", fixture_classifier, "fwd", "average"), atol=1e-6)
    with pytest.raises(th.UserError, match="rc must be 'none' or 'average'"):
        classifier.predict_outputs(model, [th.tokenize("ACGT")], rc="both")


@pytest.mark.slow
def test_epochs_val_fraction_and_eval_batch_size_at_other_values(tmp_path):
    """--epochs 2 (default 10) sets the run's steps to two passes over the training set and validates after each;
    --val_fraction 0.25 (default 0.1) holds out a quarter; --eval_batch_size 3 (default 64) scores the same
    validation loss as one batch of all: padding never reaches a score."""
    write_table(tmp_path / "train.csv", labelled(40, 0))
    args = ["finetune.py", "fit", "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--batch_size", 8,
            "--epochs", 2, "--val_fraction", 0.25, "--dropout", 0]
    result = run_script(*args, "--eval_batch_size", 3, "--out", tmp_path / "small")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train 30, valid 10" in result.stderr
    rows = read_metrics(tmp_path / "small")
    assert [m["step"] for m in rows if m["split"] == "train"] == list(range(1, 7))  # 30 // 8 = 3 steps an epoch
    assert [m["step"] for m in rows if m["split"] == "valid"] == [3, 6]
    whole = run_script(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    for a, b in zip((m for m in rows if m["split"] == "valid"), (m for m in read_metrics(tmp_path / "whole")
                                                                 if m["split"] == "valid")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]


@pytest.mark.slow
def test_rc_aug_does_not_hurt_a_strand_symmetric_task(tmp_path):
    """Whether a sequence is GC-rich is the same on both strands: training on reverse complements half the time
    (--rc_aug) learns it as well as training on the sequences as given, on the same test set."""
    rows = [(seq, targets[0]) for seq, _, targets in composition_rows(300, 5)]
    write_table(tmp_path / "train.csv", rows, labels=("at", "gc"), split=lambda i: "test" if i < 60 else "train")
    accuracy = {}
    for flags in ([], ["--rc_aug"]):
        out = tmp_path / ("aug" if flags else "plain")
        result = run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--dropout", 0, *flags,
                            "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        accuracy[bool(flags)] = read_metrics(out)[-1]["accuracy"]
    assert accuracy[False] > 0.8 and accuracy[True] >= accuracy[False] - 0.05, accuracy


def test_recipe_paper_sets_the_published_values_and_flags_override_them(tmp_path):
    """--recipe paper gives the published fine-tuning settings; a flag given beside it wins; without it, ours."""
    def parsed(*flags):
        args = finetune.parse_args(["fit", "--checkpoint", str(FIXTURE), "--data", str(FIXTURE), *flags])
        return args.batch_size, args.epochs, args.lr, args.weight_decay, args.dropout, args.betas
    assert parsed("--recipe", "paper") == (128, 100, 6e-4, 0.1, 0.1, (0.9, 0.999))
    assert parsed() == (32, 10, 6e-4, 0.1, None, (0.9, 0.95))
    assert parsed("--recipe", "paper", "--epochs", "3", "--lr", "1e-4", "--dropout", "0") == \
        (128, 3, 1e-4, 0.1, 0.0, (0.9, 0.999))
    assert parsed("--weight_decay", "0", "--batch_size", "4") == (4, 10, 6e-4, 0.0, None, (0.9, 0.95))


@pytest.mark.slow
def test_recipe_paper_reaches_the_optimizer_and_the_saved_model(tmp_path):
    """The recipe's AdamW betas are the optimizer's, its weight decay the matrices', and its dropout is in the
    saved config."""
    write_table(tmp_path / "train.csv", labelled(24, 0))
    result = run_script("finetune.py", "fit", "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv",
                        "--recipe", "paper", "--batch_size", 8, "--max_steps", 2, "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr[-2000:]
    groups = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["betas"], g["weight_decay"]) for g in groups] == [((0.9, 0.999), 0.1), ((0.9, 0.999), 0.0)]
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["embed_dropout"] == 0.1


@pytest.mark.slow
def test_finetune_errors(fixture_classifier, tmp_path):
    fit = [*FIT, "--preset", "tiny", "--seq_len", 100, "--out", tmp_path / "o"]
    (tmp_path / "gb" / "train" / "pos").mkdir(parents=True)
    (tmp_path / "gb" / "train" / "neg").mkdir(parents=True)
    (tmp_path / "gb" / "train" / "pos" / "1.txt").write_text("ACGT")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "gb"), "train/neg", "empty class folder")
    (tmp_path / "nolabel.csv").write_text("sequence,class\nACGT,1\n")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "nolabel.csv"), "nolabel.csv:1", "'label'")
    (tmp_path / "empty.csv").write_text("sequence,label\n")
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "empty.csv"), "empty.csv", "no sequences")
    write_table(tmp_path / "train.csv", labelled(40, 0))
    write_table(tmp_path / "test.csv", labelled(4, 1), labels=("neg", "maybe"))
    assert_one_line_error(run_script(*fit, "--data", tmp_path / "train.csv", "--test", tmp_path / "test.csv"),
                          "test.csv", "'maybe' is unseen in training")
    assert_one_line_error(run_script(*fit, "--species", "human", "mouse=m.fa"), "'human'", "NAME=FASTA")
    write_species_fasta(tmp_path / "a.fa", SOURCES[0], 0, records=1, length=400)
    write_species_fasta(tmp_path / "b.fa", SOURCES[1], 1, records=1, length=400)
    assert_one_line_error(run_script(*fit, "--species", f"a={tmp_path / 'a.fa'}", f"b={tmp_path / 'b.fa'}"),
                          "windows are fewer than one batch")
    assert_one_line_error(run_script("finetune.py", "predict", "--checkpoint", FIXTURE, "--input", tmp_path / "test.csv"),
                          "not a fine-tuned classifier")
    assert_one_line_error(run_script("finetune.py", "embed", "--checkpoint", fixture_classifier, "--input",
                                     tmp_path / "missing.fa", "--out", tmp_path / "e.npy"), "missing.fa: file not found")
    # a second fit into the same --out refuses, as train.py does
    assert_one_line_error(run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv",
                                     "--out", fixture_classifier), "--resume", "--overwrite")


@pytest.mark.slow
def test_hub_folders_hold_the_tokenizer_and_the_classifier(tmp_path, monkeypatch):
    """save_pretrained(layout="hf") writes the port's tokenizer files beside config.json, pointing at the
    port's tokenizer as config.json points at its model. A classifier fine-tuned with --layout hf is written
    as the hub's HyenaDNAForSequenceClassification folder, which finetune.py predict reads back with the same
    predictions (export.py reads such a folder in test_hf_sequence_classifier_loads_with_its_score_head)."""
    model = th.from_pretrained(FIXTURE)
    th.save_pretrained(model, tmp_path / "lm", layout="hf")
    tokenizer = json.loads((tmp_path / "lm" / "tokenizer_config.json").read_text())
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert tokenizer["auto_map"]["AutoTokenizer"][0] == config["auto_map"]["AutoModel"].split("--")[0] + \
        "--tokenization_hyena.HyenaDNATokenizer"
    assert tokenizer["padding_side"] == "left" and tokenizer["characters"] == list("ACGTN")
    assert tokenizer["model_max_length"] == model.cfg.l_max and tokenizer["eos_token"] == "[SEP]"
    assert {int(i): t["content"] for i, t in tokenizer["added_tokens_decoder"].items()} == \
        {i: t for t, i in th.SPECIAL_TOKENS.items()}
    assert json.loads((tmp_path / "lm" / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"
    # a hub classifier, fine-tuned a step from the command line, read back by predict and by export
    write_table(tmp_path / "train.csv", labelled(64, 0))
    result = run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--max_steps", 2,
                        "--layout", "hf", "--out", tmp_path / "clf")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["HyenaDNAForSequenceClassification"] and config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["problem_type"] == "single_label_classification" and config["tinyhyena"]["truncate"] == "right"
    assert (tmp_path / "clf" / "tokenizer_config.json").is_file() and not (tmp_path / "clf" / "model.pt").exists()
    assert_one_line_error(run_script(*FIT, "--checkpoint", FIXTURE, "--data", tmp_path / "train.csv", "--resume",
                                     "--out", tmp_path / "clf"), "written with --layout hf")
    clf = classifier.load_classifier(tmp_path / "clf")
    assert clf.pool == "last" and clf.end_token == th.SPECIAL_TOKENS["[SEP]"] and not clf.head.bias.any()
    seqs = [seq for seq, _ in labelled(5, 1)]
    (tmp_path / "in.txt").write_text("\n".join(seqs) + "\n")
    result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / "clf", "--input", tmp_path / "in.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.array([[float(x) for x in line.split("\t")[2:]] for line in result.stdout.splitlines()[1:]])
    expected = classifier.readout("classify", classifier.predict_logits(clf, [th.tokenize(s) for s in seqs], 8,
                                                                      torch.device("cpu"))).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    # the same folder written in-process from a classifier built the hub's way, and refusals
    clf.head.weight.data.normal_()
    classifier.save_classifier(clf, tmp_path / "again", clf.class_names, {}, layout="hf")
    again = classifier.load_classifier(tmp_path / "again")
    ids = classifier.pad_left([th.tokenize(s) for s in seqs])
    with torch.no_grad():
        assert torch.allclose(again(ids), clf(ids), atol=1e-5)
    plain = classifier.SequenceClassifier(model, 2)  # mean pooling, a bias
    with pytest.raises(th.UserError, match="cannot hold a pool other than the last token's"):
        classifier.save_classifier(plain, tmp_path / "plain", ["a", "b"], {}, layout="hf")


# ---------------------------------------------------------------------------------------------------------
# Per-base fine-tuning.

MOTIF = "GATTACA"


def write_motif_genome(root, length=16000, planted=250):
    """Two chromosomes of random bases with MOTIF planted at random places; a BED of the bases of its every
    occurrence (class inside), and a bedGraph of each 50-base bin's G+C count over each chromosome's first
    half (the rest unlabelled). Returns the chromosomes' sequences."""
    import re
    rng = np.random.default_rng(0)
    chroms, bed, bedgraph = {}, [], []
    for name in ("chr1", "chr2"):
        seq = list(rng.choice(list("ACGT"), length))
        for p in rng.choice(length - len(MOTIF), planted, replace=False):
            seq[p:p + len(MOTIF)] = MOTIF
        seq = chroms[name] = "".join(seq)
        bed += [f"{name}\t{m.start()}\t{m.start() + len(MOTIF)}\n" for m in re.finditer(f"(?={MOTIF})", seq)]
        bedgraph += [f"{name}\t{i}\t{i + 50}\t{sum(b in 'GC' for b in seq[i:i + 50])}\n" for i in range(0, length // 2, 50)]
    (root / "g.fa").write_text("".join(f">{n}\n{s}\n" for n, s in chroms.items()))
    (root / "motif.bed").write_text("".join(bed))
    (root / "gc.bedGraph").write_text("".join(bedgraph))
    return chroms


def read_bedgraph(path, lengths):
    """{chrom: float array} of a bedGraph's values (NaN where it has none)."""
    out = {chrom: np.full(n, np.nan) for chrom, n in lengths.items()}
    for line in path.read_text().splitlines()[1:]:  # after the track line
        chrom, start, end, value = line.split("\t")
        out[chrom][int(start):int(end)] = float(value)
    return out


PER_BASE_FIT = ["finetune.py", "fit", "--checkpoint", FIXTURE, "--task", "per_base", "--seq_len", 128,
                "--batch_size", 16, "--lr", 1e-3, "--max_steps", 60, "--eval_interval", 30, "--dropout", 0]


@pytest.mark.slow
def test_per_base_finds_a_motifs_bases_and_predict_writes_what_the_model_computes(tmp_path):
    """Fine-tuned on a BED of a motif's bases, the model marks them far above chance (every base called
    outside scores a macro F1 of 0.49); predict --rc average writes, per class, the mean of both strands'
    probabilities at every base, window by window, as the model in memory computes them."""
    chroms = write_motif_genome(tmp_path)
    result = run_script(*PER_BASE_FIT, "--fasta", tmp_path / "g.fa", "--labels", tmp_path / "motif.bed",
                        "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 classes (outside, inside); train 224, valid 12, test 12" in result.stderr
    test = read_metrics(tmp_path / "ft")[-1]
    assert test["split"] == "test" and test["f1_macro"] > 0.7 and test["mcc"] > 0.4, test
    result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / "ft", "--input", tmp_path / "g.fa",
                        "--rc", "average", "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-2000:]
    model = classifier.load_classifier(tmp_path / "ft")
    lengths = {c: len(s) for c, s in chroms.items()}
    written = [read_bedgraph(tmp_path / f"pred.{name}.bedGraph", lengths) for name in ("outside", "inside")]
    for chrom, seq in chroms.items():
        ids = th.tokenize(seq)
        for start in range(0, len(ids), model.max_len):
            window = torch.as_tensor(ids[start:start + model.max_len], dtype=torch.long)[None]
            flipped = torch.as_tensor(data.reverse_complement(window[0].numpy()).copy(), dtype=torch.long)[None]
            with torch.no_grad():
                expected = (torch.softmax(model(window), -1) + torch.softmax(model(flipped), -1).flip(1))[0] / 2
            for j in range(2):
                np.testing.assert_allclose(written[j][chrom][start:start + len(window[0])], expected[:, j].numpy(),
                                           rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_per_base_values_from_a_bedgraph_leave_unlabelled_bases_out(tmp_path):
    """A bedGraph's values are learnt where it has them: windows without any are left out (the values cover
    each chromosome's first half, so the validation stretch has none and a tenth of training is held out), the
    loss and metrics skip the unlabelled bases of the rest, and predict writes one bedGraph of values."""
    write_motif_genome(tmp_path)
    result = run_script(*PER_BASE_FIT, "--fasta", tmp_path / "g.fa", "--labels", tmp_path / "gc.bedGraph",
                        "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 per_base_values targets (value); train 113, valid 13, test 0" in result.stderr
    valid = [m for m in read_metrics(tmp_path / "ft") if m["split"] == "valid"]
    assert all(math.isfinite(m["loss"]) for m in valid) and valid[-1]["pearson"] > 0.2, valid
    result = run_script("finetune.py", "predict", "--checkpoint", tmp_path / "ft", "--fasta", tmp_path / "g.fa",
                        "--bed", tmp_path / "motif.bed", "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "pred.value.bedGraph").read_text().splitlines()
    assert lines[0].startswith("track type=bedGraph") and all(len(l.split("\t")) == 4 for l in lines[1:])


@pytest.mark.slow
def test_per_base_errors(tmp_path):
    """Each bad per-base input is refused in one line, before anything is written."""
    write_motif_genome(tmp_path, length=2000, planted=10)
    for flags, needle in [(["--task", "per_base", "--fasta", "g.fa"], "one of the arguments --data --species --labels"),
                          (["--labels", "motif.bed", "--fasta", "g.fa"], "go together"),
                          (["--task", "per_base", "--labels", "motif.bed"], "go together"),
                          (["--data", "g.fa", "--fasta", "g.fa"], "go together"),
                          (["--task", "per_base", "--labels", "motif.bed", "--fasta", "g.fa", "--pool", "last"], "drop --pool"),
                          (["--task", "per_base", "--labels", "motif.bed", "--fasta", "g.fa", "--layout", "hf"], "drop --layout hf")]:
        with pytest.raises(th.UserError, match=needle):
            finetune.parse_args(["fit", "--checkpoint", str(FIXTURE), *[str(tmp_path / f) if f.endswith((".fa", ".bed"))
                                                                     else f for f in flags]])
    (tmp_path / "bad.bedGraph").write_text("chr1\t0\t10\t1.5\nchr1\t10\t20\tlots\n")
    (tmp_path / "mixed.bed").write_text("chr1\t0\t10\tpromoter\nchr1\t10\t20\n")
    for labels, needle in [("bad.bedGraph", "bad.bedGraph:2: a bedGraph line is chrom, start, end, value"),
                           ("mixed.bed", "mixed.bed:2: no name (class) in column 4")]:
        result = run_script(*PER_BASE_FIT, "--fasta", tmp_path / "g.fa", "--labels", tmp_path / labels,
                            "--out", tmp_path / "out")
        assert_one_line_error(result, needle)
        assert not (tmp_path / "out").exists()
    result = run_script(*PER_BASE_FIT, "--fasta", tmp_path / "g.fa", "--labels", tmp_path / "motif.bed",
                        "--seq_len", 4000, "--out", tmp_path / "out")
    assert_one_line_error(result, "--seq_len in [1, 1026]")


def test_rc_aug_reverses_a_per_base_label_with_its_sequence():
    """Reverse-complement augmentation turns base i into base L-1-i: a per-base label goes with it, and a
    sequence-level label stays as it is."""
    ids = th.tokenize("AACGTTTG")
    per_base = tasks.Examples([ids], [np.arange(8)], rc_aug=True)
    whole = tasks.Examples([ids], [1], rc_aug=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        (x, y), (_, label) = per_base[0], whole[0]
        flipped = not np.array_equal(x, ids)
        assert np.array_equal(x, data.reverse_complement(ids) if flipped else ids) and label == 1
        assert np.array_equal(y, np.arange(8)[::-1] if flipped else np.arange(8))
        seen.add(flipped)
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------------------------
# Options at their other values and limits.

def test_pool_reads_the_mean_of_real_positions_or_the_last():
    """--pool mean (default): the head reads the mean hidden state over a row's bases, padding excluded;
    --pool last: the last position's, where the causal model has read the whole sequence."""
    backbone = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=12), 0)
    ids = classifier.pad_left([th.tokenize("ACGTAC"), th.tokenize("GGATCCATG")])  # (2, 9), 3 pads in row 0
    hidden = backbone.hidden_states(ids)
    for pool, pooled in (("mean", torch.stack([hidden[0, 3:].mean(0), hidden[1].mean(0)])), ("last", hidden[:, -1])):
        model = classifier.SequenceClassifier(backbone, 2, pool=pool).eval()
        torch.testing.assert_close(model(ids), model.head(pooled))
    with pytest.raises(th.UserError, match="pool must be mean or last"):
        classifier.SequenceClassifier(backbone, 2, pool="max")


def test_truncate_sides_at_the_limit():
    """--truncate keeps max_len bases: left drops the first ones, right the last ones, center both (one more on
    the right when odd); a sequence of exactly max_len is kept whole."""
    ids = np.arange(10)
    assert tasks.cut(ids, 10, "left") is ids
    assert tasks.cut(ids, 9, "left").tolist() == list(range(1, 10))
    assert tasks.cut(ids, 9, "right").tolist() == list(range(9))
    assert tasks.cut(ids, 9, "center").tolist() == list(range(9))
    assert tasks.cut(ids, 6, "center").tolist() == list(range(2, 8))
    assert tasks.cut(ids, 1, "left").tolist() == [9]


def test_class_tokens_one_distinct_nucleotide_per_class():
    """--class_tokens maps class i to its i-th nucleotide (the default ACGTN in order); the wrong count, a
    repeat or a letter that is not a nucleotide token is refused."""
    backbone = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=12), 0)
    model = classifier.SequenceClassifier(backbone, 2, soft_prompt=2, class_tokens="TG")
    assert model.class_ids.tolist() == [th.BASE_IDS["T"], th.BASE_IDS["G"]]
    assert classifier.SequenceClassifier(backbone, 5, soft_prompt=2).class_tokens == "ACGTN"  # the limit: 5 classes
    for tokens in ("TGC", "TT", "TX"):
        with pytest.raises(th.UserError, match="its own nucleotide token"):
            classifier.SequenceClassifier(backbone, 2, soft_prompt=2, class_tokens=tokens)
    with pytest.raises(th.UserError, match="its own nucleotide token"):
        classifier.SequenceClassifier(backbone, 6, soft_prompt=2)


def test_eval_windows_caps_each_species_validation_and_test_windows(tmp_path):
    """--eval_windows N: at most N validation and N test windows per species, evenly spread over the tiles
    (the first and the last among them); 1 keeps the first tile."""
    write_species_fasta(tmp_path / "a.fa", SOURCES[0], 0, records=2, length=4000)
    write_species_fasta(tmp_path / "b.fa", SOURCES[1], 1, records=2, length=4000)
    def counts(n):
        args = types.SimpleNamespace(species=[f"a={tmp_path / 'a.fa'}", f"b={tmp_path / 'b.fa'}"], seq_len=50,
                                     seed=0, eval_windows=n)
        splits, names = finetune.species_windows(args, 100)
        return {split: np.bincount(splits[split].labels).tolist() for split in ("valid", "test")}
    assert counts(256) == counts(8) == {"valid": [8, 8], "test": [8, 8]}  # 2 records x 200 bases / 50 each
    assert counts(3) == {"valid": [3, 3], "test": [3, 3]} and counts(1) == {"valid": [1, 1], "test": [1, 1]}
    assert finetune.evenly(list(range(8)), 3) == [0, 4, 7] and finetune.evenly(list(range(8)), 1) == [0]
    assert finetune.evenly(list(range(8)), 9) == list(range(8)) and finetune.evenly([], 3) == []
