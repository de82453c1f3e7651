"""Built-in learning-rate schedules against transformers' reference schedules."""

import copy
import itertools

import pytest
import torch

from mmcore.plugins.manager import make_registry
from mmcore.validators import FieldError

# transformers is a test-only reference here (the core does not depend on it)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def registry():
    return make_registry(load_entrypoints=False)


def build(registry, kind, name, *args, **params):
    registration = registry.get(kind, name)
    return registration.factory(registration.params_cls(**params), *args)


TOTAL = 40


def optimizer():
    """Two parameter groups with different learning rates (head / backbone)."""
    return torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
         {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-5}]
    )


def lr_sequence(scheduler, steps=TOTAL):
    """Learning rates of every group before each of ``steps`` optimizer steps."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr())
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def warmup_shifted(theirs, warmup):
    """transformers' rates (one more than needed) with warmup one step ahead: step k uses theirs at k + 1
    during warmup (so the first step is not wasted at 0), theirs at k afterwards."""
    return [theirs[k + 1] if k < warmup else theirs[k] for k in range(len(theirs) - 1)]


def assert_same_rates(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-15), f"step {step}: {a} != {b}"


def test_builtin_schedulers(registry):
    assert registry.names("scheduler") == ["constant", "cosine", "cosine_warmup"]


@pytest.mark.parametrize("ratio, warmup", [(0.1, 4), (0.25, 10), (0.0, 0), (0.13, 6)])
def test_cosine_warmup_matches_transformers(registry, ratio, warmup):
    ours = build(registry, "scheduler", "cosine_warmup", optimizer(), TOTAL, warmup_ratio=ratio)
    theirs = transformers.get_cosine_schedule_with_warmup(optimizer(), warmup, TOTAL)
    rates = lr_sequence(ours)
    assert_same_rates(rates, warmup_shifted(lr_sequence(theirs, TOTAL + 1), warmup))
    # the first optimizer step runs at lr / warmup, never at 0
    assert rates[0] == pytest.approx([1e-3 / max(warmup, 1), 2e-5 / max(warmup, 1)], rel=1e-12)


def test_cosine_warmup_lr_of_each_step_by_hand(registry):
    """4 warmup steps of 10: 1/4, 2/4, 3/4, 1, then cosine from its top over the 6 left."""
    import math

    rates = [r[0] for r in lr_sequence(build(registry, "scheduler", "cosine_warmup", optimizer(), 10, warmup_steps=4), 10)]
    expected = [1e-3 * f for f in (0.25, 0.5, 0.75, 1.0)]
    expected += [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 6)) for k in range(4, 10)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert min(rates) > 0


def test_cosine_warmup_steps_override_the_ratio(registry):
    ours = build(
        registry, "scheduler", "cosine_warmup", optimizer(), TOTAL, warmup_ratio=0.5, warmup_steps=3
    )
    theirs = transformers.get_cosine_schedule_with_warmup(optimizer(), 3, TOTAL)
    assert_same_rates(lr_sequence(ours), warmup_shifted(lr_sequence(theirs, TOTAL + 1), 3))


def test_cosine_warmup_min_lr_ratio(registry):
    ours = build(
        registry, "scheduler", "cosine_warmup", optimizer(), TOTAL, warmup_steps=5, min_lr_ratio=0.1
    )
    theirs = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer(), 5, TOTAL, min_lr_rate=0.1
    )
    rates = lr_sequence(ours)
    assert_same_rates(rates, warmup_shifted(lr_sequence(theirs, TOTAL + 1), 5))
    assert rates[-1][0] > 1e-4  # the floor is 10% of 1e-3


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_cosine_matches_transformers_without_warmup(registry, floor):
    ours = build(registry, "scheduler", "cosine", optimizer(), TOTAL, min_lr_ratio=floor)
    theirs = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer(), 0, TOTAL, min_lr_rate=floor
    )
    assert_same_rates(lr_sequence(ours), lr_sequence(theirs))
    if floor == 0.0:
        plain = transformers.get_cosine_schedule_with_warmup(
            optimizer(), num_warmup_steps=0, num_training_steps=TOTAL
        )
        ours = build(registry, "scheduler", "cosine", optimizer(), TOTAL)
        assert_same_rates(lr_sequence(ours), lr_sequence(plain))


def test_constant_matches_transformers(registry):
    ours = build(registry, "scheduler", "constant", optimizer(), TOTAL)
    theirs = transformers.get_constant_schedule(optimizer())
    rates = lr_sequence(ours)
    assert_same_rates(rates, lr_sequence(theirs))
    assert rates[-1] == [1e-3, 2e-5]


def test_cosine_does_not_rise_again_after_the_last_step(registry):
    scheduler = build(registry, "scheduler", "cosine", optimizer(), 10)
    rates = [r[0] for r in lr_sequence(scheduler, 15)]
    assert rates[10:] == [0.0] * 5
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_scheduler_state_round_trips(registry):
    first = build(registry, "scheduler", "cosine_warmup", optimizer(), TOTAL, warmup_steps=5)
    lr_sequence(first, 12)
    state = copy.deepcopy(first.state_dict())
    optimizer_state = copy.deepcopy(first.optimizer.state_dict())
    expected = lr_sequence(first, 10)

    # a resumed run: build optimizer and scheduler fresh, then load the optimizer's state
    # (it carries the current lr) and the scheduler's — in that order, after building both
    opt = optimizer()
    resumed = build(registry, "scheduler", "cosine_warmup", opt, TOTAL, warmup_steps=5)
    opt.load_state_dict(optimizer_state)
    resumed.load_state_dict(state)
    assert_same_rates(lr_sequence(resumed, 10), expected)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("cosine_warmup", {"warmup_ratio": 1.0}, "must be in [0.0, 1.0) (got 1.0)"),
        ("cosine_warmup", {"warmup_steps": -1}, "must be >= 0 (got -1)"),
        ("cosine_warmup", {"min_lr_ratio": 2.0}, "must be in [0.0, 1.0] (got 2.0)"),
        ("cosine", {"min_lr_ratio": -0.5}, "must be in [0.0, 1.0] (got -0.5)"),
    ],
)
def test_scheduler_params_are_validated(registry, name, params, message):
    with pytest.raises(FieldError) as info:
        registry.get("scheduler", name).params_cls(**params)
    assert str(info.value) == message
