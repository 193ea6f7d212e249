"""train.py: pretraining learns a known source; the loop's resume, signals, divergence, DDP and gradient
accumulation."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import tinyhyena as th
import train
import trainer
from helpers import ROOT, assert_one_line_error, free_port, read_metrics, run_process, run_script


@pytest.mark.slow
def test_train_learns_markov_source(markov, markov_model):
    _, entropy = markov
    metrics = read_metrics(markov_model)
    assert {m["seq_len"] for m in metrics if m["split"] == "train"} == {128, 256}  # the length warm-up ran
    assert all({"step", "split", "loss", "tokens", "seq_len", "elapsed_s"} <= set(m) for m in metrics)
    assert [(m["split"], m["step"]) for m in metrics[-3:]] == [("train", 72), ("val", 72), ("test", 72)]
    assert metrics[-2]["loss"] < entropy + 0.05 < np.log(4)  # near the source's entropy rate, far below chance
    test = metrics[-1]  # the held-out chromosome, reported at the end
    assert test["loss"] < entropy + 0.05 and test["bits_per_base"] == pytest.approx(test["loss"] / np.log(2))
    model = th.from_pretrained(markov_model)
    assert model.cfg.l_max == 258


@pytest.mark.slow
def test_init_from_starts_where_the_checkpoint_is(markov, markov_model, tmp_path):
    """--init_from: the run's first evaluation (step 0) is the checkpoint's own loss on the same validation
    windows; a longer --seq_len raises l_max and trains on; --preset beside it is an error."""
    args = ["train.py", "--fasta", markov[0], "--init_from", markov_model, "--max_steps", 2, "--eval_batches", 4,
            "--batch_size", 2, "--min_seq_len", 64]
    result = run_script(*args, "--out", tmp_path / "same")
    assert result.returncode == 0, result.stderr[-2000:]
    first = read_metrics(tmp_path / "same")[0]
    assert (first["split"], first["step"], first["seq_len"]) == ("val", 0, 256)  # the checkpoint's length
    checkpoint = th.from_pretrained(markov_model)
    windows = data.Windows(data.Genome(data.prepare(markov[0], quiet=True)), 256, "valid")
    expected = train.evaluate(checkpoint, windows, types.SimpleNamespace(eval_batches=4), torch.device("cpu"), 0, 1)
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    assert first["loss"] < np.log(4) - 0.2  # a trained model's loss, not a fresh one's
    longer = run_script(*args, "--seq_len", 512, "--out", tmp_path / "longer")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert th.from_pretrained(tmp_path / "longer").cfg.l_max == 514
    assert_one_line_error(run_script(*args, "--preset", "tiny", "--out", tmp_path / "x"), "--init_from", "--preset")


# The last process of a run asks itself to stop (SIGTERM, as a scheduler's preemption does) once it has computed
# the gradients of step STOP: every process stops after that step, at the same step, and checkpoints.
STOP = 7


def stopping_at(step, rank=0, world=1):
    """trainer.accumulate_gradients, which sends SIGTERM to this process after the given step's gradients when
    this is the run's last process."""
    accumulate = trainer.accumulate_gradients

    def accumulate_then_stop(ddp, job, i, *args, **kwargs):
        result = accumulate(ddp, job, i, *args, **kwargs)
        if i + 1 == step and rank == world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    return accumulate_then_stop


