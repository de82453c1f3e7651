"""``bench/serve_small.py --quick --no-students``: the chain's ensemble steps end to end through the CLI
(``run --seeds``, ``run --folds``, ``export`` of a run, an ensemble and a bag, timed through each bundle),
its table's figures the ones on disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_small_quick_prints_the_chain_from_the_files(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serve_small.py"), "--quick", "--no-students", "--work", str(work),
         "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "rows.json").read_text())["tables"]["demo"]}
    assert list(rows) == ["single runs (2 seeds)", "best single run", "seed ensemble", "2-fold bag"]
    ensemble = json.loads((work / "demo" / "seeds" / "results.json").read_text())
    bag = json.loads((work / "demo" / "bag" / "results.json").read_text())
    assert rows["seed ensemble"]["auroc"] == f"{ensemble['test']['at_threshold']['auroc']:.4f}"
    assert rows["2-fold bag"]["chosen_on"] == f"oof {bag['oof']['auroc']:.4f}"
    for name in ("best single run", "seed ensemble", "2-fold bag"):
        assert rows[name]["b1"] > 0 and rows[name]["b32"] > 0 and rows[name]["mb"] > 0
    bag_manifest = json.loads((work / "demo" / "bundle-bag" / "manifest.json").read_text())
    assert [m["weight"] for m in bag_manifest["ensemble"]["members"]] == [0.5, 0.5]
    assert "| seed ensemble | " in out.stdout and "| 2-fold bag | " in out.stdout

    # the paired difference the bag's target names, from the two runs' test predictions
    from sklearn.metrics import roc_auc_score

    def test_auroc(folder):
        records = json.loads((folder / "test_predictions.json").read_text())
        return roc_auc_score([int(r["label"]) for r in records], [r["score"] for r in records])

    best = work / "demo" / "seeds" / (work / "demo" / "best.txt").read_text().strip()
    assert best.parent.name == "members" and rows["best single run"]["note"].endswith(best.name)
    (label, diff, low, high), = json.loads((tmp_path / "rows.json").read_text())["differences"]["demo"]
    assert label == "bag - best single run" and low <= diff <= high
    assert diff == pytest.approx(test_auroc(work / "demo" / "bag") - test_auroc(best), abs=1e-5)
    again = subprocess.run([sys.executable, str(REPO / "bench" / "serve_small.py"), "--differences-only", "--work",
                            str(work), "--datasets", "demo"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert f"| bag - best single run | {diff:+.4f} | [{low:+.4f}, {high:+.4f}] |" in again.stdout

