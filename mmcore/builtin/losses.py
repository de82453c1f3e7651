"""Binary losses on logits: ``bce`` and ``focal``, both with label smoothing.

Label smoothing moves the 0/1 targets towards 0.5: ``t * (1 - ls) + 0.5 * ls``.
"""

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError, at_least, in_range


def smooth(targets, label_smoothing):
    """Targets moved towards 0.5 by ``label_smoothing``."""
    return targets * (1.0 - label_smoothing) + 0.5 * label_smoothing


def _pos_weight_value(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, str):
        if value != "auto":
            raise FieldError(attribute.name, f'must be a number > 0 or "auto" (got {value!r})')
        return
    if isinstance(value, bool) or value <= 0:
        raise FieldError(attribute.name, f'must be a number > 0 or "auto" (got {value!r})')


@attrs.frozen(kw_only=True)
class BceParams:
    """``pos_weight``: weight of the positive class; ``"auto"`` = negatives / positives."""

    pos_weight: float | str | None = attrs.field(default=None, validator=_pos_weight_value)
    label_smoothing: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))


class BceLoss(nn.Module):
    """Binary cross-entropy on logits (mean), optionally weighting positives."""

    def __init__(self, pos_weight=None, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        weight = None if pos_weight is None else torch.tensor(float(pos_weight))
        # a buffer moves with .to(device) and is saved with the model
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits, targets):
        targets = smooth(targets.float(), self.label_smoothing)
        return F.binary_cross_entropy_with_logits(
            logits.float(), targets, pos_weight=self.pos_weight
        )


def resolve_pos_weight(pos_weight, label_counts):
    """A number for ``pos_weight``: ``"auto"`` becomes negatives / positives of the train set."""
    if pos_weight != "auto":
        return pos_weight
    negatives, positives = label_counts
    if positives <= 0 or negatives <= 0:
        raise ValueError(
            f'pos_weight = "auto" needs both classes in the training set '
            f"(got {negatives} negatives, {positives} positives)"
        )
    return negatives / positives


def build_bce(params, label_counts):
    return BceLoss(
        pos_weight=resolve_pos_weight(params.pos_weight, label_counts),
        label_smoothing=params.label_smoothing,
    )


@attrs.frozen(kw_only=True)
class FocalParams:
    """Focal loss (Lin et al. 2017): ``alpha`` weights positives (None = no weighting)."""

    alpha: float | None = attrs.field(
        default=0.25, validator=in_range(0.0, 1.0, high_inclusive=True)
    )
    gamma: float = attrs.field(default=2.0, validator=at_least(0))
    label_smoothing: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))


class FocalLoss(nn.Module):
    """Sigmoid focal loss (torchvision's), mean over the batch."""

    def __init__(self, alpha=0.25, gamma=2.0, label_smoothing=0.0):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        from torchvision.ops import sigmoid_focal_loss

        targets = smooth(targets.float(), self.label_smoothing)
        # torchvision spells "no alpha weighting" as a negative alpha
        alpha = -1.0 if self.alpha is None else self.alpha
        return sigmoid_focal_loss(
            logits.float(), targets, alpha=alpha, gamma=self.gamma, reduction="mean"
        )


def build_focal(params, label_counts):
    return FocalLoss(alpha=params.alpha, gamma=params.gamma, label_smoothing=params.label_smoothing)


@hookimpl
def register_losses(register):
    register("bce", build_bce, BceParams)
    register("focal", build_focal, FocalParams)
