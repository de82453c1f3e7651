"""``bench/api_memory.py --quick``: the memory benchmark's plumbing on the shared tiny run.

Each size runs in a process of its own and scores every row through ``Model.predict``; the printed
ratios must be the printed peaks' and the verdict the goal's.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_api_memory_bench_quick_prints_each_size_and_the_ratio(exportable_run, demo_data, tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "api_memory.py"), "--quick", "--run", str(exportable_run),
         "--data", str(demo_data)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(r"^ +(\d+) rows  loaded +([\d.]+) MiB  peak RSS while predicting +([\d.]+) MiB  ([\d.]+)x of 200 rows",
                      out.stdout, re.M)
    assert [int(r[0]) for r in rows] == [200, 2000], out.stdout
    peaks = [float(r[2]) for r in rows]
    assert [float(r[3]) for r in rows] == [1.0, pytest.approx(peaks[1] / peaks[0], abs=1e-3)]
    assert all(float(r[2]) >= float(r[1]) * 0.5 for r in rows)  # the peak is the whole process's, model included
    worst = max(peaks) / peaks[0]
    verdict = re.search(r"^largest / smallest peak RSS: ([\d.]+)x \(goal <= 1\.3x\): (PASS|MISS)$", out.stdout, re.M)
    assert float(verdict.group(1)) == pytest.approx(worst, abs=2e-3)
    assert verdict.group(2) == ("PASS" if worst <= 1.3 else "MISS")
    assert "reset after the load" in out.stdout
