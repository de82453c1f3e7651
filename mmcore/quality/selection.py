"""Which unlabelled rows to label next: uncertainty, diversity, or both.

- **uncertainty** (margin sampling; Scheffer, Decomain and Wrobel 2001): the rows whose decision
  is closest to flipping, by the report's margin ``|logit(calibrated_score) - logit(threshold)|``
  (:func:`mmcore.evaluation.explain.margin`), smallest first.
- **diversity** (greedy k-center, the "core-set" of Sener and Savarese, ICLR 2018, Algorithm 1):
  each pick is the row farthest from everything labelled or picked so far, so a batch covers the
  pool instead of piling up near one confusing kind of ad. Distances are Euclidean between
  L2-normalised embeddings (``sqrt(2 - 2 cos)``, in [0, 2]), so the encoders' scales do not matter.
- **both** (the default; the pre-filter of Zhdanov, "Diverse mini-batch active learning", 2019):
  the ``candidate_multiple x budget`` most uncertain rows, then k-center among them.

Rows in ``exclude`` (already labelled or chosen in an earlier round) are never returned and count
as labelled for diversity. The result is deterministic for a seed: the seed only breaks ties
(equal margins; for diversity, equally far rows).
"""

from __future__ import annotations

import attrs
import numpy as np

from mmcore.evaluation.explain import margin
from mmcore.quality.similarity import as_matrix, min_distances, normalized, unit_distance

STRATEGIES = ("uncertainty", "diversity", "both")
#: "both" runs k-center among this many times the budget of the most uncertain rows (Zhdanov's beta = 10)
CANDIDATE_MULTIPLE = 10


@attrs.frozen(kw_only=True)
class Selected:
    """One row to label, in labelling order."""

    position: int  # index into the pool's arrays
    reason: str
    margin: float | None  # |logit(score) - logit(threshold)|, when scores were used
    distance: float | None  # to the nearest labelled or earlier-picked row, when embeddings were used


def select_rows(scores, threshold, embeddings, budget, *, strategy="both", labelled_embeddings=None, exclude=(),
                seed=0, candidate_multiple=CANDIDATE_MULTIPLE):
    """Up to ``budget`` pool rows to label next, in labelling order, each with its reason.

    ``scores``: the pool's calibrated scores (unused by ``diversity``); ``threshold``: the run's
    tuned threshold; ``embeddings``: the pool's rows x dims (unused by ``uncertainty``);
    ``labelled_embeddings``: the rows already labelled (the run's train + val), the centers k-center
    starts from; ``exclude``: pool positions never to return. Returns a tuple of :class:`Selected`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"budget must be at least 1 (got {budget})")
    size, margins, embeddings = _pool(scores, threshold, embeddings, strategy)
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(size)
    excluded = np.zeros(size, dtype=bool)
    positions = np.asarray(list(exclude), dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"exclude holds positions outside the pool of {size} rows")
    excluded[positions] = True
    available = np.flatnonzero(~excluded)

    if margins is not None:
        by_margin = available[np.lexsort((tiebreak[available], margins[available]))]
    if strategy == "uncertainty":
        return tuple(Selected(position=int(i), reason=f"margin {margins[i]:.3f} to the threshold",
                              margin=float(margins[i]), distance=None) for i in by_margin[:budget])

    if strategy == "both":
        candidates = by_margin[: int(candidate_multiple) * budget]
    else:
        candidates = available[np.argsort(tiebreak[available], kind="stable")]
    pool = normalized(embeddings[candidates])  # only the candidates are copied (a memory map reads just them)
    nearest = np.full(len(candidates), np.inf)
    # the labelled set is normalised block by block, never copied whole
    for centers in (embeddings[excluded], labelled_embeddings):
        if centers is not None and len(centers):
            np.minimum(nearest, min_distances(pool, centers), out=nearest)
    picks = _k_center(pool, budget, None if np.isinf(nearest).all() else nearest,
                      first=0 if strategy == "both" else None)
    chosen = []
    for index, distance, how in picks:
        i = int(candidates[index])
        if distance is not None:
            how = f"{how}: distance {distance:.3f}"
        if strategy == "both":
            how = f"margin {margins[i]:.3f} to the threshold (among the {len(candidates)} most uncertain); {how}"
        chosen.append(Selected(position=i, reason=how, margin=None if margins is None else float(margins[i]),
                               distance=distance))
    return tuple(chosen)


def _pool(scores, threshold, embeddings, strategy):
    """``(rows, margins or None, embeddings as a 2-D array or None)`` of the pool, checked."""
    margins = None
    if strategy != "diversity":
        if scores is None:
            raise ValueError(f"strategy {strategy!r} needs the pool's scores")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.all((scores >= 0) & (scores <= 1)):
            raise ValueError("scores must be probabilities in [0, 1]")
        margins = np.abs(margin(scores, threshold))
    if strategy == "uncertainty":
        return len(margins), margins, None
    if embeddings is None:
        raise ValueError(f"strategy {strategy!r} needs the pool's embeddings")
    embeddings = as_matrix(embeddings)
    if margins is not None and len(margins) != len(embeddings):
        raise ValueError(f"scores ({len(margins)}) and embeddings ({len(embeddings)}) must have one row per pool row")
    return len(embeddings), margins, embeddings


def _k_center(points, budget, nearest, first=None):
    """Greedy k-center over unit ``points``: ``[(index, distance or None, how)]`` in pick order.

    ``nearest``: each point's distance to the centers already labelled, or None when there are
    none. Each pick is the point farthest from those centers and the earlier picks (ties: the
    lowest index). With no centers the first pick is ``first``, or the point nearest the mean
    (the most typical row) when ``first`` is None.
    """
    if not len(points):
        return []
    picks = []
    if nearest is None:
        if first is None:
            first = int(np.argmin(unit_distance(points, points.mean(axis=0, keepdims=True))[:, 0]))
            picks.append((first, None, "nearest the pool's mean (no labelled rows to start from)"))
        else:
            picks.append((first, None, "the most uncertain (no labelled rows to start from)"))
        nearest = unit_distance(points, points[first:first + 1])[:, 0]
        nearest[first] = -1.0
    else:
        nearest = np.array(nearest, dtype=np.float64)
    while len(picks) < min(budget, len(points)):
        index = int(np.argmax(nearest))
        picks.append((index, float(nearest[index]), "farthest from the labelled rows and earlier picks"))
        np.minimum(nearest, unit_distance(points, points[index:index + 1])[:, 0], out=nearest)
        nearest[index] = -1.0  # picked: never again, even when every distance left is 0
    return picks
