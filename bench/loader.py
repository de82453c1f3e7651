"""Loader throughput (decode + preprocess in workers) vs single-core decode rate x workers.

    python bench/loader.py [--images 400] [--size 640] [--workers N] [--encoder resnet18]

Generates JPEGs (``--size`` px, larger than the encoder's input so ``Image.draft`` applies),
measures one core decoding + preprocessing in this process, then the real DataLoader
(``make_loader``: one worker per core, prefetching) over the same files. Target: the loader
reaches ~ workers x the single-core rate (minus worker start-up). Last rows: the loader
handing over uint8 pixels (what training does; the model normalises on the device) vs float32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--workers", type=int, default=-1, help="-1 = one per core")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder", default="resnet18")
    args = parser.parse_args()

    import torch

    from mmcore.commands.demo import make_demo_dataset
    from mmcore.data.csvs import read_split
    from mmcore.data.dataset import SampleDataset, default_num_workers, make_loader
    from mmcore.data.images import load_rgb
    from mmcore.model.classifier import build_component
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    torch.set_num_threads(1)
    registry = get_registry()
    recipe = recipe_from_dict({"vision": {"name": args.encoder, "params": {"pretrained": False}}}, registry=registry)
    preprocessing = build_component(registry, "vision", recipe.vision).preprocessing
    work = Path(tempfile.mkdtemp(prefix="mmcore-loader-"))
    data = make_demo_dataset(work, n_train=args.images, n_val=2, n_test=2, size=(args.size, args.size))
    split = read_split(data / "train.csv", data)
    workers = default_num_workers() if args.workers < 0 else args.workers

    started = time.perf_counter()
    for path in split.paths:
        preprocessing(load_rgb(path, target_size=preprocessing.target_size))
    single = len(split) / (time.perf_counter() - started)

    dataset = SampleDataset(split, preprocessing=preprocessing)
    started = time.perf_counter()
    loader = make_loader(dataset, batch_size=args.batch, num_workers=workers)
    first = None
    seen = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - started
            steady_start, steady_seen = time.perf_counter(), 0
        else:
            steady_seen += batch["size"]
        seen += batch["size"]
    total = time.perf_counter() - started
    steady = steady_seen / max(time.perf_counter() - steady_start, 1e-9)
    assert seen == len(split)

    print(f"{len(split)} JPEGs of {args.size}px -> {args.encoder} preprocessing {preprocessing.size}, "
          f"{workers} workers, batch {args.batch}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"single core (in process)    {single:8.1f} img/s")
    print(f"ideal = single x {workers}        {single * workers:8.1f} img/s")
    print(f"loader, whole pass          {seen / total:8.1f} img/s   {seen / total / (single * workers):.2f} of ideal "
          f"(first batch after {first:.2f} s: worker start-up)")
    print(f"loader, after first batch   {steady:8.1f} img/s   {steady / (single * workers):.2f} of ideal")

    # the same loader handing over uint8 pixels (normalised on the device by the model) vs float32
    rates = {}
    for name, uint8 in (("float32", False), ("uint8", True)):
        loader = make_loader(SampleDataset(split, preprocessing=preprocessing, uint8_pixels=uint8),
                             batch_size=args.batch, num_workers=workers)
        started = time.perf_counter()
        pixels = 0
        for batch in loader:
            pixels += batch["vision"]["pixel_values"].nbytes
        rates[name] = len(split) / (time.perf_counter() - started)
        print(f"loader, {name:<7} pixels      {rates[name]:8.1f} img/s   {pixels / len(split) / 1024:.0f} KiB per image")
    print(f"uint8 / float32 loader throughput {rates['uint8'] / rates['float32']:.2f}x")


if __name__ == "__main__":
    main()
