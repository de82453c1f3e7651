"""Suspect labels from out-of-fold scores, by confident learning (cleanlab).

The scores must be **out-of-fold**: each row scored by a head that never saw it (k-fold over the
labelled rows). A model's in-sample scores have memorised its flipped labels and would hide them.

Nothing of cleanlab is re-implemented: :func:`cleanlab.filter.find_label_issues` decides which
labels are issues (``prune_by_noise_rate``: it estimates how many labels of each class are
wrong from the confident joint and flags that many, least confident first; Northcutt, Jiang and
Chuang, "Confident Learning", JAIR 2021), and :func:`cleanlab.rank.get_label_quality_scores`
scores every label (``self_confidence``: the out-of-fold probability of the given label).

The table lists every row, worst first: the flagged rows by quality (lowest first), then the
others by quality, so its top K are the K rows most likely mislabelled and the first
``flagged`` rows are exactly cleanlab's issues.
"""

from __future__ import annotations

import csv

import attrs
import numpy as np

from mmcore.evaluation.metrics import check_scores_labels
from mmcore.io import atomic_open

#: the columns of ``audit/label_issues.csv``, in order
LABEL_ISSUE_COLUMNS = ("rank", "row", "file", "given_label", "suggested_label", "oof_score", "label_quality", "is_issue")
FIXES = ("drop", "relabel")


@attrs.frozen(kw_only=True)
class LabelIssue:
    """One labelled row of the audit, as ``label_issues.csv`` lists it."""

    rank: int  # 1 = the most suspect label
    position: int  # index into the arrays the audit was given
    row: str  # the caller's row id (e.g. "train:12"); the position when none was given
    file: str
    given_label: int
    suggested_label: int  # the other class when flagged, else the given label
    oof_score: float  # out-of-fold probability of label 1
    label_quality: float  # cleanlab's self-confidence: the out-of-fold probability of the given label
    is_issue: bool


@attrs.frozen(kw_only=True)
class LabelIssues:
    """Every audited row, worst first (see the module docstring), and how many cleanlab flagged."""

    rows: tuple[LabelIssue, ...]
    flagged: int

    def mask(self):
        """A bool per position (in the order the audit was given): True where cleanlab flagged it."""
        out = np.zeros(len(self.rows), dtype=bool)
        out[[r.position for r in self.rows if r.is_issue]] = True
        return out


def platt_scores(logits, labels):
    """Out-of-fold logits mapped to probabilities by Platt scaling: a logistic fit of the given
    ``labels`` on the logits (scikit-learn), ``sigmoid(a * logit + b)``.

    Monotone, so each class's ranking is unchanged, but the two classes' confidences become
    comparable: a loss such as focal (mmcore's default) squeezes raw probabilities towards its own
    centre, and ranking class-0 rows against class-1 rows on raw ``sigmoid(logit)`` would put a
    whole class first. cleanlab asks for calibrated probabilities for the same reason.
    """
    from sklearn.linear_model import LogisticRegression

    logits = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    labels = np.asarray(labels).reshape(-1)
    if not np.isfinite(logits).all():
        raise ValueError("out-of-fold logits must be finite")
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(logits, labels)
    return fit.predict_proba(logits)[:, 1]


def find_label_issues(oof_scores, labels, *, row_ids=None, files=None):
    """Audit binary labels against out-of-fold probabilities of label 1 with cleanlab.

    ``row_ids`` and ``files`` (one per row, optional) are carried into the table. Raises
    ValueError when the scores are not probabilities, lengths differ, or one class is missing
    (confident learning estimates each class's noise from the other).
    """
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    scores, labels = check_scores_labels(oof_scores, labels, what="out-of-fold scores", purpose="audit")
    n = scores.size
    row_ids = [str(i) for i in range(n)] if row_ids is None else [str(r) for r in row_ids]
    files = [""] * n if files is None else ["" if f is None else str(f) for f in files]
    if len(row_ids) != n or len(files) != n:
        raise ValueError(f"row ids ({len(row_ids)}) and files ({len(files)}) must match the scores ({n})")
    missing = [c for c in (0, 1) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"no row is labelled {missing[0]}; an audit needs both classes")
    pred_probs = np.column_stack([1.0 - scores, scores])
    # n_jobs=1: cleanlab otherwise forks a pool per call, slower than the work on a few thousand rows
    flagged = np.asarray(cleanlab_find(labels, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1), dtype=bool)
    quality = np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), dtype=np.float64)
    order = np.lexsort((np.arange(n), quality, ~flagged))  # flagged first, then lowest quality, then position
    rows = tuple(
        LabelIssue(
            rank=rank, position=int(i), row=row_ids[i], file=files[i], given_label=int(labels[i]),
            suggested_label=int(1 - labels[i]) if flagged[i] else int(labels[i]), oof_score=float(scores[i]),
            label_quality=float(quality[i]), is_issue=bool(flagged[i]),
        )
        for rank, i in enumerate(order, start=1)
    )
    return LabelIssues(rows=rows, flagged=int(flagged.sum()))


def write_label_issues_csv(path, issues):
    """Write ``label_issues.csv`` (:data:`LABEL_ISSUE_COLUMNS`, worst first) atomically; return its path."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_ISSUE_COLUMNS)
        for r in issues.rows:
            writer.writerow([r.rank, r.row, r.file, r.given_label, r.suggested_label, f"{r.oof_score:.6f}",
                             f"{r.label_quality:.6f}", int(r.is_issue)])
    return path


def fixed_labels(issues, fix):
    """``(keep, labels)`` per position for ``--fix``: ``drop`` keeps every unflagged row with its
    label; ``relabel`` keeps every row, a flagged one with its suggested label."""
    if fix not in FIXES:
        raise ValueError(f"unknown fix {fix!r}; choose one of {', '.join(FIXES)}")
    by_position = sorted(issues.rows, key=lambda r: r.position)
    flagged = np.array([r.is_issue for r in by_position], dtype=bool)
    keep = ~flagged if fix == "drop" else np.ones(len(by_position), dtype=bool)
    labels = np.array([r.suggested_label if fix == "relabel" else r.given_label for r in by_position], dtype=np.int64)
    return keep, labels
