"""torchrun + DDP with gloo on CPU: same metrics as one process with the same global batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_and_only_rank0_writes(cli, tiny_recipe, tmp_path):
    # dropout off: each rank draws its own dropout masks, so only then do the runs agree exactly
    recipe = tiny_recipe(
        "r.toml", experiment="ddp", seed=5, pooling={"name": "attention"},
        head={"params": {"dropout": 0.0}}, train={"epochs": 2},
    )
    cli("run", recipe, "--out", tmp_path / "single", "--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mmcore", "run", str(recipe), "--out", str(tmp_path / "ddp"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("== ddp ==") == 1  # one summary: rank 0 alone talks
    assert "distributed: 2 processes, global batch 16" in result.stdout

    single = json.loads((tmp_path / "single" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    for key in ("auroc", "auprc", "f1", "accuracy"):
        assert ddp["test"]["at_threshold"][key] == pytest.approx(single["test"]["at_threshold"][key], abs=1e-6)
    a = [p["score"] for p in json.loads((tmp_path / "single" / "test_predictions.json").read_text())]
    b = [p["score"] for p in json.loads((tmp_path / "ddp" / "test_predictions.json").read_text())]
    assert len(b) == 32  # every test sample exactly once: no sampler padding duplicates
    np.testing.assert_allclose(b, a, atol=1e-5)

    # only rank 0 wrote: one process id across all TensorBoard event files, one run directory
    pids = {name.split(".")[4] for name in os.listdir(tmp_path / "ddp" / "tensorboard")}
    assert len(pids) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "r.toml", "single"]


def test_ranks_split_each_global_batch_of_a_single_process():
    from mmcore.engine.sampling import EpochBatchSampler

    # the sampler gives each rank its slice of the same global batches a single process sees
    one = list(EpochBatchSampler(10, 4, seed=1))
    r0 = list(EpochBatchSampler(10, 4, seed=1, rank=0, world_size=2))
    r1 = list(EpochBatchSampler(10, 4, seed=1, rank=1, world_size=2))
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(batch) for batch in one]
    assert len(r0) == len(one) == 3
