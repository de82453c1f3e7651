"""How far new ads are from a run's reference profile: inputs (per modality), scores, slices.

- **Domain AUROC** per modality: a classifier told to separate reference rows from new rows by
  their embeddings, cross-validated. 0.5 means it cannot (no drift); 1.0 means every new ad is
  recognisably new (the "domain classifier" test of Rabanser, Guennemann and Lipton, "Failing
  Loudly", NeurIPS 2019). scikit-learn ``LogisticRegression`` on standardised embeddings,
  ``StratifiedKFold`` (shuffled, seeded), both sides subsampled to the same size (at most
  ``max_per_side``, so the AUROC is not driven by the class balance and the cost is bounded).
  :func:`compare_to_profile` keeps near-duplicate clusters (any modality, centred cosine >= 0.9)
  within one fold (``StratifiedGroupKFold``): ads come in campaigns of near-identical copies, and a
  classifier that sees a campaign's copies in training recognises the rest of it, so two samples of
  one distribution split by campaign looked "drifted" (Dredze's val vs test: 0.735 image, 0.843 text
  ungrouped; 0.533 and 0.653 grouped; docs/data-quality.md).
- **Scores**: the population stability index over the fixed buckets ``SCORE_BUCKETS`` (the
  server's histogram edges), ``sum((new - ref) * ln(new / ref))`` of the bucket shares, each
  share floored at ``PSI_FLOOR`` so an empty bucket stays finite; the usual bands (Siddiqi,
  "Credit Risk Scorecards", 2006): < 0.1 stable, 0.1 - 0.25 moderate, >= 0.25 significant.
  The two-sample Kolmogorov-Smirnov statistic (``scipy.stats.ks_2samp``) against the profile's
  score sample; the positive rate at the run's threshold; the empty-OCR rate; per slice.
- **Verdict** (:class:`DriftRule`): drift when any modality's domain AUROC >= 0.75 or the score
  PSI >= 0.25; ``mmcore drift`` then exits :data:`DRIFT_EXIT_CODE` (10), not an error code.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from mmcore.evaluation.explain import _family_order, slice_keys
from mmcore.evaluation.metrics import SCORE_BUCKETS
from mmcore.io import write_json
from mmcore.quality.profile import score_histogram, slice_summary
from mmcore.quality.similarity import as_matrix

#: ``mmcore drift``'s exit code when the verdict is drift (0 otherwise; 1-4, 130, 143 stay errors and signals)
DRIFT_EXIT_CODE = 10
DOMAIN_FOLDS = 5
MAX_PER_SIDE = 2000
PSI_FLOOR = 1e-4
#: the domain classifier's folds keep together rows this similar in any modality (centred cosine)
CLUSTER_SIMILARITY = 0.9
PSI_BANDS = ((0.1, "stable"), (0.25, "moderate"), (math.inf, "significant"))
#: a slice's own score PSI is given only when both sides have this many rows (fewer: too noisy)
MIN_SLICE_ROWS = 50


@attrs.frozen(kw_only=True)
class DriftRule:
    """When ``mmcore drift`` says drift: any modality's domain AUROC or the score PSI at or above these."""

    domain_auroc: float = 0.75
    psi: float = 0.25


def psi_from_counts(reference_counts, new_counts, floor=PSI_FLOOR):
    """Population stability index of two histograms on the same buckets (counts, not shares)."""
    reference = np.asarray(reference_counts, dtype=np.float64)
    new = np.asarray(new_counts, dtype=np.float64)
    if reference.shape != new.shape or reference.sum() <= 0 or new.sum() <= 0:
        raise ValueError("PSI needs two non-empty histograms on the same buckets")
    p = np.maximum(reference / reference.sum(), floor)
    q = np.maximum(new / new.sum(), floor)
    return float(np.sum((q - p) * np.log(q / p)))


def psi(reference_scores, new_scores, edges=SCORE_BUCKETS):
    """Population stability index of two score samples over ``edges`` (see the module docstring)."""
    return psi_from_counts(score_histogram(reference_scores, edges), score_histogram(new_scores, edges))


def psi_band(value):
    """``"stable"``, ``"moderate"`` or ``"significant"`` (the usual 0.1 / 0.25 bands)."""
    return next(name for upper, name in PSI_BANDS if value < upper)


