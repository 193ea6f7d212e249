"""export.py: both ONNX targets against torch and the published outputs, the graph's shape and size, and
the command line."""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

import onnx_graph
import tinyhyena as th
from helpers import (FIXTURE, Irfft, Rfft, ROOT, assert_one_line_error, direct_causal_conv, n_params, random_model,
    rel_err, run_process, run_script)


@pytest.fixture(scope="module")
def fixture_cpu_graph(tmp_path_factory):
    """The published-format fixture exported for the cpu target with both outputs (one export, two tests)."""
    path = tmp_path_factory.mktemp("fixture_graph") / "tinyhyena.onnx"
    onnx_graph.export(th.from_pretrained(FIXTURE), str(path), "cpu", outputs="both")
    return path


def test_export_cpu_matches_published_outputs(fixture_cpu_graph):
    model = th.from_pretrained(FIXTURE)
    ref = np.load(FIXTURE / "reference.npz")
    session = ort.InferenceSession(str(fixture_cpu_graph), providers=["CPUExecutionProvider"])
    logits, hidden = session.run(None, {"input_ids": ref["input_ids"]})
    assert rel_err(logits, ref["logits"]) <= 1e-4 and rel_err(hidden, ref["hidden"]) <= 1e-4
    # dynamic batch and length, against torch
    assert onnx_graph.check_against_torch(model, str(fixture_cpu_graph), "both", [1, 37, 1000]) <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(fixture_cpu_graph)).metadata_props}
    assert json.loads(meta["tokens"])["A"] == 7 and meta["pad_id"] == "4" and meta["l_max"] == "1026"
    assert meta["target"] == "cpu" and json.loads(meta["config"])["d_model"] == 128


def test_export_holds_parameters_and_serves_any_length_up_to_max_len(tmp_path):
    """The filters are computed in the graph for the input's length and the FFT size follows that length, so
    a graph exported for a long max_len holds about the parameters and is exact on short inputs too."""
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=20000), 0)
    onnx_graph.export(model, str(tmp_path / "m.onnx"), "cpu")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert stored <= 1.1 * n_params(model) + 200, (stored, n_params(model))  # no l_max-long tables
    assert not any(op == "DFT" for _, op in onnx_graph.graph_ops(graph))  # ONNX Runtime's CPU DFT is the slow kernel
    # the channel groups and the MLP's hidden groups are Loops: 2 per block, nothing else at the top level
    assert [n.op_type for n in graph.node].count("Loop") == 2 * model.cfg.n_layer
    # lengths on both sides of every length where the matrix FFT's radix p doubles
    changes = list(onnx_graph.fft_radix_lengths(model.cfg.l_max).values())[1:]
    assert len(changes) == 3  # p = 2, 4, 8
    lengths = sorted({1, 37, 1000} | {L + side for L in changes for side in (-1, 0)})
    assert onnx_graph.check_against_torch(model, str(tmp_path / "m.onnx"), "logits", lengths, batches=(1, 2)) <= 1e-4


@pytest.mark.parametrize("d_model,order,d_inner", [(12, 3, 40), (48, 2, 300), (7, 2, 8)])
def test_export_groups_compute_the_model(d_model, order, d_inner, monkeypatch):
    """The graph's blocks in groups (channels of the operator, hidden units of the MLP; each group a Loop
    iteration) compute the model, in torch, for group sizes that divide the widths unevenly or not at all."""
    monkeypatch.setattr(onnx_graph, "CHANNEL_GROUP", 5)
    monkeypatch.setattr(onnx_graph, "HIDDEN_GROUP", 16)
    cfg = th.HyenaConfig(d_model=d_model, n_layer=2, d_inner=d_inner, order=order, filter_order=8, l_max=300)
    model = random_model(cfg, 3)
    wrapper = onnx_graph.ExportedModel(model, "both").eval()
    ids = torch.randint(7, 12, (2, 257))
    with torch.no_grad():
        logits, hidden = wrapper(ids)
        assert rel_err(logits, model(ids)) <= 1e-5 and rel_err(hidden, model.hidden_states(ids)) <= 1e-5


