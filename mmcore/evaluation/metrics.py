"""Binary classification metrics on arrays of scores and labels, as plain JSON-ready values.

A prediction is positive when ``score >= threshold`` everywhere in mmcore (metrics, threshold
tuning, prediction). torchmetrics thresholds with ``>``, so hard predictions are made here and
handed to torchmetrics as labels; AUROC, AUPRC, the confusion matrix and the ECE come from
torchmetrics.
"""

import math

import numpy as np

ECE_BINS = 15

#: Fixed upper edges of the calibrated-score histogram (Prometheus ``le`` buckets; ``+Inf``
#: follows): ``mmcore serve``'s ``mmcore_calibrated_score`` and any drift comparison use these
#: same edges, so two histograms of one model always line up. Finer at both ends, where the
#: scores of a confident classifier gather.
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def check_scores_labels(scores, labels, *, what="scores", probabilities=True, purpose="evaluate"):
    """Return ``(scores, labels)`` as 1-D float64 / int64 arrays, or raise ValueError saying why not.

    ``probabilities=False`` accepts any finite values (logits, for calibration).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{what} and labels differ in length ({scores.size} vs {labels.size})")
    if scores.size == 0:
        raise ValueError(f"no samples to {purpose}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if probabilities and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(
            f"scores must be probabilities in [0, 1] (got min {scores.min():.4g}, max {scores.max():.4g});"
            " apply a sigmoid to logits first"
        )
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 or 1 (got {labels[bad][0]!r})")
    return scores, labels.astype(np.int64)


def _float_or_none(value):
    # torchmetrics computes curves in float32: 7 decimals keep every meaningful digit
    value = float(value)
    return round(value, 7) if math.isfinite(value) else None


def _ratio(numerator, denominator):
    """``numerator / denominator`` with 0/0 = 0, as scikit-learn's ``zero_division=0``."""
    return numerator / denominator if denominator else 0.0


def binary_metrics(scores, labels, threshold=0.5):
    """All binary metrics of probability ``scores`` against 0/1 ``labels`` at ``threshold``.

    Returns a dict of plain Python numbers: ``auroc, auprc`` (threshold-free; None when only one
    class is present), ``accuracy, precision, recall, specificity, f1`` (at the threshold; a 0/0
    ratio counts as 0, like scikit-learn's ``zero_division=0``), ``brier`` (mean squared error of
    the scores), ``ece`` (expected calibration error, 15 equal-width bins, L1), the confusion
    matrix ``tn, fp, fn, tp``, and ``n, positives, threshold``.
    """
    import torch
    from torchmetrics.functional import classification as tmc

    scores, labels = check_scores_labels(scores, labels)
    threshold = float(threshold)
    s = torch.from_numpy(scores)
    y = torch.from_numpy(labels)
    hard = torch.from_numpy((scores >= threshold).astype(np.int64))

    positives = int(labels.sum())
    both_classes = 0 < positives < labels.size
    auroc = auprc = None
    if both_classes:
        auroc = _float_or_none(tmc.binary_auroc(s, y))
        auprc = _float_or_none(tmc.binary_average_precision(s, y))

    # the ratios follow from torchmetrics' confusion matrix exactly; its own ratio functions
    # return float32, which would put 0.7519999742507935 in results.json instead of 0.752
    tn, fp, fn, tp = (int(v) for v in tmc.binary_confusion_matrix(hard, y).reshape(-1))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": _ratio(tp + tn, labels.size),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": float(np.mean((scores - labels) ** 2)),
        "ece": float(tmc.binary_calibration_error(s, y, n_bins=ECE_BINS, norm="l1")),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": int(labels.size),
        "positives": positives,
        "threshold": threshold,
    }


def metrics_report(scores, labels, threshold):
    """Metrics at the default 0.5 and at the tuned ``threshold``: ``{"at_0.5": ..., "at_threshold": ...}``."""
    return {
        "at_0.5": binary_metrics(scores, labels, 0.5),
        "at_threshold": binary_metrics(scores, labels, threshold),
    }


def calibration_bins(scores, labels, n_bins=ECE_BINS):
    """Reliability-diagram bins: a list of dicts ``lower, upper, count, mean_score, positive_rate``.

    Bins are ``[k/n, (k+1)/n)`` with a score of exactly 1 in the last bin; empty bins are kept
    with ``mean_score`` and ``positive_rate`` None.
    """
    scores, labels = check_scores_labels(scores, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # the edges torchmetrics' ECE uses
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, n_bins - 1)
    bins = []
    for k in range(n_bins):
        members = index == k
        count = int(members.sum())
        bins.append(
            {
                "lower": k / n_bins,
                "upper": (k + 1) / n_bins,
                "count": count,
                "mean_score": float(scores[members].mean()) if count else None,
                "positive_rate": float(labels[members].mean()) if count else None,
            }
        )
    return bins


def rank_auroc(scores, labels):
    """AUROC of 0/1 int ``labels`` by the rank-sum formula in float64, ties counted half (as
    torchmetrics and scikit-learn); None when one class is absent. Arrays are not checked: for
    loops over many candidate scores (bootstrap, ensemble selection) on checked inputs."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank within each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
