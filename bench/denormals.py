"""CPU epoch times early vs late in a run, with denormals flushed to zero (the engine's default) and without.

    python bench/denormals.py [--epochs 12] [--repeats 2] [--n-train 240]
    python bench/denormals.py --demo      # the demo recipe itself (ResNet18 random + real MiniLM)

A real ``mmcore run`` (fake encoders from the test plugin, or with ``--demo`` the shipped demo
recipe ``mmcore/recipes/demo.toml``; frozen, warm feature cache: only pooling, fusion and head
train, as in a cached-feature run) on the generated demo dataset,
each variant in its own process; "off" replaces the engine's ``flush_denormals`` with
``torch.set_flush_denormal(False)``. Variants alternate so background load hits both alike.
Prints, per variant, the median of the first two and of the last two epochs' times
(``epoch_time_s`` in results.json: training + validation) and their ratio, and the test AUROC
(it must not change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(recipe, out, flush, demo=False):
    """Run one training in this process, with or without the flush."""
    import torch

    import mmcore.engine.runtime as runtime

    if not flush:
        runtime.flush_denormals = lambda: torch.set_flush_denormal(False)
    from mmcore.commands.run import run_training
    from mmcore.plugins.manager import get_registry, make_registry
    from mmcore.recipe import load_recipe

    if demo:
        registry = get_registry()
    else:
        import mmcore_fake_encoders

        registry = make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders)])
    loaded = load_recipe(recipe, registry=registry)
    run_training(loaded, recipe_path=recipe, out=out, registry=registry, progress=False, echo=lambda *a, **k: None)


def demo_recipe_text(data_dir, epochs, cache_dir):
    """The shipped demo recipe, on ``data_dir``, with its own cache, ``epochs`` and no early stop."""
    import tomli_w
    import tomllib

    data = tomllib.loads((REPO / "mmcore" / "recipes" / "demo.toml").read_text(encoding="utf-8"))
    data["data"]["base_dir"] = str(data_dir)
    data["train"]["epochs"] = epochs
    data["train"]["early_stopping"] = {"patience": 0}
    data["cache"] = {"dir": str(cache_dir)}
    data["logging"] = {"tensorboard": False, "progress": False}
    return tomli_w.dumps(data)


def recipe_text(data_dir, epochs, cache_dir):
    import tomli_w

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_recipe_data

    data = tiny_recipe_data(
        data_dir,
        experiment="denormals",
        pooling={"name": "attention"},
        train={"epochs": epochs, "early_stopping": {"patience": 0}},
        cache={"dir": str(cache_dir)},
        logging={"tensorboard": False, "progress": False},
    )
    return tomli_w.dumps(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--demo", action="store_true", help="the shipped demo recipe on the demo's own data")
    parser.add_argument("--child", nargs=3, metavar=("RECIPE", "OUT", "FLUSH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        recipe, out, flush = args.child
        return child(recipe, out, flush == "on", demo=args.demo)

    from mmcore.commands.demo import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="mmcore-denormals-"))
    if args.demo:  # the demo's own data: make_demo_dataset's defaults, as `mmcore demo` writes it
        data = make_demo_dataset(work / "data")
        text = demo_recipe_text(data, args.epochs, work / "cache")
    else:
        data = make_demo_dataset(work / "data", n_train=args.n_train, n_val=80, n_test=80, size=(48, 48))
        text = recipe_text(data, args.epochs, work / "cache")
    recipe = work / "r.toml"
    recipe.write_text(text, encoding="utf-8")
    runs = {"off": [], "on": []}
    order = [("warm", "on")] + [(f"{flush}{i}", flush) for i in range(args.repeats) for flush in ("off", "on")]
    for name, flush in order:  # the first run fills the feature cache and is not counted
        out = work / f"run-{name}"
        command = [sys.executable, __file__, "--child", str(recipe), str(out), flush] + (["--demo"] if args.demo else [])
        subprocess.run(command, check=True, cwd=REPO)
        results = json.loads((out / "results.json").read_text())
        if name != "warm":
            runs[flush].append(results)
    print(f"{'flush':>6} {'early epoch s':>14} {'late epoch s':>13} {'late/early':>11} {'test auroc':>11}")
    for flush, results in runs.items():
        early = statistics.median(h["epoch_time_s"] for r in results for h in r["history"][:2])
        late = statistics.median(h["epoch_time_s"] for r in results for h in r["history"][-2:])
        auroc = results[0]["test"]["at_threshold"]["auroc"]
        print(f"{flush:>6} {early:14.3f} {late:13.3f} {late / early:10.2f}x {auroc:11.4f}")


if __name__ == "__main__":
    main()