@pytest.fixture(scope="module")
def cpu_conv_session(tmp_path_factory):
    """The cpu target's long convolution (the FFT as matrix products) alone, as ONNX Runtime runs it."""
    class Conv(torch.nn.Module):
        def forward(self, u, k):
            return torch.ops.tinyhyena.causal_conv(u, k)
    dims = {name: torch.export.Dim(name, max=5000) for name in ("B", "C", "L")}
    program = torch.onnx.export(Conv(), (torch.randn(2, 3, 40), torch.randn(3, 40)), dynamo=True,
                                dynamic_shapes=({0: dims["B"], 1: dims["C"], 2: dims["L"]}, {0: dims["C"], 1: dims["L"]}),
                                custom_translation_table={torch.ops.tinyhyena.causal_conv.default:
                                                          onnx_graph.cpu_translation(5000)}, verbose=False)
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    onnx.save(program.model_proto, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@given(st.integers(1, 3), st.integers(1, 4), st.one_of(st.integers(1, 300), st.integers(1000, 5000)),
       st.integers(0, 2**31 - 1))
def test_exported_cpu_conv_equals_direct_conv(cpu_conv_session, B, C, L, seed):
    g = torch.Generator().manual_seed(seed)
    u, k = torch.randn(B, C, L, generator=g, dtype=torch.float64), torch.randn(C, L, generator=g, dtype=torch.float64)
    (y,) = cpu_conv_session.run(None, {"u": u.float().numpy(), "k": k.float().numpy()})
    assert rel_err(y, direct_causal_conv(u, k).numpy()) <= 1e-5


def test_export_cuda_graph_computes_the_model_at_several_lengths_with_cuda_provider_ops_only(tmp_path):
    """The cuda target's graph, evaluated with Rfft/Irfft as cuFFT computes them, equals torch at lengths up to
    max_len; every op of it (Loop bodies included) has a kernel in ONNX Runtime's CUDA provider."""
    model = random_model(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=5000), 1)
    onnx_graph.export(model, str(tmp_path / "m.onnx"), "cuda", outputs="hidden")
    evaluator = ReferenceEvaluator(str(tmp_path / "m.onnx"), new_ops=[Rfft, Irfft])
    rng = np.random.default_rng(0)
    for L in (1, 2, 37, 1000, 4321):
        ids = rng.integers(7, 12, size=(2, L))
        (hidden,) = evaluator.run(None, {"input_ids": ids})
        with torch.no_grad():
            assert rel_err(hidden, model.hidden_states(torch.from_numpy(ids))) <= 1e-4, L
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = onnx_graph.graph_ops(graph)  # Loop bodies included
    assert not any(op == "DFT" for _, op in ops)
    assert {("com.microsoft", "Rfft"), ("com.microsoft", "Irfft")} <= ops
    assert {op for _, op in ops} <= onnx_graph.CUDA_OPS, {op for _, op in ops} - onnx_graph.CUDA_OPS
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "length"]


@pytest.mark.slow
def test_large_1m_shape_exports_within_memory(tmp_path):
    """A model of large-1m's shape (d_model 256, l_max 1,000,002; one of its 8 layers, random weights) exports
    for both targets, one after the other in a fresh process, whose peak RSS and files are checked."""
    torch.manual_seed(0)
    th.save_pretrained(th.HyenaDNA(th.preset_config("large-1m", n_layer=1)), tmp_path / "large")
    code = ("import resource, sys\nimport cli, export\n"
            "for target in ('cpu', 'cuda'):\n"
            "    argv = ['--checkpoint', sys.argv[1], '--target', target, '--no-check', '--out', f'{sys.argv[2]}/{target}.onnx']\n"
            "    assert cli.run_command(export.main, argv) == 0\n"
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    result = run_process("-c", code, tmp_path / "large", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_gb = int(result.stdout.split("peak_rss_kb")[1]) / 2**20
    assert peak_gb < 0.9, peak_gb  # 0.64 GB measured (0.70 GB with 2 layers; 2026-12-03, the 2-core machine)
    for target in ("cpu", "cuda"):  # one layer: about 0.8M parameters, 3.35 MB measured
        assert os.path.getsize(tmp_path / f"{target}.onnx") < 4e6


def test_odd_fft_sizes():
    for n in [1, 2, 100, 2051, 2 * 1_000_002 - 1]:
        sizes = onnx_graph.odd_fft_sizes(n)
        m = sizes[-1]  # the graph's largest choice: the first size that fits n
        assert m >= n and m % 2 == 1 and m < 1.3 * n + 3
        assert sizes == sorted(sizes) and all(s % 2 == 1 for s in sizes) and (len(sizes) == 1 or sizes[-2] < n)


@pytest.mark.slow
def test_export_default_out_never_replaces_a_file_that_is_not_onnx(fixture_cpu_graph, tmp_path):
    """The default --out, tinyhyena.onnx, is refused where it holds something else; an earlier export (the kind
    of file export.py writes) is replaced. (Writing it where there is none: the CLI test above.)"""
    torch.manual_seed(0)
    th.save_pretrained(th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=40)),
                       tmp_path / "small")
    (tmp_path / "tinyhyena.onnx").write_text("not a model")
    result = run_script(ROOT / "export.py", "--checkpoint", tmp_path / "small", "--target", "cpu", "--no-check",
                        cwd=tmp_path)
    assert_one_line_error(result, "tinyhyena.onnx exists and is not an ONNX model", "--out")
    assert (tmp_path / "tinyhyena.onnx").read_text() == "not a model"
    shutil.copy(fixture_cpu_graph, tmp_path / "tinyhyena.onnx")  # an earlier export, of another model
    result = run_script(ROOT / "export.py", "--checkpoint", tmp_path / "small", "--target", "cpu", "--no-check",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "tinyhyena.onnx")).metadata_props}
    assert json.loads(meta["config"])["d_model"] == 8  # replaced by this export
    assert sorted(os.listdir(tmp_path)) == ["small", "tinyhyena.onnx"]


