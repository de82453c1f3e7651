"""Frozen multimodal recipe: on-disk feature cache vs no cache vs the floor, side by side.

    python bench/frozen_cache.py [--images 500] [--epochs 5] [--encoder resnet18]

Each configuration runs ``run_training`` in a fresh process (timing the feature pass and
every epoch); the floor is one encoder pass at the raw forward throughput measured here
plus the head training of the cached run. Prints the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """
experiment = "bench"
seed = 0
[data]
base_dir = "{data}"
[vision]
name = "{encoder}"
params = {{ pretrained = false }}
[text]
name = "fake_text"
[pooling]
name = "{pooling}"
[train]
epochs = {epochs}
batch_size = 32
learning_rate = 1e-3
[train.early_stopping]
patience = 0
[cache]
enabled = {enabled}
dir = "{cache}"
[logging]
tensorboard = false
progress = false
"""


def one_run(recipe_path, out):
    """Train once in this process; print {feature_s, epochs_s, total_s, log} as JSON."""
    import numpy as np

    from mmcore.commands.run import run_training
    from mmcore.engine import pipeline as pipeline_module
    from mmcore.evaluation.metrics import binary_metrics
    from mmcore.recipe import load_recipe

    # one-time imports (torchmetrics: seconds) must not be charged to the first epoch
    binary_metrics(np.array([0.2, 0.8]), np.array([0, 1]), 0.5)

    spent = {"dataset": 0.0}
    original = pipeline_module.Pipeline.dataset

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["dataset"] += time.perf_counter() - started

    pipeline_module.Pipeline.dataset = timed
    logs = []
    original_log = pipeline_module.Pipeline._log
    pipeline_module.Pipeline._log = lambda self, m: (logs.append(m), original_log(self, m))
    started = time.perf_counter()
    run_dir = run_training(load_recipe(recipe_path), recipe_path=recipe_path, out=out, progress=False, echo=lambda *_: None)
    total = time.perf_counter() - started
    results = json.loads((Path(run_dir) / "results.json").read_text())
    print(json.dumps({
        "feature_s": spent["dataset"],
        "epochs_s": [row["epoch_time_s"] for row in results["history"]],
        "total_s": total,
        "log": logs,
        "test_auroc": results["test"]["at_0.5"]["auroc"],
    }))


def run_config(work, name, **fields):
    recipe = work / f"{name}.toml"
    recipe.write_text(RECIPE.format(**fields), encoding="utf-8")
    out = work / "runs" / name
    result = subprocess.run(
        [sys.executable, __file__, "--one", str(recipe), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def forward_throughput(encoder_name, pooling, batch_size=32, batches=6):
    """Images/s of the raw encoder forward (no_grad, fp32, channels_last), random pixels."""
    import torch

    from mmcore.model.components import build_component
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    registry = get_registry()
    recipe = recipe_from_dict({"vision": {"name": encoder_name, "params": {"pretrained": False}}}, registry=registry)
    encoder = build_component(registry, "vision", recipe.vision).eval()
    h, w = encoder.preprocessing.size
    x = torch.randn(batch_size, 3, h, w)
    if encoder.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        encoder(pixel_values=x)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            encoder(pixel_values=x)
    return batch_size * batches / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="training images (val, test: a fifth each)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_run(*args.one)

    import torch

    from mmcore.commands.demo import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="mmcore-bench-"))
    n_eval = max(2, args.images // 5)
    data = make_demo_dataset(work / "data", n_train=args.images, n_val=n_eval, n_test=n_eval, size=(args.size, args.size))
    total_images = args.images + 2 * n_eval
    common = dict(data=data, encoder=args.encoder, pooling=args.pooling, epochs=args.epochs, cache=work / "cache")
    print(f"{args.encoder} ({args.pooling} pooling), {total_images} images of {args.size}px "
          f"({args.images} train), {args.epochs} epochs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    rate = forward_throughput(args.encoder, args.pooling)
    cold = run_config(work, "cache-cold", enabled="true", **common)
    warm = run_config(work, "cache-warm", enabled="true", **common)
    none = run_config(work, "no-cache", enabled="false", **common)

    def training(run):
        return run["feature_s"] + sum(run["epochs_s"])

    encoder_pass = total_images / rate
    head = sum(warm["epochs_s"])  # head training alone (all features already cached)
    floor = encoder_pass + head
    first = cold["feature_s"] + cold["epochs_s"][0]  # building the cache is the first epoch's work
    later = [e / first for e in cold["epochs_s"][1:]]
    print(f"raw encoder forward: {rate:.1f} img/s -> one pass over {total_images} images {encoder_pass:.1f} s")
    print(f"{'':<12}{'features s':>11}{'epochs s':>40}{'train s':>9}{'total s':>9}")
    for name, run in (("cache cold", cold), ("cache warm", warm), ("no cache", none)):
        epochs = " ".join(f"{e:.2f}" for e in run["epochs_s"])
        print(f"{name:<12}{run['feature_s']:>11.2f}{epochs:>40}{training(run):>9.2f}{run['total_s']:>9.2f}")
    print(f"floor (encoder pass + head training)              {floor:.2f} s")
    print()
    print(f"cache cold: epochs 2..{args.epochs} / first (feature pass + epoch 1): "
          + ", ".join(f"{100 * x:.1f}%" for x in later) + f"   target < 5% each: {'met' if max(later) < 0.05 else 'MISSED'}")
    print(f"cache cold: training / floor = {training(cold) / floor:.2f}x   target <= 1.3x: "
          f"{'met' if training(cold) / floor <= 1.3 else 'MISSED'}")
    print(f"no cache:   whole run / cache cold whole run = {none['total_s'] / cold['total_s']:.2f}x, "
          f"epochs 2..{args.epochs} no cache / cached = {sum(none['epochs_s'][1:]) / max(sum(cold['epochs_s'][1:]), 1e-9):.1f}x")
    print(f"cache warm: feature stage {warm['feature_s']:.2f} s vs {cold['feature_s']:.2f} s cold "
          f"({100 * warm['feature_s'] / cold['feature_s']:.1f}%); log: {warm['log'][0]!r}")
    print(f"test AUROC: cold {cold['test_auroc']:.3f}, warm {warm['test_auroc']:.3f}, no cache {none['test_auroc']:.3f}")


if __name__ == "__main__":
    main()
