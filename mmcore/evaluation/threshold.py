"""Choosing the decision threshold on validation scores (``eval.threshold`` in a recipe).

Rules:

- ``"f1"``: the threshold with the highest F1; ties go to the highest threshold (fewest
  positives predicted).
- ``"youden"``: the highest Youden's J = TPR - FPR; ties go to the highest threshold.
- ``{"precision": p}``: the lowest threshold whose precision is at least ``p``, i.e. the most
  recall the precision target allows. When no threshold reaches ``p``, the threshold with the
  best precision (lowest one among ties), and the description says the target was missed.
- ``{"recall": r}``: the highest threshold whose recall is at least ``r``.
- a number in (0, 1): used as is.

Candidate thresholds are the distinct validation scores; a prediction is positive when
``score >= threshold``.
"""

import numpy as np

from mmcore.errors import did_you_mean
from mmcore.evaluation.metrics import check_scores_labels

NAMED_RULES = ("f1", "youden")
TARGET_RULES = ("precision", "recall")
RULE_HELP = 'must be "f1", "youden", {precision = 0.95}, {recall = 0.9} or a number in (0, 1)'


def parse_threshold_rule(value):
    """Validate a recipe's ``eval.threshold`` value and return it normalised.

    Returns ``"f1"``, ``"youden"``, ``{"precision": float}``, ``{"recall": float}`` or a float;
    raises ValueError with a one-line message otherwise.
    """
    if isinstance(value, str):
        if value.strip().lower() in NAMED_RULES:
            return value.strip().lower()
        raise ValueError(f"{RULE_HELP} (got {value!r}){did_you_mean(value, NAMED_RULES + TARGET_RULES)}")
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"{RULE_HELP}; a target takes exactly one key (got {dict(value)!r})")
        ((key, target),) = value.items()
        if key not in TARGET_RULES:
            raise ValueError(
                f"{RULE_HELP}; unknown target {key!r}{did_you_mean(str(key), TARGET_RULES)}"
            )
        if not _is_number(target) or not 0 < target <= 1:
            raise ValueError(f"{key} target must be a number in (0, 1] (got {target!r})")
        return {key: float(target)}
    if _is_number(value):
        if not 0 < value < 1:
            raise ValueError(f"{RULE_HELP} (got {value!r})")
        return float(value)
    raise ValueError(f"{RULE_HELP} (got {value!r})")


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def operating_points(scores, labels):
    """Counts at every candidate threshold, highest threshold first.

    Returns a dict of arrays: ``threshold`` (the distinct scores, descending), ``tp``, ``fp``
    (predictions ``score >= threshold``), and the totals ``positives``, ``negatives`` as ints.
    """
    scores, labels = check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # the last sample of each run of equal scores: everything up to it is predicted positive
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    return {
        "threshold": sorted_scores[last_of_run],
        "tp": np.cumsum(sorted_labels)[last_of_run],
        "fp": np.cumsum(1 - sorted_labels)[last_of_run],
        "positives": int(labels.sum()),
        "negatives": int(labels.size - labels.sum()),
    }


def tune_threshold(scores, labels, rule):
    """Pick the decision threshold on validation ``scores``/``labels`` by ``rule``.

    Returns ``(threshold, description)``, the description a short sentence for the run's
    results (e.g. ``"max F1 on validation (F1=0.912, precision=0.901, recall=0.923)"``).
    A validation set with a single class keeps 0.5 for every rule except a fixed number.
    """
    rule = parse_threshold_rule(rule)
    if isinstance(rule, float):
        return rule, f"fixed threshold {rule:g} from the recipe"

    points = operating_points(scores, labels)
    n_pos, n_neg = points["positives"], points["negatives"]
    if n_pos == 0 or n_neg == 0:
        return 0.5, (
            f"kept 0.5: validation has a single class ({n_pos} positives, {n_neg} negatives),"
            f" so rule {rule!r} cannot be applied"
        )

    thresholds, tp, fp = points["threshold"], points["tp"], points["fp"]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    fpr = fp / n_neg
    eps = 1e-12  # a target like 0.95 must accept a ratio that rounds to it

    def stats(i):
        return f"precision={precision[i]:.3f}, recall={recall[i]:.3f}"

    if rule == "f1":
        f1 = 2 * tp / (tp + fp + n_pos)
        i = int(np.argmax(f1))  # first maximum = highest threshold
        return float(thresholds[i]), f"max F1 on validation (F1={f1[i]:.3f}, {stats(i)})"
    if rule == "youden":
        j = recall - fpr
        i = int(np.argmax(j))
        return float(thresholds[i]), (
            f"max Youden's J = TPR - FPR on validation (J={j[i]:.3f}, TPR={recall[i]:.3f}, FPR={fpr[i]:.3f})"
        )
    ((key, target),) = rule.items()
    if key == "precision":
        reached = np.flatnonzero(precision >= target - eps)
        if reached.size:
            i = int(reached[-1])  # lowest threshold that still meets the target
            return float(thresholds[i]), (
                f"lowest threshold with validation precision >= {target:g} ({stats(i)})"
            )
        i = int(np.flatnonzero(precision == precision.max())[-1])
        return float(thresholds[i]), (
            f"precision target {target:g} unreachable on validation;"
            f" used the best precision instead ({stats(i)})"
        )
    # recall only grows as the threshold falls, so the first one reaching it is the highest
    i = int(np.flatnonzero(recall >= target - eps)[0])
    return float(thresholds[i]), f"highest threshold with validation recall >= {target:g} ({stats(i)})"
