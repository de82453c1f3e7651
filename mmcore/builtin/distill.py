"""Knowledge distillation for a binary classifier (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network"), as timm's ``LogitDistillationTask`` does it for softmax classifiers:

    loss = weight * T^2 * KL(sigmoid(t / T) || sigmoid(s / T)) + (1 - weight) * hard_loss(s, y)

with t the teacher's logit, s the student's, T the temperature, and the KL divergence between
the two Bernoulli distributions, averaged over the batch. The T^2 keeps the soft term's gradient
on the scale of the hard term's whatever T is (its gradient in s is ``T * (sigmoid(s/T) -
sigmoid(t/T))``). The teacher's logit is detached: no gradient reaches the teacher, which the
caller runs in eval mode and does not wrap in DDP.

Rows without a label (a transfer set the teacher scored) are marked by ``labelled = False``:
they add to the soft term only; the hard loss is the recipe's loss on the labelled rows alone.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn


def bernoulli_kl(teacher_logits, student_logits, temperature):
    """``KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T)))`` per row (float32 [B]), from log-sigmoids
    so that confident logits do not overflow."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    p = torch.sigmoid(t)
    return p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))


@attrs.frozen
class DistillationTerms:
    """What :class:`DistillationLoss` computed: the loss to minimise and its two terms, for logging."""

    loss: torch.Tensor
    #: ``T^2 * mean KL`` over every row, before ``weight``
    soft: torch.Tensor
    #: the hard loss over the labelled rows (0 when the batch has none), before ``1 - weight``
    hard: torch.Tensor


class DistillationLoss(nn.Module):
    """``weight * T^2 * KL(teacher || student) + (1 - weight) * hard_loss`` (see the module docstring)."""

    def __init__(self, hard_loss, *, temperature, weight):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a number > 0 (got {temperature!r})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"weight must be a number in [0, 1] (got {weight!r})")
        self.hard_loss = hard_loss
        self.temperature = float(temperature)
        self.weight = float(weight)

    def forward(self, student_logits, teacher_logits, targets, labelled=None):
        """:class:`DistillationTerms` of a batch: logits and targets [B]; ``labelled`` a bool mask [B]
        (None: every row has a label); the targets of unlabelled rows are ignored (NaN is fine)."""
        student_logits = student_logits.reshape(-1)
        teacher_logits = teacher_logits.detach().reshape(-1)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher and student logits differ in shape ({tuple(teacher_logits.shape)} vs "
                             f"{tuple(student_logits.shape)})")
        soft = self.temperature**2 * bernoulli_kl(teacher_logits, student_logits, self.temperature).mean()
        targets = targets.reshape(-1)
        if labelled is None:
            hard = self.hard_loss(student_logits, targets)
        else:
            labelled = labelled.reshape(-1).bool()
            hard = self.hard_loss(student_logits[labelled], targets[labelled]) if labelled.any() else soft.new_zeros(())
        return DistillationTerms(loss=self.weight * soft + (1 - self.weight) * hard, soft=soft, hard=hard)
