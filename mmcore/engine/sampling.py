"""Samplers whose order is a pure function of (seed, epoch) — and of nothing else.

That makes a resumed run see exactly the batches an uninterrupted one would, and lets N
processes split every *global* batch between them (rank r takes its slice), so a DDP run
optimizes the same batches as a single process with the same global batch size.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def epoch_generator(seed, epoch):
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


class EpochBatchSampler(Sampler):
    """Global batches of ``batch_size`` from a per-epoch permutation; this rank's slice of each.

    ``weights`` (one per sample) draws a class-balanced epoch with replacement instead of a
    permutation (``train.balanced_sampler``). A last global batch smaller than the number of
    ranks is dropped, so no rank ever gets an empty batch.
    """

    def __init__(self, n, batch_size, *, seed, shuffle=True, rank=0, world_size=1, weights=None):
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.weights = weights
        self.epoch = 1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _order(self):
        generator = epoch_generator(self.seed, self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.n, generator=generator)
        return torch.arange(self.n)

    def __iter__(self):
        order = self._order()
        for start in range(0, self.n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            if len(chunk) < self.world_size:
                break
            yield chunk[self.rank :: self.world_size].tolist()

    def __len__(self):
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


class ShardSampler(Sampler):
    """Evaluation: rank r takes indices r, r+N, r+2N, ... — every sample exactly once, no padding."""

    def __init__(self, n, rank=0, world_size=1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def balanced_weights(labels):
    """Per-sample weights that make both classes equally likely."""
    labels = torch.as_tensor(labels)
    counts = torch.bincount(labels, minlength=2).clamp(min=1).double()
    return (1.0 / counts)[labels]
