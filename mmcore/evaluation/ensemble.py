"""Greedy ensemble selection (Caruana et al. 2004, "Ensemble selection from libraries of models").

Forward selection with replacement: start from an empty ensemble (or the best ``initial_best``
members, each once) and, for a fixed number of iterations, add the member whose addition gives
the best metric of the ensemble's score on the selection rows (validation, or out-of-fold rows
for a k-fold bag). A member may be added many times; its weight is the number of times it was
picked over the length of the kept path. AutoGluon's ``EnsembleSelection`` is the model: 25
iterations by default (TabRepo found no gain above 25), ties go to a member already in the
ensemble, and the kept path ends at the first iteration that reached the best metric, so later
iterations that only repeat the best do not blur the weights. Unlike AutoGluon, ties are broken
without randomness: among equally good candidates, a member already picked, then the lowest
index.

The ensemble's score is the weighted mean of the members' probabilities, ``sigmoid(logit_m)``
(each member's raw score, before its own temperature), not a weighted mean of logits: a mean
of logits is a product of odds, which one overconfident member (logit 30 against two at -2)
decides alone, while a mean of probabilities is bounded by its members and is what Caruana and
AutoGluon average (and what ``bench/real_data.py --ensemble`` measured). For temperature
scaling and the threshold, the ensemble has a logit again: ``logit(p)``, with p clipped to
``[COMBINED_EPS, 1 - COMBINED_EPS]`` so it stays finite in float32 (an exported graph computes
the same clip).
"""

from __future__ import annotations

import attrs
import numpy as np

from mmcore.evaluation.metrics import check_scores_labels, rank_auroc

#: selection metrics; "auroc" is maximised, "log_loss" minimised
METRICS = ("auroc", "log_loss")
DEFAULT_METRIC = "auroc"
#: AutoGluon's default ``ensemble_size``; TabRepo reports no measurable gain above 25
DEFAULT_ITERATIONS = 25
#: 2**-23: ``1 - COMBINED_EPS`` is exact in float32, so host (float64) and graph (float32) clip alike;
#: the combined logit then lies within +-15.94
COMBINED_EPS = 2.0**-23
#: the log loss's clip, as scikit-learn's
_LOG_LOSS_EPS = 1e-15
#: two metrics this close are a tie (float noise, not a better ensemble)
_TIE = 1e-12
#: combined scores are rounded to this many decimals before ranking: rows whose mean is the same
#: number summed in another order must tie, not differ in the last bit and reorder
_RANK_DECIMALS = 12


@attrs.frozen(kw_only=True)
class EnsembleSelection:
    """The result of :func:`select_ensemble` (JSON-ready through :meth:`to_json`)."""

    metric: str
    #: the iterations asked for (initial picks included); the kept path may be shorter
    iterations: int
    #: member index picked at each kept iteration, in order
    path: tuple[int, ...]
    #: the ensemble's metric after each iteration run (longer than ``path`` when the best came early)
    trajectory: tuple[float, ...]
    #: times each member was picked on the kept path
    counts: tuple[int, ...]
    #: ``counts / len(path)``: one per member, summing to 1
    weights: tuple[float, ...]

    @property
    def score(self):
        """The metric of the kept ensemble on the selection rows."""
        return self.trajectory[len(self.path) - 1]

    def to_json(self):
        return {
            "metric": self.metric,
            "iterations": self.iterations,
            "weights": list(self.weights),
            "counts": list(self.counts),
            "path": list(self.path),
            "trajectory": list(self.trajectory),
            "score": self.score,
        }


def _member_matrix(member_scores, labels):
    """``(scores [M, N] float64, labels [N] int64)``, or ValueError naming the member that is wrong."""
    rows = [np.asarray(scores, dtype=np.float64).reshape(-1) for scores in member_scores]
    if not rows:
        raise ValueError("an ensemble needs at least one member")
    checked = []
    for index, scores in enumerate(rows):
        scores, labels_checked = check_scores_labels(scores, labels, what=f"member {index}'s scores", purpose="select on")
        checked.append(scores)
    return np.stack(checked), labels_checked


