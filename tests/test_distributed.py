"""torchrun + DDP with gloo on CPU: same metrics as one process with the same global batch; the
step under no_sync, skips agreed by every rank, per-rank seeds, the best state broadcast."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CHECKS = Path(__file__).resolve().parent / "ddp_checks.py"


def torchrun(*args, timeout=600):
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (gloo on CPU), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_and_only_rank0_writes(cli, tiny_recipe, tmp_path):
    # dropout off: each rank draws its own dropout masks (seeded by rank), so only then do the runs agree exactly
    recipe = tiny_recipe(
        "r.toml", experiment="ddp", seed=5, pooling={"name": "attention"},
        head={"params": {"dropout": 0.0}}, train={"epochs": 2},
    )
    cli("run", recipe, "--out", tmp_path / "single", "--quiet")
    # the real CLI, with every collective's device checked and checkpoint_best.ckpt unreadable on rank 1:
    # the selected epoch's weights must come from rank 0, not from a shared directory
    result = torchrun(CHECKS, "cli", "run", recipe, "--out", tmp_path / "ddp", "--quiet")
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_recipe_module):
    """What each of 2 gloo ranks saw in tests/ddp_checks.py (one torchrun for all the checks)."""
    out = tmp_path_factory.mktemp("ddp_checks")
    result = torchrun(CHECKS, out, tiny_recipe_module)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def tiny_recipe_module(tmp_path_factory, demo_data):
    import tomli_w
    from tiny import tiny_recipe_data

    path = tmp_path_factory.mktemp("recipe") / "seeds.toml"
    path.write_text(tomli_w.dumps(tiny_recipe_data(demo_data, head={"params": {"dropout": 0.5}})))
    return path


@pytest.mark.slow
def test_accumulation_all_reduces_once_per_optimizer_step(ranks):
    for rank in ranks:
        # 8 micro-batches, accumulation 4: 2 optimizer steps, one gradient all-reduce each (not 8)
        assert rank["no_sync"]["completed"] and rank["no_sync"]["steps"] == 2
        assert rank["no_sync"]["reductions"] == 2
    assert ranks[0]["no_sync"]["params"] == ranks[1]["no_sync"]["params"]


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_every_rank(ranks):
    a, b = ranks[0]["nan_skip"], ranks[1]["nan_skip"]
    assert a["completed"] and b["completed"]
    assert a["skipped"] == b["skipped"] == 2 and a["steps"] == b["steps"] == 3
    assert a["params"] == b["params"]  # still one model: the skipped synced micro-batch was reduced by hand
    assert a["loss"] == pytest.approx(a["loss"]) and np.isfinite(a["params"][0]).all()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_naming_the_same_step(ranks):
    expected = ("non-finite loss (nan) at step 2 (epoch 1, batch 3); stopped, the last good checkpoint is kept "
                '(set train.on_nan = "skip" to skip such batches)')
    assert ranks[0]["nan_stop"]["error"] == ranks[1]["nan_stop"]["error"] == expected


@pytest.mark.slow
def test_a_batch_without_images_on_one_rank_is_left_out_on_every_rank(ranks):
    a, b = ranks[0]["empty"], ranks[1]["empty"]
    assert a["completed"] and b["completed"] and a["steps"] == b["steps"] == 3
    assert a["params"] == b["params"]


@pytest.mark.slow
def test_ranks_build_the_same_model_then_draw_their_own_dropout_masks(ranks):
    assert ranks[0]["seeds"]["init"] == ranks[1]["seeds"]["init"]
    assert ranks[0]["seeds"]["dropout_mask"] != ranks[1]["seeds"]["dropout_mask"]


@pytest.mark.slow
def test_every_collective_got_a_tensor_its_backend_supports(ranks):
    # ddp_checks.py fails the run otherwise; these are the collectives that were watched
    assert "all_reduce" in ranks[0]["collectives"]
