"""The data path to the device: uint8 pixels normalised on the device, the decoded-image cache,
fixed-length token batches without masks, one weights fingerprint per run, backend settings."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from mmcore.cli.cache import cache_group
from mmcore.data.csvs import read_split
from mmcore.data.dataset import Collate, SampleDataset, make_loader
from mmcore.engine import features
from mmcore.engine.build import enable_gradient_checkpointing
from mmcore.engine.inference import predict
from mmcore.engine.pipeline import Pipeline
from mmcore.engine.policies import BadImages
from mmcore.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def make_pipeline(registry, cache_dir, *, decoded="auto", image_size=32, augmentation="none", one_pass=False, **train):
    data = {
        "seed": 5,
        "data": {"base_dir": "", "num_workers": 0},
        "vision": {"name": "fake_cnn", "params": {"image_size": image_size, "width": 8}},
        "text": {"name": "fake_text"},
        "pooling": {"name": "mean"},
        "augmentation": {"name": augmentation},
        "train": {"batch_size": 8, "freeze_backbone": False, **train},
        "cache": {"dir": str(cache_dir), "decoded_images": decoded},
        "logging": {"tensorboard": False, "progress": False},
    }
    return Pipeline(recipe_from_dict(data, registry=registry), registry, progress=False, one_pass=one_pass)


def logits_of(pipeline, dataset):
    loader = make_loader(dataset, batch_size=8, num_workers=0)
    bad = BadImages("error")
    return predict(pipeline.model, loader, device=pipeline.device, dtype=pipeline.dtype, bad_images=bad, progress=False)[1]


def test_uint8_loading_gives_float_loadings_predictions(registry, tmp_path, demo_data):
    split = read_split(demo_data / "val.csv", demo_data)
    pipeline = make_pipeline(registry, tmp_path / "cache", decoded=False)
    preprocessing = pipeline.model.vision.preprocessing
    as_uint8 = SampleDataset(split, preprocessing=preprocessing, uint8_pixels=True)
    as_float = SampleDataset(split, preprocessing=preprocessing, uint8_pixels=False)
    batch = Collate(preprocessing)([as_uint8[0], as_uint8[1]])
    assert batch["vision"]["pixel_values"].dtype == torch.uint8  # a quarter of the bytes through IPC
    assert Collate(preprocessing)([as_float[0]])["vision"]["pixel_values"].dtype == torch.float32
    a, b = logits_of(pipeline, as_uint8), logits_of(pipeline, as_float)
    assert len(a) == len(split)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_decoded_image_cache_same_predictions_and_invalidation(registry, tmp_path, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data / "images", data / "images")
    shutil.copy(demo_data / "val.csv", data / "val.csv")
    split = read_split(data / "val.csv", data)
    cache = tmp_path / "cache"

    first = make_pipeline(registry, cache)
    assert first.cache_decoded and not first.cache_vision  # the encoder trains: pixels, not features
    cached, _, errors = first.dataset(split)
    assert errors == [] and cached.decoded_images is not None
    assert "0/32 from cache" in first.cache_log[-1]
    uncached = make_pipeline(registry, cache, decoded=False)
    plain, _, _ = uncached.dataset(split)
    assert plain.decoded_images is None
    np.testing.assert_allclose(logits_of(first, cached), logits_of(first, plain), atol=1e-6, rtol=0)

    second = make_pipeline(registry, cache)
    second.dataset(split)
    assert "32/32 from cache" in second.cache_log[-1]

    # a changed file misses (content key); the others still hit
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(split.paths[0])
    third = make_pipeline(registry, cache)
    dataset, _, _ = third.dataset(split)
    assert "31/32 from cache" in third.cache_log[-1]
    expected = third.model.vision.preprocessing.resized(Image.open(split.paths[0]).convert("RGB"))
    assert torch.equal(dataset[0]["vision"]["pixel_values"], expected)

    # another preprocessing (input size) is another space: nothing from cache
    other = make_pipeline(registry, cache, image_size=24)
    other.dataset(split)
    assert "0/32 from cache" in other.cache_log[-1]

    out = CliRunner().invoke(cache_group, ["info", "--dir", str(cache)])
    assert out.exit_code == 0
    assert sum(1 for line in out.output.splitlines() if line.startswith("fake_cnn") and " pixels " in line) == 2


def test_decoded_cache_decisions(registry, tmp_path):
    cache = tmp_path / "cache"
    assert make_pipeline(registry, cache, augmentation="weak").cache_decoded  # keeps_size augmentations
    assert not make_pipeline(registry, cache, decoded=False).cache_decoded
    frozen = make_pipeline(registry, cache, augmentation="weak", freeze_backbone=True)
    assert not frozen.cache_decoded  # "auto": only when the vision encoder trains
    assert make_pipeline(registry, cache, decoded=True, augmentation="weak", freeze_backbone=True).cache_decoded
    # eval / predict / export / serve score each row once: "auto" does not write pixels never read again
    assert not make_pipeline(registry, cache, one_pass=True).cache_decoded
    assert make_pipeline(registry, cache, decoded=True, one_pass=True).cache_decoded  # unless asked for


def test_augmentation_applies_after_the_decoded_cache(registry, tmp_path, demo_data):
    split = read_split(demo_data / "val.csv", demo_data)
    pipeline = make_pipeline(registry, tmp_path / "cache", augmentation="strong")
    dataset, _, _ = pipeline.dataset(split, train=True)
    assert dataset.decoded_images is not None and dataset.augmentation is not None
    torch.manual_seed(0)
    one = dataset[3]["vision"]["pixel_values"]
    torch.manual_seed(1)
    two = dataset[3]["vision"]["pixel_values"]
    assert one.dtype == torch.uint8 and one.shape == (3, 32, 32)
    assert not torch.equal(one, two)  # random augmentation on every read of the cached pixels


def test_fixed_length_tokens_stack_without_mask_and_pool_the_same(registry):
    from mmcore.builtin.pooling import AttentionPooling
    from mmcore.data.dataset import _stack_padded

    tokens = [torch.randn(5, 8, dtype=torch.float16) for _ in range(3)]
    batch = _stack_padded(tokens, "vision")
    assert batch["vision_mask"] is None and batch["vision_tokens"].dtype == torch.float16
    ragged = _stack_padded([tokens[0], tokens[1][:3]], "vision")
    assert ragged["vision_mask"].tolist()[1] == [True] * 3 + [False] * 2
    pooling = AttentionPooling(8, heads=2).eval()
    stacked = batch["vision_tokens"].float()
    full = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(pooling(stacked, None), pooling(stacked, full))


def test_half_features_are_upcast_on_the_device():
    from mmcore.engine.step import prepare_batch

    batch = {"vision_feature": torch.ones(2, 4, dtype=torch.float16), "text_feature": torch.ones(2, 3, dtype=torch.float16)}
    out = prepare_batch(batch, torch.device("cpu"))
    assert out["vision_feature"].dtype == torch.float32 and out["text_feature"].dtype == torch.float32


def test_token_caches_keep_loader_workers():
    class Split(list):
        labels = None

    tokens = SampleDataset(Split([0] * 8), vision_features=[np.zeros((4, 2), np.float16)] * 8,
                           vision_lengths=np.full(8, 4), needs_image=True)
    vectors = SampleDataset(Split([0] * 8), vision_features=[np.zeros(2, np.float16)] * 8, needs_image=True)
    assert make_loader(tokens, batch_size=2, num_workers=2).num_workers == 2
    assert make_loader(vectors, batch_size=2, num_workers=2).num_workers == 0


def test_weights_fingerprint_computed_once_per_module(monkeypatch):
    calls = []
    real = features.weights_fingerprint
    monkeypatch.setattr(features, "weights_fingerprint", lambda m: calls.append(m) or real(m))
    module = torch.nn.Linear(3, 2)
    first = features.run_fingerprint(module)
    assert features.run_fingerprint(module) == first == real(module)
    assert len(calls) == 1
    assert features.run_fingerprint(torch.nn.Linear(3, 2)) != first  # another module, its own weights


def test_gradient_checkpointing_timm_and_a_clear_line(registry, tmp_path, capsys):
    import timm

    from mmcore.kit.vision import TimmEncoder, timm_preprocessing

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                              num_heads=2, img_size=32, patch_size=8)
    encoder = TimmEncoder(model, name="vit", weights="random", preprocessing=timm_preprocessing(model, size=32))
    assert enable_gradient_checkpointing(encoder) and model.grad_checkpointing
    pipeline = make_pipeline(registry, tmp_path / "cache", gradient_checkpointing=True)
    assert pipeline.recipe.train.gradient_checkpointing
    assert "fake_cnn' supports neither gradient_checkpointing_enable" in capsys.readouterr().err


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """The GPU benchmark's CPU smoke run (its two cheapest sections; the whole ``--dry-run`` takes
    minutes on 2 cores): the frozen fill is timed after its one-time costs, the uint8 loader row
    compares both loaders, and each prints its engine/raw ratio."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_default_recipe.py"), "--dry-run", "--modes", "frozen,uint8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # 16 images, a warm-up fill of 1 batch of 4 outside the timer: 12 timed
    assert "[frozen] 12 images decoded + encoded + stored" in out.stdout, out.stdout[-3000:]
    assert "[uint8 loader] 16 images" in out.stdout
    assert out.stdout.count("engine/raw  img/s") == 2
    assert "summary: frozen " in out.stdout


