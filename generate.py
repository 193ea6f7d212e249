"""
Sample DNA from a pretrained model: continuations of a prompt, one base at a time (decoding.py decodes).

    python generate.py --checkpoint DIR --prompt ACGTTGCA --length 1000 --num 4 --temperature 0.8 --out gen.fa
    python generate.py --checkpoint DIR --prompt_fasta prompt.fa --length 4096 --top_k 2 --seed 1 --out gen.fa

Sampling draws bases only (A, C, G, T). --temperature 0 takes the most probable base at each step. --method
online (the default) decodes exactly in O(log^2 t) per base; cache (O(t) per base) and forward (a whole forward
pass per base) are the references it is tested against.
"""

import sys

import numpy as np

import base
import cli
import fast
import tinyhyena as th
from decoding import METHODS, generate


def main(argv=None):
    fast.tune_cpu_memory()  # process-wide CPU memory settings, before any tensor (fast.py)
    p = cli.ArgumentParser(description="Sample DNA continuations of a prompt from a pretrained model.")
    p.add_argument("--checkpoint", required=True, type=cli.existing_path, help="published, hub or tinyhyena folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt's bases")
    prompt.add_argument("--prompt_fasta", type=cli.existing_file, help="a FASTA whose first record is the prompt")
    p.add_argument("--length", type=cli.positive_int, required=True, help="bases to generate after the prompt")
    p.add_argument("--num", type=cli.positive_int, default=1, help="continuations to sample")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=1.0, help="0: the most probable base")
    p.add_argument("--top_k", type=int, choices=[1, 2, 3, 4], help="sample among the k most probable bases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=cli.output_file, help="FASTA to write (default: standard output)")
    p.add_argument("--method", choices=METHODS, default="online",
                   help="online (default): exact, O(log^2 t) per base; cache: exact, O(t) per base; forward: the "
                        "whole forward pass per base")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.prompt_fasta:
        from data import read_fasta
        records = read_fasta(args.prompt_fasta)
        if not records:
            raise th.UserError(f"{args.prompt_fasta}: no records")
        ids = np.asarray(records[0][1], dtype=np.int64)
    else:
        ids = th.tokenize(args.prompt)
    model = th.from_pretrained(args.checkpoint, cli.pick_device(args.device))
    from tqdm import tqdm
    with tqdm(total=args.length, unit="base", file=sys.stderr) as bar:
        out = generate(model, ids, args.length, args.num, args.temperature, args.top_k, args.seed,
                       args.method, progress=bar.update)
    lines = []
    for i, row in enumerate(out.numpy()):
        seq = th.detokenize(row)
        lines.append(f">sample{i + 1} length={args.length} temperature={args.temperature} seed={args.seed}\n")
        lines += [seq[j:j + 70] + "\n" for j in range(0, len(seq), 70)]
    base.write_text(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
