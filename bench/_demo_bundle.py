"""The demo model (recipes/demo.toml: ResNet18 random + the real MiniLM), trained briefly and exported.

Shared by ``bench/serve.py`` and ``bench/export.py``; kept in ``--work`` so a second benchmark reuses it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mmcore(*args):
    """Run the real CLI; stop the benchmark with its output when it fails."""
    result = subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"mmcore {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def demo_bundle(work, epochs=2, overrides=(), export=True):
    """(run dir, bundle dir, data dir) of the demo model under ``work`` (made when missing).

    ``overrides``: extra ``--set`` values for the demo recipe (``text.params.pretrained=false`` where
    the MiniLM weights are not installed); ``export=False`` leaves the bundle out (serving the run).
    """
    from mmcore.commands.demo import make_demo_dataset

    work = Path(work)
    data, run, bundle = work / "demo_data", work / "run", work / "bundle"
    if not (data / "test.csv").is_file():
        make_demo_dataset(data)
    if not (run / "status.json").is_file():
        sets = [arg for value in overrides for arg in ("--set", value)]
        mmcore("run", REPO / "recipes" / "demo.toml", "--out", run, "--quiet",
               "--set", f"data.base_dir={str(data.resolve())!r}", "--set", f"train.epochs={epochs}",
               "--set", f"cache.dir={str((work / 'cache').resolve())!r}", *sets)
    if export and not (bundle / "manifest.json").is_file():
        mmcore("export", run, "--out", bundle, "--quiet")
    return run, bundle, data