def test_gradient_checkpointing_hf_encoder_trains_the_same():
    """SigLIP2 (HF): checkpointing is switched on and the gradients equal those without it."""
    from mmcore_vision_siglip2 import Siglip2Params
    from mmcore_vision_siglip2.encoders import build_encoder

    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = build_encoder("siglip2_base", Siglip2Params(tiny=True, pretrained=False))
        encoder.train()
        if checkpointing:
            assert enable_gradient_checkpointing(encoder) and encoder.model.is_activation_checkpointing
        torch.manual_seed(1)
        size = encoder.preprocessing.size
        pixels = torch.randn(2, 3, *size)
        encoder(pixel_values=pixels).tokens.square().mean().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False])


class RandomItems(torch.utils.data.Dataset):
    """Items whose text is a random draw and the pid that drew it (what augmentation would draw)."""

    needs_image, needs_workers, preprocessing = True, True, None

    def __len__(self):
        return 24

    def __getitem__(self, index):
        import os

        return {"index": index, "label": 0.0, "text": f"{torch.rand(1).item():.6f}|{os.getpid()}"}


def _epochs(loader, sampler, epochs, seed=5):
    """{epoch: (the epoch's draws in order, the worker pids that made them)}."""
    from mmcore.engine.sampling import derive_seed

    seen = {}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(derive_seed(seed, epoch, 0))  # what the engine does per epoch
        texts = [text for batch in loader for text in batch["text"]]
        seen[epoch] = ([t.split("|")[0] for t in texts], {t.split("|")[1] for t in texts})
    return seen


