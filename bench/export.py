"""onnxruntime (the bundle) vs PyTorch (the run) CPU latency per batch, for the demo model.

    python bench/export.py [--work /tmp/mmcore-bench-export] [--batches 1,8,32] [--repeats 5]

Both sides get the same preprocessed images and tokenized texts; the figure is the median
wall time of one forward pass (tokenization and image decoding excluded, they are shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _demo_bundle import demo_bundle  # noqa: E402


def _median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mmcore-bench-serve")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from mmcore.data.csvs import read_split
    from mmcore.export.onnx import FusedModel
    from mmcore.scoring.bundle import BundleScorer
    from mmcore.scoring.run import RunScorer

    run, bundle, data = demo_bundle(args.work)
    onnx, torch_run = BundleScorer(bundle, device="cpu"), RunScorer(run)
    split = read_split(data / "test.csv", require_label=False)
    fused = FusedModel(torch_run.model.to("cpu").eval(), onnx.vision_names)
    print(f"demo model ({onnx.metadata()['vision']} + {onnx.metadata()['text']}), {torch.get_num_threads()} CPU threads")
    print(f"{'batch':>5}  {'PyTorch ms':>10}  {'onnxruntime ms':>14}  {'speed-up':>8}")
    for size in [int(b) for b in args.batches.split(",")]:
        rows = [i % len(split) for i in range(size)]
        items = [onnx.preprocess(onnx.load_image(split.paths[i])) for i in rows]
        texts = [split.texts[i] for i in rows]
        feeds = {**{k: v.numpy() for k, v in onnx.preprocessing.collate(items).items()}, **onnx.text_feeds(texts)}
        feeds = {name: feeds[name] for name in onnx.input_names}
        tensors = [torch.from_numpy(feeds[name]) for name in onnx.input_names]

        def with_torch():
            with torch.no_grad():
                fused(*tensors)

        torch_ms = _median_ms(with_torch, args.repeats)
        ort_ms = _median_ms(lambda: onnx.runner(feeds), args.repeats)
        print(f"{size:>5}  {torch_ms:>10.1f}  {ort_ms:>14.1f}  {torch_ms / ort_ms:>7.2f}x")


if __name__ == "__main__":
    main()
