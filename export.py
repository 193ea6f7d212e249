"""
Export a tinyhyena or published HyenaDNA checkpoint to ONNX, for ONNX Runtime without torch.

    python export.py                                    # newest checkpoint in out/, CUDA graph, tinyhyena.onnx
    python export.py --checkpoint DIR --target cpu --out model.onnx [--max_len N] [--outputs logits|hidden|both]

The graph takes `input_ids` int64 [batch, length] (both dynamic, length <= max_len) and gives `logits` float32
[batch, length, padded vocab] and/or `hidden` [batch, length, d_model].

The long convolution is the part that needs care (what ONNX Runtime offers, measured on version 1.31):
- the implicit filter depends only on the weights and the length, so it is computed once here, for max_len,
  and stored in the graph; a shorter sequence uses its first positions;
- `--target cuda`: ONNX's DFT op has no CUDA kernel in ONNX Runtime (nodes would fall back to the CPU), so the
  FFT is written with the contrib ops com.microsoft.Rfft / Irfft, which run on cuFFT. Their Irfft infers an
  output length of 2m-1 from m frequency bins, so the FFT size is odd;
- `--target cpu`: ONNX Runtime's CPU DFT is slow and inexact at sizes other than powers of two, so up to
  max_len 8192 the convolution is a direct one (a grouped Conv against the flipped filter, exact and fast at
  that size) and beyond that a power-of-two DFT.
"""

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import finetune
import tinyhyena as th

DIRECT_CONV_MAX_LEN = 8192


# ---------------------------------------------------------------------------------------------------------
# The long convolution as a single graph node, which each target translates its own way.

@torch.library.custom_op("tinyhyena::causal_conv", mutates_args=())
def causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (B, C, L) with k (C, L)."""
    return th.causal_fft_conv(u, k)


@causal_conv.register_fake
def _(u, k):
    return torch.empty_like(u)


def odd_fft_size(n):
    """Smallest odd 3^a 5^b 7^c >= n: sizes cuFFT is fast at, and odd as ORT's Irfft needs."""
    best = None
    p3 = 1
    while p3 < 3 * n:
        p5 = p3
        while p5 < 3 * n:
            size = p5
            while size < n:
                size *= 7
            best = size if best is None else min(best, size)
            p5 *= 5
        p3 *= 3
    return best


def cuda_translation(n):
    """onnxscript function for causal_conv on the CUDA provider: zero-pad to n, Rfft, complex product, Irfft."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    ms = onnxscript.values.Opset("com.microsoft", 1)

    def contrib(name):  # declare the contrib op's signature so onnxscript can emit it
        schema = OpSchema(name, "com.microsoft", 1, inputs=[OpSchema.FormalParameter("X", "T")],
                          outputs=[OpSchema.FormalParameter("Y", "T")], type_constraints=[("T", ["tensor(float)"], "")],
                          attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                                      for a in ("normalized", "onesided", "signal_ndim")])
        return onnxscript.values.Op(ms, name, schema)
    rfft, irfft = contrib("Rfft"), contrib("Irfft")

    def translate(u, k):  # u (B, C, L), k (C, L)
        L = op.Shape(u, start=2, end=3)
        pad_u = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), op.Sub(op.Constant(value_ints=[n]), L), axis=0)
        pad_k = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Sub(op.Constant(value_ints=[n]), op.Shape(k, start=1, end=2)), axis=0)
        U = rfft(op.Pad(u, pad_u), normalized=0, onesided=1, signal_ndim=1)  # (B, C, m, 2)
        K = rfft(op.Pad(k, pad_k), normalized=0, onesided=1, signal_ndim=1)  # (C, m, 2)
        ur, ui = op.Split(U, num_outputs=2, axis=-1)
        kr, ki = op.Split(K, num_outputs=2, axis=-1)
        Y = op.Concat(op.Sub(op.Mul(ur, kr), op.Mul(ui, ki)), op.Add(op.Mul(ur, ki), op.Mul(ui, kr)), axis=-1)
        y = irfft(Y, normalized=0, onesided=1, signal_ndim=1)  # (B, C, n), scaled by 1/n
        return op.Slice(y, op.Constant(value_ints=[0]), L, op.Constant(value_ints=[2]))
    return translate


def direct_conv(u, k):
    """u (B, C, L), k (C, L): y[t] = sum_j k[j] u[t-j], as a grouped convolution of u, padded on the left
    with L-1 zeros, against the flipped filter. O(L^2) work, but exact, and fast at short lengths."""
    L = u.shape[-1]
    return F.conv1d(F.pad(u, (L - 1, 0)), k.flip(-1)[:, None, :], groups=u.shape[1])


def dft_conv(u, k, n):
    """The FFT convolution at a fixed power-of-two size n, which torch's exporter writes as DFT nodes."""
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


