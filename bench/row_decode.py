"""The scoring path's decode: threads (what ``score_rows`` uses) against DataLoader worker processes, JPEG.

    python bench/row_decode.py [--images 400] [--size 640] [--workers 1,2] [--encoder resnet18] [--repeats 3]

Generates JPEGs (``--size`` px, larger than the encoder's input so ``Image.draft`` applies), then
decodes and preprocesses them for the encoder (float32 pixels, what a scorer feeds its model) two ways
with the same number of workers: :func:`mmcore.scoring.rows.score_rows` with a scorer whose model
costs nothing (a thread pool in this process: Pillow and torch release the GIL while they decode
and resize), and the training DataLoader (``make_loader``: worker processes, prefetching), whose
worker start-up is counted as a scoring command pays it. Prints img/s of each (the best of
``--repeats``) and their ratio.
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


def threads_rate(split, preprocessing, workers, batch):
    """img/s of :func:`score_rows` decoding and preprocessing ``split`` with ``workers`` threads."""
    import numpy as np

    from mmcore.scoring.base import Scorer
    from mmcore.scoring.rows import collect, score_rows

    class FreeModel(Scorer):
        """Every row's decode and preprocessing, and no model."""

        recipe_data = {"train": {"modality": "vision_only"}}
        decision = {"threshold": 0.5, "temperature": 1.0}

        def __init__(self):
            self.preprocessing = preprocessing

        def logits(self, vision_items, texts):
            return np.zeros(len(vision_items))

    started = time.perf_counter()
    scored = collect(score_rows(FreeModel(), split, batch_size=batch, workers=workers))
    assert len(scored.positions) == len(split)
    return len(split) / (time.perf_counter() - started)


def loader_rate(split, preprocessing, workers, batch):
    """img/s of the DataLoader (worker processes, start-up included) over the same rows."""
    from mmcore.data.dataset import SampleDataset, make_loader

    started = time.perf_counter()
    seen = 0
    for batch_ in make_loader(SampleDataset(split, preprocessing=preprocessing), batch_size=batch, num_workers=workers):
        seen += batch_["size"]
    assert seen == len(split)
    return len(split) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from mmcore.commands.demo import make_demo_dataset
    from mmcore.data.csvs import read_split
    from mmcore.model.components import build_component
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    torch.set_num_threads(1)  # as each loader worker runs: one core per worker on both sides
    registry = get_registry()
    recipe = recipe_from_dict({"vision": {"name": args.encoder, "params": {"pretrained": False}}}, registry=registry)
    preprocessing = build_component(registry, "vision", recipe.vision).preprocessing
    work = Path(tempfile.mkdtemp(prefix="mmcore-row-decode-"))
    try:
        data = make_demo_dataset(work, n_train=args.images, n_val=2, n_test=2, size=(args.size, args.size))
        split = read_split(data / "train.csv", data)
        print(f"{len(split)} JPEGs of {args.size}px -> {args.encoder} preprocessing {preprocessing.size}, batch "
              f"{args.batch}, {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), torch {torch.__version__}")
        print(f"{'workers':>7}  {'threads img/s':>13}  {'loader img/s':>12}  {'threads / loader':>16}")
        for workers in (int(w) for w in args.workers.split(",")):
            threads = max(threads_rate(split, preprocessing, workers, args.batch) for _ in range(args.repeats))
            loader = max(loader_rate(split, preprocessing, workers, args.batch) for _ in range(args.repeats))
            print(f"{workers:>7}  {threads:>13.1f}  {loader:>12.1f}  {threads / loader:>16.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
