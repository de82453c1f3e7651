"""`mmcore tune` on the demo data: pruning, --jobs, samplers and the feature cache, same trial budget.

    python bench/tune.py [--trials 6] [--epochs 5] [--train 160]

Every study is a real ``mmcore tune`` process on ``recipes/demo.toml`` (ResNet18 random + MiniLM,
frozen: their features are cached) over the same space, timed from outside:

- cache: a 2-trial study on an empty feature cache; its first trial computes the frozen encoders'
  features, the second reads them (every later study starts warm, so the others compare fairly);
- pruning: TPE with the median pruner vs no pruner (wall time, trials pruned);
- jobs: TPE without pruning, ``--jobs 2`` vs ``--jobs 1`` (wall time);
- samplers: the best validation AUROC TPE, random and grid find in the same number of trials
  (no pruning; the grid is the space's 3 x 2 points, so the budget is 6 unless --trials says less).
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

REPO = Path(__file__).resolve().parents[1]
SPACE = """
"train.learning_rate" = { log_uniform = [1e-4, 3e-2], points = 3 }
"fusion.params.dim" = { choice = [32, 128] }
"""


def tune(recipe, space, out, cache, *args, data, epochs):
    """One ``mmcore tune`` study in a fresh process; (wall seconds, study.json)."""
    command = [
        sys.executable, "-m", "mmcore", "tune", str(recipe), "--space", str(space), "--out", str(out), "--seed", "0",
        "--quiet", "--set", f"data.base_dir={str(data)!r}", "--set", f"cache.dir={str(cache)!r}",
        "--set", f"train.epochs={epochs}", "--set", "train.early_stopping.patience=0",
        "--set", "logging.tensorboard=false", *map(str, args),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, json.loads((Path(out) / "study.json").read_text())


def trial_seconds(study_dir, name):
    return json.loads((Path(study_dir) / name / "status.json").read_text())["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=160, help="training images (val and test: half as many each)")
    args = parser.parse_args()

    from mmcore.commands.demo import make_demo_dataset

    recipe = REPO / "recipes" / "demo.toml"
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        tmp = Path(tmp)
        data = make_demo_dataset(tmp / "data", n_train=args.train, n_val=args.train // 2, n_test=args.train // 2)
        space = tmp / "space.toml"
        space.write_text(SPACE, encoding="utf-8")
        cache = tmp / "cache"
        common = dict(data=data, epochs=args.epochs)
        n = str(args.trials)

        tune(recipe, space, tmp / "cold", cache, "--trials", 2, "--pruner", "none", **common)
        cold, warm = trial_seconds(tmp / "cold", "trial-000"), trial_seconds(tmp / "cold", "trial-001")

        pruned_wall, pruned = tune(recipe, space, tmp / "median", cache, "--trials", n, "--pruner", "median:n_startup_trials=2",
                                   **common)
        none_wall, tpe = tune(recipe, space, tmp / "tpe", cache, "--trials", n, "--pruner", "none", **common)
        jobs_wall, _ = tune(recipe, space, tmp / "jobs2", cache, "--trials", n, "--pruner", "none", "--jobs", 2, **common)
        _, random = tune(recipe, space, tmp / "random", cache, "--trials", n, "--pruner", "none", "--sampler", "random",
                         **common)
        _, grid = tune(recipe, space, tmp / "grid", cache, "--trials", n, "--pruner", "none", "--sampler", "grid", **common)

    count = sum(1 for t in pruned["trials"] if t["state"] == "pruned")
    print(f"demo data: {args.train} train images, {args.trials} trials of {args.epochs} epochs per study, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"feature cache : first trial {cold:.1f} s (encoders run), second {warm:.1f} s (features from the cache): "
          f"{cold / warm:.1f}x")
    print(f"pruning       : median {pruned_wall:.1f} s vs none {none_wall:.1f} s wall = {pruned_wall / none_wall:.2f}x "
          f"({count} of {args.trials} trials pruned)")
    print(f"jobs          : --jobs 2 {jobs_wall:.1f} s vs --jobs 1 {none_wall:.1f} s wall = {none_wall / jobs_wall:.2f}x faster")
    best = {name: study["best"]["value"] for name, study in (("tpe", tpe), ("random", random), ("grid", grid))}
    print("best val_auroc: " + ", ".join(f"{name} {value:.4f}" for name, value in best.items())
          + f" (grid: {len(grid['trials'])} points)")


if __name__ == "__main__":
    main()