def ks(reference_scores, new_scores):
    """``(statistic, p-value)`` of the two-sample Kolmogorov-Smirnov test (scipy)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference_scores, dtype=np.float64), np.asarray(new_scores, dtype=np.float64))
    return float(result.statistic), float(result.pvalue)


def _subsample(side, per_side, rng):
    return np.sort(rng.choice(len(side), size=per_side, replace=False))


def near_duplicate_clusters(*modalities, similarity=CLUSTER_SIMILARITY):
    """A cluster id per row joining rows that are near-duplicates in ANY modality: cosine similarity
    of the mean-centred embeddings ``>= similarity`` (centred: uncentred encoder features are all
    alike), transitively. Each argument is one modality's rows x dims, the rows aligned."""
    from mmcore.data.folds import group_rows
    from mmcore.quality.duplicates import duplicate_groups, near_duplicate_pairs

    columns = []
    for embeddings in modalities:
        x = as_matrix(embeddings).astype(np.float64)
        centred = x - x.mean(axis=0, keepdims=True)
        pairs = near_duplicate_pairs(centred, ["rows"] * len(x), threshold=similarity).pairs
        columns.append(duplicate_groups(len(x), pairs).tolist())
    return group_rows(*columns)


def domain_auroc(reference_embeddings, new_embeddings, *, folds=DOMAIN_FOLDS, seed=0, max_per_side=MAX_PER_SIDE,
                 groups=None):
    """Cross-validated AUROC of a classifier separating new rows from reference rows (see above).

    Both sides are subsampled (seeded) to ``min(len(reference), len(new), max_per_side)`` rows;
    each row is scored by the fold model that did not train on it, and the AUROC is taken over
    all of them. ``groups``: a cluster id per row of the two sides together (reference rows first,
    after the same subsampling), kept within one fold (``StratifiedGroupKFold``), so a campaign of
    near-identical ads is never learnt from its own copies; None (or clusters so large that a fold
    would train on one side only): plain ``StratifiedKFold``.
    Raises ValueError with fewer than ``folds`` rows on a side or unequal dims.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference = as_matrix(reference_embeddings, "reference embeddings")
    new = as_matrix(new_embeddings, "new embeddings")
    if reference.shape[1] != new.shape[1]:
        raise ValueError(f"reference and new embeddings differ in dims ({reference.shape[1]} vs {new.shape[1]})")
    per_side = min(len(reference), len(new), int(max_per_side))
    if per_side < folds:
        raise ValueError(f"a domain classifier needs at least {folds} rows on each side (got {len(reference)} and {len(new)})")
    rng = np.random.default_rng(seed)
    pick = [_subsample(side, per_side, rng) for side in (reference, new)]
    features = np.concatenate([reference[pick[0]], new[pick[1]]]).astype(np.float64)
    domain = np.r_[np.zeros(per_side, dtype=np.int64), np.ones(per_side, dtype=np.int64)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splits = None
    if groups is not None and len(np.unique(groups)) >= 2 * folds:
        grouped = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            features, domain, np.asarray(groups)))
        # a cluster as large as a side (every new row one campaign) leaves a fold one class: ungrouped then
        if all(np.unique(domain[train]).size == 2 for train, _ in grouped):
            splits = grouped
    if splits is None:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    decision = cross_val_predict(model, features, domain, cv=splits, method="decision_function")
    return float(roc_auc_score(domain, decision))


def _domain_clusters(reference, new, *, max_per_side, seed):
    """Near-duplicate clusters of the rows :func:`domain_auroc` will draw (the same seeded subsample)."""
    names = sorted(set(reference) & set(new))
    if not names:
        return None
    if len({len(reference[m]) for m in names}) != 1 or len({len(new[m]) for m in names}) != 1:
        return None  # the modalities' rows are not aligned: no joint clusters
    n_ref, n_new = len(reference[names[0]]), len(new[names[0]])
    per_side = min(n_ref, n_new, int(max_per_side))
    rng = np.random.default_rng(seed)
    pick = [_subsample(np.empty(n), per_side, rng) for n in (n_ref, n_new)]
    return near_duplicate_clusters(*(np.concatenate([as_matrix(reference[m])[pick[0]], as_matrix(new[m])[pick[1]]])
                                     for m in names))


@attrs.frozen(kw_only=True)
class DriftReport:
    """Everything ``drift.json`` holds; :meth:`to_json` is its content."""

    reference_rows: int
    new_rows: int
    threshold: float
    domain_auroc: dict  # {modality: {"auroc", "rows_per_side"}}
    score: dict  # psi, psi_band, ks_statistic, ks_pvalue, buckets, reference_counts, new_counts
    positive_rate: dict  # reference, new, shift
    empty_ocr_rate: dict  # reference, new, shift
    slices: dict  # {family: [row per slice]}
    rule: DriftRule
    drift: bool
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self):
        """:data:`DRIFT_EXIT_CODE` on drift, else 0."""
        return DRIFT_EXIT_CODE if self.drift else 0

    def to_json(self):
        """A JSON-ready dict (the content of ``drift.json``)."""
        return {"drift": self.drift, "exit_code": self.exit_code, "reasons": list(self.reasons),
                "rule": attrs.asdict(self.rule), "rows": {"reference": self.reference_rows, "new": self.new_rows},
                "threshold": self.threshold, "domain_auroc": self.domain_auroc, "score": self.score,
                "positive_rate": self.positive_rate, "empty_ocr_rate": self.empty_ocr_rate, "slices": self.slices,
                "notes": list(self.notes)}

    def write(self, path):
        """Write ``drift.json`` atomically; return its path."""
        return write_json(path, self.to_json())


def compare_to_profile(profile, *, scores, texts, embeddings, image_sizes=None, rule=DriftRule(), folds=DOMAIN_FOLDS,
                       seed=0, max_per_side=MAX_PER_SIDE):
    """A :class:`DriftReport` of new rows against a :class:`~mmcore.quality.profile.ReferenceProfile`.

    ``scores``: the new rows' calibrated scores; ``texts``: their OCR texts; ``embeddings``:
    ``{modality: rows x dims}`` of the same encoders; ``image_sizes``: ``(width, height)`` or None
    each (the size slices are compared only when given). A modality of the profile missing from
    ``embeddings`` is skipped with a note.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    texts = list(texts)
    if scores.size == 0 or len(texts) != scores.size:
        raise ValueError(f"drift needs one text per new score (scores: {scores.size}, texts: {len(texts)})")
    threshold = profile.threshold
    notes, domain = [], {}
    clusters = _domain_clusters(profile.embeddings, embeddings, max_per_side=max_per_side, seed=seed)
    for modality, reference in profile.embeddings.items():
        if modality not in embeddings:
            notes.append(f"no new {modality} embeddings: its domain AUROC is not computed")
            continue
        auroc = domain_auroc(reference, embeddings[modality], folds=folds, seed=seed, max_per_side=max_per_side,
                             groups=clusters)
        domain[modality] = {"auroc": round(auroc, 6),
                            "rows_per_side": min(len(reference), len(embeddings[modality]), max_per_side)}
    new_counts = score_histogram(scores)
    score_psi = psi_from_counts(profile.score_counts, new_counts)
    statistic, pvalue = ks(profile.sample_scores, scores)
    keys = slice_keys(texts, image_sizes)
    new_positive = float(np.mean(scores >= threshold))
    new_empty = keys["text"].count("text empty") / scores.size
    reasons = [f"{m} domain AUROC {v['auroc']:.3f} >= {rule.domain_auroc}" for m, v in domain.items()
               if v["auroc"] >= rule.domain_auroc]
    if score_psi >= rule.psi:
        reasons.append(f"score PSI {score_psi:.3f} >= {rule.psi}")
    return DriftReport(
        reference_rows=profile.rows, new_rows=int(scores.size), threshold=threshold, domain_auroc=domain,
        score={"psi": round(score_psi, 6), "psi_band": psi_band(score_psi), "ks_statistic": round(statistic, 6),
               "ks_pvalue": pvalue, "buckets": list(SCORE_BUCKETS), "reference_counts": list(profile.score_counts),
               "new_counts": [int(c) for c in new_counts]},
        positive_rate=_shift(profile.positives / profile.rows, new_positive),
        empty_ocr_rate=_shift(profile.empty_ocr / profile.rows, new_empty),
        slices=_slice_drift(profile, slice_summary(scores, threshold, keys), scores.size),
        rule=rule, drift=bool(reasons), reasons=tuple(reasons), notes=tuple(notes),
    )


