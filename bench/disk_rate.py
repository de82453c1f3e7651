"""How fast this disk takes the frozen token cache, against what an encoder produces.

    python bench/disk_rate.py --dir /path/of/cache.dir       # 2 GiB of SO400M token rows per storage form
    python bench/disk_rate.py --dry-run                      # tiny rows (CPU check of the script)

Writes SigLIP2 SO400M @384 token rows (729 tokens x 1152, what attention pooling caches)
through the feature cache's own writer (``FeatureStore.writer``: chunks of up to 128 MiB,
each written to a temporary name, fsynced and renamed) into ``--dir``, for each
``cache.token_storage`` form, and prints MB/s and the images per second the writer sustains,
split into the encoding's own rate (int8 quantization and 2x2 pooling run in the fill's one
writer thread, on one core) and the disk's MB/s. A GPU fills the cache at its encoder's rate:
~500 img/s per H200 for SO400M (PERFORMANCE.md), i.e. ~840 MB/s of fp16 tokens per GPU; where
the writer sustains less, the fill waits on it (the engine then says so with its figures) and
``int8`` (half the bytes) or ``pooled`` (about a quarter) write less, if their encoding keeps
up. The rows are random float16, so compression plays no part.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: SigLIP2 SO400M @384: 27x27 patches of 14 px, hidden size 1152
TOKENS, DIM = 729, 1152
#: images per second one GPU encodes (SO400M @384 forward, one H200, bf16: PERFORMANCE.md)
GPU_IMAGES_PER_S = 500


def write_rate(root, storage, rows, tokens, dim):
    """(bytes written, seconds, seconds of encoding alone) of ``rows`` token rows through the cache's
    chunk writer; the encoding (``FeatureStore.encode``: int8 quantization, 2x2 pooling) runs in the
    fill's one writer thread, on one core, before the disk sees a byte."""
    from mmcore.store.features import FeatureStore, stored_row_bytes

    description = {"kind": "vision", "encoder": "disk_rate", "identity": f"disk_rate|{storage}", "dtype": "bfloat16",
                   "stored": "tokens", "pooling": None, "dim": dim, "token_storage": storage, "has_cls_token": False}
    store = FeatureStore(root, description)
    store.ensure()
    generator = np.random.default_rng(0)
    block = generator.standard_normal((16, tokens, dim), dtype=np.float32).astype(np.float16)
    started = time.perf_counter()
    for i in range(min(rows, 64)):
        store.encode(block[i % len(block)])
    encode = (time.perf_counter() - started) / min(rows, 64) * rows
    writer = store.writer()
    started = time.perf_counter()
    for i in range(rows):
        writer.add(i.to_bytes(20, "big"), block[i % len(block)])
    writer.flush()
    seconds = time.perf_counter() - started
    written = rows * stored_row_bytes(description, tokens)
    shutil.rmtree(store.dir, ignore_errors=True)
    return written, seconds, encode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory; give cache.dir's disk)")
    parser.add_argument("--gib", type=float, default=2.0, help="fp16 bytes to write per form (the others write less)")
    parser.add_argument("--forms", default="fp16,int8,pooled")
    parser.add_argument("--dry-run", action="store_true", help="tiny rows: checks the script, measures nothing")
    args = parser.parse_args(argv)
    tokens, dim = (16, 32) if args.dry_run else (TOKENS, DIM)
    rows = max(8, int(args.gib * 2**30 / (tokens * dim * 2))) if not args.dry_run else 64
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mmcore-disk-rate-", dir=base))
    print(f"cache writes to {base}: {rows} token rows of {tokens} x {dim} per form "
          f"({tokens * dim * 2 / 1e6:.2f} MB each in fp16){' (dry run: tiny rows)' if args.dry_run else ''}", flush=True)
    print(f"{'storage':>8} {'MB/s':>8} {'img/s':>8} {'encode img/s':>13} {'disk MB/s':>10}  "
          f"vs one GPU encoding {GPU_IMAGES_PER_S} img/s", flush=True)
    try:
        for form in [f for f in args.forms.split(",") if f]:
            written, seconds, encode = write_rate(root, form, rows, tokens, dim)
            images = rows / seconds
            verdict = "keeps up" if images >= GPU_IMAGES_PER_S else f"the fill would wait ({images / GPU_IMAGES_PER_S:.2f}x)"
            disk = written / max(seconds - encode, 1e-9) / 1e6
            print(f"{form:>8} {written / seconds / 1e6:8.0f} {images:8.0f} {rows / max(encode, 1e-9):13.0f} {disk:10.0f}  "
                  f"{verdict}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
