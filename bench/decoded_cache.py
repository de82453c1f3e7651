"""The decoded-image cache on a fine-tune run: epoch 2 vs epoch 1, with the cache and without.

    python bench/decoded_cache.py [--images 256] [--size 1600] [--workers 2] [--encoder resnet18]

A fine-tune run (``freeze_backbone = false``, ``augmentation = "weak"``) of ``--encoder``
(random weights; ``tiny = true`` unless ``--full``) over generated JPEGs of ``--size`` px, the
text side cached. Epoch 1 with the cache decodes every image once (``cache.decoded_images``)
and trains; epoch 2 trains from the memory-mapped uint8 pixels (augmentation still applied).
Without the cache both epochs decode. Each epoch is the engine's ``Trainer.train_epoch`` over
the real loader. Goal (issue 17): epoch 2 <= 0.5x epoch 1 with the cache, on CPU, where the
encoder's own forward and backward stay in both.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def epochs(args, data, cache, decoded):
    """(epoch 1 seconds, epoch 2 seconds) of one fine-tune run."""
    from mmcore.data.csvs import load_splits
    from mmcore.engine.loop import Trainer
    from mmcore.engine.pipeline import Pipeline
    from mmcore.model.components import build_component
    from mmcore.model.trainability import parameter_groups
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    registry = get_registry()
    recipe = recipe_from_dict({
        "data": {"base_dir": str(data), "num_workers": args.workers},
        "vision": {"name": args.encoder, "params": {"pretrained": False, "tiny": not args.full}},
        "text": {"name": "none"} if args.vision_only else {"name": "labse", "params": {"tiny": True, "pretrained": False}},
        "pooling": {"name": "mean"},
        "augmentation": {"name": "weak"},
        "train": {"freeze_backbone": False, "batch_size": args.batch, "modality": "vision_only" if args.vision_only else "multimodal",
                  "precision": "fp32"},
        "cache": {"dir": str(cache), "decoded_images": decoded},
        "logging": {"tensorboard": False, "progress": False},
    }, registry=registry)
    pipeline = Pipeline(recipe, registry, progress=False)
    split = load_splits(recipe.data)["train"]
    train = recipe.train
    optimizer = __import__("torch").optim.AdamW(parameter_groups(
        pipeline.model, head_lr=train.learning_rate, backbone_lr=train.backbone_lr, lora_lr=train.lora_lr,
        weight_decay=train.weight_decay))
    scheduler = build_component(registry, "scheduler", recipe.scheduler, optimizer, 10**6)
    loss_fn = build_component(registry, "loss", recipe.loss, (len(split) // 2, len(split) - len(split) // 2))
    trainer = Trainer(model=pipeline.model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                      device=pipeline.device, dtype=pipeline.dtype, progress=False, channels_last=pipeline.channels_last)
    times = []
    started = time.perf_counter()
    dataset, split, _ = pipeline.dataset(split, train=True)  # the decoded-image fill is part of epoch 1
    for epoch in (1, 2):
        loader = pipeline.loader(dataset, train=True, seed=epoch)
        trainer.train_epoch(loader, epoch, 2)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
    return times, dataset.decoded_images is not None


def per_image(args, data, cache):
    """ms per item in the loader's worker code: decode + resize vs the cached pixels (no augmentation)."""
    from mmcore.data.csvs import read_split
    from mmcore.data.dataset import SampleDataset
    from mmcore.engine.features import decoded_store, fill_decoded_cache, image_keys
    from mmcore.model.components import build_component
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    registry = get_registry()
    recipe = recipe_from_dict({"vision": {"name": args.encoder, "params": {"pretrained": False, "tiny": not args.full}}},
                              registry=registry)
    encoder = build_component(registry, "vision", recipe.vision)
    split = read_split(Path(data) / "train.csv", data)
    store = decoded_store(cache, encoder)
    keys = image_keys(cache, split)
    fill_decoded_cache(split, store, keys, preprocessing=encoder.preprocessing, num_workers=0,
                       max_image_pixels=10**9, progress=False)
    timings = {}
    for name, view in (("decode + resize", None), ("decoded-image cache", store.view(keys))):
        dataset = SampleDataset(split, preprocessing=encoder.preprocessing, uint8_pixels=True, decoded_images=view)
        started = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        timings[name] = (time.perf_counter() - started) / len(dataset) * 1000
        print(f"per image, one core: {name:<20} {timings[name]:7.2f} ms  (input {encoder.preprocessing.size})")
    print(f"per image: cached / decode = {timings['decoded-image cache'] / timings['decode + resize']:.3f}x")


def as_png(data):
    """Rewrite the generated JPEGs as PNGs (screenshots and banners often are), CSVs updated."""
    from PIL import Image

    for csv in Path(data).glob("*.csv"):
        lines = csv.read_text().splitlines()
        out = [lines[0]]
        for line in lines[1:]:
            name, rest = line.split(",", 1)
            png = name[: -len(".jpg")] + ".png"
            with Image.open(Path(data) / name) as image:
                image.save(Path(data) / png)
            (Path(data) / name).unlink()
            out.append(f"{png},{rest}")
        csv.write_text("\n".join(out) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=1600, help="generated JPEG side, px")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--full", action="store_true", help="the full-size encoder (default: its tiny build)")
    parser.add_argument("--vision-only", action="store_true", help="no text encoder")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg",
                        help="image files: JPEG (decoded at reduced scale by draft()) or PNG (no draft: a full decode)")
    args = parser.parse_args()

    import torch

    from mmcore.commands.demo import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="mmcore-decoded-"))
    data = make_demo_dataset(work / "data", n_train=args.images, n_val=2, n_test=2, size=(args.size, args.size))
    if args.format == "png":
        as_png(data)
    print(f"{args.images} {args.format.upper()}s of {args.size} px, {args.encoder}{'' if args.full else ' (tiny)'} fine-tuned, "
          f"weak augmentation, batch {args.batch}, {args.workers} workers, {os.cpu_count()} CPUs, torch {torch.__version__}")
    per_image(args, data, work / "cache-items")
    rows = {}
    for decoded in (False, True):
        (first, second), used = epochs(args, data, work / f"cache-{decoded}", decoded)
        assert used == decoded
        rows[decoded] = (first, second)
        name = "decoded-image cache" if decoded else "no cache (decode every epoch)"
        print(f"{name:<31} epoch 1 {first:7.2f} s   epoch 2 {second:7.2f} s   epoch2/epoch1 {second / first:.2f}x")
    ratio = rows[True][1] / rows[True][0]
    print(f"with the cache: epoch 2 / epoch 1 = {ratio:.2f}x (goal <= 0.50: {'met' if ratio <= 0.5 else 'MISSED'}); "
          f"epoch 2 cached / uncached = {rows[True][1] / rows[False][1]:.2f}x")


if __name__ == "__main__":
    main()
