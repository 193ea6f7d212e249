"""
Measured speed and memory of tinyhyena, against the floor and against attention.

    python bench.py [--device cpu|cuda] [--preset tiny] [--lengths 1024,32768,1048576] [--batch 1] [--train]
    python bench.py --published standalone_hyenadna.py --lengths 1024 --batch 32 --train    # side by side
    python bench.py --generate                              # sampling speed of each decoding method

Each measurement runs in a fresh subprocess, so its peak memory (RSS on CPU, allocated memory on CUDA) is its
own. Per length it reports: tinyhyena inference (and with --train a training step: forward, backward, with
the same activation-checkpointing rule as train.py); the floor, i.e. the FFT convolutions and the linear
layers alone, the work no implementation can skip; and a causal Transformer of the same width and depth using
torch's scaled_dot_product_attention, until it runs out of memory or time; and the model exported by
export.py for the device, run by ONNX Runtime (inference only). With --published PATH (the published
HyenaDNA standalone file, HazyResearch/hyena-dna `standalone_hyenadna.py`; it needs `pip install einops`), the
published implementation of the same size is measured too, in the same environment, alternating with
tinyhyena. The table is printed with the device, versions and date; with --append it is also added to the end
of BENCHMARKS.md's history.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import base
import checkpoints
import cli
import fast
import tinyhyena as th
from trainer import checkpointing_needed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class CausalTransformer(nn.Module):
    """The paper's baseline: same width, depth and MLP as the Hyena model, attention as the mixer."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(cfg.d_model), qkv=nn.Linear(cfg.d_model, 3 * cfg.d_model),
            out=nn.Linear(cfg.d_model, cfg.d_model), norm2=nn.LayerNorm(cfg.d_model),
            mlp=th.MLP(cfg))) for _ in range(cfg.n_layer))
        self.heads = max(1, cfg.d_model // 64)

    def forward(self, ids):
        x = self.embedding(ids)
        B, L, d = x.shape
        for layer in self.layers:
            q, k, v = layer["qkv"](layer["norm1"](x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
            x = x + layer["out"](a)
            x = x + layer["mlp"](layer["norm2"](x))
        return F.linear(x, self.embedding.weight)


def floor_step(cfg, L, device, batch):
    """The unavoidable work of one forward pass, done the plain way: per layer, (order-1) FFT convolutions
    over d_model channels (rfft of input and filter, product, irfft, all at size 2L) and the four linear
    layers (in_proj, out_proj, fc1, fc2)."""
    d, n = cfg.d_model, fast.fft_size(2 * L - 1)
    u, k = torch.randn(batch, d, L, device=device), torch.randn(d, L, device=device)
    x = torch.randn(batch, L, d, device=device)
    lin = [nn.Linear(d, (cfg.order + 1) * d), nn.Linear(d, d), nn.Linear(d, cfg.d_inner), nn.Linear(cfg.d_inner, d)]
    lin = [m.to(device) for m in lin]

    def run():
        for _ in range(cfg.n_layer):
            for _ in range(cfg.order - 1):
                torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
            lin[0](x)
            lin[1](x)
            lin[3](lin[2](x))
    return run


def onnx_step(cfg, L, device, batch):
    """The same model exported by export.py for this device (max_len = L), run by ONNX Runtime."""
    import tempfile
    import onnxruntime as ort
    import onnx_graph
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    with tempfile.TemporaryDirectory() as folder:  # the session holds the graph: the file can go
        path = os.path.join(folder, "bench.onnx")
        onnx_graph.export(th.HyenaDNA(cfg).eval(), path, device.type, max_len=L)
        session = onnx_graph.ort_session(path, provider)
    ids = np.random.default_rng(0).integers(7, 12, size=(batch, L), dtype=np.int64)
    if device.type != "cuda":
        return lambda: session.run(None, {"input_ids": ids})
    # as a GPU app serves: the input and the logits stay on the GPU (IO binding), so no host copy is timed
    binding = session.io_binding()
    binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, "cuda", 0))
    binding.bind_output("logits", "cuda", 0)
    return lambda: session.run_with_iobinding(binding)


GENERATE_PROMPT = 64  # bases of prompt before the generated ones


def generation_time(method, preset, L, device, budget):
    """Runs in a subprocess: seconds to sample L bases (greedy) after a GENERATE_PROMPT-base prompt with
    decoding.generate's `method`. A method whose cost per base grows with t (cache, forward) is first timed at
    position L/2; where L times that (its time for L bases if the cost grows linearly) is over `budget`, the
    run is not made, and (L/2) times it is reported as a lower bound: the second half's bases each cost at least
    as much."""
    import decoding
    cfg = th.preset_config(preset, l_max=GENERATE_PROMPT + L + 2)
    torch.manual_seed(0)
    model = th.HyenaDNA(cfg).to(device).eval()
    bases = torch.randint(7, 11, (GENERATE_PROMPT + L,), generator=torch.Generator().manual_seed(0))
    if method != "online":
        half = GENERATE_PROMPT + L // 2
        times = []
        with torch.no_grad():
            if method == "cache":
                state = model.decoding_state(GENERATE_PROMPT + L, th.ConvHistory)
                model.prefill(bases[None, :half].to(device), state)
            for i in range(9 if method == "cache" else 4):  # the first is a warm-up, not timed
                start = time.perf_counter()
                if method == "cache":
                    model.step(bases[half + i:half + i + 1].to(device), state)
                else:
                    model(bases[None, :half + i].to(device))
                sync(device)
                times.append(time.perf_counter() - start)
        per_base = sorted(times[1:])[len(times) // 2 - 1]  # the median of the timed ones
        if L * per_base > budget:
            return {"seconds": L // 2 * per_base, "lower_bound": True}
    start = time.perf_counter()
    decoding.generate(model, bases[:GENERATE_PROMPT], L, temperature=0, method=method)
    sync(device)
    return {"seconds": time.perf_counter() - start, "lower_bound": False}


def generation_table(args, lengths):
    """Bases per second of each decoding method at each length, one fresh process per measurement."""
    lines = [f"\n## Generation: {args.preset}, {args.device}, {datetime.date.today()}",
             f"torch {torch.__version__}, batch 1, greedy, after a {GENERATE_PROMPT}-base prompt; each run a fresh "
             "process (peak = its peak memory). A time marked >= is a lower bound: the run would take longer than "
             "--timeout, and (L/2) times the cost of one base at position L/2 is shown.\n",
             "| bases | method | seconds | bases per second | peak GB |", "|---|---|---|---|---|"]
    for L in lengths:
        for method in ("online", "cache", "forward"):
            result, err = measure(f"generate-{method}", args.preset, L, args.device, False, args.timeout + 60,
                                  1, budget=args.timeout)
            if result is None:
                line = f"| {L:,} | {method} | {err} | - | - |"
            else:
                bound = ">= " if result["lower_bound"] else ""
                rate = ("<= " if bound else "") + f"{L / result['seconds']:,.1f}"
                line = f"| {L:,} | {method} | {bound}{result['seconds']:.2f} | {rate} | {result['peak_gb']:.2f} |"
            lines.append(line)
            print(line, flush=True)
    emit(lines, args.append)
    return 0


def load_published(path):
    """Import the published standalone file from path. It imports two names that a forward pass never uses:
    torchvision's StochasticDepth (its blocks use it at p = 0, the identity) and the base classes of
    transformers' tokenizer; when those packages are not installed, inert stand-ins take their place."""
    import importlib.util
    import types

    class Identity(nn.Module):  # StochasticDepth(p=0, mode) is the identity
        def __init__(self, p, mode):
            super().__init__()
            if p:
                raise th.UserError("bench.py's stand-in for StochasticDepth supports p = 0 only")

        def forward(self, x):
            return x
    stand_ins = {"torchvision": {}, "torchvision.ops": {"StochasticDepth": Identity}, "transformers": {},
                 "transformers.tokenization_utils": {"AddedToken": lambda *a, **k: a[0] if a else None,
                                                     "PreTrainedTokenizer": type("PreTrainedTokenizer", (), {})}}
    missing = {p for p in ("torchvision", "transformers") if importlib.util.find_spec(p) is None}
    for name, attrs in stand_ins.items():
        if name.split(".")[0] in missing:
            module = sys.modules.setdefault(name, types.ModuleType(name))
            for key, value in attrs.items():
                setattr(module, key, value)
    spec = importlib.util.spec_from_file_location("published_hyenadna", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published_model(path, cfg):
    """The published HyenaDNAModel with cfg's sizes (its own initialisation) and a function that maps ids to
    next-token logits, as tinyhyena's model(ids) does."""
    published = load_published(path)
    layer = {"_name_": "hyena", "emb_dim": cfg.emb_dim, "filter_order": cfg.filter_order, "local_order": 3,
             "l_max": cfg.l_max, "modulate": True, "w": cfg.w, "lr": 6e-4, "wd": 0.0, "lr_pos_emb": 0.0}
    model = published.HyenaDNAModel(d_model=cfg.d_model, n_layer=cfg.n_layer, d_inner=cfg.d_inner,
                                    vocab_size=cfg.vocab_size, layer=layer, resid_dropout=0.0, embed_dropout=0.1,
                                    fused_mlp=False, fused_dropout_add_ln=False, residual_in_fp32=True,
                                    pad_vocab_size_multiple=cfg.pad_vocab_size_multiple)
    embedding = model.backbone.embeddings.word_embeddings.weight
    return model, lambda ids: model(ids) @ embedding.T


def measure_one(kind, preset, L, device_name, train, batch, published_path=None, budget=None):
    """Runs in a subprocess: time a call (after a warm-up call where it is cheap; the median of three up to
    2^17) and report peak memory."""
    device = torch.device(device_name)
    if kind.startswith("generate-"):
        result = generation_time(kind.split("-", 1)[1], preset, L, device, budget)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({**result, "peak_gb": peak / 1e9}))
        return
    torch.manual_seed(0)
    cfg = th.preset_config(preset, l_max=L + 2)
    ids = torch.randint(7, 12, (batch, L), device=device)
    if kind == "floor":
        fn = floor_step(cfg, L, device, batch)
    elif kind == "onnx":
        fn = onnx_step(cfg, L, device, batch)
    else:
        if kind == "published":
            model, logits = published_model(published_path, cfg)
        else:
            model = th.HyenaDNA(cfg) if kind == "hyena" else CausalTransformer(cfg)
            logits = model
        model = model.to(device)
        if train:
            model.train()
            if kind == "hyena":  # the rule train.py applies
                model.gradient_checkpointing = checkpointing_needed(cfg, L, device)

            def fn():
                F.cross_entropy(logits(ids).flatten(0, 1), ids.flatten()).backward()
                model.zero_grad(set_to_none=True)
        else:
            model.eval()

            def fn():
                with torch.no_grad():
                    logits(ids)
    with torch.no_grad() if kind in ("floor", "onnx") else torch.enable_grad():
        if L <= 1 << 17:
            fn()  # warm-up: allocator, FFT plans, kernels
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3 if L <= 1 << 17 else 1):  # the median of 3 where a call is short: the machine is noisy
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        seconds = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_gb": peak / 1e9}))


def measure(kind, preset, L, device, train, timeout, batch, published=None, budget=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", kind, "--preset", preset, "--lengths", str(L),
           "--device", device, "--batch", str(batch)] + (["--train"] if train else []) + \
          (["--published", published] if published else []) + (["--timeout", str(budget)] if budget else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout:.0f} s"
    if r.returncode != 0:
        return None, "out of memory" if r.returncode in (-9, 137) or "out of memory" in r.stderr else "failed"
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py), the same for every
    # implementation measured: each measurement's process runs this main too
    p = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "large", *checkpoints.PRESETS])
    p.add_argument("--lengths", help="comma-separated (default 1024,32768,131072,1048576; with --generate "
                                     "4096,16384,65536,262144)")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="sequences per call")
    p.add_argument("--train", action="store_true", help="also time a training step")
    p.add_argument("--timeout", type=cli.positive_float, default=600, help="seconds allowed to one measurement")
    p.add_argument("--onnx_max_len", type=cli.nonnegative_int, default=1 << 20,
                   help="longest length run through ONNX Runtime")
    p.add_argument("--published", metavar="PATH", type=cli.existing_file,
                   help="the published standalone_hyenadna.py: measure it side by side")
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="with --published: alternating rounds (medians reported)")
    p.add_argument("--generate", action="store_true",
                   help="time sampling --lengths bases (default 4096,16384,65536,262144) with each decoding method")
    p.add_argument("--append", action="store_true", help="also add the table to the end of BENCHMARKS.md")
    p.add_argument("--_measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    text = args.lengths or ("4096,16384,65536,262144" if args.generate else "1024,32768,131072,1048576")
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        p.error(f"--lengths {text!r}: expected positive integers, comma-separated")
    cli.pick_device(args.device)
    if args._measure:
        measure_one(args._measure, args.preset, lengths[0], args.device, args.train, args.batch, args.published,
                    args.timeout)
        return 0
    if args.generate:
        return generation_table(args, lengths)
    if args.published:
        return side_by_side(args, lengths)

    rows, attention_dead = [], None
    modes = [False, True] if args.train else [False]
    for L in lengths:
        for train in modes:
            mode = "train step" if train else "inference"
            hyena, err = measure("hyena", args.preset, L, args.device, train, args.timeout, args.batch)
            floor = measure("floor", args.preset, L, args.device, False, args.timeout, args.batch)[0] if not train else None
            attn, attn_err = (None, attention_dead) if attention_dead else \
                measure("attention", args.preset, L, args.device, train, args.timeout, args.batch)
            if attn_err and not train:
                attention_dead = attn_err
            onnx, onnx_err = measure("onnx", args.preset, L, args.device, False, args.timeout, args.batch) \
                if not train and L <= args.onnx_max_len else (None, None)
            notes = [f"tinyhyena: {err}" if err else "", f"attention: {attn_err}" if attn_err else "",
                     f"onnxruntime: {onnx_err}" if onnx_err else ""]
            row = {"length": L, "mode": mode, "hyena_s": hyena and hyena["seconds"], "hyena_gb": hyena and hyena["peak_gb"],
                   "floor_s": floor and floor["seconds"], "attention_s": attn and attn["seconds"],
                   "attention_gb": attn and attn["peak_gb"], "onnx_s": onnx and onnx["seconds"],
                   "onnx_gb": onnx and onnx["peak_gb"],
                   "note": "; ".join(n for n in notes if n)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    lines = [f"\n## {args.preset}, {args.device} ({device_name}), {datetime.date.today()}",
             f"torch {torch.__version__}, Python {platform.python_version()}, float32, batch {args.batch}. "
             "Peak memory is the measuring process's peak RSS on CPU, torch's peak allocation on CUDA.\n",
             "| length | mode | tinyhyena s | peak GB | floor s | ratio to floor | attention s | attention GB | "
             "onnxruntime s | onnxruntime GB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["hyena_s"] / r["floor_s"] if r["hyena_s"] and r["floor_s"] else None
        lines.append(f"| {r['length']:,} | {r['mode']} | {fmt(r['hyena_s'], '.3f')} | {fmt(r['hyena_gb'], '.2f')} | "
                     f"{fmt(r['floor_s'], '.3f')} | {fmt(ratio, '.2f')} | {fmt(r['attention_s'], '.3f')} | "
                     f"{fmt(r['attention_gb'], '.2f')} | {fmt(r['onnx_s'], '.3f')} | {fmt(r['onnx_gb'], '.2f')} | "
                     f"{r['note']} |")
    emit(lines, args.append)
    return 0


BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "BENCHMARKS.md")


def emit(lines, append):
    """Print the table; with `append`, add it to the end of BENCHMARKS.md (its history, in date order),
    rewriting the file atomically: earlier tables stay as they are."""
    table = "\n".join(lines) + "\n"
    print(table)
    if append:
        with open(BENCHMARKS) as f:
            old = f.read()
        base.write_text(BENCHMARKS, [old.rstrip("\n") + "\n\n", table])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def side_by_side(args, lengths):
    """Published implementation and tinyhyena, same sizes, same environment, alternating --rounds times."""
    modes = ["inference"] + (["train step"] if args.train else [])
    lines = [f"\n## Side by side with the published implementation: {args.preset}, {args.device}, batch {args.batch}, "
             f"{datetime.date.today()}",
             f"torch {torch.__version__}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} for "
             f"both, {args.rounds} alternating rounds, medians (each run a fresh process; peak = its peak memory).\n",
             "| length | mode | published s | tinyhyena s | speed-up | published GB | tinyhyena GB | runs (published / tinyhyena) |",
             "|---|---|---|---|---|---|---|---|"]
    for L in lengths:
        for mode in modes:
            runs = {"published": [], "hyena": []}
            for _ in range(args.rounds):
                for kind in runs:
                    result, err = measure(kind, args.preset, L, args.device, mode != "inference", args.timeout,
                                          args.batch, args.published if kind == "published" else None)
                    if result:
                        runs[kind].append(result)
                    else:
                        print(f"{kind} at {L} ({mode}): {err}", file=sys.stderr)
            med = {k: sorted(r["seconds"] for r in v)[len(v) // 2] if v else None for k, v in runs.items()}
            mem = {k: max(r["peak_gb"] for r in v) if v else None for k, v in runs.items()}
            speed = f"{med['published'] / med['hyena']:.2f}x" if med["published"] and med["hyena"] else "-"
            spread = " / ".join(", ".join(f"{r['seconds']:.3f}" for r in runs[k]) or "-" for k in ("published", "hyena"))
            line = (f"| {L:,} | {mode} | {fmt(med['published'], '.3f')} | {fmt(med['hyena'], '.3f')} | {speed} | "
                    f"{fmt(mem['published'], '.2f')} | {fmt(mem['hyena'], '.2f')} | {spread} |")
            lines.append(line)
            print(line, flush=True)
    emit(lines, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
