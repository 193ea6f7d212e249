"""What the test files share: paths, model builders, the Markov source, table writers, and running scripts."""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from onnx.reference.op_run import OpRun

import checkpoints
import cli
import tinyhyena as th


ROOT = Path(__file__).resolve().parent.parent  # the repository: scripts run from here


FIXTURE = ROOT / "fixtures" / "hyenadna_tiny"  # published layout + the published code's outputs


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def rel_err(out, ref):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_model(cfg, seed, fast=True, channel_group=None):
    """A model whose every weight is drawn at a scale where no term of the forward pass is negligible
    (the published init makes the filter MLP nearly silent, which would hide mistakes in it). channel_group
    sets the fast path's channels per group (small: several groups)."""
    torch.manual_seed(seed)
    model = th.HyenaDNA(cfg, fast=fast).eval()
    if fast and channel_group:
        for block in model.blocks:
            block.mixer.fast.channel_group = channel_group
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("freq"):
                p.uniform_(0.5, 2.0)
            elif p.dim() >= 2:
                p.normal_(0, 1 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.5)
    return model


def with_float64_tables(model):
    """The model (in float64) with its stored positional features and window rates computed in float64 too:
    their float32 rounding, amplified by random weights, reached 1e-4 of the output, which would hide
    differences of that size from the NumPy twin."""
    for block in model.blocks:
        filt = block.mixer.filter
        z, t = th.positional_features(filt.l_max, filt.emb_dim, dtype=torch.float64)
        with torch.no_grad():
            filt.z.copy_(z), filt.t.copy_(t)
            filt.deltas.copy_(th.window_decay_rates(len(filt.deltas), dtype=torch.float64))
    return model


# Lengths where bugs live: 1, the first few, both sides of powers of two and of the fast path's FFT sizes
# (smooth numbers: 2^a 3^b 5^c), and up to a few thousand.
LENGTHS = [1, 2, 3, 5, 7, 13, 31, 32, 33, 63, 64, 65, 97, 128, 255, 256, 257, 331, 511, 512, 513, 1000, 1023, 1024,
           1025, 1537, 2047, 2048, 2049, 3000]


@st.composite
def configs_and_lengths(draw, max_len=3000):
    """(cfg, L, B, seed, channel_group): widths and channel groups that make several groups, orders 2-4."""
    cfg = th.HyenaConfig(
        d_model=draw(st.integers(1, 12)) * 2,
        n_layer=draw(st.integers(1, 2)),
        d_inner=draw(st.integers(4, 48)),
        order=draw(st.integers(2, 4)),
        filter_order=draw(st.integers(2, 16)),
        emb_dim=draw(st.sampled_from([3, 5, 7])),
        short_filter_order=draw(st.integers(1, 4)),
        l_max=draw(st.integers(2, max_len)),
    )
    L = draw(st.one_of(st.sampled_from(LENGTHS + [cfg.l_max, cfg.l_max - 1]), st.integers(1, cfg.l_max)))
    group = draw(st.one_of(st.none(), st.integers(1, cfg.d_model)))  # None: the budget's choice
    return cfg, max(1, min(L, cfg.l_max)), draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1)), group


