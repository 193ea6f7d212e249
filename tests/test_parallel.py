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