def test_training_workers_persist_and_a_resumed_epoch_draws_the_same(tmp_path):
    """Train loader workers live across epochs; the sampler (main process) and the per-sample seeds
    of SeededItems decide every draw, so fresh workers after a resume draw what persistent ones did."""
    from mmcore.engine.sampling import EpochBatchSampler, SeededItems

    def loader_and_sampler(workers):
        sampler = EpochBatchSampler(24, 6, seed=5, seeded=True, drop_last=True)
        return make_loader(SeededItems(RandomItems()), batch_size=6, batch_sampler=sampler, num_workers=workers), sampler

    persistent, sampler = loader_and_sampler(2)
    assert persistent.persistent_workers
    straight = _epochs(persistent, sampler, (1, 2, 3))
    assert len(set.union(*(pids for _, pids in straight.values()))) == 2  # the same two workers all along
    assert straight[1][0] != straight[2][0]  # each epoch draws anew
    resumed, sampler = loader_and_sampler(2)
    assert _epochs(resumed, sampler, (3,))[3][0] == straight[3][0]  # workers started at epoch 3
    in_process, sampler = loader_and_sampler(0)
    assert _epochs(in_process, sampler, (2,))[2][0] == straight[2][0]


def test_the_first_gpu_script_checks_its_arguments_and_a_stage_reports_under_out(tmp_path):
    """``bench/gpu_first_gpu_run.sh``: a bad stage is one line (exit 2); its quickest stage in a dry
    run writes its figures and the summary under $OUT, the other stages said not selected."""
    script = REPO / "bench" / "gpu_first_gpu_run.sh"
    bad = subprocess.run(["bash", str(script), "--only", "stack,gpu"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0] == (
        "gpu_first_gpu_run.sh: --only: unknown stage 'gpu' (stages: install stack disk syncs train run serve)"
    )
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(script), "--dry-run", "--only", "disk"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[1:4] == ["install: not selected", "stack: not selected", summary[3]]
    assert re.fullmatch(r"disk: rc=0 in \d+s -> 03-disk\.txt", summary[3]), summary
    assert summary[4:8] == [f"{name}: not selected" for name in ("syncs", "train", "run", "serve")]
    rows = [line.split()[0] for line in (out / "03-disk.txt").read_text().splitlines()[2:]]
    assert rows == ["fp16", "int8", "pooled"]
    owed = (out / "owed.txt").read_text()
    assert "onnxruntime-gpu" in owed and "NCCL across GPUs" in owed
