"""The training epoch: batches through a :class:`~mmcore.engine.step.TrainStep`, the policies and
the bookkeeping a checkpoint needs (plain PyTorch).

The loop never waits on the device between log points: the loss sum and the NaN check
stay device tensors and are read once per ``log_every`` optimizer steps, before a
checkpoint is written and at the epoch's end (:meth:`Trainer.settle`).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from mmcore.engine.inference import predict, sigmoid
from mmcore.engine.policies import BadImages, NanPolicy, NonFiniteLoss
from mmcore.engine.runtime import any_rank
from mmcore.engine.step import TrainStep

__all__ = ["BadImages", "NonFiniteLoss", "Trainer", "predict", "set_train_mode", "sigmoid", "total_steps"]

#: optimizer steps between two reads of the loss (as Lightning's log_every_n_steps)
LOG_EVERY = 50


def set_train_mode(model):
    """Train mode for what trains; frozen encoders stay in eval mode (dropout off, BN fixed)."""
    from mmcore.model.trainability import freeze_norm_statistics

    model.train()
    inner = getattr(model, "module", model)  # inside DistributedDataParallel
    for name in ("vision", "text"):
        encoder = getattr(inner, name, None)
        if encoder is None:
            continue
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()
        else:
            freeze_norm_statistics(encoder)


def group_sizes(num_batches, accum):
    """Batches in each accumulation group of an epoch: full groups, then the partial rest."""
    full, rest = divmod(num_batches, accum)
    return [accum] * full + ([rest] if rest else [])


class Trainer:
    """Training epochs of one model/optimizer/scheduler/loss; ``train_epoch``."""

    def __init__(
        self,
        *,
        model,
        optimizer,
        scheduler,
        loss_fn,
        device,
        dtype,
        grad_accum_steps=1,
        grad_clip=0.0,
        on_nan="stop",
        bad_images=None,
        writer=None,
        progress=True,
        channels_last=False,
        on_step=None,
        log_every=LOG_EVERY,
        last_checkpoint=None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.step = TrainStep(
            model, optimizer, scheduler, loss_fn, device=device, dtype=dtype, grad_clip=grad_clip,
            channels_last=channels_last,
        )
        self.device = device
        self.grad_accum_steps = grad_accum_steps
        self.nan = NanPolicy(on_nan, device, last_checkpoint)
        self.bad_images = bad_images or BadImages("error")
        self.writer = writer
        self.progress = progress
        self.on_step = on_step
        self.log_every = log_every
        self.global_step = 0
        self.stop_requested = False
        self.batches_done = 0
        self.loss_totals = (0.0, 0)
        self._loss_sum = None

    @property
    def skipped_nan_steps(self):
        """Batches left out because their loss was not finite (``train.on_nan = "skip"``)."""
        return self.nan.skipped

    @skipped_nan_steps.setter
    def skipped_nan_steps(self, value):
        self.nan.skipped = value

    def settle(self):
        """Read the device state back: raise for a bad loss (``stop``), update ``loss_totals``.

        Called on every rank (it may all-reduce) at log points, before a checkpoint is
        written and at the epoch's end.
        """
        self.nan.raise_if_bad()
        if self._loss_sum is not None:
            self.loss_totals = (float(self._loss_sum.item()), self._loss_n)
        return self.loss_totals

    def train_epoch(self, loader, epoch, epochs, *, skip_batches=0, totals=(0.0, 0)):
        """One pass over ``loader``, which yields the epoch's batches from batch ``skip_batches`` on.

        Returns ``(mean loss, completed)``; ``completed`` is False when a stop was requested
        (SIGINT/SIGTERM): the loop then ends right after an optimizer step, so the state
        (``batches_done``, ``loss_totals``) is consistent for a checkpoint.
        """
        set_train_mode(self.model)
        accum = self.grad_accum_steps
        num_batches = skip_batches + len(loader)
        sizes = group_sizes(num_batches, accum)
        self._loss_sum = torch.tensor(float(totals[0]), dtype=torch.float64, device=self.device)
        self._loss_n = int(totals[1])
        self.loss_totals = (float(totals[0]), self._loss_n)
        self.batches_done = skip_batches
        self.nan.start_epoch(epoch, skip_batches, self.global_step, accum)
        self.optimizer.zero_grad(set_to_none=True)
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            total=num_batches, initial=skip_batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
            disable=not self.progress, leave=False,
        )
        for i, batch in enumerate(loader, start=skip_batches):
            bar.update(1)
            group = i // accum
            last_of_group = i + 1 == group * accum + sizes[group]
            self.bad_images.check(batch, "train")
            if self.bad_images.empty_anywhere(batch):
                self.nan.observe(None)
            else:
                # the last, partial group is weighted by its real size
                loss, trained = self.step.micro_step(
                    batch, weight=1.0 / sizes[group], sync=last_of_group, skip=self.nan.skip
                )
                self.nan.observe(loss)
                if trained:
                    n = batch["size"]
                    self._loss_sum += loss.double() * n
                    self._loss_n += n
                    seen += n
            if last_of_group:
                lrs, _ = self.step.optimizer_step()
                self.global_step += 1
                self.batches_done = i + 1
                if self.writer is not None:
                    for name, lr in lrs.items():  # the rate this step used
                        self.writer.add_scalar(f"lr/{name}", lr, self.global_step)
                if self.global_step % self.log_every == 0:
                    self._log(bar, seen, started)
                if self.on_step is not None:
                    self.on_step(epoch, i + 1)
                if any_rank(self.stop_requested):
                    bar.close()
                    total, n = self.settle()
                    return total / max(n, 1), False
        self._log(bar, seen, started)
        bar.close()
        total, n = self.loss_totals
        return total / max(n, 1), True

    def _log(self, bar, seen, started):
        total, n = self.settle()
        if self.writer is not None and n:
            self.writer.add_scalar("train/loss", total / n, self.global_step)
        rate = seen / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}", rate=f"{rate:.0f}/s", refresh=False)


def total_steps(num_batches, grad_accum_steps, epochs):
    """Optimizer steps of a whole run."""
    return max(1, math.ceil(num_batches / grad_accum_steps) * epochs)

