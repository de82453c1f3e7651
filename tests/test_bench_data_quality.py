"""``bench/data_quality.py --quick``: the data-quality benchmark's plumbing end to end on generated data
(audit of flipped and clean labels, a round of select against random picks, drift against its own rows and
a shifted set); the printed figures are the ones in results.json and in the audit's label_issues.csv."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_quality_bench_quick(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "data_quality.py"), "--quick", "--work", str(work), "--seeds", "1",
         "--folds", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    flipped = results["labels"]["flipped"][0]
    with open(flipped["label_issues"], newline="") as handle:
        table = list(csv.DictReader(handle))
    train = work / "labels-seed0" / "train.csv"
    flips = flipped["flips"]
    assert flips == round(0.05 * 160)
    with open(work / "demo" / "train.csv", newline="") as a, open(train, newline="") as b:
        changed = {f"{train}:{i}" for i, (x, y) in enumerate(zip(csv.DictReader(a), csv.DictReader(b)), start=1)
                   if x["label"] != y["label"]}
    assert len(changed) == flips
    assert flipped["top_k_recall"] == round(len(changed & {r["row"] for r in table[:flips]}) / flips, 4)
    assert flipped["flagged"] == sum(r["is_issue"] == "1" for r in table)
    lines = out.stdout.splitlines()
    assert lines[0] == (f"labels seed 0: {flips} flipped, top-K holds {flipped['top_k_recall']:.1%} of them; cleanlab flags "
                        f"{flipped['flagged']} rows ({flipped['flagged_that_are_flips']} of them flips) in {flipped['seconds']} s")
    assert re.fullmatch(r"select seed 0: 32 labelled, AUROC select \d\.\d{4} vs random \d\.\d{4}: .*", lines[3])
    shifted = results["drift"]["other dataset"]
    assert shifted["exit_code"] == 10 and shifted["domain_auroc"]["image"] >= 0.9
    assert results["drift"]["own training rows"]["domain_auroc"]["image"] < 0.75
