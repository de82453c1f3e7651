"""Folds for k-fold bagging and label audits: stratified by label and grouped, so that rows
sharing an image, a text or a group value never straddle two folds (a near-copy in the
training part would make its twin's held-out score a memory, not a prediction).

Groups come from a union of keys (:func:`group_rows`): rows sharing ANY key — the image's
content hash, the OCR text, a group column's value — are one group, transitively (union-find).
Folds are then filled greedily (:func:`assign_folds`): the largest groups first, each into the
fold that keeps the positive and negative counts most even (each class relative to its total),
ties to the smaller fold, then to a seeded order. For rows that are their own group this gives
per-fold positive and negative counts within one of each other, and sizes within one.

scikit-learn's ``StratifiedGroupKFold`` was considered and not used: its greedy pass balances
the class proportions only, not the fold sizes; it does not keep each class in every fold (on
23 rows in 12 groups with shuffle=True it left a fold of 3 rows with no positive while another
held 4 of 8); without shuffle it is not seeded; and it would make scikit-learn a dependency of
training. This module needs numpy only.
"""

from __future__ import annotations

import numpy as np

from mmcore.errors import DataError

_CLASS_NAMES = {1: "positive", 0: "negative"}


def _no_key(value):
    return value is None or (isinstance(value, str) and not value.strip())


def group_rows(*key_columns):
    """Group id per row (int64 [N], numbered by first row): rows sharing a value in any column are one group.

    Each column is a sequence of N hashable keys (image content hashes, texts, group values).
    ``None``, ``""`` and whitespace-only strings are no key: an empty OCR text joins nothing.
    Values are compared within their column only (a text equal to a group value joins nothing).
    """
    if not key_columns:
        raise ValueError("group_rows needs at least one column of keys")
    lengths = {len(column) for column in key_columns}
    if len(lengths) != 1:
        raise ValueError(f"key columns differ in length ({', '.join(str(len(c)) for c in key_columns)})")
    (n,) = lengths
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for column in key_columns:
        first_row = {}
        for row, key in enumerate(column):
            if _no_key(key):
                continue
            other = first_row.setdefault(key, row)
            a, b = root(row), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is the group's first row
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    _, groups = np.unique(roots, return_inverse=True)  # roots are first rows: ids follow first appearance
    return groups.astype(np.int64)


def _fewer(most):
    """What to do when only ``most`` folds are possible."""
    return f"; use at most {most} folds" if most >= 2 else "; no split into folds is possible"


def _check_labels(labels):
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1 (got {labels[~np.isin(labels, (0, 1))][0]!r})")
    return labels.astype(np.int64)


def assign_folds(labels, groups, k, seed, *, what="the labelled rows"):
    """Fold of each row (int64 [N] in ``0..k-1``), stratified by the 0/1 ``labels`` and grouped.

    ``groups``: a group id per row (e.g. from :func:`group_rows`), or None for one group per row;
    a group's rows always share a fold. ``seed`` decides between equally good choices, so the
    same inputs and seed give the same folds. Every fold holds both classes, or DataError (one
    line starting with ``what``, e.g. the CSVs' names) says why it cannot: fewer groups than
    folds, or fewer groups holding a class than folds.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (got {k!r})")
    labels = _check_labels(labels)
    n = labels.size
    group_of_row = np.arange(n) if groups is None else np.asarray(groups).reshape(-1)
    if group_of_row.size != n:
        raise ValueError(f"groups and labels differ in length ({group_of_row.size} vs {n})")
    _, group_of_row = np.unique(group_of_row, return_inverse=True)
    count = int(group_of_row.max()) + 1 if n else 0
    if k > count:
        raise DataError(
            f"{what}: {k} folds need at least {k} groups of rows, there are {count}"
            f" (rows sharing an image, a text or a group value are one group){_fewer(count)}"
        )
    positives = np.bincount(group_of_row, weights=labels, minlength=count).astype(np.int64)
    sizes = np.bincount(group_of_row, minlength=count).astype(np.int64)
    by_class = {1: positives, 0: sizes - positives}
    for label, per_group in by_class.items():
        holding = int((per_group > 0).sum())
        if holding < k:
            raise DataError(
                f"{what}: {k} folds need a {_CLASS_NAMES[label]} row in each fold, but the"
                f" {_CLASS_NAMES[label]} rows lie in {holding} group{'s' if holding != 1 else ''}{_fewer(holding)}"
            )

    rng = np.random.default_rng(seed)
    shuffle = rng.permutation(count)
    fold_preference = rng.permutation(k)
    minority = by_class[1] if by_class[1].sum() <= by_class[0].sum() else by_class[0]
    # largest groups first; among equal sizes those with more of the rarer class, then a seeded order
    order = np.lexsort((shuffle, -minority, -sizes))

    totals = {label: int(per_group.sum()) for label, per_group in by_class.items()}
    in_fold = {label: np.zeros(k, dtype=np.int64) for label in by_class}
    fold_sizes = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(count, dtype=np.int64)
    for group in order:
        held = {label: int(by_class[label][group]) for label in by_class}
        # a fold still missing a class this group holds comes first: every fold gets both classes
        lacking = [f for f in range(k) if any(held[c] and not in_fold[c][f] for c in held)]
        # the squared deviation each class's count would add, relative to its total; integers, so
        # exact: sum_c held_c * in_fold_c[f] * (product of the other totals)
        cost = held[1] * in_fold[1] * totals[0] + held[0] * in_fold[0] * totals[1]
        fold = min(lacking or range(k), key=lambda f: (cost[f], fold_sizes[f], fold_preference[f]))
        fold_of_group[group] = fold
        fold_sizes[fold] += sizes[group]
        for label in by_class:
            in_fold[label][fold] += held[label]

    for label in by_class:
        empty = np.flatnonzero(in_fold[label] == 0)
        if empty.size:
            raise DataError(
                f"{what}: fold {int(empty[0]) + 1} of {k} would hold no {_CLASS_NAMES[label]} row"
                f" (the groups are too uneven to spread); use fewer folds"
            )
    return fold_of_group[group_of_row]


def fold_splits(folds):
    """For each fold f (in order): ``(training positions, held-out positions)``, sorted int64 arrays.

    The held-out positions are the rows of fold f; the training positions all the others.
    """
    folds = np.asarray(folds).reshape(-1)
    k = int(folds.max()) + 1 if folds.size else 0
    present = np.bincount(folds, minlength=k) if folds.size else np.zeros(0, dtype=np.int64)
    if folds.size and (folds.min() < 0 or (present == 0).any()):
        raise ValueError(f"folds must number every fold from 0 to {k - 1} (got {sorted(set(folds.tolist()))})")
    positions = np.arange(folds.size, dtype=np.int64)
    return [(positions[folds != f], positions[folds == f]) for f in range(k)]


def fold_summary(folds, labels):
    """One dict per fold, ``{"fold", "rows", "positives"}``: the table a run logs and records."""
    labels = _check_labels(labels)
    folds = np.asarray(folds).reshape(-1)
    return [
        {"fold": f, "rows": int(held.size), "positives": int(labels[held].sum())}
        for f, (_, held) in enumerate(fold_splits(folds))
    ]