def _shift(reference, new):
    return {"reference": round(reference, 6), "new": round(new, 6), "shift": round(new - reference, 6)}


def _slice_drift(profile, new_slices, new_rows):
    """Per family, one row per slice: each side's rows, share, positive rate, and the slice's score PSI."""
    out = {}
    for family, reference in profile.slices.items():
        if family not in new_slices:
            continue
        new = new_slices[family]
        rows = []
        for name in dict.fromkeys(_family_order(family) + sorted(set(reference) | set(new))):
            ref, cur = reference.get(name), new.get(name)
            if ref is None and cur is None:
                continue
            ref_rows, new_rows_in = (ref or {}).get("rows", 0), (cur or {}).get("rows", 0)
            enough = ref_rows >= MIN_SLICE_ROWS and new_rows_in >= MIN_SLICE_ROWS
            rows.append({
                "slice": name, "reference_rows": ref_rows, "new_rows": new_rows_in,
                "reference_share": round(ref_rows / profile.rows, 6), "new_share": round(new_rows_in / new_rows, 6),
                "reference_positive_rate": round(ref["positives"] / ref_rows, 6) if ref_rows else None,
                "new_positive_rate": round(cur["positives"] / new_rows_in, 6) if new_rows_in else None,
                "psi": round(psi_from_counts(ref["score_counts"], cur["score_counts"]), 6) if enough else None,
            })
        out[family] = rows
    return out
