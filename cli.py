"""
Command-line conventions shared by every script (train, finetune, score, generate, export, bench, data).

Every script parses with `ArgumentParser`, checks values with the types below and runs its main through
`run_command`: what the user got wrong (a tinyhyena.UserError) is one line, `error: <what, naming the flag or
path>`, and exit status 1, with no traceback; any other exception is a bug and keeps its traceback. (The error
types and the file helpers are base.py's.)
"""

import argparse
import math
import os
import sys

import torch

from base import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line, exit 1) rather than usage text and exit 2."""

    def error(self, message):
        raise UserError(message)


def _checked(convert, test, wanted):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
open_fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: file not found" if not os.path.exists(text) else f"{text}: not a file")
    return text


def output_file(text):
    """A file to write: its folder must exist, and it must not be a folder itself (checked before any work)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: folder {os.path.dirname(text) or folder} does not exist")
    return text


def existing_path(text):
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: not found")
    return text


def add_sequence_inputs(parser, input_help):
    """The flags of a command that reads sequences: --input FILE, or --fasta GENOME --bed REGIONS (regions
    cut from a genome; data.read_inputs reads either). check_sequence_inputs checks them after parsing."""
    parser.add_argument("--input", type=existing_file, help=input_help + "; or use --fasta and --bed")
    parser.add_argument("--fasta", type=existing_path, help="genome FASTA (plain or gzipped), or a prepared genome "
                                                            "folder, to cut the --bed regions from")
    parser.add_argument("--bed", type=existing_file, help="regions of --fasta (BED3 to BED12; the name column is "
                                                          "the id; a - strand is read reverse-complemented)")


def check_sequence_inputs(parser, args):
    if args.input is not None and (args.bed is not None or args.fasta is not None):
        parser.error("--input and --fasta/--bed exclude each other: give sequences, or regions of a genome")
    if args.input is None and (args.bed is None or args.fasta is None):
        parser.error("give --input FILE, or --fasta GENOME with --bed REGIONS" if args.bed is None and args.fasta is None
                     else "--fasta and --bed go together: the genome, and the regions to cut from it")


def run_command(main, argv=None):
    """A script's entry point: main(argv) -> exit status, with a UserError printed as one line, status 1."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def pick_device(name="auto"):
    """torch.device from a command-line name: "auto" is the GPU when there is one, else the CPU. UserError
    naming --device for one that torch cannot use here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UserError(f"--device {name}: CUDA requested but this torch build has no CUDA")
        visible = torch.cuda.device_count()
        if visible == 0:
            raise UserError(f"--device {name}: CUDA requested but no GPU is visible")
        if device.index is not None and device.index >= visible:
            raise UserError(f"--device {name}: {name} requested, {visible} GPU{'s' if visible > 1 else ''} visible")
    return device
