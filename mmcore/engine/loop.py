"""The training epoch: batches through a :class:`~mmcore.engine.step.TrainStep`, the policies and
the bookkeeping a checkpoint needs (plain PyTorch).

The loop never waits on the device between log points: the loss sum and the NaN check
stay device tensors and are read once per ``log_every`` optimizer steps, before a
checkpoint is written and at the epoch's end (:meth:`Trainer.settle`). Each step's loss and
gradient norm wait on the device too and reach the logger in that same read, each at its own
global step; the learning rate of a step is logged as it is (a host number).
"""

from __future__ import annotations

import math

import torch

from mmcore.dist import any_rank, is_distributed, world_size
from mmcore.engine.policies import BadImages, NanPolicy
from mmcore.engine.step import TrainStep, is_ddp
from mmcore.model.trainability import freeze_norm_statistics, unwrap
from mmcore.progress import SmoothedRate, progress_bar

#: optimizer steps between two reads of the loss (as Lightning's log_every_n_steps)
LOG_EVERY = 50

#: under torchrun, optimizer steps between two checks of a stop request (SIGINT/SIGTERM): each
#: check is a collective every rank waits at, so a signal stops training within this many steps
#: (and at the epoch's end); one process checks after every step, which costs nothing
STOP_CHECK_EVERY = 10


def set_train_mode(model):
    """Train mode for what trains; frozen encoders stay in eval mode (dropout off, BN fixed)."""
    model.train()
    inner = unwrap(model)  # inside DistributedDataParallel / the compile wrapper
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
        ema=None,
        distill=None,
        online_teacher=None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.step = TrainStep(
            model, optimizer, scheduler, loss_fn, device=device, dtype=dtype, grad_clip=grad_clip,
            channels_last=channels_last, ema=ema, distill=distill, online_teacher=online_teacher,
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
        #: optimizer steps whose loss / gradient norm (device tensors) the logger has not had yet
        self._pending = []
        self.rate = SmoothedRate()
        #: the smoothed training throughput of the whole job (all ranks), samples/s
        self.samples_per_s = None

    def release_data_parallel(self):
        """Training is over: unhook the DDP wrapper and train (or score) the plain model from now on.

        DDP's reducer hooks each trainable parameter's gradient accumulator, which puts the
        wrapper in a reference cycle: until a garbage collection happens to run, it keeps the
        process group alive past ``destroy_process_group``, possibly until the interpreter
        tears down, where a gloo rank can abort ("terminate called without an active
        exception", exit -6) after its work is done. Unhooked, it goes as soon as it is dropped.
        """
        if is_ddp(self.model):
            self.model._remove_autograd_hooks()
            self.model = self.step.model = self.model.module

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
            pending, self._pending = self._pending, []
            losses = [loss for _, loss, _, _ in pending if loss is not None]
            norms = [norm.double() for _, _, _, norm in pending if norm is not None]
            # one copy to the host for the running sum and every pending step's values
            values = torch.stack([self._loss_sum, *losses, *norms]).tolist()
            self.loss_totals = (values[0], self._loss_n)
            self._write_steps(pending, values[1 : 1 + len(losses)], values[1 + len(losses) :])
        return self.loss_totals

    def _write_steps(self, pending, losses, norms):
        """``train/loss`` (the step's mean over its samples) and ``train/grad_norm``, each at its step."""
        losses, norms = iter(losses), iter(norms)
        for step, loss, samples, norm in pending:
            if loss is not None:
                self.writer.add_scalar("train/loss", next(losses) / samples, step)
            if norm is not None:
                self.writer.add_scalar("train/grad_norm", next(norms), step)

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
        self._pending = []
        window = 0  # samples trained since the last rate reading
        step_loss, step_samples = None, 0  # this accumulation group's loss sum (device) and samples
        self.rate.restart()
        bar = progress_bar(
            self.progress, total=num_batches, initial=skip_batches, desc=f"epoch {epoch}/{epochs}", unit="batch"
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
                    weighted = loss.double() * n
                    self._loss_sum += weighted
                    self._loss_n += n
                    step_samples += n
                    if self.writer is not None:
                        step_loss = weighted if step_loss is None else step_loss + weighted
            if last_of_group:
                lrs, norm = self.step.optimizer_step()
                self.global_step += 1
                self.batches_done = i + 1
                window += step_samples
                if self.writer is not None:
                    for name, lr in lrs.items():  # the rate this step used
                        self.writer.add_scalar(f"lr/{name}", lr, self.global_step)
                    self._pending.append((self.global_step, step_loss, step_samples, norm))
                step_loss, step_samples = None, 0
                if self.global_step % self.log_every == 0:
                    self._log(bar, window)
                    window = 0
                if self.on_step is not None:
                    self.on_step(epoch, i + 1)
                if self._stop_check_due(epoch_end=i + 1 == num_batches) and any_rank(self.stop_requested):
                    bar.close()
                    total, n = self.settle()
                    return total / max(n, 1), False
        self._log(bar, window)
        bar.close()
        total, n = self.loss_totals
        return total / max(n, 1), True

    def _stop_check_due(self, *, epoch_end):
        """Whether this optimizer step asks every rank for a stop request (:data:`STOP_CHECK_EVERY`)."""
        return not is_distributed() or epoch_end or self.global_step % STOP_CHECK_EVERY == 0

    def _log(self, bar, window):
        """A log point: read the device state back, then the throughput of the window since the last one."""
        total, n = self.settle()  # waits for the device, so the window's time is the work's
        if window:
            rate, self.samples_per_s = self.rate.update(window * world_size())
            if self.writer is not None:
                self.writer.add_scalar("train/samples_per_s", rate, self.global_step)
        postfix = {"loss": f"{total / max(n, 1):.4f}"}
        if self.samples_per_s is not None:
            postfix["samples/s"] = f"{self.samples_per_s:.1f}"
        bar.set_postfix(postfix, refresh=False)


def total_steps(num_batches, grad_accum_steps, epochs):
    """Optimizer steps of a whole run."""
    return max(1, math.ceil(num_batches / grad_accum_steps) * epochs)

