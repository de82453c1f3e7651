"""``bench/int8.py --quick``: the int8 benchmark's plumbing on the tiny model; its figures are the ones on disk."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_int8_bench_quick_prints_rows_per_second_of_both_graphs_and_the_gate_on_disk(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "int8.py"), "--quick", "--work", str(work)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = re.search(r"^tiny +([\d.]+) +([\d.]+) +([\d.]+)x +([\d.]+) +([\d.]+) +([\d.]+)% +(\S+) \((\d+) rows\)$",
                     out.stdout, re.M)
    assert line, out.stdout
    fp32, int8, ratio, fp32_mb, int8_mb, agreement, drop, rows = line.groups()
    assert float(fp32) > 0 and float(int8) > 0
    assert float(ratio) == pytest.approx(float(int8) / float(fp32), abs=0.01)
    manifest = json.loads((work / "tiny" / "int8-dynamic" / "manifest.json").read_text())
    gate = manifest["quantization"]["gate"]
    assert manifest["precision"] == "int8" and int(rows) == gate["rows"] == 32
    assert float(agreement) == pytest.approx(100 * gate["agreement"], abs=0.005)
    assert float(drop) == pytest.approx(gate["auroc_drop"], abs=5e-5)
    assert float(int8_mb) == pytest.approx(manifest["files"]["model.onnx"]["bytes"] / 1e6, abs=0.005)
    fp32_manifest = json.loads((work / "tiny" / "fp32" / "manifest.json").read_text())
    assert float(fp32_mb) == pytest.approx(fp32_manifest["files"]["model.onnx"]["bytes"] / 1e6, abs=0.005)
