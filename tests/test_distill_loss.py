"""The distillation loss (mmcore.builtin.distill) against hand computations with math.log."""

import math

import pytest
import torch

from mmcore.builtin.distill import DistillationLoss, bernoulli_kl
from mmcore.builtin.losses import BceLoss


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _kl(teacher, student, temperature):
    """KL(Bernoulli(p) || Bernoulli(q)) by its definition, p and q the softened teacher and student."""
    p, q = _sigmoid(teacher / temperature), _sigmoid(student / temperature)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_loss_matches_the_formula_on_one_row():
    # T = 2, teacher logit 1.0, student logit -0.5, label 1, weight 0.7:
    # p = sigmoid(0.5) = 0.622459, q = sigmoid(-0.25) = 0.437823
    # KL = p ln(p/q) + (1-p) ln((1-p)/(1-q)) = 0.219020 - 0.150313 = 0.068707
    # hard = -ln sigmoid(-0.5) = 0.974077;  loss = 0.7 * 4 * 0.068707 + 0.3 * 0.974077 = 0.484603
    kl = _kl(1.0, -0.5, 2.0)
    hard = -math.log(_sigmoid(-0.5))
    assert kl == pytest.approx(0.068707, abs=1e-6)
    expected = 0.7 * 4 * kl + 0.3 * hard
    assert expected == pytest.approx(0.484603, abs=1e-6)

    student = torch.tensor([-0.5], requires_grad=True)
    teacher = torch.tensor([1.0], requires_grad=True)
    terms = DistillationLoss(BceLoss(), temperature=2.0, weight=0.7)(student, teacher, torch.tensor([1.0]))
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms.soft.item() == pytest.approx(4 * kl, rel=1e-6)
    assert terms.hard.item() == pytest.approx(hard, rel=1e-6)

    terms.loss.backward()
    # d/ds: weight * T * (q - p) from the soft term, (1 - weight) * (sigmoid(s) - y) from the BCE
    gradient = 0.7 * 2 * (_sigmoid(-0.25) - _sigmoid(0.5)) + 0.3 * (_sigmoid(-0.5) - 1)
    assert student.grad.item() == pytest.approx(gradient, rel=1e-5)
    assert teacher.grad is None  # the teacher's logit is detached


def test_unlabelled_rows_add_only_to_the_soft_term():
    student = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    teacher = torch.tensor([1.5, 0.4, -0.7])
    targets = torch.tensor([0.0, float("nan"), float("nan")])  # rows 1 and 2: a transfer set
    labelled = torch.tensor([True, False, False])
    terms = DistillationLoss(BceLoss(), temperature=3.0, weight=0.4)(student, teacher, targets, labelled)
    soft = 9 * sum(_kl(t, s, 3.0) for t, s in ((1.5, 0.3), (0.4, -1.2), (-0.7, 2.0))) / 3
    hard = -math.log(1 - _sigmoid(0.3))
    assert terms.loss.item() == pytest.approx(0.4 * soft + 0.6 * hard, rel=1e-6)
    terms.loss.backward()
    # an unlabelled row's gradient is its soft term's only: weight * T * (q - p) / batch
    assert student.grad[1].item() == pytest.approx(0.4 * 3 * (_sigmoid(-0.4) - _sigmoid(0.4 / 3)) / 3, rel=1e-5)
    assert torch.isfinite(student.grad).all()


def test_a_batch_without_labels_has_no_hard_term():
    terms = DistillationLoss(BceLoss(), temperature=1.0, weight=0.5)(
        torch.tensor([0.2, 0.1]), torch.tensor([0.2, 0.1]), torch.full((2,), float("nan")), torch.tensor([False, False])
    )
    assert terms.hard.item() == 0.0
    assert terms.loss.item() == pytest.approx(0.0, abs=1e-7)  # same logits: no divergence either


def test_kl_stays_finite_for_confident_logits():
    kl = bernoulli_kl(torch.tensor([80.0, -80.0]), torch.tensor([-80.0, 80.0]), 1.0)
    assert torch.isfinite(kl).all()
    assert kl.tolist() == pytest.approx([80.0, 80.0], rel=1e-4)  # ~ |t - s| when both are certain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0, "weight": 0.5}, "temperature must be a number > 0 (got 0)"),
        ({"temperature": 2.0, "weight": 1.5}, "weight must be a number in [0, 1] (got 1.5)"),
        ({"temperature": True, "weight": 0.5}, "temperature must be a number > 0 (got True)"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError) as error:
        DistillationLoss(BceLoss(), **kwargs)
    assert str(error.value) == message
