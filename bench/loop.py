"""The training loop's host syncs and DDP's accumulation all-reduces, each side by side.

    python bench/loop.py                      # both tables
    python bench/loop.py --only syncs         # steps/s, loss read every step vs every LOG_EVERY steps
    python bench/loop.py --only ddp           # 2 gloo processes, accumulation 4: no_sync vs an all-reduce per micro-step

1. **Host syncs**: the engine's ``Trainer.train_epoch`` on a small MLP (``--small`` wide: a sync is a visible
   part of a step) with ``log_every = 1`` (the loss and the NaN check read on the host after
   every optimizer step, as the loop did before) and with the engine's ``LOG_EVERY`` (read
   once per interval, the NaN policy still naming the step). Variants alternate.
2. **DDP accumulation**: two gloo processes on this machine, ``TrainStep`` over a DDP-wrapped
   MLP (``--hidden`` wide: its gradients are what is all-reduced), 4 micro-batches per
   optimizer step, the group's first three under ``no_sync`` (the engine) or all four
   synchronised (what DDP does without it). Prints ms per optimizer step and the ratio.

On a CPU a host sync costs little (nothing runs ahead of the host to wait for); the gap this
removes is a GPU's, where each ``.item()`` drains the queue of launched kernels.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Mlp(nn.Module):
    """batch["x"] -> one logit per row; stands in for the trainable part of a cached-feature run."""

    def __init__(self, width, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, batch):
        return self.net(batch["x"]).squeeze(-1)


def batches(n, batch, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n * batch, width, generator=generator)
    y = (x[:, 0] > 0).float()
    return [{"x": x[i * batch:(i + 1) * batch], "label": y[i * batch:(i + 1) * batch], "errors": [], "bad_indices": [],
             "size": batch} for i in range(n)]


def bce(logits, labels):
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def syncs(args):
    from mmcore.engine.loop import LOG_EVERY, Trainer

    width = hidden = args.small
    data = batches(args.steps, args.batch, width)
    print(f"host syncs: MLP {width}->{hidden}->{hidden}->1, batch {args.batch}, {args.steps} steps "
          f"x {args.repeats} repeats, {torch.get_num_threads()} threads, torch {torch.__version__}")
    times = {1: [], LOG_EVERY: []}
    for _ in range(args.repeats):
        for every in times:
            torch.manual_seed(0)
            model = Mlp(width, hidden)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=bce,
                              device=torch.device("cpu"), dtype=None, progress=False, log_every=every)
            started = time.perf_counter()
            trainer.train_epoch(data, 1, 1)
            times[every].append(args.steps / (time.perf_counter() - started))
    every_step, interval = statistics.median(times[1]), statistics.median(times[LOG_EVERY])
    print(f"loss read every step (log_every 1)         {every_step:8.1f} steps/s (median)")
    print(f"loss read every {LOG_EVERY} steps (the engine)     {interval:8.1f} steps/s (median)")
    print(f"without / with per-step host syncs = {interval / every_step:.3f}x")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_rank(rank, world, port, args, out):
    import torch.distributed as dist

    from mmcore.engine.step import TrainStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = batches(args.groups * 4, args.batch, args.width, seed=rank)
        results = {}
        for repeat in range(args.repeats):
            for mode in ("no_sync", "every micro-step"):
                torch.manual_seed(0)
                model = nn.parallel.DistributedDataParallel(Mlp(args.width, args.hidden))
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
                step = TrainStep(model, optimizer, scheduler, bce, device=torch.device("cpu"), dtype=None)
                dist.barrier()
                started = time.perf_counter()
                for i, batch in enumerate(data):
                    last = i % 4 == 3
                    step.micro_step(batch, weight=0.25, sync=last or mode != "no_sync")
                    if last:
                        step.optimizer_step()
                dist.barrier()
                results.setdefault(mode, []).append((time.perf_counter() - started) / args.groups * 1000)
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def ddp(args):
    import torch.multiprocessing as mp

    params = sum(p.numel() for p in Mlp(args.width, args.hidden).parameters())
    print(f"\nDDP: 2 gloo processes (1 thread each), MLP of {params / 1e6:.1f}M parameters "
          f"({params * 4 / 2**20:.0f} MiB of gradients), batch {args.batch} per process, accumulation 4, "
          f"{args.groups} optimizer steps x {args.repeats} repeats")
    context = mp.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_ddp_rank, args=(rank, 2, port, args, out)) for rank in range(2)]
    for process in processes:
        process.start()
    results = out.get(timeout=600)
    for process in processes:
        process.join(60)
    medians = {mode: statistics.median(values) for mode, values in results.items()}
    for mode, value in medians.items():
        print(f"all-reduce {'only on the group' + chr(39) + 's last (no_sync)' if mode == 'no_sync' else 'on every micro-step':<38} "
              f"{value:8.1f} ms per optimizer step (median)")
    print(f"no_sync speed-up = {medians['every micro-step'] / medians['no_sync']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("syncs", "ddp"))
    parser.add_argument("--small", type=int, default=64, help="width of the host-syncs MLP (small: the sync shows)")
    parser.add_argument("--width", type=int, default=256, help="input width of the DDP MLP")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width of the DDP MLP (its gradients)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per syncs repeat")
    parser.add_argument("--groups", type=int, default=30, help="optimizer steps per DDP repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the host-syncs table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "syncs"):
        syncs(args)
    if args.only in (None, "ddp"):
        ddp(args)


if __name__ == "__main__":
    main()