@pytest.fixture(scope="module")
def trained_checkpoint(markov, tmp_path_factory):
    """train.py's own folder: two steps at --seq_len 64 from a one-layer model (the graph's cost is per layer)."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    th.save_pretrained(th.HyenaDNA(th.HyenaConfig(d_model=16, n_layer=1, d_inner=32, filter_order=8, l_max=34)),
                       root / "start")
    result = run_script("train.py", "--fasta", markov[0], "--init_from", root / "start", "--seq_len", 64,
                        "--min_seq_len", 64, "--batch_size", 2, "--max_steps", 2, "--eval_batches", 1,
                        "--out", root / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "out"


@pytest.mark.slow
def test_export_cli_with_no_flags_takes_the_newest_train_checkpoint(trained_checkpoint, tmp_path):
    """With no flags: the newest checkpoint under out/ of the working directory, to tinyhyena.onnx there, for the
    cuda target. (The cpu target from a train.py folder, checked against torch by export.py itself: the README's
    quick start, run as written by test_docs.)"""
    work = trained_checkpoint.parent
    result = run_script(ROOT / "export.py", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    graph = work / "tinyhyena.onnx"
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert meta["target"] == "cuda" and meta["l_max"] == "66"
    model = th.from_pretrained(trained_checkpoint)  # the graph computes it (Rfft/Irfft as cuFFT computes them)
    evaluator = ReferenceEvaluator(str(graph), new_ops=[Rfft, Irfft])
    ids = np.random.default_rng(0).integers(7, 12, size=(2, 66))
    with torch.no_grad():
        assert rel_err(evaluator.run(None, {"input_ids": ids})[0], model(torch.from_numpy(ids))) <= 1e-4


@pytest.mark.slow
def test_export_cli_errors(trained_checkpoint, tmp_path):
    assert_one_line_error(run_script(ROOT / "export.py", cwd=tmp_path), "no checkpoint in out/", "train.py")
    assert_one_line_error(run_script("export.py", "--checkpoint", trained_checkpoint, "--max_len", 100000),
                          "--max_len 100000 is outside [1, 66]")


@pytest.mark.slow
def test_readme_deploy_snippet_runs_without_torch(fixture_cpu_graph, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- deploy-snippet -->")[1].split("```python")[1].split("```")[0]
    shutil.copy(fixture_cpu_graph, tmp_path / "tinyhyena.onnx")
    (tmp_path / "app.py").write_text("import sys\nsys.modules['torch'] = None  # importing torch now fails\n" + snippet)
    result = run_process(tmp_path / "app.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "next base" in result.stdout and "embedding" in result.stdout


def test_export_refuses_outputs_for_a_fine_tuned_model(fixture_classifier, tmp_path):
    """A fine-tuned model's graph outputs what its task predicts. (Its export, against torch: test_finetune's
    regression test for values, and its Hugging Face classifier test for probabilities.)"""
    assert_one_line_error(run_script("export.py", "--checkpoint", fixture_classifier, "--outputs", "hidden",
                                     "--out", tmp_path / "x.onnx"), "fine-tuned model")
    assert not (tmp_path / "x.onnx").exists()
