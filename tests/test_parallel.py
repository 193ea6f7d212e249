"""parallel.py: context parallelism, one sequence split across processes, against one process reading it all."""

import json

import numpy as np
import pytest

from helpers import FIXTURE, ROOT, assert_one_line_error, free_port, run_process, run_script

# Each process of a torchrun computes the model twice on the same weights and batch: whole, as one process
# would, and as its context group's shard of positions. It reports the worst relative errors.
WORKER = """
import json, sys
import torch, torch.distributed as dist
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import parallel, tinyhyena as th
from helpers import random_model
cp, order, K, L, checkpointing, channel_group = map(int, sys.argv[2:8])
out = sys.argv[8]


def work(args, rank, world, device):  # in the process group, which run_distributed leaves at the end
    groups = [dist.new_group(list(range(i, i + cp))) for i in range(0, world, cp)]  # every process makes each group
    group = parallel.ContextGroup(groups[rank // cp])
    cfg = th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, order=order, filter_order=8, short_filter_order=K, l_max=L + 2)
    whole = random_model(cfg, 0).double()
    sharded = random_model(cfg, 0).double()
    parallel.enable(sharded, group)
    for block in sharded.blocks:  # 0: chosen by the budget (one step at these sizes)
        block.mixer.fast.channel_group = channel_group or None
    sharded.gradient_checkpointing = bool(checkpointing)  # each block, and in it the filters and the recurrence,
    # recomputed in backward: the exchanges run again, in the same order in every process
    ids = torch.randint(7, 12, (2, L + 1), generator=torch.Generator().manual_seed(rank // cp))  # one batch per group
    ids[0, :3] = th.PAD_ID  # padding is left out of the loss
    x, y = ids[:, :-1], ids[:, 1:]
    logits = whole(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=th.PAD_ID)
    loss.backward()
    shard_logits = sharded(group.shard(x))
    scaled, mean = parallel.context_loss(sharded, group.shard(x), group.shard(y), group)
    scaled.backward()
    for p in sharded.parameters():  # DDP's average over the processes of one group's scaled losses
        dist.all_reduce(p.grad, group=group.group)
        p.grad /= group.size
    gathered = [torch.empty_like(shard_logits) for _ in range(cp)]
    dist.all_gather(gathered, shard_logits.contiguous(), group=group.group)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    errors = {"logits": rel(torch.cat(gathered, 1), logits), "loss": abs(float(mean) / float(loss) - 1),
              "grads": max(rel(a.grad, b.grad) for a, b in zip(sharded.parameters(), whole.parameters()))}
    with torch.no_grad():  # without a gradient: from the filters' spectra, made at the first call and then kept
        first = sharded(group.shard(x))
        errors["kept"] = all(block.mixer.fast.spectrum_cache is not None for block in sharded.blocks)
        errors["no_grad"] = max(rel(first, shard_logits), rel(sharded(group.shard(x)), shard_logits))
    json.dump(errors, open(f"{out}/errors{rank}.json", "w"))


parallel.run_distributed(work, None, torch.device("cpu"))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("world, cp, order, K, L, checkpointing, channel_group",
                         [(2, 2, 2, 1, 64, 0, 0), (2, 2, 2, 3, 64, 1, 3), (4, 4, 3, 4, 60, 1, 1)])
def test_context_parallel_equals_one_process(tmp_path, world, cp, order, K, L, checkpointing, channel_group):
    """Logits, loss and every parameter's gradient of a context-parallel run (world processes in groups of cp,
    each group its own batch) equal one process's on the same weights and batch: orders 2-3, a short filter of
    1 tap (no halo) and of 4 (a 3-position halo), with and without gradient checkpointing, the channels in one
    step, in steps of 3 and 1 channels of each process (the last step of 3 is one channel short). (train.py's test
    runs the published 3 taps, in groups of 2 among 4 processes.) Without a gradient, the logits from the kept
    filters' spectra are the same."""
    (tmp_path / "worker.py").write_text(WORKER)
    result = run_process("-m", "torch.distributed.run", "--nproc_per_node", world, "--master_port", free_port(),
                         tmp_path / "worker.py", ROOT, cp, order, K, L, checkpointing, channel_group,
                         tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(world):
        errors = json.loads((tmp_path / f"errors{rank}.json").read_text())
        assert errors["logits"] <= 1e-10 and errors["loss"] <= 1e-10 and errors["grads"] <= 1e-10, (rank, errors)
        assert errors["kept"] and errors["no_grad"] <= 1e-10, (rank, errors)


@pytest.mark.distributed
def test_score_and_embed_under_context_parallelism_equal_one_process(tmp_path):
    """score.py sequences (windows of odd lengths, right-padded to a multiple of N) and finetune.py embed (mean
    pooling over sequences of several lengths, batched) under torchrun --context_parallel 2 write what one
    process writes; --context_parallel other than the number of processes is a one-line error."""
    rng = np.random.default_rng(0)
    fasta = tmp_path / "seqs.fa"
    fasta.write_text("".join(f">r{i}\n{''.join(rng.choice(list('ACGT'), n))}\n" for i, n in enumerate([1101, 301, 6])))
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port")
    common = ("--checkpoint", FIXTURE, "--input", fasta, "--device", "cpu", "--quiet")
    score = ("score.py", "sequences", *common, "--window", 500, "--context", 99)
    embed = ("finetune.py", "embed", *common, "--batch_size", 2)
    for name, extra in (("one", ()), ("cp", ("--context_parallel", 2))):
        run = (lambda *a: run_process(*torchrun, free_port(), *a)) if extra else run_script
        result = run(*score, "--out", tmp_path / f"{name}.tsv", "--per_base", tmp_path / f"{name}.bedGraph", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run(*embed, "--out", tmp_path / f"{name}.npy", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    for table in ("tsv", "bedGraph"):
        one, cp = ((tmp_path / f"{name}.{table}").read_text().splitlines() for name in ("one", "cp"))
        assert len(one) == len(cp) > 3 and one[0] == cp[0]
        for a, b in zip(one[1:], cp[1:]):
            a, b = a.split("\t"), b.split("\t")
            assert a[:2] == b[:2] and np.allclose(np.float64(a[-1]), np.float64(b[-1]), rtol=1e-5, atol=1e-5), (a, b)
    np.testing.assert_allclose(np.load(tmp_path / "cp.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-5)
    assert_one_line_error(run_script(*score, "--context_parallel", 2), "--context_parallel 2 must equal",
                          "number of processes (1)")


# Each process of a torchrun reads whole sequences through parallel.WholeSequences (its shard of positions, the
# outputs gathered) and through the model itself, at the lengths where the sharding has edges.
EDGES = """
import json, sys
import torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import parallel, tinyhyena as th
from helpers import random_model


def work(args, rank, world, device):
    results = {}
    for K, l_max in ((4, 31), (1, 8)):
        cfg = th.HyenaConfig(d_model=6, n_layer=1, d_inner=8, filter_order=4, short_filter_order=K, l_max=l_max)
        whole = random_model(cfg, 0).double()
        split = parallel.WholeSequences(random_model(cfg, 0).double(), parallel.ContextGroup())
        longest, errors = split.cfg.l_max, {}
        for L in sorted({1, 2, K - 1, K, K * world - 1, longest - 1, longest} - {0}):
            ids = torch.randint(7, 11, (2, L), generator=torch.Generator().manual_seed(L))
            with torch.no_grad():
                errors[L] = max(float((split(ids) - whole(ids)).abs().max()),
                                float((split.hidden_states(ids) - whole.hidden_states(ids)).abs().max()))
        refused = []
        for L in (0, longest + 1):
            try:
                split(torch.full((1, L), 7))
            except th.UserError as e:
                refused.append(str(e))
        results[f"K={K}, l_max={l_max}"] = {"longest": longest, "errors": errors, "refused": refused}
    try:
        parallel.WholeSequences(random_model(th.HyenaConfig(d_model=6, n_layer=1, d_inner=8, filter_order=4,
                                                            short_filter_order=4, l_max=8), 0), parallel.ContextGroup())
    except th.UserError as e:
        results["too short"] = str(e)
    json.dump(results, open(sys.argv[2] + f"/edges{rank}.json", "w"))


parallel.run_distributed(work, None, torch.device("cpu"))
"""


@pytest.mark.distributed
def test_whole_sequences_at_the_edges_of_the_sharding(tmp_path):
    """Three processes sharing each sequence (an odd N) give one process's logits and hidden states, to 1e-12 in
    float64, at each edge: a single position (shorter than the short convolution's 3-position halo in every
    process: padded to a halo each), lengths around the halo and around N halos, and the longest, l_max 31
    rounded down to 30. Length 0 and 31 are one-line errors that name the limit; so is an l_max too short to give
    each process a halo. A short filter of 1 tap (no halo, l_max 8 -> 6) the same."""
    (tmp_path / "edges.py").write_text(EDGES)
    result = run_process("-m", "torch.distributed.run", "--nproc_per_node", 3, "--master_port", free_port(),
                         tmp_path / "edges.py", ROOT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(3):
        results = json.loads((tmp_path / f"edges{rank}.json").read_text())
        for (case, longest) in (("K=4, l_max=31", 30), ("K=1, l_max=8", 6)):
            got = results[case]
            assert got["longest"] == longest and str(longest) in got["errors"] and "1" in got["errors"], got
            assert max(got["errors"].values()) <= 1e-12, (rank, case, got["errors"])
            assert [m.split(":")[0] for m in got["refused"]] == [f"sequence length {L} is outside [1, {longest}]"
                                                                 for L in (0, longest + 1)], got["refused"]
            assert "rounded down to a multiple of 3" in got["refused"][1]
        assert results["too short"] == ("l_max 8 is too short for --context_parallel 3: each process needs at least "
                                        "the short convolution's 3-position halo")