STOP_WRAPPER = """
import os, runpy, signal, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import trainer
from test_train import stopping_at
trainer.accumulate_gradients = stopping_at(int(sys.argv[2]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def small_genome(path):
    """Four 400-base chromosomes, two of them for training: 12 windows of 65 bases, an epoch of 3 steps of 4
    sequences (and of 24 windows of 33 bases, 3 steps of 8, in the length warm-up)."""
    rng = np.random.default_rng(0)
    path.write_text("".join(f">chr{c}\n{''.join(rng.choice(list('ACGT'), 400))}\n" for c in range(4)))
    return path


RESUME_CASES = {  # each training option that changes what a step reads or how it accumulates: (processes, flags)
    "one process": (1, ["--batch_size", 4]),
    "grad_accum": (1, ["--batch_size", 2, "--grad_accum", 2]),
    "ddp": (2, ["--batch_size", 2]),  # one torchrun agent of 2 processes
    "context_parallel": (2, ["--batch_size", 4, "--context_parallel", 2]),  # two torchrun nodes of 1
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.distributed) if n > 1 else c
                                  for c, (n, _) in RESUME_CASES.items()])
def test_stopped_and_resumed_run_is_the_uninterrupted_run(case, tmp_path, monkeypatch):
    """A run stopped by SIGTERM after step 7 of 9 (steps 1-3 read length 32, then length 64: the stop falls in
    the middle of that stage's second epoch) and resumed
    with --resume logs every row the uninterrupted run logs, step for step, and ends with the same weights:
    with one process; accumulating 2 micro-batches; with 2 processes of DDP (one torchrun agent) and 2
    processes sharing each sequence (two torchrun nodes joined by a c10d rendezvous); the stop reaches only the
    last process, and both stop at the same step, each with its own random state saved. Dropout and reverse-complement augmentation
    are on: the random state is resumed too."""
    processes, flags = RESUME_CASES[case]
    fasta = small_genome(tmp_path / "g.fa")
    args = ["train.py", "--fasta", fasta, "--seq_len", 64, "--min_seq_len", 32, "--max_steps", 9, "--eval_interval",
            4, "--eval_batches", 2, "--rc_aug", "--lr", 3e-3, "--warmup_steps", 2, "--device", "cpu", *flags]

    def run(out, *extra, stop=None):
        if processes == 1:
            with monkeypatch.context() as patch:
                if stop:
                    patch.setattr(trainer, "accumulate_gradients", stopping_at(stop))
                result = run_script(*args, "--out", out, *extra)
            assert result.returncode == 0, result.stderr[-3000:]
            return result.stdout
        (tmp_path / "stop.py").write_text(STOP_WRAPPER)
        script = [tmp_path / "stop.py", ROOT, stop] if stop else []
        launch = two_node_run if case == "context_parallel" else one_node_run
        codes, outputs = finish(launch(*script, *args, "--out", out, *extra))
        assert set(codes) == {0}, [err[-3000:] for _, err in outputs]
        return outputs[0][0]
    run(tmp_path / "full")
    assert "stopped by a signal at step 7" in run(tmp_path / "cut", stop=STOP)
    state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)
    assert state["step"] == STOP and len(state["rng"]) == processes
    run(tmp_path / "cut", "--resume")
    drop = lambda rows: [{k: v for k, v in m.items() if k != "elapsed_s"} for m in rows]
    full, resumed = drop(read_metrics(tmp_path / "full")), drop(read_metrics(tmp_path / "cut"))
    assert [m["step"] for m in resumed if m["split"] == "train"] == list(range(1, 10))  # each step logged once
    assert {m["seq_len"] for m in resumed if m["split"] == "train"} == {32, 64}
    assert resumed == full
    cut, whole = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("cut", "full"))
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in whole)
    if processes > 1:  # the FASTA was prepared once, by rank 0, in place
        index = json.loads((Path(str(fasta) + ".tinyhyena") / "index.json").read_text())
        assert set(index["chroms"]) == {"chr0", "chr1", "chr2", "chr3"}
        assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
        assert not torch.equal(state["rng"][0]["torch_rng"], state["rng"][1]["torch_rng"])
        single = run_script(*args, "--context_parallel", 1, "--out", tmp_path / "cut", "--resume")
        assert_one_line_error(single, f"written by {processes} process(es)", "same number")


@pytest.mark.slow
def test_train_refuses_an_out_holding_another_run(markov, tmp_path):
    fasta, _ = markov
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # an unrelated file: used beside, never deleted
    args = ["train.py", "--fasta", fasta, "--seq_len", 32, "--min_seq_len", 32, "--batch_size", 2, "--max_steps", 2,
            "--eval_batches", 1, "--out", out]
    assert run_script(*args).returncode == 0
    first = {name: (out / name).read_bytes() for name in ("model.pt", "train_state.pt", "metrics.jsonl")}
    again = run_script(*args, "--max_steps", 3)  # the shell-history slip: same command, no --resume
    assert_one_line_error(again, str(out), "--resume", "--overwrite")
    assert {name: (out / name).read_bytes() for name in first} == first  # byte-identical: nothing touched
    resumed = run_script(*args, "--max_steps", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1, 2, 3]
    over = run_script(*args, "--max_steps", 1, "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1]  # started over
    assert (out / "notes.txt").read_text() == "mine"
    assert_one_line_error(run_script(*args, "--resume", "--overwrite"), "exclude each other")


@pytest.mark.slow
def test_train_without_data_says_how_to_get_it(tmp_path):
    result = run_script(ROOT / "train.py", "--max_steps", 1, cwd=tmp_path)
    assert_one_line_error(result, "python data.py hg38", "--fasta")


@pytest.mark.slow
def test_train_stops_on_non_finite_loss(markov, tmp_path):
    fasta, _ = markov
    result = run_script("train.py", "--fasta", fasta, "--seq_len", 32, "--min_seq_len", 32, "--batch_size", 2,
                        "--max_steps", 20, "--lr", 1e30, "--warmup_steps", 0, "--ckpt_interval", 1,
                        "--out", tmp_path / "nan")
    assert result.returncode == 1 and "last good checkpoint" in result.stderr
    metrics = read_metrics(tmp_path / "nan")
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics)  # the bad step logged nothing
    last = metrics[-1]["step"]
    assert last < 20 and f"at step {last};" in result.stderr  # stopped at the first non-finite loss
    state = torch.load(tmp_path / "nan" / "train_state.pt", weights_only=True)
    assert state["step"] == last  # the checkpoint of the last step that completed, not the bad one
    model = th.from_pretrained(tmp_path / "nan")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def deterministic_run(markov, out, *extra, launcher=()):
    """A short train.py run without dropout (so that its steps depend only on its batches): its metrics rows by
    split, and its final weights."""
    run = run_process if launcher else run_script
    result = run(*launcher, "train.py", "--fasta", markov[0], "--seq_len", 64, "--min_seq_len", 64, "--max_steps", 3,
                 "--eval_batches", 2, "--dropout", 0, "--lr", 3e-3, "--warmup_steps", 1, "--device", "cpu",
                 "--out", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for m in read_metrics(out):
        rows.setdefault(m["split"], []).append(m)
    return rows, torch.load(Path(out) / "model.pt", weights_only=True)


def assert_same_run(a, b):
    """The same steps: step 1's gradient norm (the gradient of the same initial weights, before any optimizer
    step: a gradient twice or half as large shows here, which the losses after AdamW and clipping would hide),
    every step's loss and gradient norm, the validation and test losses, and the final weights."""
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert [m["step"] for m in rows_a["train"]] == [m["step"] for m in rows_b["train"]] == [1, 2, 3]
    assert rows_a["train"][0]["grad_norm"] == pytest.approx(rows_b["train"][0]["grad_norm"], rel=1e-5)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in rows_a["train"]], [m[key] for m in rows_b["train"]], rtol=1e-4)
    for split in ("val", "test"):  # evaluation sharded over the processes, against one process
        assert rows_a[split][-1]["loss"] == pytest.approx(rows_b[split][-1]["loss"], rel=1e-5), split
    for k in weights_a:
        # Adam divides by the gradient's running scale, so where a gradient is near zero float32 rounding alone
        # (another order of summation) moves a weight by up to a few 1e-5 after 3 steps at lr 3e-3
        torch.testing.assert_close(weights_a[k], weights_b[k], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_train_ddp_two_processes_equal_one_process_with_their_global_batch(markov, tmp_path):
    """Two DDP ranks of 2 sequences each take the steps one process takes on the same 4 sequences: the gradients
    are averaged over the ranks, not summed."""
    ddp = deterministic_run(markov, tmp_path / "ddp", "--batch_size", 2,
                            launcher=("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port()))
    assert_same_run(ddp, deterministic_run(markov, tmp_path / "one", "--batch_size", 4))


@pytest.mark.distributed
def test_train_context_parallel_equals_one_process(markov, tmp_path):
    """train.py --context_parallel 2 among 4 processes: each sequence's positions split over 2 processes, data
    parallel over the 2 groups, with reverse-complement augmentation. It takes the steps one process takes on the
    same global batch: the same gradient at step 1, losses, validation and test losses, and final weights. So
    both processes of a group read the same strands, and those of one process (the draws come from the run's
    seed and the epoch, not from a process's random state)."""
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", 4, "--master_port", free_port())
    split = deterministic_run(markov, tmp_path / "cp", "--batch_size", 2, "--context_parallel", 2, "--rc_aug",
                              launcher=launcher)
    assert_same_run(split, deterministic_run(markov, tmp_path / "one", "--batch_size", 4, "--rc_aug"))


def two_node_run(*command):
    """Two torchrun agents on this machine, one process each, joined by a c10d rendezvous on 127.0.0.1 (a free
    port, a fresh id): two "nodes" of one run of `command` (a script and its flags). Returns the agents' Popen
    objects."""
    port = free_port()
    args = ["-m", "torch.distributed.run", "--nnodes", 2, "--nproc_per_node", 1, "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test{port}{os.getpid()}", *command]
    return [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def one_node_run(*command):
    """One torchrun agent of two processes on this machine running `command`; its Popen, in a list."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(), *command]
    return [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]


def finish(agents, timeout=240):
    """(exit codes, outputs) of the agents; a run that hangs past `timeout` seconds is killed and fails."""
    try:
        results = [agent.communicate(timeout=timeout) for agent in agents]
    except subprocess.TimeoutExpired:
        for agent in agents:
            subprocess.run(["pkill", "-9", "-P", str(agent.pid)])
            agent.kill()
        pytest.fail(f"the run did not end within {timeout} s")
    return [agent.returncode for agent in agents], results


@pytest.mark.slow
def test_resume_after_sigkills_at_random_moments_and_a_torn_metrics_line(markov, tmp_path):
    """A run that checkpoints every step, killed with SIGKILL at random moments (checkpoint writing included),
    resumes each time; a torn last line in metrics.jsonl is dropped with a warning."""
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "--fasta", markov[0], "--seq_len", 32, "--min_seq_len", 32, "--batch_size",
            2, "--max_steps", 400, "--ckpt_interval", 1, "--eval_interval", 1000, "--eval_batches", 1, "--out", out]
    rng = np.random.default_rng(0)
    for attempt in range(3):
        run = subprocess.Popen(list(map(str, args + (["--resume"] if attempt else []))), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None and not (out / "train_state.pt").exists():
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.2, 1.5)))
        run.kill()
        _, err = run.communicate()
        assert run.returncode == -signal.SIGKILL, err[-2000:]  # still training when killed: the resume worked
        state = torch.load(out / "train_state.pt", weights_only=True)  # the last checkpoint is whole
        assert state["step"] >= 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "split": "tr')  # a write cut short
    done = run_script(*args[1:-4], "--max_steps", state["step"] + 2, "--out", out, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped a torn last line" in done.stderr
    steps = [m["step"] for m in read_metrics(out) if m["split"] == "train"]
    assert steps == list(range(1, state["step"] + 3))


@pytest.mark.slow
def test_grad_accum_equals_the_bigger_batch(markov, tmp_path):
    """Accumulating 2 micro-batches of 2 takes the steps of one batch of 4 (same sequences, same mean loss)."""
    accumulated = deterministic_run(markov, tmp_path / "accum", "--batch_size", 2, "--grad_accum", 2)
    assert_same_run(accumulated, deterministic_run(markov, tmp_path / "whole", "--batch_size", 4))
    different = deterministic_run(markov, tmp_path / "half", "--batch_size", 2)  # the check can tell batches apart
    assert not np.allclose([m["loss"] for m in different[0]["train"][1:]],
                           [m["loss"] for m in accumulated[0]["train"][1:]], rtol=1e-5)


def test_workers_read_what_the_main_process_reads(markov, tmp_path):
    """--workers 2 (DataLoader worker processes) runs the steps of --workers 0, reverse-complement draws
    included; another --seed does not (the check can tell runs apart)."""
    in_workers = deterministic_run(markov, tmp_path / "w2", "--rc_aug", "--workers", 2)
    assert_same_run(in_workers, deterministic_run(markov, tmp_path / "w0", "--rc_aug"))
    other = deterministic_run(markov, tmp_path / "seed", "--rc_aug", "--seed", 1)
    assert not np.allclose([m["loss"] for m in other[0]["train"]], [m["loss"] for m in in_workers[0]["train"]])


def test_accumulated_gradients_are_those_of_the_whole_batch():
    """train.accumulate_gradients over micro-batches leaves in every parameter's .grad the gradient of the mean
    loss over all the step's sequences, as one micro-batch of them all does."""
    torch.manual_seed(0)
    cfg = th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=40, embed_dropout=0.0)
    model = th.HyenaDNA(cfg).double()
    ids = torch.randint(7, 11, (4, 33), generator=torch.Generator().manual_seed(1))

    def job(micro):  # a Job whose batches are the 4 sequences, `micro` at a time
        parts = iter(zip(ids[:, :-1].split(micro), ids[:, 1:].split(micro)))
        return types.SimpleNamespace(next_batch=lambda step: next(parts), loss=lambda m, x, y: (train.lm_loss(m, x, y), None))
    results = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        model.zero_grad(set_to_none=True)
        loss, records = trainer.accumulate_gradients(model, job(micro), 0, accum, torch.device("cpu"))
        assert len(records) == accum
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole_loss, whole), *accumulated = results
    for loss, grads in accumulated:
        assert loss == pytest.approx(whole_loss, rel=1e-12)
        for name, grad in whole.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-14)


def test_learning_rate_schedule():
    """Linear warm-up to the peak, then a cosine that falls monotonically to 10% of it at max_steps."""
    args = types.SimpleNamespace(lr=1e-3, warmup_steps=10, max_steps=110)
    lrs = [trainer.lr_at(step, args) for step in range(120)]
    np.testing.assert_allclose(lrs[:10], [1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)  # held at the floor after


def test_weight_decay_only_on_matrices_outside_the_filter():
    """AdamW decays the embedding and the projections' and MLP's matrices; never biases, norms, or the implicit
    filter (a function of position); frozen parameters are not handed to the optimizer at all."""
    model = th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=20))
    decayed, plain = trainer.adamw(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    expected = {"embedding.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                       for m in ("mixer.in_proj", "mixer.short_conv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")}
    assert decayed_names == expected
    assert {names[id(p)] for p in plain["params"]} == set(names.values()) - expected
    model.blocks[0].requires_grad_(False)
    groups = trainer.adamw(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))).param_groups
    assert not {names[id(p)] for g in groups for p in g["params"]} & {n for n in names.values() if n.startswith("blocks.0.")}


