"""torchrun + DDP with gloo on CPU: same metrics as one process with the same global batch; the
step under no_sync, skips agreed by every rank, per-rank seeds, the best state broadcast; timm
head modules, batch norms, workers per rank, the re-sharded cache fill; the text encoder's
precision with the cache on and off, float16 overflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CHECKS = Path(__file__).resolve().parent / "ddp_checks.py"


def torchrun(*args, timeout=600, nproc=2):
    """``torchrun --standalone --nproc_per_node=NPROC ARGS`` (gloo on CPU), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)],
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
    for rank in (0, 1):  # DDP unhooked and dropped when training ended, not left for interpreter teardown
        assert f"rank {rank}: DistributedDataParallel objects alive after the command: 0" in result.stdout

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


@pytest.mark.slow
def test_a_timm_convnext_trains_all_layers_under_ddp(ranks):
    # ConvNeXt's head.norm is never used by forward_features: left in, DDP fails at the 2nd step
    # ("Expected to have finished reduction in the prior iteration")
    a, b = ranks[0]["timm"], ranks[1]["timm"]
    assert "error" not in a and "error" not in b, a.get("error") or b.get("error")
    assert a["completed"] and a["steps"] == b["steps"] == 4
    assert a["trainable"] > 0 and a["params"] == b["params"]


def test_the_timm_glue_drops_head_modules_the_features_never_use():
    timm = pytest.importorskip("timm")
    import torch

    from mmcore.kit.vision import TimmEncoder, square_preprocessing

    for name, kwargs, dropped in [
        ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), ["head"]),
        ("vit_tiny_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8, global_pool="map"),
         ["attn_pool"]),
        ("vit_tiny_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8, global_pool="avg"),
         ["fc_norm"]),
    ]:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        assert all(any(True for _ in getattr(model, d).parameters()) for d in dropped)
        encoder = TimmEncoder(model, name=name, weights="random", preprocessing=square_preprocessing(32))
        encoder(torch.randn(2, 3, 32, 32)).tokens.sum().backward()
        # every parameter left gets a gradient from the features: nothing for DDP to wait for
        assert [n for n, p in encoder.named_parameters() if p.grad is None] == [], name
        assert all(isinstance(getattr(model, d), torch.nn.Identity) for d in dropped)


@pytest.mark.slow
def test_trainable_batchnorm_statistics_stay_identical_across_ranks_on_gloo(ranks):
    a, b = ranks[0]["batchnorm"], ranks[1]["batchnorm"]
    assert "error" not in a, a.get("error")
    assert a["mode"] == b["mode"] == "frozen" and a["norms"] > 0
    assert a["stats"] == b["stats"] and a["stats_unchanged"]  # each rank saw other images
    assert a["weights_trained"] and a["params"] == b["params"]  # the affine weights still train


def test_batchnorm_becomes_syncbatchnorm_on_cuda_and_nothing_changes_alone():
    import torch

    from mmcore.model.trainability import FROZEN_BN_STATS, distributed_batchnorm, freeze_norm_statistics

    def cnn():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    alone = cnn()
    assert distributed_batchnorm(alone, device=torch.device("cpu"), world_size=1) == "none"
    alone.train()
    freeze_norm_statistics(alone)
    assert alone[1].training  # one process: batch statistics as before
    # convert_sync_batchnorm needs no GPU to convert; SyncBatchNorm only runs on one
    synced = cnn()
    assert distributed_batchnorm(synced, device=torch.device("cuda", 0), world_size=2) == "synced"
    assert isinstance(synced[1], torch.nn.SyncBatchNorm) and not hasattr(synced, FROZEN_BN_STATS)
    frozen = cnn().requires_grad_(False)  # no trainable batch norm: nothing to do
    assert distributed_batchnorm(frozen, device=torch.device("cpu"), world_size=2) == "none"


