"""Time and peak memory of the quality library at scale, on synthetic memory-mapped embeddings.

    python bench/quality_scale.py [--rows 20000] [--dims 768] [--budget 500] [--threads N]

Writes a float16 ``.npy`` of ``rows x dims`` random embeddings (as the feature cache stores them),
opens it memory-mapped and runs, each in a fresh process so one's memory does not hide the other's:
``near_duplicate_pairs`` over every pair, and ``select_rows`` (default strategy) with the first
half as the labelled set and the second half as the pool. Prints seconds and the peak RSS above the
process's size before the call; the tiles keep the second independent of ``rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import numpy as np
from mmcore.quality import near_duplicate_pairs, select_rows

path, what, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
embeddings = np.load(path, mmap_mode="r")
half = len(embeddings) // 2
scores = np.random.default_rng(0).uniform(size=len(embeddings) - half)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if what == "near_duplicate_pairs":
    near_duplicate_pairs(embeddings, ["train"] * len(embeddings))
else:
    select_rows(scores, 0.5, embeddings[half:], budget, labelled_embeddings=embeddings[:half])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"what": what, "seconds": round(seconds, 1), "peak_rss_above_start_mb": round((peak - before) / 1024)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's)")
    args = parser.parse_args()

    import numpy as np

    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "embeddings.npy")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.rows, args.dims))
        rng = np.random.default_rng(0)
        for start in range(0, args.rows, 4096):
            stop = min(start + 4096, args.rows)
            array[start:stop] = rng.normal(size=(stop - start, args.dims)).astype(np.float16)
        array.flush()
        del array
        print(json.dumps({"rows": args.rows, "dims": args.dims, "budget": args.budget, "cpus": os.cpu_count()}))
        for what in ("near_duplicate_pairs", "select_rows"):
            result = subprocess.run([sys.executable, "-c", CHILD, path, what, str(args.budget)], env=env,
                                    capture_output=True, text=True, check=True)
            print(result.stdout.strip())


if __name__ == "__main__":
    main()