class ExportedModel(nn.Module):
    """The model with frozen filters and the long convolution of one target. Inputs are not checked here:
    the graph's metadata tells an app the token map and max_len. `model` is a HyenaDNA language model, or a
    fine-tuned classifier (finetune.py) whose graph outputs class probabilities."""

    def __init__(self, model, target, max_len, outputs):
        super().__init__()
        self.model, self.outputs = copy.deepcopy(model).eval(), outputs
        lm = self.model.backbone if outputs == "probabilities" else self.model
        d = lm.cfg.d_model
        for block in lm.blocks:
            block.mlp_chunk = lm.cfg.l_max  # one MLP call: the graph has no Python loop over slices
            mixer = block.mixer
            mixer.channel_group = d  # one group: ONNX Runtime plans memory itself
            mixer.filter.freeze(lm.cfg.l_max if outputs == "probabilities" else max_len)
            if target == "cuda":
                mixer.long_conv = torch.ops.tinyhyena.causal_conv
            elif max_len <= DIRECT_CONV_MAX_LEN:
                mixer.long_conv = direct_conv
            else:
                n = th.fft_size(2 * lm.cfg.l_max, radices=(2,))
                mixer.long_conv = lambda v, h, n=n: dft_conv(v, h, n)

    def forward(self, input_ids):  # (B, L) int64
        if self.outputs == "probabilities":
            return torch.softmax(self.model(input_ids), -1)  # (B, n_classes)
        hidden = self.model.hidden_states(input_ids)  # (B, L, d)
        logits = F.linear(hidden, self.model.embedding.weight)  # (B, L, V)
        return {"logits": logits, "hidden": hidden, "both": (logits, hidden)}[self.outputs]


# Ops the CUDA graph may hold: each has a kernel in ONNX Runtime's CUDA provider (checked by the tests).
CUDA_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Tanh", "Sin", "Exp", "Neg", "Abs", "MatMul", "Gemm", "Gather",
            "Concat", "Split", "Slice", "Pad", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Shape",
            "Cast", "Constant", "ReduceMean", "LayerNormalization", "Gelu", "Erf", "Where", "Equal", "Identity",
            "Conv", "ConstantOfShape", "Range", "Flatten", "Softmax", "Rfft", "Irfft", "FastGelu",
            "SkipLayerNormalization", "BiasGelu", "Greater", "Less", "Min", "Max", "CumSum", "Einsum", "Not", "And", "ScatterND"}


def find_checkpoint(root="out"):
    """The newest folder under root (root itself included) that holds config.json and model.pt."""
    found = []
    for folder, _, files in os.walk(root):
        if "config.json" in files and ("model.pt" in files or "weights.ckpt" in files):
            found.append((os.path.getmtime(os.path.join(folder, "config.json")), folder))
    return max(found)[1] if found else None


def export(model, path, target="cuda", max_len=None, outputs="logits"):
    """Write the ONNX file (atomically) and return the onnx.ModelProto. A fine-tuned classifier's graph
    outputs "probabilities" whatever `outputs` says."""
    classifier = isinstance(model, finetune.SequenceClassifier)
    outputs = "probabilities" if classifier else outputs
    cfg = model.backbone.cfg if classifier else model.cfg
    max_len = max_len or (model.max_len if classifier else cfg.l_max)
    wrapper = ExportedModel(model, target, max_len, outputs).eval()
    example = torch.full((2, min(max_len, 16)), th.BASE_IDS["A"], dtype=torch.long)
    batch, length = torch.export.Dim("batch", max=1 << 16), torch.export.Dim("length", max=max_len)
    table = {}
    if target == "cuda":
        table[torch.ops.tinyhyena.causal_conv.default] = cuda_translation(odd_fft_size(2 * cfg.l_max - 1))
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["input_ids"],
                                    output_names={"logits": ["logits"], "hidden": ["hidden"],
                                                  "both": ["logits", "hidden"], "probabilities": ["probabilities"]}[outputs],
                                    dynamic_shapes=({0: batch, 1: length},), custom_translation_table=table,
                                    optimize=True, verbose=False)
    proto = program.model_proto
    meta = {"tokens": json.dumps({**th.SPECIAL_TOKENS, **th.BASE_IDS}), "pad_id": str(th.PAD_ID),
            "unknown_base_id": str(th.N_ID), "l_max": str(cfg.l_max), "max_len": str(max_len),
            "config": json.dumps(cfg.to_dict()), "target": target, "outputs": outputs,
            "tinyhyena_version": th.__version__}
    if classifier:
        meta.update(class_names=json.dumps(model.class_names), pool=model.pool,
                    soft_prompt=str(0 if model.prompt is None else len(model.prompt)),
                    padding="left: [PAD] ids before the sequence, as in fine-tuning")
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    import onnx
    th.atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return proto


