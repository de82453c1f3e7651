"""int8 against fp32 bundles on the CPU: rows/s of the graph at batch 32, bundle size, the export's gate.

    OMP_NUM_THREADS=1 nice -n 10 python bench/int8.py     # tiny + demo model (ResNet18 + MiniLM), a few minutes
    python bench/int8.py --quick                          # the tiny model, few repeats: the plumbing, < 1 min

For each model — ``tiny`` (``recipes/demo.toml`` with the tiny ResNet and tiny BERT) and ``demo``
(``recipes/demo.toml`` itself: ResNet18 with random weights + the real MiniLM; ``--no-demo`` leaves it
out) — on the generated demo ads: ``mmcore run`` (``--epochs``), ``mmcore export`` (fp32, parity gate)
and ``mmcore export --quantize int8 [--quantize-mode MODE]`` with the gate's limits opened
(``--min-agreement 0 --max-auroc-drop 1``: this measures speed; the gate's figures are printed as
they came). Then both graphs score the same ``--batch`` rows (the bundle's own inputs, made once by
its host side) ``--repeats`` times in one onnxruntime session each, alternating, after a warm-up
call; rows/s is the batch over the median call. Printed: one line per model with fp32 and int8
rows/s, their ratio (the issue's target: >= 1.5x at batch 32), graph MB, and the gate's agreement and
AUROC change; decoding and preprocessing are not timed (they are the same for both graphs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["vision.params.tiny=true", "text.params.tiny=true"]


def mmcore(*args):
    """Run the real CLI; stop the benchmark with its output when it fails."""
    result = subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"mmcore {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def bundles(work, name, overrides, *, data, epochs, mode, rows, ops=None):
    """(fp32 bundle, int8 bundle) of the demo recipe with ``overrides`` under ``work/name`` (made when missing);
    ``ops``: ``--quantize-ops`` (None: the export's default)."""
    base = work / name
    run, fp32 = base / "run", base / "fp32"
    int8 = base / (f"int8-{mode}" + (f"-{ops.replace(',', '-')}" if ops else ""))
    if not (run / "status.json").is_file():
        sets = [arg for value in overrides for arg in ("--set", value)]
        mmcore("run", REPO / "recipes" / "demo.toml", "--out", run, "--quiet",
               "--set", f"data.base_dir={str(data.resolve())!r}", "--set", f"train.epochs={epochs}",
               "--set", f"cache.dir={str((work / 'cache').resolve())!r}", "--set", "logging.tensorboard=false", *sets)
    if not (fp32 / "manifest.json").is_file():
        mmcore("export", run, "--out", fp32, "--quiet", "--rows", rows)
    if not (int8 / "manifest.json").is_file():
        mmcore("export", run, "--out", int8, "--quiet", "--rows", rows, "--quantize", "int8", "--quantize-mode", mode,
               "--min-agreement", "0", "--max-auroc-drop", "1", *(["--quantize-ops", ops] if ops else []))
    return fp32, int8


def batch_feeds(scorer, data, batch):
    """The graph inputs of the first ``batch`` test rows (cycled when there are fewer)."""
    from mmcore.data.csvs import read_split

    split = read_split(data / "test.csv", data)
    picks = [i % len(split) for i in range(batch)]
    items = [scorer.preprocess(scorer.load_image(split.paths[i])) for i in picks] if scorer.uses_vision else None
    return scorer.feeds(items, [split.texts[i] for i in picks])


def rows_per_s(fp32, int8, feeds, batch, repeats):
    """Rows/s of each scorer's graph on ``feeds``: calls alternate, one warm-up each, the median counts."""
    times = {"fp32": [], "int8": []}
    runners = {"fp32": fp32.runner, "int8": int8.runner}
    for runner in runners.values():
        runner(feeds)
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(feeds)
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(spent) for name, spent in times.items()}


def graph_mb(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = [manifest["graph"]["file"], manifest["graph"].get("external_data")]
    return sum(manifest["files"][f]["bytes"] for f in files if f) / 1e6


def measure(name, overrides, args, data):
    from mmcore.scoring.scorers import open_scorer

    fp32_dir, int8_dir = bundles(args.work, name, overrides, data=data, epochs=args.epochs, mode=args.mode, rows=args.rows,
                                 ops=args.ops)
    fp32, int8 = open_scorer(fp32_dir, device="cpu"), open_scorer(int8_dir, device="cpu")
    feeds = batch_feeds(fp32, data, args.batch)
    rates = rows_per_s(fp32, int8, feeds, args.batch, args.repeats)
    gate = json.loads((int8_dir / "manifest.json").read_text())["quantization"]["gate"]
    drop = "n/a" if gate["auroc_drop"] is None else f"{gate['auroc_drop']:+.4f}"
    return (f"{name:<6} {rates['fp32']:>10.1f} {rates['int8']:>10.1f} {rates['int8'] / rates['fp32']:>7.2f}x "
            f"{graph_mb(fp32_dir):>9.2f} {graph_mb(int8_dir):>9.2f} {gate['agreement']:>9.2%} {drop:>10} "
            f"({gate['rows']} rows)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_int8"), help="where data, runs and bundles go (reused)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=128, help="parity (and gate) rows of each export")
    parser.add_argument("--mode", choices=["dynamic", "static"], default="dynamic")
    parser.add_argument("--ops", default=None, help="--quantize-ops for the int8 export (default: the export's)")
    parser.add_argument("--no-demo", action="store_true", help="the tiny model only")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 3 repeats, 1 epoch: the plumbing")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.no_demo, args.rows = 3, 1, True, 32
    from mmcore.commands.demo import make_demo_dataset

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "demo_data"
    if not (data / "test.csv").is_file():
        make_demo_dataset(data, **({"n_train": 64, "n_val": 32, "n_test": 32, "size": (48, 48)} if args.quick else {}))
    models = [("tiny", TINY)] + ([] if args.no_demo else [("demo", [])])
    print(f"int8 ({args.mode}{', ' + args.ops if args.ops else ''}) / fp32 graph rows/s at batch {args.batch} on the CPU, median of {args.repeats} calls")
    print(f"{'model':<6} {'fp32 r/s':>10} {'int8 r/s':>10} {'ratio':>8} {'fp32 MB':>9} {'int8 MB':>9} "
          f"{'agreement':>9} {'AUROC drop':>10}")
    for name, overrides in models:
        print(measure(name, overrides, args, data), flush=True)


if __name__ == "__main__":
    main()
