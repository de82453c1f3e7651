"""A run start and an epoch at scale: per-row cost for 10k and 100k images, as ratios.

    python bench/scale.py                 # 10k images (and the token-storage AUROC table)
    python bench/scale.py --large         # 10k and 100k images (the 100k set takes minutes to make)
    python bench/scale.py --sizes 2000,20000 --no-storage

Synthetic datasets of small unique JPEGs (24x24) are made on the spot in a temporary folder,
split 80/10/10. Each measurement runs in a fresh process (so its peak memory, ``ru_maxrss``,
is its own):

- **cold start**: reading the split CSVs and the checks before training (header scan,
  duplicate / leakage check) with an empty cache: every image is read once;
- **warm start**: the same again with the checks remembered (one ``stat`` per image);
- **epoch**: one training epoch of the fusion head over cached features (the tests' tiny
  ``fake_cnn`` / ``fake_text`` encoders, filled first, not timed), through the engine's
  dataset, sampler and loader.

Printed per row (ms) and as ratios of the largest size to the smallest: ~N for total time
(i.e. per-row cost flat), ~1 for peak memory. Goal: warm start <= 0.05 ms per row.

The token-storage table (skip it with ``--no-storage``) trains the demo data, vision only, with
attention pooling (token sequences cached) three times, with ``cache.token_storage`` = fp16, int8 and pooled, and prints each
test AUROC and cache size per entry.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root, n):
    """``n`` unique 24x24 JPEGs under ``root/images`` and train/val/test CSVs (80/10/10)."""
    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
        pixels[0, :4] = np.frombuffer(i.to_bytes(12, "little"), dtype=np.uint8).reshape(4, 3)  # unique content
        pixels[:, :, 0] = np.clip(pixels[:, :, 0].astype(int) + (60 if label else -60), 0, 255)
        name = f"images/{i:07d}.jpg"
        Image.fromarray(pixels).save(root / name, quality=80)
        rows.append(f"{name},{bool(label)},{'sale today' if label else 'a photo'} {i % 97}")
    cut = [int(n * 0.8), int(n * 0.9)]
    for split, part in (("train", rows[: cut[0]]), ("val", rows[cut[0] : cut[1]]), ("test", rows[cut[1] :])):
        (root / f"{split}.csv").write_text("local_image_path,label,text_info\n" + "\n".join(part) + "\n")


RECIPE = """
experiment = "scale"
seed = 0
[data]
base_dir = "{data}"
num_workers = 0
[vision]
name = "fake_cnn"
params = {{ width = 16, image_size = 24 }}
[text]
name = "fake_text"
[pooling]
name = "{pooling}"
[fusion]
name = "gated"
params = {{ dim = 16 }}
[head]
name = "mlp"
params = {{ hidden = [16] }}
[train]
epochs = {epochs}
batch_size = 64
learning_rate = 0.003
[cache]
dir = "{cache}"
token_storage = "{storage}"
[logging]
progress = false
tensorboard = false
"""


def _child_start(recipe_path):
    """Time the run start (CSVs + checks) in this process -> dict."""
    import pandas  # noqa: F401 - imported by the first CSV read: a fixed cost, not a per-row one

    import mmcore.data.memo  # noqa: F401
    from mmcore.commands.run import _check_images
    from mmcore.data.csvs import load_splits
    from mmcore.data.memo import ImageHashes
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import load_recipe

    recipe = load_recipe(recipe_path, registry=get_registry())
    started = time.perf_counter()
    splits = load_splits(recipe.data, cache=recipe.cache)
    loaded = time.perf_counter()
    hashes = ImageHashes.for_recipe(recipe)
    _check_images(recipe, splits, lambda line: None, hashes)
    done = time.perf_counter()
    rows = sum(len(s) for s in splits.values())
    return {"rows": rows, "csv_s": loaded - started, "checks_s": done - loaded, "read": hashes.facts.examined}


def _child_epoch(recipe_path):
    """Fill the feature cache (untimed), then time one epoch of head training over cached features."""
    import torch

    from mmcore.data.csvs import load_splits
    from mmcore.engine.pipeline import Pipeline
    from mmcore.engine.sampling import EpochBatchSampler
    from mmcore.engine.step import prepare_batch
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import load_recipe

    registry = get_registry()
    recipe = load_recipe(recipe_path, registry=registry)
    split = load_splits(recipe.data, cache=recipe.cache, names=("train",))["train"]
    pipeline = Pipeline(recipe, registry, progress=False)
    dataset, split, _ = pipeline.dataset(split, train=True)
    sampler = EpochBatchSampler(len(dataset), recipe.train.batch_size, seed=0)
    loader = pipeline.loader(dataset, train=True, batch_sampler=sampler)
    model = pipeline.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    started = time.perf_counter()
    for batch in loader:
        batch = prepare_batch(batch, pipeline.device)  # float16 cached features upcast, as the engine does
        logits = model(batch).logit.reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"rows": len(dataset), "epoch_s": time.perf_counter() - started}


def _child(kind, recipe_path):
    result = {"start": _child_start, "epoch": _child_epoch}[kind](recipe_path)
    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(kind, recipe_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(recipe_path)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(n, work):
    data, cache = work / f"data{n}", work / f"cache{n}"
    made = time.perf_counter()
    make_dataset(data, n)
    made = time.perf_counter() - made
    recipe = work / f"recipe{n}.toml"
    recipe.write_text(RECIPE.format(data=data, cache=cache, pooling="mean", epochs=1, storage="fp16"))
    cold = run_child("start", recipe)
    warm = run_child("start", recipe)
    epoch = run_child("epoch", recipe)
    return {"n": n, "made_s": made, "cold": cold, "warm": warm, "epoch": epoch}


def report(results):
    print("\nrun start and epoch cost per row (ms); memory = peak RSS of the measuring process")
    header = (f"{'images':>8} {'cold start':>11} {'warm start':>11} {'  of which checks':>17} {'epoch':>8} "
              f"{'cold MiB':>9} {'warm MiB':>9} {'epoch MiB':>10}")
    print(header)
    for r in results:
        rows = r["cold"]["rows"]
        cold = (r["cold"]["csv_s"] + r["cold"]["checks_s"]) / rows * 1e3
        warm = (r["warm"]["csv_s"] + r["warm"]["checks_s"]) / rows * 1e3
        checks = r["warm"]["checks_s"] / rows * 1e3
        epoch = r["epoch"]["epoch_s"] / r["epoch"]["rows"] * 1e3
        print(f"{rows:>8} {cold:>11.4f} {warm:>11.4f} {checks:>17.4f} {epoch:>8.4f} "
              f"{r['cold']['maxrss_mib']:>9.0f} {r['warm']['maxrss_mib']:>9.0f} {r['epoch']['maxrss_mib']:>10.0f}")
        assert r["warm"]["read"] == 0, "a warm start read images"
    if len(results) > 1:
        small, large = results[0], results[-1]
        scale = large["n"] / small["n"]

        def total(r, kind):
            return r[kind]["csv_s"] + r[kind]["checks_s"]

        print(f"\nratios {large['n']} / {small['n']} (rows x{scale:.0f}): "
              f"cold start time {total(large, 'cold') / total(small, 'cold'):.1f}, "
              f"warm start time {total(large, 'warm') / total(small, 'warm'):.1f}, "
              f"epoch time {large['epoch']['epoch_s'] / small['epoch']['epoch_s']:.1f}; "
              f"peak memory cold {large['cold']['maxrss_mib'] / small['cold']['maxrss_mib']:.2f}, "
              f"warm {large['warm']['maxrss_mib'] / small['warm']['maxrss_mib']:.2f}, "
              f"epoch {large['epoch']['maxrss_mib'] / small['epoch']['maxrss_mib']:.2f}")
    warm = results[-1]
    per_row = (warm["warm"]["csv_s"] + warm["warm"]["checks_s"]) / warm["warm"]["rows"] * 1e3
    print(f"goal: warm start <= 0.05 ms per row: {per_row:.4f} ms at {warm['n']} images "
          f"({'met' if per_row <= 0.05 else 'NOT met'})")


def storage_table(work, n_train=400, epochs=6):
    """Test AUROC of the demo recipe with attention pooling per ``cache.token_storage``."""
    from mmcore.commands.demo import make_demo_dataset

    data = make_demo_dataset(work / "demo", n_train=n_train, n_val=n_train // 4, n_test=n_train // 4, size=(48, 48))
    print(f"\ncache.token_storage on the demo data ({n_train} train images, vision only, attention pooling, {epochs} epochs)")
    print(f"{'storage':>8} {'test AUROC':>11} {'bytes/entry':>12}")
    for storage in ("fp16", "int8", "pooled"):
        recipe = work / f"storage-{storage}.toml"
        cache = work / f"cache-{storage}"
        text = RECIPE.format(data=data, cache=cache, pooling="attention", epochs=epochs, storage=storage)
        # vision only: the texts of the demo data alone separate the classes and would hide the vision features
        recipe.write_text(text.replace("image_size = 24", "image_size = 32").replace("[train]\n", '[train]\nmodality = "vision_only"\n'))
        out = work / f"run-{storage}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "mmcore", "run", str(recipe), "--out", str(out), "--quiet"], check=True,
                       env=env, capture_output=True)
        results = json.loads((out / "results.json").read_text())
        from mmcore.store.spaces import feature_spaces

        vision = [s for s in feature_spaces(cache) if s["stored"] == "tokens"][0]
        print(f"{storage:>8} {results['test']['at_threshold']['auroc']:>11.4f} {vision['bytes_per_entry']:>12.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="", help="comma-separated dataset sizes (default 10000, or 10000,100000)")
    parser.add_argument("--large", action="store_true", help="also 100k images (minutes to make)")
    parser.add_argument("--no-storage", action="store_true", help="skip the token-storage AUROC table")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([10_000, 100_000] if args.large else [10_000])
    with tempfile.TemporaryDirectory(prefix="mmcore-scale-") as tmp:
        work = Path(tmp)
        results = []
        for n in sizes:
            results.append(measure(n, work))
            print(f"{n} images: made in {results[-1]['made_s']:.1f} s", flush=True)
        report(results)
        if not args.no_storage:
            storage_table(work)


if __name__ == "__main__":
    main()
