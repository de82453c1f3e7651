"""The two data/loss policies of a run, as small pieces: ``data.on_bad_image`` and ``train.on_nan``.

Both keep ranks on one path under DDP: a decision that changes what a rank does (skip a
batch's backward) is agreed by every rank before anyone acts on it.
"""

from __future__ import annotations

import os

import torch

from mmcore.dist import all_gather_objects, all_reduce_, any_rank, is_distributed
from mmcore.errors import DataError, RunError


class BadImages:
    """Applies ``data.on_bad_image``: stop with the rows, or skip them and count them."""

    def __init__(self, policy):
        self.policy = policy
        self.skipped = {}

    def check(self, batch, split_name):
        """Raise (``error``) or record (``skip``) the batch's unreadable images."""
        if not batch["errors"]:
            return
        if self.policy == "error":
            raise DataError(
                batch["errors"]
                + ["set data.on_bad_image = \"skip\" to leave such images out (counted in results.json)"]
            )
        for message in batch["errors"]:
            self.skipped.setdefault(split_name, {})[message] = True

    def empty_anywhere(self, batch):
        """Whether this batch has no usable sample on some rank — then every rank leaves it out
        (a host flag: no wait on the device)."""
        empty = not batch["size"]
        if self.policy == "skip" and is_distributed():
            return any_rank(empty)
        return empty

    def counts(self):
        """Skipped images per split."""
        return {name: len(messages) for name, messages in self.skipped.items()}


class NonFiniteLoss(RunError):
    """The loss became NaN/inf and ``train.on_nan = "stop"``."""


#: no bad batch seen (larger than any batch index)
_NONE = 2**62


class NanPolicy:
    """``train.on_nan``: ``stop`` names the first step whose loss was not finite; ``skip``
    leaves such a batch out of the update (on every rank) and counts it.

    ``stop`` never waits on the device: each loss is checked on the device and the first
    bad batch recorded there; :meth:`raise_if_bad` reads it once (per log interval, before a
    checkpoint is written, at the epoch's end), so the message is exact and no checkpoint
    holds weights trained on a bad batch. ``skip`` must decide before the backward, so it
    reads one flag per batch (all-reduced under DDP).
    """

    def __init__(self, policy, device, last_checkpoint=None):
        self.policy = policy
        self.device = device
        #: where the resumable state is saved: the stop message says whether one exists yet
        self.last_checkpoint = last_checkpoint
        self.skipped = 0
        self._first_bad = None

    def start_epoch(self, epoch, first_batch, first_step, accum):
        """Batch ``first_batch`` of ``epoch`` comes next, followed by optimizer step ``first_step + 1``."""
        self.epoch, self.first_batch, self.first_step, self.accum = epoch, first_batch, first_step, accum
        self._batch = torch.tensor(first_batch - 1, dtype=torch.long, device=self.device)
        self._first_bad = torch.tensor(_NONE, dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)

    def observe(self, loss):
        """Record ``loss`` (a device scalar) of the next batch; a batch without a loss passes ``None``."""
        self._batch += 1
        if loss is None or self.policy != "stop":
            return
        bad = ~torch.isfinite(loss) & (self._first_bad == _NONE)
        self._first_bad = torch.where(bad, self._batch, self._first_bad)
        self._bad_loss = torch.where(bad, loss.float(), self._bad_loss)

    def skip(self, loss):
        """``skip``: whether to leave this batch out (its loss is not finite on some rank)."""
        if self.policy != "skip":
            return False
        bad = any_rank(~torch.isfinite(loss))
        self.skipped += int(bad)
        return bad

    def _kept(self):
        if self.last_checkpoint is not None and not os.path.isfile(self.last_checkpoint):
            return " before any checkpoint was written"
        return ", the last good checkpoint is kept"

    def raise_if_bad(self):
        """``stop``: raise :class:`NonFiniteLoss` for the earliest bad batch on any rank."""
        if self.policy != "stop" or self._first_bad is None:
            return
        first = all_reduce_(self._first_bad.clone(), "min")
        batch = int(first.item())
        if batch == _NONE:
            return
        losses = [b_loss for b, b_loss in all_gather_objects((int(self._first_bad.item()), float(self._bad_loss.item())))
                  if b == batch]
        step = self.first_step + (batch - self.first_batch) // self.accum + 1
        raise NonFiniteLoss(
            f"non-finite loss ({losses[0]}) at step {step} "
            f"(epoch {self.epoch}, batch {batch + 1}); stopped{self._kept()} "
            f"(set train.on_nan = \"skip\" to skip such batches)"
        )
