"""Samplers whose order is a pure function of (seed, epoch) — and of nothing else.

That makes a resumed run see exactly the batches an uninterrupted one would, and lets N
processes split every *global* batch between them (rank r takes its slice), so a DDP run
optimizes the same batches as a single process with the same global batch size.

A resumed epoch starts at the sampler (``set_epoch(epoch, start=k)``): the batches already
trained on are never loaded. Random augmentation is seeded per sample from (seed, epoch,
position in the epoch) by :class:`SeededItems`, so it does not depend on which loader worker
— or which rank — decodes the sample, nor on how many batches that worker decoded before.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(seed, *parts):
    """The one seed formula: ``seed`` folded with ``parts`` (epoch, rank, position, ...).

    ``derive_seed(seed, epoch) == seed * 1_000_003 + epoch``, the per-epoch seed of the
    sampler and of the loader workers.
    """
    for part in parts:
        seed = seed * 1_000_003 + int(part)
    return seed % 2**63


def epoch_generator(seed, epoch):
    """A torch generator seeded for ``epoch`` of a run seeded with ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, epoch))
    return generator


class EpochBatchSampler(Sampler):
    """Global batches of ``batch_size`` from a per-epoch permutation; this rank's slice of each.

    ``weights`` (one per sample) draws a class-balanced epoch with replacement instead of a
    permutation (``train.balanced_sampler``). With ``drop_last`` (``train.drop_last``, the
    default) the epoch's last, partial global batch is left out, so every batch has one shape
    (torch.compile compiles once) and every rank gets as many samples as the others; an epoch
    smaller than one global batch keeps its one partial batch. Without it, a last global batch
    smaller than the number of ranks is still dropped, so no rank ever gets an empty batch.
    With ``seeded`` each index comes as ``(index, seed)``, the seed derived from the sample's
    position in the epoch (for :class:`SeededItems`).
    """

    def __init__(self, n, batch_size, *, seed, shuffle=True, rank=0, world_size=1, weights=None, seeded=False,
                 drop_last=False):
        self.n = n
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.weights = weights
        self.seeded = seeded
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Iterate ``epoch`` from its batch ``start`` on (a resumed epoch skips what it did)."""
        self.epoch = epoch
        self.start = start

    @property
    def epoch_batches(self):
        """Batches in a whole epoch (``len`` counts only those from ``start`` on)."""
        full, rest = divmod(self.n, self.batch_size)
        if self.drop_last and full:
            return full
        return full + (1 if rest >= self.world_size else 0)

    def _order(self):
        generator = epoch_generator(self.seed, self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.n, generator=generator)
        return torch.arange(self.n)

    def __iter__(self):
        order = self._order()
        epoch_seed = derive_seed(self.seed, self.epoch)
        for start in range(self.start * self.batch_size, self.epoch_batches * self.batch_size, self.batch_size):
            chunk = order[start : start + self.batch_size]
            indices = chunk[self.rank :: self.world_size].tolist()
            if self.seeded:
                positions = range(start + self.rank, start + len(chunk), self.world_size)
                indices = [(index, derive_seed(epoch_seed, position)) for index, position in zip(indices, positions)]
            yield indices

    def __len__(self):
        return max(0, self.epoch_batches - self.start)


class SeededItems(Dataset):
    """A dataset whose item ``(index, seed)`` is made with python/numpy/torch seeded by ``seed``.

    Random augmentation then depends only on the sample's place in the epoch. In the main
    process (no loader workers) the global generators are restored afterwards, so dropout's
    stream is the same with or without it.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    # what make_loader reads from a dataset
    needs_image = property(lambda self: self.dataset.needs_image)
    needs_workers = property(lambda self: getattr(self.dataset, "needs_workers", self.dataset.needs_image))
    preprocessing = property(lambda self: self.dataset.preprocessing)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        saved = None
        if torch.utils.data.get_worker_info() is None:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


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