def check_against_torch(model, path, outputs, lengths, batches=(1, 2, 3), provider="CPUExecutionProvider"):
    """Max relative error (||ort - torch|| / ||torch||) over the given shapes."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=[provider])
    if provider not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime did not enable {provider}")
    worst = 0.0
    rng = np.random.default_rng(0)
    for B in batches:
        for L in lengths:
            ids = rng.integers(7, 12, size=(B, L), dtype=np.int64)
            if outputs == "probabilities" and B > 1:  # left padding, as fine-tuning batches are padded
                ids[1:, :L // 2] = th.PAD_ID
            got = session.run(None, {"input_ids": ids})
            with torch.no_grad():
                t = torch.from_numpy(ids)
                if outputs == "probabilities":
                    ref = [torch.softmax(model(t), -1)]
                else:
                    ref = {"logits": [model(t)], "hidden": [model.hidden_states(t)],
                           "both": [model(t), model.hidden_states(t)]}[outputs]
            for g, r in zip(got, ref):
                r = r.numpy()
                worst = max(worst, float(np.linalg.norm(g - r) / np.linalg.norm(r)))
    return worst


def cuda_provider_works():
    """onnxruntime-gpu lists the CUDA provider even on machines without a GPU: ask torch and ORT both."""
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


DEFAULT_OUT = "tinyhyena.onnx"


def is_onnx_model(path):
    import onnx
    try:
        onnx.load(path, load_external_data=False)
        return True
    except Exception:  # onnx raises DecodeError, ValueError, ... depending on what the bytes look like
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX for ONNX Runtime.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest in out/)")
    p.add_argument("--out", help=f"ONNX file to write (default: {DEFAULT_OUT}, replaced only if it is an ONNX model)")
    p.add_argument("--target", default="cuda", help="cuda (ONNX Runtime's CUDA provider) or cpu")
    p.add_argument("--max_len", type=int, help="longest input the graph accepts (default: l_max)")
    p.add_argument("--outputs", choices=["logits", "hidden", "both"],
                   help="language models: logits (default), hidden or both; a fine-tuned classifier's graph "
                        "always outputs probabilities [batch, n_classes]")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    args = p.parse_args(argv)
    try:
        if args.out is None:  # not named by the user: never replace a file that is not an earlier export
            args.out = DEFAULT_OUT
            if os.path.lexists(args.out) and not (os.path.isfile(args.out) and is_onnx_model(args.out)):
                raise ValueError(f"{args.out} exists and is not an ONNX model; pass --out FILE to choose the output")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; name the ONNX file to write")
        if args.target not in ("cuda", "cpu"):
            raise ValueError(f"unknown --target {args.target!r}: choose cuda or cpu")
        checkpoint = args.checkpoint or find_checkpoint()
        if checkpoint is None:
            raise ValueError("no checkpoint in out/: train one with `python train.py ...`, "
                             "or pass --checkpoint DIR (a published HyenaDNA folder works too)")
        if os.path.isfile(os.path.join(checkpoint, finetune.CLASSIFIER_FILE)):
            if args.outputs is not None:
                raise ValueError(f"{checkpoint} is a fine-tuned classifier: its graph outputs probabilities, "
                                 "drop --outputs")
            model, args.outputs = finetune.load_classifier(checkpoint), "probabilities"
            limit = model.max_len
        else:
            model, args.outputs = th.from_pretrained(checkpoint), args.outputs or "logits"
            limit = model.cfg.l_max
        max_len = args.max_len or limit
        if not 1 <= max_len <= limit:
            raise ValueError(f"--max_len {max_len} is outside [1, {limit}] (the checkpoint's l_max)")
        proto = export(model, args.out, args.target, max_len, args.outputs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, target {args.target}, max_len {max_len}); "
          f"ops: {', '.join(ops)}")
    if not args.check:
        return 0
    lengths = sorted({1, min(37, max_len), max_len})
    if args.target == "cuda":
        if not cuda_provider_works():
            print("check skipped: ONNX Runtime's CUDA provider cannot run here (no GPU, or onnxruntime-gpu missing); "
                  "the cuda graph's Rfft/Irfft have CUDA kernels only. Export with --target cpu to check on the CPU")
            return 0
        err = check_against_torch(model, args.out, args.outputs, lengths, provider="CUDAExecutionProvider")
    else:
        err = check_against_torch(model, args.out, args.outputs, lengths)
    print(f"ONNX Runtime vs torch: max relative error {err:.2e} over batch 1-3, lengths {lengths}")
    if err > 1e-4:
        print(f"error: relative error {err:.2e} is above 1e-4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
