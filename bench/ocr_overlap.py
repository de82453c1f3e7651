"""How close ``mmcore ocr`` comes to the OCR text shipped with a dataset, and how fast.

Blanks ``text_info`` of a CSV into a temp folder (never next to the data), runs the ``mmcore ocr``
command on it through the CLI, and compares per image the lowercase word sets
(``[a-z0-9]+`` tokens, and Hangul runs) with the shipped text:

- Jaccard: |A & B| / |A | B| (1.0 when both are empty);
- token recall: shipped tokens found again / shipped tokens (over images with shipped text);
- empty agreement: share of images where both are empty or both are non-empty.

    python bench/ocr_overlap.py /work/shared/data/dredze_image_spam/test.csv --lang eng
    python bench/ocr_overlap.py DATA.csv --lang eng --engine-param psm=11 --limit 100
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

WORD = re.compile(r"[a-z0-9]+|[\uac00-\ud7a3]+")


def words(text):
    """Lowercase word set of ``text``."""
    return set(WORD.findall(str(text).lower()))


def compare(reference, produced):
    """Mean Jaccard, micro token recall and empty agreement over aligned text lists."""
    jaccards, found, total, agree = [], 0, 0, 0
    for ref, out in zip(reference, produced):
        a, b = words(ref), words(out)
        jaccards.append(len(a & b) / len(a | b) if a | b else 1.0)
        found += len(a & b)
        total += len(a)
        agree += bool(a) == bool(b)
    n = max(1, len(jaccards))
    return {
        "images": len(jaccards),
        "mean_jaccard": sum(jaccards) / n,
        "token_recall": found / max(1, total),
        "empty_agreement": agree / n,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--lang", default="eng")
    parser.add_argument("--engine", default="tesseract")
    parser.add_argument("--engine-param", action="append", default=[])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--save", type=Path, default=None, help="also write the OCR CSV here")
    args = parser.parse_args(argv)

    shipped = pd.read_csv(args.csv, keep_default_na=False, dtype=str)
    if args.limit:
        shipped = shipped.head(args.limit)
    with tempfile.TemporaryDirectory(prefix="ocr-bench-") as tmp:
        blanked = Path(tmp) / "blanked.csv"
        out = Path(tmp) / "ocr.csv"
        shipped.assign(text_info="").to_csv(blanked, index=False)
        command = [
            sys.executable, "-m", "mmcore", "ocr",
            str(blanked), "-o", str(out), "--engine", args.engine, "--lang", args.lang,
            "--base-dir", str(args.csv.resolve().parent),
        ]
        for param in args.engine_param:
            command += ["--engine-param", param]
        if args.workers:
            command += ["--workers", str(args.workers)]
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            sys.exit("mmcore ocr failed (see above)")
        seconds = time.perf_counter() - start
        produced = pd.read_csv(out, keep_default_na=False, dtype=str)
        if args.save:
            produced.to_csv(args.save, index=False)
    scores = compare(shipped["text_info"], produced["text_info"])
    workers = args.workers or os.cpu_count()
    print(f"engine={args.engine} lang={args.lang} params={args.engine_param or 'defaults'} "
          f"workers={workers}")
    for key, value in scores.items():
        print(f"{key:16} {value:.3f}" if isinstance(value, float) else f"{key:16} {value}")
    if "label" in shipped.columns:
        for label in sorted(shipped["label"].unique()):
            rows = (shipped["label"] == label).to_numpy()
            part = compare(shipped["text_info"][rows], produced["text_info"][rows])
            print(f"  label={label}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in part.items()))
    print(f"{'seconds':16} {seconds:.1f}")
    print(f"{'images_per_s':16} {len(shipped) / seconds:.2f}")


if __name__ == "__main__":
    main()
