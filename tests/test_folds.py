"""Stratified, grouped folds (mmcore.data.folds): groups never straddle, counts balanced, seeded, one-line errors."""

import numpy as np
import pytest

from mmcore.data.folds import assign_folds, fold_splits, fold_summary, group_rows
from mmcore.errors import DataError


def test_rows_sharing_any_key_are_one_group_transitively():
    images = ["a", "b", "b", "c", "d", "e"]
    texts = ["sale", "sale", "", "", "   ", None]
    group_column = [None, None, None, None, "batch7", "batch7"]
    # 0-1 share a text, 1-2 an image: {0, 1, 2}. 3 and 4 have empty texts, which join nothing;
    # 4 and 5 share a group value: {4, 5}. Ids follow the first row of each group.
    assert group_rows(images, texts, group_column).tolist() == [0, 0, 0, 1, 2, 2]
    assert group_rows(images).tolist() == [0, 1, 1, 2, 3, 4]
    # a key matches within its own column only
    assert group_rows(["x", "y"], ["y", "z"]).tolist() == [0, 1]


def test_group_rows_rejects_columns_of_different_lengths():
    with pytest.raises(ValueError, match=r"^key columns differ in length \(2, 3\)$"):
        group_rows(["a", "b"], ["a", "b", "c"])


@pytest.mark.parametrize(("positives", "negatives", "k"), [(7, 13, 5), (3, 17, 3), (10, 10, 4), (2, 9, 2), (5, 6, 5), (50, 3, 3)])
def test_single_rows_are_stratified_within_one_row(positives, negatives, k):
    labels = np.array([1] * positives + [0] * negatives)
    for seed in range(10):
        folds = assign_folds(labels, None, k, seed)
        sizes = np.bincount(folds, minlength=k)
        fold_positives = np.bincount(folds, weights=labels, minlength=k).astype(int)
        assert sorted(set(fold_positives.tolist())) in ([positives // k], [positives // k, positives // k + 1])
        assert sizes.max() - sizes.min() <= 1
        assert sorted(set((sizes - fold_positives).tolist())) in ([negatives // k], [negatives // k, negatives // k + 1])


def test_groups_never_straddle_and_folds_stay_balanced_on_random_cases():
    rng = np.random.default_rng(0)
    checked = 0
    for case in range(300):
        n = int(rng.integers(10, 150))
        k = int(rng.integers(2, 7))
        groups = rng.integers(0, int(rng.integers(k, n + 1)), n)
        labels = (rng.random(n) < rng.uniform(0.15, 0.6)).astype(int)
        try:
            folds = assign_folds(labels, groups, k, case)
        except DataError:
            continue  # too few groups holding a class: the message is tested below
        checked += 1
        for group in np.unique(groups):
            assert np.unique(folds[groups == group]).size == 1
        sizes = np.bincount(folds, minlength=k)
        per_class = [np.bincount(folds, weights=labels == c, minlength=k) for c in (0, 1)]
        assert all((counts > 0).all() for counts in per_class)
        # greedy largest-first: no fold ends more than one group's size above another
        assert sizes.max() - sizes.min() <= np.bincount(groups).max()
    assert checked > 250


def test_every_fold_holds_both_classes_where_scikit_learns_split_leaves_one_without_positives():
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(0)
    groups, labels = rng.integers(0, 12, 23), rng.integers(0, 2, 23)
    theirs = np.empty(23, dtype=int)
    for fold, (_, held) in enumerate(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(labels, labels, groups)):
        theirs[held] = fold
    assert 0 in np.bincount(theirs, weights=labels, minlength=5)
    ours = assign_folds(labels, groups, 5, 0)
    assert np.bincount(ours, weights=labels, minlength=5).min() >= 1
    assert np.bincount(ours, weights=1 - labels, minlength=5).min() >= 1
    assert np.ptp(np.bincount(ours)) < np.ptp(np.bincount(theirs))


def test_the_same_seed_gives_the_same_folds_and_another_seed_others():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    groups = rng.integers(0, 120, 200)
    first = assign_folds(labels, groups, 5, 11)
    assert np.array_equal(assign_folds(labels, groups, 5, 11), first)
    assert not np.array_equal(assign_folds(labels, groups, 5, 12), first)


def test_fold_splits_hold_out_each_fold_once():
    folds = np.array([2, 0, 1, 0, 2, 1, 1])
    splits = fold_splits(folds)
    assert [held.tolist() for _, held in splits] == [[1, 3], [2, 5, 6], [0, 4]]
    assert [train.tolist() for train, _ in splits] == [[0, 2, 4, 5, 6], [0, 1, 3, 4], [1, 2, 3, 5, 6]]
    assert fold_summary(folds, [1, 0, 1, 1, 0, 0, 0]) == [
        {"fold": 0, "rows": 2, "positives": 1},
        {"fold": 1, "rows": 3, "positives": 1},
        {"fold": 2, "rows": 2, "positives": 1},
    ]
    with pytest.raises(ValueError, match=r"^folds must number every fold from 0 to 2 \(got \[0, 2\]\)$"):
        fold_splits([0, 2, 2])


@pytest.mark.parametrize(
    ("labels", "groups", "k", "line"),
    [
        ([1, 0, 1, 0], [0, 0, 1, 1], 3,
         "train.csv + val.csv: 3 folds need at least 3 groups of rows, there are 2"
         " (rows sharing an image, a text or a group value are one group); use at most 2 folds"),
        ([1, 0, 1, 0, 0, 0], [0, 1, 0, 2, 3, 4], 2,
         "train.csv + val.csv: 2 folds need a positive row in each fold, but the positive rows lie in 1 group;"
         " no split into folds is possible"),
        ([1, 1, 1, 0, 0, 1], None, 3,
         "train.csv + val.csv: 3 folds need a negative row in each fold, but the negative rows lie in 2 groups;"
         " use at most 2 folds"),
    ],
)
def test_impossible_splits_are_one_line(labels, groups, k, line):
    with pytest.raises(DataError) as error:
        assign_folds(labels, groups, k, 0, what="train.csv + val.csv")
    assert error.value.problems == [line]


def test_k_must_be_at_least_two():
    with pytest.raises(ValueError, match=r"^k must be an integer >= 2 \(got 1\)$"):
        assign_folds([0, 1], None, 1, 0)


def test_a_fold_still_missing_a_class_gets_the_next_group_holding_it():
    # groups (largest first): x = 1,1,0 -> fold A; y = 0,0,0 -> an empty fold, B; z = 1,0 -> C (no rows
    # yet). w = 1,0 by counts alone would join C again (cost 1*7 + 1*4 = 11 against B's 3*4 = 12) and
    # leave B without a positive; B is still missing a positive, so w goes there. v = 0 goes anywhere.
    labels = [1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    groups = ["x", "x", "x", "y", "y", "y", "z", "z", "w", "w", "v"]
    for seed in range(5):
        folds = assign_folds(labels, group_rows(groups), 3, seed)
        assert sorted(np.bincount(folds, weights=labels, minlength=3).tolist()) == [1, 1, 2]
