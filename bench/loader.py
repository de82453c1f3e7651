"""Loader throughput (decode + preprocess in workers) vs single-core decode rate x workers, JPEG and PNG.

    python bench/loader.py [--images 400] [--size 640] [--workers N] [--encoder resnet18] [--format jpeg|png|both]

Generates JPEGs (``--size`` px, larger than the encoder's input so ``Image.draft`` applies),
measures one core decoding + preprocessing in this process, then the real DataLoader
(``make_loader``: one worker per core, prefetching) over the same files. Target: the loader
reaches ~ workers x the single-core rate (minus worker start-up). Then the same images as PNGs
(banners and screenshots often are: no ``draft()``, every pixel decoded, several times a
JPEG's cost). Last rows: the loader handing over uint8 pixels (what training does; the model
normalises on the device) vs float32.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(split, preprocessing, workers, batch, label):
    """Print the single-core and loader rates of ``split``; -> loader img/s after its first batch."""
    from mmcore.data.dataset import SampleDataset, make_loader
    from mmcore.data.images import load_rgb

    started = time.perf_counter()
    for path in split.paths:
        preprocessing(load_rgb(path, target_size=preprocessing.target_size))
    single = len(split) / (time.perf_counter() - started)

    dataset = SampleDataset(split, preprocessing=preprocessing)
    started = time.perf_counter()
    loader = make_loader(dataset, batch_size=batch, num_workers=workers)
    first = None
    seen = 0
    for batch_ in loader:
        if first is None:
            first = time.perf_counter() - started
            steady_start, steady_seen = time.perf_counter(), 0
        else:
            steady_seen += batch_["size"]
        seen += batch_["size"]
    total = time.perf_counter() - started
    steady = steady_seen / max(time.perf_counter() - steady_start, 1e-9)
    assert seen == len(split)
    print(f"{label} single core (in process)    {single:8.1f} img/s")
    print(f"{label} ideal = single x {workers}        {single * workers:8.1f} img/s")
    print(f"{label} loader, whole pass          {seen / total:8.1f} img/s   {seen / total / (single * workers):.2f} of "
          f"ideal (first batch after {first:.2f} s: worker start-up)")
    print(f"{label} loader, after first batch   {steady:8.1f} img/s   {steady / (single * workers):.2f} of ideal")
    return steady


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--workers", type=int, default=-1, help="-1 = one per core")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--format", choices=("jpeg", "png", "both"), default="both")
    args = parser.parse_args()

    import torch
    from decoded_cache import as_png

    from mmcore.commands.demo import make_demo_dataset
    from mmcore.data.csvs import read_split
    from mmcore.data.dataset import SampleDataset, default_num_workers, make_loader
    from mmcore.model.components import build_component
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    torch.set_num_threads(1)
    registry = get_registry()
    recipe = recipe_from_dict({"vision": {"name": args.encoder, "params": {"pretrained": False}}}, registry=registry)
    preprocessing = build_component(registry, "vision", recipe.vision).preprocessing
    work = Path(tempfile.mkdtemp(prefix="mmcore-loader-"))
    data = make_demo_dataset(work / "jpeg", n_train=args.images, n_val=2, n_test=2, size=(args.size, args.size))
    split = read_split(data / "train.csv", data)
    workers = default_num_workers() if args.workers < 0 else args.workers
    print(f"{len(split)} images of {args.size}px -> {args.encoder} preprocessing {preprocessing.size}, "
          f"{workers} workers, batch {args.batch}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    rates = {}
    if args.format in ("jpeg", "both"):
        rates["JPEG"] = measure(split, preprocessing, workers, args.batch, "JPEG")
    if args.format in ("png", "both"):
        png = shutil.copytree(data, work / "png")
        as_png(png)
        rates["PNG"] = measure(read_split(png / "train.csv", png), preprocessing, workers, args.batch, "PNG ")
    if len(rates) == 2:
        print(f"PNG / JPEG loader throughput {rates['PNG'] / rates['JPEG']:.2f}x")

    # the same loader handing over uint8 pixels (normalised on the device by the model) vs float32
    uint8_rates = {}
    for name, uint8 in (("float32", False), ("uint8", True)):
        loader = make_loader(SampleDataset(split, preprocessing=preprocessing, uint8_pixels=uint8),
                             batch_size=args.batch, num_workers=workers)
        started = time.perf_counter()
        pixels = 0
        for batch in loader:
            pixels += batch["vision"]["pixel_values"].nbytes
        uint8_rates[name] = len(split) / (time.perf_counter() - started)
        print(f"loader, {name:<7} pixels      {uint8_rates[name]:8.1f} img/s   {pixels / len(split) / 1024:.0f} KiB per image")
    print(f"uint8 / float32 loader throughput {uint8_rates['uint8'] / uint8_rates['float32']:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
