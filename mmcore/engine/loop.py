"""The training and evaluation loops (plain PyTorch)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from mmcore.engine.runtime import all_gather_objects, any_rank, autocast, to_device
from mmcore.errors import DataError, RunError


class BadImages:
    """Applies ``data.on_bad_image``: stop with the rows, or skip them and count them."""

    def __init__(self, policy):
        self.policy = policy
        self.skipped = {}

    def check(self, batch, split_name):
        if not batch["errors"]:
            return
        if self.policy == "error":
            raise DataError(
                batch["errors"]
                + ["set data.on_bad_image = \"skip\" to leave such images out (counted in results.json)"]
            )
        for message in batch["errors"]:
            self.skipped.setdefault(split_name, {})[message] = True

    def counts(self):
        return {name: len(messages) for name, messages in self.skipped.items()}


def _prepare(batch, device, channels_last):
    batch = to_device(batch, device)
    vision = batch.get("vision")
    if channels_last and vision is not None and vision["pixel_values"].dim() == 4:
        vision["pixel_values"] = vision["pixel_values"].contiguous(memory_format=torch.channels_last)
    return batch


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


class NonFiniteLoss(RunError):
    """The loss became NaN/inf and ``train.on_nan = "stop"``."""


def _group_lrs(optimizer):
    """One learning rate per named parameter group (head, backbone, lora)."""
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


class Trainer:
    """One optimizer/scheduler/loss over a model; ``train_epoch`` and ``predict``."""

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
        last_checkpoint=None,
    ):
        self.model = model
        #: where the resumable state is saved (the NaN stop says whether one exists yet)
        self.last_checkpoint = last_checkpoint
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.device = device
        self.dtype = dtype
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.on_nan = on_nan
        self.bad_images = bad_images or BadImages("error")
        self.writer = writer
        self.progress = progress
        self.channels_last = channels_last
        self.on_step = on_step
        self.global_step = 0
        self.skipped_nan_steps = 0
        self.stop_requested = False
        self.batches_done = 0
        self.loss_totals = (0.0, 0)

    def _kept(self):
        if self.last_checkpoint is not None and not os.path.isfile(self.last_checkpoint):
            return " before any checkpoint was written"
        return ", the last good checkpoint is kept"

    def train_epoch(self, loader, epoch, epochs, *, skip_batches=0, totals=(0.0, 0)):
        """One pass over ``loader`` from batch ``skip_batches`` on.

        Returns ``(mean loss, completed)``; ``completed`` is False when a stop was requested
        (SIGINT/SIGTERM): the loop then ends right after an optimizer step, so the state
        (``batches_done``, ``loss_totals``) is consistent for a checkpoint.
        """
        model = self.model
        set_train_mode(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        total_loss, total_n = totals
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            total=len(loader),
            initial=skip_batches,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            disable=not self.progress,
            leave=False,
        )
        accum = self.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        num_batches = len(loader)
        self.batches_done = skip_batches
        iterator = iter(loader)
        for i in range(num_batches):
            batch = next(iterator)
            if i < skip_batches:
                continue  # already trained on before the resume: same batch order, skipped
            bar.update(1)
            self.bad_images.check(batch, "train")
            if batch["size"]:
                batch = _prepare(batch, self.device, self.channels_last)
                with autocast(self.device, self.dtype):
                    logits = model(batch)
                loss = self.loss_fn(logits.float(), batch["label"])
                if not torch.isfinite(loss):
                    if self.on_nan == "stop":
                        raise NonFiniteLoss(
                            f"non-finite loss ({loss.item()}) at step {self.global_step + 1} "
                            f"(epoch {epoch}, batch {i + 1}); stopped{self._kept()} "
                            f"(set train.on_nan = \"skip\" to skip such batches)"
                        )
                    self.skipped_nan_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    (loss / accum).backward()
                    n = batch["size"]
                    total_loss += loss.item() * n
                    total_n += n
                    seen += n
            if (i + 1) % accum == 0 or i + 1 == num_batches:
                if self.grad_clip > 0 and trainable:
                    torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                self.batches_done = i + 1
                self.loss_totals = (total_loss, total_n)
                if self.writer is not None and total_n:
                    self.writer.add_scalar("train/loss", total_loss / total_n, self.global_step)
                    for name, lr in _group_lrs(self.optimizer).items():
                        self.writer.add_scalar(f"lr/{name}", lr, self.global_step)
                if self.on_step is not None:
                    self.on_step(epoch, i + 1)
                if any_rank(self.stop_requested):
                    bar.close()
                    return total_loss / max(total_n, 1), False
            rate = seen / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{total_loss / max(total_n, 1):.4f}", rate=f"{rate:.0f}/s", refresh=False)
        bar.close()
        self.loss_totals = (total_loss, total_n)
        return total_loss / max(total_n, 1), True

    @torch.no_grad()
    def predict(self, loader, split_name="eval", desc=None):
        """Logits, labels and dataset indices for every sample, gathered on the CPU."""
        model = self.model
        model.eval()
        indices, logits, labels = [], [], []
        bar = tqdm(total=len(loader), desc=desc or split_name, unit="batch", disable=not self.progress, leave=False)
        for batch in loader:
            bar.update(1)
            self.bad_images.check(batch, split_name)
            if not batch["size"]:
                continue
            index, label = batch["index"], batch["label"]
            batch = _prepare(batch, self.device, self.channels_last)
            with autocast(self.device, self.dtype):
                out = model(batch)
            logits.append(out.float().cpu())
            indices.append(index)
            labels.append(label)
        bar.close()
        local = (
            torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64),
            torch.cat(logits).double().numpy() if logits else np.zeros(0),
            torch.cat(labels).numpy() if labels else np.zeros(0),
        )
        parts = all_gather_objects(local)  # each rank scored its own shard; everyone gets all
        index = np.concatenate([p[0] for p in parts])
        order = np.argsort(index, kind="stable")
        return index[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def total_steps(num_batches, grad_accum_steps, epochs):
    return max(1, math.ceil(num_batches / grad_accum_steps) * epochs)
