"""Learning-rate schedules, stepped once per optimizer step: ``cosine_warmup``, ``cosine``,
``constant``.

They are ``LambdaLR`` schedules whose factor is a small callable object, so the schedule's
state (including its settings) round-trips through ``state_dict`` for resumed runs.
"""

import math

import attrs
from torch.optim.lr_scheduler import LambdaLR

from mmcore.interfaces import NoParams
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import at_least, in_range


class CosineFactor:
    """Linear warmup to 1 over ``warmup`` steps, then a half cosine down to ``floor``.

    ``step`` k is the k-th optimizer step (from 0), and the factor is the one that step
    uses. Warmup is ``(k + 1) / warmup``: transformers' ``get_cosine_schedule_with_warmup``
    at k + 1, so the first step runs at ``lr / warmup`` rather than at 0 (a wasted step);
    from step ``warmup`` on it is transformers' cosine at k (the peak is used twice).
    """

    def __init__(self, warmup, total, floor):
        self.warmup = warmup
        self.total = total
        self.floor = floor

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * cosine


class ConstantFactor:
    """Always 1."""

    def __call__(self, step):
        return 1.0


@attrs.frozen(kw_only=True)
class CosineWarmupParams:
    """Warmup for ``warmup_ratio`` of the steps (or exactly ``warmup_steps``), then cosine decay
    to ``min_lr_ratio`` times the initial learning rate."""

    warmup_ratio: float = attrs.field(default=0.1, validator=in_range(0.0, 1.0))
    warmup_steps: int | None = attrs.field(default=None, validator=at_least(0))
    min_lr_ratio: float = attrs.field(
        default=0.0, validator=in_range(0.0, 1.0, high_inclusive=True)
    )


def warmup_steps(params, total_steps):
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    if params.warmup_steps is not None:
        return params.warmup_steps
    return math.ceil(params.warmup_ratio * total_steps)


def build_cosine_warmup(params, optimizer, total_steps):
    factor = CosineFactor(warmup_steps(params, total_steps), total_steps, params.min_lr_ratio)
    return LambdaLR(optimizer, factor)


@attrs.frozen(kw_only=True)
class CosineParams:
    """Cosine decay from the initial learning rate to ``min_lr_ratio`` times it, no warmup."""

    min_lr_ratio: float = attrs.field(
        default=0.0, validator=in_range(0.0, 1.0, high_inclusive=True)
    )


def build_cosine(params, optimizer, total_steps):
    return LambdaLR(optimizer, CosineFactor(0, total_steps, params.min_lr_ratio))




def build_constant(params, optimizer, total_steps):
    return LambdaLR(optimizer, ConstantFactor())


@hookimpl
def register_schedulers(register):
    register("cosine_warmup", build_cosine_warmup, CosineWarmupParams)
    register("cosine", build_cosine, CosineParams)
    register("constant", build_constant, NoParams)
