"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits; it is fitted by minimising the validation negative
log-likelihood, so it changes the confidence of the scores but never their order (AUROC and the
ranking stay the same).
"""

import math

import numpy as np

from mmcore.evaluation.metrics import check_scores_labels

MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2


def _as_tensors(logits, labels):
    import torch

    logits, labels = check_scores_labels(logits, labels, what="logits", probabilities=False, purpose="calibrate on")
    return torch.from_numpy(logits), torch.from_numpy(labels.astype(np.float64))


def nll(logits, labels, temperature=1.0):
    """Mean binary negative log-likelihood of ``sigmoid(logits / temperature)``."""
    import torch.nn.functional as F

    x, y = _as_tensors(logits, labels)
    return float(F.binary_cross_entropy_with_logits(x / temperature, y))


def fit_temperature(logits, labels):
    """Fit the temperature T > 0 that minimises the NLL of ``sigmoid(logits / T)`` on ``labels``.

    Optimises log T with L-BFGS, so T stays positive, within [0.01, 100].
    Returns 1.0 when the labels hold a single class (nothing to calibrate against) or when no
    temperature beats T = 1.
    """
    import torch
    import torch.nn.functional as F

    x, y = _as_tensors(logits, labels)
    if y.min() == y.max():
        return 1.0

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # clamping inside the loss zeroes the gradient past a bound, which stops L-BFGS there
    # instead of chasing T -> infinity when the logits are anti-correlated with the labels
    bounds = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe",
        tolerance_grad=1e-12, tolerance_change=1e-14,
    )

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x / log_t.clamp(*bounds).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(float(log_t.detach().clamp(*bounds)))
    if not math.isfinite(temperature):
        return 1.0
    with torch.no_grad():
        fitted = F.binary_cross_entropy_with_logits(x / temperature, y)
        unscaled = F.binary_cross_entropy_with_logits(x, y)
    return temperature if fitted <= unscaled else 1.0


def apply_temperature(logits, temperature):
    """Calibrated probabilities ``sigmoid(logits / temperature)`` as a float64 array."""
    import torch

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature!r})")
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return torch.sigmoid(logits / float(temperature)).numpy()


def sigmoid(logits):
    """Probabilities from logits (float64, numpy), without overflow for logits far below zero."""
    logits = np.asarray(logits, dtype=np.float64)
    small = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))


def decide_logits(logits, *, temperature, threshold):
    """Logits -> (raw scores, calibrated scores, decisions) as float64, float64 and bool arrays:
    the sigmoid, the temperature's calibration, and the threshold on the calibrated score."""
    raw = sigmoid(logits)
    calibrated = apply_temperature(logits, temperature) if temperature != 1.0 else raw
    return raw, np.asarray(calibrated, dtype=np.float64), calibrated >= threshold
