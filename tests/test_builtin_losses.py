"""Built-in losses against torch and torchvision."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from mmcore.plugins.manager import make_registry
from mmcore.validators import FieldError


@pytest.fixture(scope="module")
def registry():
    return make_registry(load_entrypoints=False)


def build(registry, kind, name, *args, **params):
    registration = registry.get(kind, name)
    return registration.factory(registration.params_cls(**params), *args)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, generator=g) * 3
    targets = (torch.rand(16, generator=g) > 0.6).float()
    return logits, targets


# --- losses ------------------------------------------------------------------------------


def test_builtin_losses(registry):
    assert registry.names("loss") == ["bce", "focal"]


@pytest.mark.parametrize(
    "alpha, gamma, smoothing", list(itertools.product([0.25, 0.8], [0.0, 2.0, 3.5], [0.0, 0.1]))
)
def test_focal_matches_torchvision(registry, batch, alpha, gamma, smoothing):
    logits, targets = batch
    loss = build(
        registry, "loss", "focal", (10, 6), alpha=alpha, gamma=gamma, label_smoothing=smoothing
    )
    smoothed = targets * (1 - smoothing) + 0.5 * smoothing
    expected = sigmoid_focal_loss(logits, smoothed, alpha=alpha, gamma=gamma, reduction="mean")
    torch.testing.assert_close(loss(logits, targets), expected)


def test_focal_defaults_are_the_papers(registry, batch):
    logits, targets = batch
    loss = build(registry, "loss", "focal", (10, 6))
    expected = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
    torch.testing.assert_close(loss(logits, targets), expected)


def test_focal_matches_the_paper_formula(registry, batch):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), Lin et al. 2017, for hard targets."""
    logits, targets = batch
    p = torch.sigmoid(logits.double())
    p_t = torch.where(targets == 1, p, 1 - p)
    alpha_t = torch.where(targets == 1, 0.3, 0.7).double()
    expected = (-alpha_t * (1 - p_t) ** 1.5 * torch.log(p_t)).mean()
    loss = build(registry, "loss", "focal", (10, 6), alpha=0.3, gamma=1.5)
    torch.testing.assert_close(loss(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)

    no_alpha = build(registry, "loss", "focal", (10, 6), alpha=None, gamma=1.5)
    expected = (-((1 - p_t) ** 1.5) * torch.log(p_t)).mean()
    torch.testing.assert_close(no_alpha(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)


def test_focal_without_alpha_and_gamma_is_bce(registry, batch):
    logits, targets = batch
    loss = build(registry, "loss", "focal", (10, 6), alpha=None, gamma=0.0, label_smoothing=0.2)
    expected = F.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1)
    torch.testing.assert_close(loss(logits, targets), expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_matches_torch(registry, batch, smoothing):
    logits, targets = batch
    loss = build(registry, "loss", "bce", (10, 6), label_smoothing=smoothing)
    smoothed = targets * (1 - smoothing) + 0.5 * smoothing
    expected = F.binary_cross_entropy_with_logits(logits, smoothed)
    torch.testing.assert_close(loss(logits, targets), expected)


def test_bce_pos_weight_number(registry, batch):
    logits, targets = batch
    loss = build(registry, "loss", "bce", (10, 6), pos_weight=2.5)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(2.5))
    torch.testing.assert_close(loss(logits, targets), expected)
    assert not torch.allclose(expected, F.binary_cross_entropy_with_logits(logits, targets))


def test_bce_pos_weight_auto_is_negatives_over_positives(registry, batch):
    logits, targets = batch
    loss = build(registry, "loss", "bce", (30, 8), pos_weight="auto", label_smoothing=0.1)
    expected = F.binary_cross_entropy_with_logits(
        logits, targets * 0.9 + 0.05, pos_weight=torch.tensor(30 / 8)
    )
    torch.testing.assert_close(loss(logits, targets), expected)


def test_bce_pos_weight_follows_the_module_to_another_dtype(registry, batch):
    logits, targets = batch
    loss = build(registry, "loss", "bce", (30, 8), pos_weight="auto").double()
    expected = F.binary_cross_entropy_with_logits(
        logits.double(), targets.double(), pos_weight=torch.tensor(30 / 8, dtype=torch.float64)
    )
    out = loss(logits.double(), targets.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


def test_bce_auto_needs_both_classes(registry):
    with pytest.raises(ValueError) as info:
        build(registry, "loss", "bce", (12, 0), pos_weight="auto")
    assert str(info.value) == (
        'pos_weight = "auto" needs both classes in the training set (got 12 negatives, 0 positives)'
    )


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("bce", {"pos_weight": "balanced"}, "must be a number > 0 or \"auto\" (got 'balanced')"),
        ("bce", {"pos_weight": 0.0}, 'must be a number > 0 or "auto" (got 0.0)'),
        ("bce", {"label_smoothing": 1.0}, "must be in [0.0, 1.0) (got 1.0)"),
        ("focal", {"label_smoothing": -0.1}, "must be in [0.0, 1.0) (got -0.1)"),
        ("focal", {"alpha": 1.5}, "must be in [0.0, 1.0] (got 1.5)"),
        ("focal", {"gamma": -1.0}, "must be >= 0 (got -1.0)"),
    ],
)
def test_loss_params_are_validated(registry, name, params, message):
    with pytest.raises(FieldError) as info:
        registry.get("loss", name).params_cls(**params)
    assert str(info.value) == message
    assert info.value.field == next(iter(params))


def test_losses_give_gradients(registry, batch):
    logits, targets = batch
    for name in registry.names("loss"):
        x = logits.clone().requires_grad_()
        build(registry, "loss", name, (10, 6))(x, targets).backward()
        # pushing a positive's logit up must lower the loss
        positive = int(targets.argmax())
        assert x.grad[positive] < 0