def direct_causal_conv(u, k):
    """y[b, c, t] = sum_{s<=t} k[c, t-s] u[b, c, s], the O(L^2) way."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        y[..., t] = (u[..., :t + 1] * k[:, :t + 1].flip(-1)).sum(-1)
    return y


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hf_folder(tmp_path, name="hf", drop=(), weights="safetensors", **config_changes):
    """The fixture written as a -hf folder; `drop` removes weight keys (as the hub's deduplicating save does),
    `config_changes` edits config.json."""
    folder = tmp_path / name
    th.save_pretrained(th.from_pretrained(FIXTURE), folder, layout="hf")
    state = {k: v for k, v in checkpoints.read_safetensors(folder / "model.safetensors").items() if k not in drop}
    if weights == "bin":
        os.remove(folder / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
    else:
        checkpoints.write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_script(script, *args, cwd=ROOT):
    """`python script args` run in this process: the script's main(argv) through cli.run_command, as its
    __main__ runs it, with what it prints captured. A CompletedProcess (returncode, stdout, stderr). A fresh
    process would spend 2 s importing torch; run_process is for what needs one (signals, torchrun, memory, a
    script's __main__ itself)."""
    module = importlib.import_module(Path(script).stem)
    stdout, stderr, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.run_command(module.main, [str(a) for a in args])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())


def run_process(*args, cwd=ROOT, env=None, timeout=600):
    """`python args` in a fresh process."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert last.startswith("error: ") and all(n in last for n in needles), result.stderr


def markov_table(seed=0, favourites=None):
    """(16, 4) transition probabilities of an order-2 Markov source: after each pair of bases (row 4*a + b),
    one next base (its favourite, random unless given) has probability 0.7, the other three 0.1."""
    rng = np.random.default_rng(seed)
    probs = np.full((16, 4), 0.1)
    probs[np.arange(16), rng.integers(0, 4, 16) if favourites is None else favourites] = 0.7
    return probs


def markov_sequence(probs, length, rng):
    """A base string drawn from the source."""
    cum, seq, u = probs.cumsum(1), [int(rng.integers(4)), int(rng.integers(4))], rng.random(length)
    for i in range(2, length):
        seq.append(min(3, int(np.searchsorted(cum[seq[-2] * 4 + seq[-1]], u[i]))))
    return "".join("ACGT"[b] for b in seq[:length])


def markov_genome(path, n_chroms=4, length=40000, seed=0):
    """A genome from the order-2 Markov source markov_table(seed). Returns the entropy rate in nats per base."""
    rng = np.random.default_rng(seed)
    probs = markov_table(seed)
    with open(path, "w") as f:
        for c in range(n_chroms):
            text = markov_sequence(probs, length, rng)
            f.write(f">chr{c}\n" + "\n".join(text[i:i + 70] for i in range(0, length, 70)) + "\n")
    return -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))


def read_metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rfft(OpRun):  # onnx.reference matches ops by class name
    """com.microsoft.Rfft as ONNX Runtime's CUDA kernel computes it (cuFFT R2C, unnormalised), for onnx's
    reference evaluator: the cuda graph's arithmetic is checked on a machine without a GPU."""
    op_domain = "com.microsoft"

    def _run(self, x, normalized=0, onesided=1, signal_ndim=1):
        X = np.fft.rfft(x.astype(np.float64), axis=-1)
        return (np.stack([X.real, X.imag], -1).astype(x.dtype),)


class Irfft(OpRun):
    """com.microsoft.Irfft as the CUDA kernel computes it: m bins give 2m-1 outputs, divided by 2m-1."""
    op_domain = "com.microsoft"

    def _run(self, x, normalized=0, onesided=1, signal_ndim=1):
        return (np.fft.irfft(x[..., 0] + 1j * x[..., 1], n=2 * x.shape[-2] - 1, axis=-1).astype(x.dtype),)


def spearman(a, b):
    """Spearman's rank correlation, ties given their average rank."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average the ranks of tied values
            r[x == value] = r[x == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


SOURCES = [markov_table(0), markov_table(0, favourites=0)]  # the genome's source, and one that favours A


def labelled(n, seed, lengths=(80, 120)):
    """n sequences alternating between the two sources: [(sequence, class 0 or 1)]."""
    rng = np.random.default_rng(seed)
    return [(markov_sequence(SOURCES[i % 2], int(rng.integers(*lengths)), rng), i % 2) for i in range(n)]


def write_table(path, rows, sep=",", labels=("neg", "pos"), split=None):
    with open(path, "w") as f:
        f.write(sep.join(["name", "sequence", "label"] + (["split"] if split else [])) + "\n")
        for i, (seq, c) in enumerate(rows):
            f.write(sep.join([f"s{i}", seq, labels[c]] + ([split(i)] if split else [])) + "\n")


def write_benchmark(root, split, rows, labels=("negative", "positive")):
    for i, (seq, c) in enumerate(rows):
        folder = root / split / labels[c]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text(seq)


def write_species_fasta(path, source, seed, records=2, length=12000):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for r in range(records):
            text = markov_sequence(source, length, rng)
            f.write(f">rec{r}\n" + "\n".join(text[i:i + 60] for i in range(0, length, 60)) + "\n")


FIT = ["finetune.py", "fit", "--batch_size", 16, "--lr", 1e-3, "--max_steps", 40, "--eval_interval", 20]


def composition_rows(n, seed, length=100):
    """Sequences of random base composition, with composition-derived targets: [(sequence, gc fraction,
    [gc > 0.5, A > T, G > C])]."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = rng.dirichlet(np.ones(4))
        seq = "".join(rng.choice(list("ACGT"), size=length, p=p))
        count = {b: seq.count(b) for b in "ACGT"}
        gc = (count["G"] + count["C"]) / length
        rows.append((seq, gc, [int(gc > 0.5), int(count["A"] > count["T"]), int(count["G"] > count["C"])]))
    return rows


def n_params(model):
    return sum(p.numel() for p in model.parameters())