def _metric_function(metric, labels):
    """``scores [N] -> gain`` (higher is better) for ``metric``."""
    if metric == "auroc":
        if labels.min() == labels.max():
            raise ValueError("selecting on AUROC needs both classes in the labels")
        return lambda scores: rank_auroc(np.round(scores, _RANK_DECIMALS), labels)
    positive = labels == 1

    def negative_log_loss(scores):
        p = np.clip(scores, _LOG_LOSS_EPS, 1 - _LOG_LOSS_EPS)
        return float(-np.mean(np.where(positive, -np.log(p), -np.log1p(-p))))

    return negative_log_loss


def _close(a, b):
    return abs(a - b) <= _TIE * max(1.0, abs(a), abs(b))


def select_ensemble(member_scores, labels, *, metric=DEFAULT_METRIC, iterations=DEFAULT_ITERATIONS, initial_best=0):
    """Greedy forward selection with replacement of members by ``metric`` on ``labels``.

    ``member_scores``: one array of N probabilities per member (``sigmoid(logit)``), all on the
    same N rows as ``labels`` (0/1). ``iterations``: how many picks to make in all (the initial
    ones included). ``initial_best``: start with the N best members alone, each once (Caruana's
    sorted initialisation; 0 = start empty). Deterministic: ties go to a member already picked,
    then to the lowest index. Returns an :class:`EnsembleSelection`; raises ValueError for
    scores that are not probabilities of the labels' length, an unknown metric, or bad counts.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; one of {', '.join(METRICS)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (got {iterations!r})")
    if isinstance(initial_best, bool) or not isinstance(initial_best, int) or not 0 <= initial_best <= iterations:
        raise ValueError(f"initial_best must be an integer in [0, iterations] (got {initial_best!r})")
    scores, labels = _member_matrix(member_scores, labels)
    gain = _metric_function(metric, labels)
    members = scores.shape[0]

    counts = np.zeros(members, dtype=np.int64)
    path, trajectory = [], []

    def pick(member):
        counts[member] += 1
        path.append(int(member))
        # from the counts, so the ensemble's score does not depend on the order of the picks
        trajectory.append(gain(counts @ scores / counts.sum()))

    initial = min(initial_best, members)
    if initial:
        alone = [gain(scores[m]) for m in range(members)]
        # a stable sort on -gain: equally good members keep their index order
        for member in sorted(range(members), key=lambda m: -alone[m])[:initial]:
            pick(member)
    while len(path) < iterations:
        base = counts @ scores
        candidates = [gain((base + scores[m]) / (len(path) + 1)) for m in range(members)]
        best = max(candidates)
        tied = [m for m in range(members) if _close(candidates[m], best)]
        already = [m for m in tied if counts[m] > 0]
        pick((already or tied)[0])
        if members == 1:
            break  # every further pick is the same member

    # the kept path ends at the first iteration that reached the best (never inside the initial picks)
    first = max(initial, 1) - 1
    best = max(trajectory[first:])
    kept = next(i for i in range(first, len(trajectory)) if _close(trajectory[i], best)) + 1
    kept_counts = np.bincount(np.asarray(path[:kept]), minlength=members)
    return EnsembleSelection(
        metric=metric,
        iterations=iterations,
        path=tuple(path[:kept]),
        trajectory=tuple(float(v if metric == "auroc" else -v) for v in trajectory),
        counts=tuple(int(c) for c in kept_counts),
        weights=tuple(float(c) / kept for c in kept_counts),
    )


def combine_scores(member_scores, weights):
    """The ensemble's probability per row: ``sum_m weights[m] * member_scores[m]`` (float64 [N]).

    ``weights`` must be non-negative and sum to 1 (as :class:`EnsembleSelection` gives them).
    """
    matrix = np.stack([np.asarray(s, dtype=np.float64).reshape(-1) for s in member_scores])
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.size != matrix.shape[0]:
        raise ValueError(f"{weights.size} weights for {matrix.shape[0]} members")
    if (weights < 0).any() or not np.isclose(weights.sum(), 1.0, rtol=0, atol=1e-9):
        raise ValueError(f"weights must be >= 0 and sum to 1 (got {weights.tolist()})")
    return weights @ matrix


def combined_logit(scores):
    """``logit(p)`` of the ensemble's probabilities, p clipped to ``[COMBINED_EPS, 1 - COMBINED_EPS]``:
    the ensemble's logit, to which its temperature and threshold apply like a single run's."""
    p = np.clip(np.asarray(scores, dtype=np.float64), COMBINED_EPS, 1.0 - COMBINED_EPS)
    return np.log(p) - np.log1p(-p)
