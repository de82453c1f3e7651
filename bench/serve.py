"""`mmcore serve` throughput and latency with the demo model: dynamic batching on vs off.

    python bench/serve.py [--work /tmp/mmcore-bench-serve] [--requests 96] [--concurrency 1,8,32]
    python bench/serve.py --target run --set text.params.pretrained=false   # the run itself, on its train.device (CUDA on a GPU)

Serves the exported demo bundle (``--target run``: the run directory, scored by PyTorch on the
recipe's device, which is the GPU where there is one) twice (``--max-batch 32 --max-wait-ms 10``, then
``--max-batch 1``: no batching), sends ``--requests`` multipart /predict requests at each
concurrency from one asyncio client, and prints requests/s, p50 and p99 latency, and the
batched/unbatched throughput ratio (goal: >= 2x at concurrency 32 on 2 CPU cores).

It also times the bundle's ``model.onnx`` alone in this process (onnxruntime, the server's
session, as the server opens it) at batch 1 and at batch 32: the per-row speed-up of the model itself is the
ceiling of what any batching can give on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _demo_bundle import demo_bundle  # noqa: E402


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(bundle, *flags):
    """``mmcore serve`` in a subprocess -> (process, url) once /ready answers."""
    import httpx

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "mmcore", "serve", str(bundle), "--port", str(port),
                                "--log-level", "warning", "--text", "optional", *flags], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    sys.exit("mmcore serve did not become ready")


async def load(url, payloads, concurrency):
    """Send every payload with at most ``concurrency`` in flight -> (seconds, latencies)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies = []

    async def one(client, image, text):
        async with gate:
            started = time.perf_counter()
            response = await client.post(f"{url}/predict", files={"image": ("a.jpg", image, "image/jpeg")},
                                         data={"text": text})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        await one(client, *payloads[0])  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(client, image, text) for image, text in payloads))
        return time.perf_counter() - started, sorted(latencies)


def model_ceiling(bundle, seconds=3.0):
    """ms per row of the bundle's ONNX model alone at batch 1 and 32 (the batching ceiling)."""
    import numpy as np

    from mmcore.export.runner import GraphRunner

    runner = GraphRunner(Path(bundle) / "model.onnx", "onnx", device="cpu")  # as the server opens it
    shapes = {i.name: i.shape for i in runner.session.get_inputs()}
    out = {}
    for batch in (1, 32):
        feed = {}
        for name, shape in shapes.items():
            if name == "pixel_values":
                feed[name] = np.random.default_rng(0).random((batch, *shape[1:]), dtype=np.float32)
            else:  # token inputs: 16 tokens
                feed[name] = (np.zeros if name == "token_type_ids" else np.ones)((batch, 16), dtype=np.int64)
        runner(feed)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            runner(feed)
            calls += 1
        out[batch] = (time.perf_counter() - started) / calls / batch * 1000
    return out


def _run_device():
    """Where a served run scores: its recipe's train.device ("auto": the GPU when there is one)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mmcore-bench-serve")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--target", choices=("bundle", "run"), default="bundle",
                        help="serve the exported bundle (onnxruntime) or the run directory (PyTorch on its train.device)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the demo run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="demo recipe override (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="tiny encoders (a CPU check of the script)")
    args = parser.parse_args()

    from mmcore.data.csvs import read_split

    overrides = [*args.set, *(["vision.params.tiny=true", "text.params.tiny=true"] if args.tiny else [])]
    started = time.perf_counter()
    run, bundle, data = demo_bundle(args.work, epochs=args.epochs, overrides=overrides, export=args.target == "bundle")
    served = bundle if args.target == "bundle" else run
    print(f"demo {args.target} ready in {time.perf_counter() - started:.0f} s: {served}", flush=True)
    split = read_split(data / "test.csv", require_label=False)
    payloads = [(split.paths[i % len(split)].read_bytes(), split.texts[i % len(split)]) for i in range(args.requests)]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {}
    for mode, flags in (("batched", ["--max-batch", "32", "--max-wait-ms", "10"]), ("unbatched", ["--max-batch", "1"])):
        process, url = start(served, *flags)
        try:
            for level in levels:
                seconds, latencies = asyncio.run(load(url, payloads, level))
                results[mode, level] = (len(latencies) / seconds, latencies[len(latencies) // 2],
                                        latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])
                print(f"measured {mode} at concurrency {level}: {results[mode, level][0]:.1f} req/s", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    if args.target == "bundle":
        ceiling = model_ceiling(bundle)
        print(f"demo bundle {bundle}, {args.requests} requests per level, {os.cpu_count()} CPUs")
        print(f"model alone (onnxruntime): {ceiling[1]:.1f} ms per row at batch 1, {ceiling[32]:.1f} ms per row at "
              f"batch 32: batching's ceiling here {ceiling[1] / ceiling[32]:.2f}x")
    else:
        print(f"demo run {run} served by PyTorch on {_run_device()}, {args.requests} requests per level, "
              f"{os.cpu_count()} CPUs")
    print(f"{'concurrency':>11}  {'mode':>9}  {'req/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}")
    for level in levels:
        for mode in ("batched", "unbatched"):
            rps, p50, p99 = results[mode, level]
            print(f"{level:>11}  {mode:>9}  {rps:>7.1f}  {1000 * p50:>7.1f}  {1000 * p99:>7.1f}")
        print(f"{'':>11}  {'ratio':>9}  {results['batched', level][0] / results['unbatched', level][0]:>6.2f}x")


if __name__ == "__main__":
    main()
