"""Peak memory of the Python API's ``Model.predict`` on a DataFrame: 100k rows against 10k rows.

    python bench/api_memory.py [--rows 10000,100000] [--run RUN_DIR] [--batch-size 64]
    python bench/api_memory.py --quick          # the plumbing: 200 and 2000 rows (tests/test_bench_api_memory.py)

``predict`` streams the rows through :func:`mmcore.scoring.rows.score_rows` in batches (a few
batches decoded ahead of the model), so what grows with the rows is only the per-row bookkeeping
(the validated rows, the scores, the returned DataFrame), not decoded images. Each size runs in a
process of its own (``--child``): it loads the model, builds a DataFrame of ``N`` rows (the demo's
image paths and texts, repeated), scores it with ``model.predict`` and reports its peak RSS
(``ru_maxrss``) and seconds. The parent prints one line per size and the ratio of each peak to the
smallest size's, against the goal (1.3x: issue 30).

Without ``--run``, a tiny run (the test plugin's fake encoders, 1 epoch) is trained first on a small
generated demo set, in a temporary folder; the model's cost per row is then small, so what is
measured is the API's own memory, which is the point.
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

#: 100k rows may take at most this many times the peak memory of 10k rows (issue 30)
GOAL_RATIO = 1.3
TINY_RECIPE = {
    "experiment": "api_memory",
    "seed": 0,
    "data": {"num_workers": 0},
    "vision": {"name": "fake_cnn", "params": {"width": 8}},
    "text": {"name": "fake_text"},
    "pooling": {"name": "mean"},
    "fusion": {"name": "gated", "params": {"dim": 16}},
    "head": {"name": "mlp", "params": {"hidden": [16]}},
    "train": {"epochs": 1, "batch_size": 16, "learning_rate": 0.003},
    "logging": {"progress": False, "tensorboard": False},
}


def demo_frame(data_dir, rows):
    """``rows`` rows of the demo's test split, its image paths (absolute) and texts repeated."""
    import pandas as pd

    base = pd.read_csv(Path(data_dir) / "test.csv", keep_default_na=False)
    paths = [str(Path(data_dir) / p) for p in base["local_image_path"]]
    texts = base["text_info"].tolist()
    return pd.DataFrame({"local_image_path": [paths[i % len(paths)] for i in range(rows)],
                         "text_info": [texts[i % len(texts)] for i in range(rows)]})


def child(run_dir, data_dir, rows, batch_size):
    """One size, in this process: load, then build the DataFrame and predict -> one JSON line: the RSS
    after loading, the peak RSS from then on (the high-water mark is reset after the load, so the
    imports' and the model's own peak do not hide what predict adds) and predict's seconds."""
    import mmcore

    model = mmcore.load(run_dir, device="cpu", quiet=True, text="optional")
    loaded = _status_bytes("VmRSS")
    reset = _reset_peak()
    frame = demo_frame(data_dir, rows)
    started = time.perf_counter()
    scored = model.predict(frame, batch_size=batch_size)
    seconds = time.perf_counter() - started
    assert int(scored["score"].notna().sum()) == rows
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rows": rows, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak, "peak_reset": reset,
                      "seconds": round(seconds, 2)}))


def _reset_peak():
    """Reset this process's peak RSS (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field):
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def train_tiny(folder):
    """A small demo set and a tiny run on it (fake encoders, 1 epoch) -> (run dir, data dir)."""
    import mmcore
    from mmcore.commands.demo import make_demo_dataset

    data = make_demo_dataset(Path(folder) / "demo", n_train=32, n_val=16, n_test=16, size=(48, 48))
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "base_dir": str(data)},
              "cache": {"dir": str(Path(folder) / "cache")}}
    run = mmcore.train(recipe, out=Path(folder) / "run", quiet=True)
    return run.dir, data


def measure(run_dir, data_dir, sizes, batch_size):
    """Each size in a process of its own -> the children's reports, in order."""
    reports = []
    for rows in sizes:
        command = [sys.executable, __file__, "--child", "--run", str(run_dir), "--data", str(data_dir),
                   "--rows", str(rows), "--batch-size", str(batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench/api_memory.py: {rows} rows: the child exited {done.returncode}:\n{done.stderr[-2000:]}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return reports


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated DataFrame sizes (the first is the base)")
    parser.add_argument("--run", help="a run directory or bundle to score with (default: train a tiny run first)")
    parser.add_argument("--data", help="the demo data folder of --run's rows (default: the tiny run's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="200 and 2000 rows: the plumbing, for CI")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [200, 2000] if args.quick else [int(n) for n in args.rows.split(",")]
    if args.child:
        return child(args.run, args.data, sizes[0], args.batch_size)
    with tempfile.TemporaryDirectory(prefix="mmcore-api-memory-") as tmp:
        if args.run:
            if not args.data:
                parser.error("--run needs --data: a folder with a demo-style test.csv")
            run_dir, data_dir = args.run, args.data
        else:
            run_dir, data_dir = train_tiny(tmp)
        reports = measure(run_dir, data_dir, sizes, args.batch_size)
    base = reports[0]["peak_rss_bytes"]
    reset = "reset after the load" if all(r["peak_reset"] for r in reports) else "since the process started"
    print(f"Model.predict on a DataFrame, peak RSS per process ({reset}; batch {args.batch_size}, cpu, "
          f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads):")
    for report in reports:
        ratio = report["peak_rss_bytes"] / base
        print(f"  {report['rows']:>8} rows  loaded {report['loaded_rss_bytes'] / 2**20:8.1f} MiB  "
              f"peak RSS while predicting {report['peak_rss_bytes'] / 2**20:8.1f} MiB  "
              f"{ratio:5.3f}x of {reports[0]['rows']} rows  {report['seconds']:7.2f} s  "
              f"{report['rows'] / max(report['seconds'], 1e-9):8.0f} rows/s")
    worst = max(report["peak_rss_bytes"] for report in reports) / base
    verdict = "PASS" if worst <= GOAL_RATIO else "MISS"
    print(f"largest / smallest peak RSS: {worst:.3f}x (goal <= {GOAL_RATIO}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