def test_memory_comes_first_under_checkpointing(markov, tmp_path, monkeypatch):
    """A run that checkpoints activations on the CPU (a length that memory limits) asks glibc to hand freed
    buffers back (fast.tune_cpu_memory(memory_first=True)); one that does not keeps them, for speed."""
    calls = []
    monkeypatch.setattr(train.fast, "tune_cpu_memory", lambda memory_first=False: calls.append(memory_first))
    for checkpointing in ("on", "off"):
        result = run_script("train.py", "--fasta", markov[0], "--seq_len", 32, "--min_seq_len", 32, "--max_steps", 1,
                            "--eval_batches", 1, "--batch_size", 2, "--device", "cpu", "--checkpointing", checkpointing,
                            "--out", tmp_path / checkpointing)
        assert result.returncode == 0, result.stderr[-2000:]
    assert calls == [False, True, False]


def test_weight_decay_flag_reaches_the_optimizer_at_its_limits(markov):
    """train.py --weight_decay 0 (its limit) and 0.3 are the decayed group's rate (the other group stays at 0);
    a negative rate is refused."""
    for value in (0.0, 0.3):
        args = train.parse_args(["--fasta", markov[0], "--weight_decay", str(value)])
        model = th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=20))
        settings = trainer.Settings.from_args(args)
        groups = trainer.adamw(model, settings).param_groups
        assert [g["weight_decay"] for g in groups] == [value, 0.0] and groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(th.UserError, match="--weight_decay"):
        train.parse_args(["--fasta", markov[0], "--weight_decay", "-0.1"])
