"""cli.py: every script's bad command lines are one line, `error: ...`, and exit status 1."""

import ast
import json
import subprocess
import sys

import pytest

import cli
import tinyhyena as th
from helpers import FIXTURE, ROOT, run_process, run_script


def bad_invocations(tmp):
    """(script and arguments, what the one line must name) for every script."""
    (tmp / "user_folder").mkdir()
    (tmp / "user_folder" / "thesis.txt").write_text("precious")
    (tmp / "a.fa").write_text(">r\nACGT\n")
    (tmp / "plain.txt").write_text("not a folder")
    (tmp / "t.csv").write_text("sequence,label\nACGT,a\nACGA,b\n")
    (tmp / "outside.bed").write_text("r\t0\t4\nr\t2\t9\tpeak\n")
    fix = str(FIXTURE)
    cases = [
        # train.py
        (["train.py", "--device", "cuda:99", "--fasta", tmp / "a.fa"], ["--device cuda:99"]),
        (["train.py", "--fasta", tmp / "a.fa", "--out", tmp / "plain.txt" / "run"], ["--out", "plain.txt/run"]),
        (["train.py", "--seq_len", "0"], ["--seq_len", "positive integer", "'0'"]),
        (["train.py", "--lr", "-1"], ["--lr", "positive number"]),
        (["train.py", "--fasta", tmp / "missing.fa"], ["--fasta", "missing.fa: file not found"]),
        (["train.py", "--preset", "huge"], ["--preset", "huge"]),
        (["train.py", "--resume", "--overwrite"], ["--resume and --overwrite"]),
        (["train.py", "--fasta", tmp / "a.fa", "--seq_len", "66", "--min_seq_len", "66", "--context_parallel", "4",
          "--out", tmp / "cp"], ["sequence length 66 is not divisible by --context_parallel 4"]),
        (["train.py", "--fasta", tmp / "a.fa", "--seq_len", "64", "--min_seq_len", "32", "--context_parallel", "3",
          "--out", tmp / "cp"], ["sequence length 32 is not divisible by --context_parallel 3", "--min_seq_len"]),
        (["train.py", "--fasta", tmp / "a.fa", "--seq_len", "64", "--context_parallel", "2", "--out", tmp / "cp"],
         ["--context_parallel 2 does not divide the 1 process(es)"]),
        # data.py
        (["data.py", "prepare", tmp / "missing.fa"], ["missing.fa: file not found"]),
        (["data.py", "prepare", tmp / "a.fa", "--out", tmp / "user_folder"], ["user_folder"]),
        (["data.py", "unpack"], ["invalid choice: 'unpack'"]),
        (["data.py", "hg38", "--dir", tmp / "user_folder"], ["user_folder"]),
        # export.py
        (["export.py", "--checkpoint", fix, "--max_len", "0"], ["--max_len", "positive integer"]),
        (["export.py", "--checkpoint", fix, "--out", "/nonexistent/dir/x.onnx"], ["--out", "/nonexistent/dir/x.onnx", "does not exist"]),
        (["export.py", "--checkpoint", fix, "--max_len", "5000", "--out", tmp / "x.onnx"], ["--max_len 5000", "l_max"]),
        (["export.py", "--checkpoint", fix, "--target", "tpu"], ["--target", "'tpu'"]),
        (["export.py", "--checkpoint", tmp / "nowhere"], ["--checkpoint", "nowhere: not found"]),
        # bench.py
        (["bench.py", "--batch", "0"], ["--batch", "positive integer"]),
        (["bench.py", "--lengths", "1024,x"], ["--lengths", "1024,x"]),
        (["bench.py", "--published", tmp / "missing.py"], ["--published", "missing.py: file not found"]),
        (["bench.py", "--timeout", "-5"], ["--timeout", "positive number"]),
        # finetune.py
        (["finetune.py", "fit", "--preset", "tiny", "--seq_len", "10", "--data", tmp / "t.csv", "--val_fraction", "1.5"],
         ["--val_fraction", "between 0 and 1"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "missing.csv"], ["--data", "missing.csv: not found"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--device", "cuda:99",
          "--out", tmp / "ft"], ["--device cuda:99"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--out", tmp / "plain.txt" / "ft"],
         ["--out", "plain.txt/ft"]),
        (["finetune.py", "predict", "--checkpoint", fix, "--input", tmp / "a.fa"], ["not a fine-tuned classifier"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "e.npy",
          "--batch_size", "0"], ["--batch_size", "positive integer"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "no" / "e.npy"],
         ["--out", "no/e.npy", "does not exist"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--layout", "hf", "--soft_prompt", "4"],
         ["--layout hf", "drop --soft_prompt"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--layout", "hub"], ["--layout", "'hub'"]),
        # score.py
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "missing.fa"], ["--input", "missing.fa"]),
        (["score.py", "variants", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--vcf", tmp / "a.fa", "--window", "0"],
         ["--window", "positive integer"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--device", "cuda:99"],
         ["--device cuda:99"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--out", tmp / "no" / "s.tsv"],
         ["--out", "no/s.tsv", "does not exist"]),
        (["score.py", "sequences", "--checkpoint", fix, "--input", tmp / "a.fa", "--fasta", tmp / "a.fa", "--bed",
          tmp / "outside.bed"], ["--input and --fasta/--bed exclude each other"]),
        (["score.py", "sequences", "--checkpoint", fix], ["give --input FILE, or --fasta GENOME with --bed REGIONS"]),
        (["score.py", "sequences", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--bed", tmp / "outside.bed"],
         ["outside.bed:2: interval r:2-9 lies outside the chromosome (length 4)"]),
        (["finetune.py", "embed", "--checkpoint", fix, "--bed", tmp / "outside.bed", "--out", tmp / "e.npy"],
         ["--fasta and --bed go together"]),
        (["finetune.py", "predict", "--checkpoint", fix, "--fasta", tmp / "a.fa", "--bed", tmp / "missing.bed"],
         ["--bed", "missing.bed: file not found"]),
        # generate.py
        (["generate.py", "--checkpoint", fix, "--prompt", "ACGT", "--length", "5", "--temperature", "-1"],
         ["--temperature", "a number >= 0"]),
        (["generate.py", "--checkpoint", fix, "--prompt_fasta", tmp / "missing.fa", "--length", "5"],
         ["--prompt_fasta", "missing.fa: file not found"]),
        (["generate.py", "--checkpoint", fix, "--prompt", "ACGT", "--length", "5", "--method", "beam"],
         ["--method", "invalid choice: 'beam'"]),
        (["finetune.py", "fit", "--checkpoint", fix, "--data", tmp / "t.csv", "--dropout", "1", "--out", tmp / "d"],
         ["--dropout must be below 1"]),
        (["generate.py", "--checkpoint", fix, "--prompt", "ACGT", "--length", "5", "--out", tmp / "no" / "g.fa"],
         ["--out", "no/g.fa", "does not exist"]),
    ]
    if sys.platform.startswith("linux"):
        cases.append((["train.py", "--fasta", tmp / "a.fa", "--out", "/proc/x"], ["--out /proc/x"]))
    return cases


def one_line_error(result, shown, needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (shown, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(lines) == 1, (shown, result.stderr[-2000:])
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), (shown, lines[0])


@pytest.mark.slow
def test_every_script_reports_a_bad_command_line_in_one_line(tmp_path):
    cases = bad_invocations(tmp_path)
    for args, needles in cases:  # each script's main, in this process
        one_line_error(run_script(ROOT / args[0], *args[1:], cwd=tmp_path), " ".join(map(str, args)), needles)
    assert (tmp_path / "user_folder" / "thesis.txt").read_text() == "precious"
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob("**/*.tmp*"))
    # and each script run as __main__ (what `python script.py` runs), one case per script, in one fresh process
    # (a process each would spend 2 s importing torch, per script)
    firsts = {args[0]: (args, needles) for args, needles in reversed(cases)}
    assert len(firsts) == 7
    command_lines = json.dumps([[str(ROOT / args[0]), *map(str, args[1:])] for args, _ in firsts.values()])
    ran = run_process("-c", RUN_AS_MAIN, ROOT, command_lines, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    for (args, needles), (code, stderr) in zip(firsts.values(), json.loads(ran.stdout.splitlines()[-1])):
        one_line_error(subprocess.CompletedProcess(args, code, "", stderr), " ".join(map(str, args)), needles)


RUN_AS_MAIN = """
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, sys.argv[1])
results = []
for argv in json.loads(sys.argv[2]):
    sys.argv, stderr, code = argv, io.StringIO(), 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit:  # the script's own exit, with its status
            code = exit.code
        except BaseException:  # what `python script.py` would show: the traceback, status 1
            traceback.print_exc()
            code = 1
    results.append((code, stderr.getvalue()))
print(json.dumps(results))
"""


def test_bugs_keep_their_traceback():
    """Only UserError becomes one line: anything else is a bug, and the user should see where it is."""
    def buggy(argv):
        raise KeyError("a bug")

    def wrong_flag(argv):
        raise th.UserError("--x 3: bad")
    with pytest.raises(KeyError):
        cli.run_command(buggy)
    assert cli.run_command(wrong_flag) == 1


SCRIPTS = {"train", "finetune", "score", "generate", "export", "bench"}  # command lines, and nothing else
LIBRARIES = {"base", "tinyhyena", "fast", "checkpoints", "classifier", "data", "tasks", "parallel", "trainer",
             "decoding", "onnx_graph", "cli"}


def imports_of(module, top_level_only):
    """The project's modules that `module` imports: at its top level, or anywhere in it."""
    import ast
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & (SCRIPTS | LIBRARIES)


def test_libraries_below_scripts_above_and_no_circle():
    """Scripts import library modules, never one another; no library imports a script, and none but cli.py's
    users at the top of the house (scripts, and data.py for its own command line) import cli.py; base.py
    imports nothing of the project. The import graph has no circle, counting imports at call time too. The
    tutorial file stands on base, fast and checkpoints alone, none of which imports it."""
    found = {p.stem for p in ROOT.glob("*.py")}
    assert found == SCRIPTS | LIBRARIES, found ^ (SCRIPTS | LIBRARIES)  # a new file is placed in one of them
    for module in SCRIPTS | LIBRARIES:
        assert not imports_of(module, top_level_only=False) & SCRIPTS - {module}, (module, "imports a script")
    for module in LIBRARIES - {"data", "cli"}:
        assert "cli" not in imports_of(module, top_level_only=False), module
    assert imports_of("base", top_level_only=False) == set()
    assert imports_of("cli", top_level_only=False) == {"base"}
    graph = {m: imports_of(m, top_level_only=False) for m in SCRIPTS | LIBRARIES}
    done, on_path = set(), []

    def visit(m):  # depth-first; a module met again on the current path closes a circle
        assert m not in on_path, " -> ".join(on_path[on_path.index(m):] + [m])
        if m not in done:
            on_path.append(m)
            for n in sorted(graph[m]):
                visit(n)
            on_path.pop()
            done.add(m)
    for m in sorted(graph):
        visit(m)
    assert graph["tinyhyena"] == {"base", "fast", "checkpoints"}
    assert graph["fast"] == set() and graph["checkpoints"] == {"base"}


def test_only_parse_args_writes_to_the_parsed_flags():
    """A command's flags are read, never rewritten, after parsing: a default a command computes later (a
    length left to the checkpoint, fine-tuning's steps per epoch) is a value of its own, so that what a
    function was given is what the user typed. parse_args may fill the defaults that follow from other flags."""
    written = []
    for path in sorted(ROOT.glob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or function.name == "parse_args":
                continue
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for target in targets:
                    for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "args":
                            written.append(f"{path.name}:{t.lineno} {function.name}: args.{t.attr}")
    assert not written, written