@pytest.mark.slow
def test_workers_per_rank_follow_the_local_world_size_under_torchrun(ranks):
    for rank in ranks:
        w = rank["workers"]
        assert w["local_world_size"] == 2
        assert w["workers"] == max(1, min(w["cap"], w["cores"] // 2))


def test_workers_per_rank_follow_the_local_world_size(monkeypatch, tiny_dataset_for_loader):
    from mmcore.data import dataset as ds

    monkeypatch.setattr(ds.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    # 64 cores: every core a worker, at most MAX_AUTO_WORKERS (32) per process (the cap was 8)
    for local, expected in [("1", 32), ("2", 32), ("4", 16), ("8", 8), ("16", 4), ("64", 1), ("128", 1)]:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert ds.default_num_workers() == expected, local
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    loader = ds.make_loader(tiny_dataset_for_loader, batch_size=1, num_workers=-1)
    assert loader.num_workers == 4 and loader.prefetch_factor == 2


@pytest.fixture
def tiny_dataset_for_loader(demo_data):
    from mmcore.data.csvs import read_split
    from mmcore.data.dataset import SampleDataset

    return SampleDataset(read_split(demo_data / "train.csv", demo_data), preprocessing=None)


def test_the_process_group_gets_the_recipes_timeout(monkeypatch):
    import datetime

    import torch

    from mmcore import dist
    from mmcore.recipe.schema import TrainConfig

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    assert dist.init_distributed(TrainConfig().dist_timeout_s)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=1800)}


@pytest.mark.slow
def test_what_a_node_local_cache_lacks_is_resharded_among_that_nodes_ranks(tmp_path):
    # ranks 0 and 1 share one cache directory, rank 2 has its own: after the sharded pass (20
    # texts each) ranks 0 and 1 split the 20 rank 2 computed, rank 2 computes the other 40
    result = torchrun(CHECKS, "reshard", tmp_path, nproc=3, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["computed"] for r in ranks] == [[20, 10], [20, 10], [20, 40]]
    assert [r["missing"] for r in ranks] == [0, 0, 0]


def test_a_rank_that_takes_the_lock_late_still_computes_only_its_part_of_what_was_left(tmp_path):
    from mmcore_fake_encoders import FakeText, FakeTextParams

    from mmcore.engine.features import fill_text_cache, text_store
    from mmcore.store.keys import text_key

    # two ranks of one node share a store that lacks 20 texts after the sharded pass; rank 0
    # gets the store's lock first and fills its half: rank 1, after it, must still fill only
    # its own half of the 20 (not half of the 10 it finds missing, which would leave 5 to the
    # unsharded pass of one rank: CI saw 10 and 5)
    encoder = FakeText(FakeTextParams())
    texts = [f"ad text number {i}" for i in range(20)]
    store = text_store(tmp_path / "node", encoder)
    left = sorted(text_key(t) for t in texts)
    first = fill_text_cache(encoder, texts, store, progress=False, shard=(0, 2), reshard=left)
    second = fill_text_cache(encoder, texts, store, progress=False, shard=(1, 2), reshard=left)
    assert (first, second) == (10, 10)
    assert store.missing([text_key(t) for t in texts], refresh=True) == []


def test_text_features_are_equal_with_the_cache_on_and_off(registry, tiny_recipe, tmp_path):
    import torch

    from mmcore.data.csvs import load_splits
    from mmcore.engine.pipeline import Pipeline
    from mmcore.engine.runtime import autocast
    from mmcore.recipe import load_recipe

    # bf16 autocast on CPU: the online text encoder runs under it; the cache fill must too
    path = tiny_recipe("r.toml", train={"precision": "bf16"}, cache={"enabled": True, "dir": str(tmp_path / "cache")})
    pipeline = Pipeline(load_recipe(path, registry=registry), registry, progress=False)
    assert pipeline.dtype == torch.bfloat16 and pipeline.cache_text
    dataset, split, _ = pipeline.dataset(load_splits(pipeline.recipe.data)["train"])
    cached = torch.stack([torch.from_numpy(np.array(dataset.text_features[i])).float() for i in range(len(split))])
    with torch.no_grad(), autocast(pipeline.device, pipeline.dtype):  # what the step and inference do
        online = pipeline.model.text_features({"text": list(split.texts)}).float()
    # bf16 values fit float16 exactly: the cached features are the online ones, bit for bit
    assert torch.equal(cached, online)


def test_a_feature_above_float16_max_is_refused_naming_the_encoder(tmp_path):
    from mmcore_fake_encoders import FakeText, FakeTextParams

    from mmcore.engine.features import fill_text_cache, text_store
    from mmcore.store.features import FeatureOverflow
    from mmcore.store.keys import text_key

    class Loud(FakeText):
        def encode(self, texts):
            return super().encode(texts) * 0 + 1e5

    encoder = Loud(FakeTextParams())
    store = text_store(tmp_path, encoder)
    texts = ["a", "b"]
    with pytest.raises(FeatureOverflow) as caught:
        fill_text_cache(encoder, texts, store, progress=False)
    assert str(caught.value) == (
        "text encoder 'fake_text' outputs values up to 1e+05, above float16's maximum 65504, which the feature cache "
        "stores; scale its output down or set cache.enabled = false"
    )
    assert store.missing([text_key(t) for t in texts], refresh=True) == [0, 1]  # no inf stored


def test_the_trainer_unhooks_and_drops_ddp_when_training_ends(tmp_path):
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    from mmcore.engine.loop import Trainer

    # one gloo process: DDP's hooks on the parameters keep the wrapper (and so the group) in a
    # reference cycle; released, it goes at once, with the collector off
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = torch.nn.Linear(3, 1)
        wrapped = torch.nn.parallel.DistributedDataParallel(plain)
        optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
        trainer = Trainer(model=wrapped, optimizer=optimizer, scheduler=None, loss_fn=torch.nn.BCEWithLogitsLoss(),
                          device=torch.device("cpu"), dtype=None)
        gone = weakref.ref(wrapped)
        del wrapped
        gc.disable()
        try:
            trainer.release_data_parallel()
            assert trainer.model is plain and trainer.step.model is plain
            assert gone() is None
        finally:
            gc.enable()
        plain(torch.ones(2, 3)).sum().backward()  # the parameters' hooks are gone with it
        assert plain.weight.grad is not None
    finally:
        dist.destroy_process_group()
