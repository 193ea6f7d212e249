"""
Export a tinyhyena or published HyenaDNA checkpoint to ONNX, for ONNX Runtime without torch (the graph is
onnx_graph.py's).

    python export.py                                    # newest checkpoint in out/, CUDA graph, tinyhyena.onnx
    python export.py --checkpoint DIR --target cpu --out model.onnx [--max_len N] [--outputs logits|hidden|both]

The graph takes `input_ids` int64 [batch, length] (both dynamic, length <= max_len) and gives `logits` float32
[batch, length, padded vocab] and/or `hidden` [batch, length, d_model]; a fine-tuned model's folder gives
`probabilities` or `values`. After writing, the graph is run by ONNX Runtime against torch (--no-check skips it).
"""

import os
import sys

import classifier
import cli
import fast
import tinyhyena as th
from onnx_graph import check_against_torch, cuda_provider_works, export, graph_ops


def find_checkpoint(root="out"):
    """The newest folder under root (root itself included) that holds config.json and model.pt."""
    found = []
    for folder, _, files in os.walk(root):
        if "config.json" in files and ("model.pt" in files or "weights.ckpt" in files):
            found.append((os.path.getmtime(os.path.join(folder, "config.json")), folder))
    return max(found)[1] if found else None


DEFAULT_OUT = "tinyhyena.onnx"


def is_onnx_model(path):
    import onnx
    try:
        onnx.load(path, load_external_data=False)
        return True
    except Exception:  # onnx raises DecodeError, ValueError, ... depending on what the bytes look like
        return False


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    p = cli.ArgumentParser(description="Export a checkpoint to ONNX for ONNX Runtime.")
    p.add_argument("--checkpoint", type=cli.existing_path, help="checkpoint folder (default: the newest in out/)")
    p.add_argument("--out", type=cli.output_file, help=f"ONNX file to write (default: {DEFAULT_OUT}, replaced only if it is an ONNX model)")
    p.add_argument("--target", default="cuda", choices=["cuda", "cpu"], help="cuda (ONNX Runtime's CUDA provider) or cpu")
    p.add_argument("--max_len", type=cli.positive_int, help="longest input the graph accepts (default: l_max)")
    p.add_argument("--outputs", choices=["logits", "hidden", "both"],
                   help="language models: logits (default), hidden or both; a fine-tuned model's graph "
                        "always outputs what its task predicts (probabilities or values)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    args = p.parse_args(argv)
    out = args.out
    if out is None:  # not named by the user: never replace a file that is not an earlier export
        out = DEFAULT_OUT
        if os.path.lexists(out) and not (os.path.isfile(out) and is_onnx_model(out)):
            raise th.UserError(f"{out} exists and is not an ONNX model; pass --out FILE to choose the output")
    checkpoint = args.checkpoint or find_checkpoint()
    if checkpoint is None:
        raise th.UserError("no checkpoint in out/: train one with `python train.py ...`, "
                         "or pass --checkpoint DIR (a published HyenaDNA folder works too)")
    if classifier.is_classifier_folder(checkpoint):
        if args.outputs is not None:
            raise th.UserError(f"{checkpoint} is a fine-tuned model: its graph outputs what its task predicts, "
                             "drop --outputs")
        model = classifier.load_classifier(checkpoint)
        outputs, limit = classifier.OUTPUT_NAME[model.task], model.max_len
    else:
        model = th.from_pretrained(checkpoint)
        outputs, limit = args.outputs or "logits", model.cfg.l_max
    max_len = args.max_len or limit
    if not 1 <= max_len <= limit:
        raise th.UserError(f"--max_len {max_len} is outside [1, {limit}] (the checkpoint's l_max)")
    proto = export(model, out, args.target, max_len, outputs)
    ops = sorted({op for _, op in graph_ops(proto.graph)})
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, target {args.target}, max_len {max_len}); "
          f"ops: {', '.join(ops)}")
    if not args.check:
        return 0
    lengths = sorted({1, min(37, max_len), max_len})
    if args.target == "cuda":
        if not cuda_provider_works():
            print("check skipped: ONNX Runtime's CUDA provider cannot run here (no GPU, or onnxruntime-gpu missing); "
                  "the cuda graph's Rfft/Irfft have CUDA kernels only. Export with --target cpu to check on the CPU")
            return 0
        err = check_against_torch(model, out, outputs, lengths, provider="CUDAExecutionProvider")
    else:
        err = check_against_torch(model, out, outputs, lengths)
    print(f"ONNX Runtime vs torch: max relative error {err:.2e} over batch 1-3, lengths {lengths}")
    if err > 1e-4:
        print(f"error: relative error {err:.2e} is above 1e-4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
