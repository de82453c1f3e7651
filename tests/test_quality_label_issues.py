"""Suspect labels from out-of-fold scores (cleanlab), the --fix arrays, label_issues.csv, and the
label-noise rate of each slice with its Wilson interval."""

import csv

import numpy as np
import pytest

from mmcore.evaluation.explain import slice_keys
from mmcore.quality import find_label_issues, fixed_labels, label_noise_by_slice, wilson_interval, write_label_issues_csv
from mmcore.quality.label_issues import LABEL_ISSUE_COLUMNS

pytest.importorskip("cleanlab", reason="cleanlab not installed (pip install 'mmcore[quality]')")

FLIPPED = [3, 17, 40, 58, 91, 110]


def separable(n=120, seed=0):
    """True labels and out-of-fold scores that separate them well: positives 0.85-0.99, negatives 0.01-0.15."""
    rng = np.random.default_rng(seed)
    truth = (np.arange(n) % 2).astype(int)
    scores = np.where(truth == 1, rng.uniform(0.85, 0.99, n), rng.uniform(0.01, 0.15, n))
    return truth, scores


def flipped(truth):
    given = truth.copy()
    given[FLIPPED] = 1 - given[FLIPPED]
    return given


def test_flipped_labels_come_first_and_only_they_are_flagged():
    truth, scores = separable()
    issues = find_label_issues(scores, flipped(truth), row_ids=[f"train:{i + 2}" for i in range(120)],
                               files=[f"img/{i}.jpg" for i in range(120)])
    assert issues.flagged == len(FLIPPED)
    top = issues.rows[: len(FLIPPED)]
    assert sorted(r.position for r in top) == FLIPPED
    assert all(r.is_issue for r in top) and not any(r.is_issue for r in issues.rows[len(FLIPPED):])
    assert [r.rank for r in issues.rows] == list(range(1, 121))
    first = top[0]
    # the suggested label is the true one; the quality is the OOF probability of the given label
    assert first.suggested_label == truth[first.position] == 1 - first.given_label
    assert first.label_quality == pytest.approx(scores[first.position] if first.given_label else 1 - scores[first.position])
    assert (first.row, first.file) == (f"train:{first.position + 2}", f"img/{first.position}.jpg")
    # worst first: quality rises within the flagged rows and again within the rest
    qualities = [r.label_quality for r in issues.rows]
    assert qualities[:6] == sorted(qualities[:6]) and qualities[6:] == sorted(qualities[6:])
    assert issues.mask().nonzero()[0].tolist() == FLIPPED


def test_flagged_rows_come_first_even_when_an_unflagged_label_scores_lower():
    # overlapping classes: cleanlab leaves some low-quality labels unflagged (its per-class thresholds)
    rng = np.random.default_rng(0)
    truth = (rng.uniform(size=200) < 0.5).astype(int)
    scores = np.where(truth == 1, rng.beta(3, 2, 200), rng.beta(1, 8, 200))
    given = truth.copy()
    flips = rng.choice(200, 10, replace=False)
    given[flips] = 1 - given[flips]
    issues = find_label_issues(scores, given)
    flagged = [r.label_quality for r in issues.rows[: issues.flagged]]
    rest = [r.label_quality for r in issues.rows[issues.flagged:]]
    assert issues.flagged == 11 and all(r.is_issue for r in issues.rows[: issues.flagged])
    assert max(flagged) > min(rest)  # by quality alone, an unflagged row would rank among the issues
    assert flagged == sorted(flagged) and rest == sorted(rest)


def test_clean_labels_flag_nothing():
    truth, scores = separable(seed=1)
    issues = find_label_issues(scores, truth)
    assert issues.flagged == 0
    assert all(r.suggested_label == r.given_label for r in issues.rows)


def test_fix_drops_or_relabels_the_flagged_rows_only():
    truth, scores = separable()
    issues = find_label_issues(scores, flipped(truth))
    keep, labels = fixed_labels(issues, "drop")
    assert np.flatnonzero(~keep).tolist() == FLIPPED and (labels == flipped(truth)).all()
    keep, labels = fixed_labels(issues, "relabel")
    assert keep.all() and (labels == truth).all()
    with pytest.raises(ValueError, match="unknown fix 'fix'; choose one of drop, relabel"):
        fixed_labels(issues, "fix")


def test_label_issues_csv(tmp_path):
    truth, scores = separable()
    issues = find_label_issues(scores, flipped(truth), files=[f"img/{i}.jpg" for i in range(120)])
    path = write_label_issues_csv(tmp_path / "audit" / "label_issues.csv", issues)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == LABEL_ISSUE_COLUMNS
    assert len(rows) == 121
    first = issues.rows[0]
    assert rows[1] == ["1", str(first.position), f"img/{first.position}.jpg", str(first.given_label),
                       str(first.suggested_label), f"{first.oof_score:.6f}", f"{first.label_quality:.6f}", "1"]
    assert [r[-1] for r in rows[1:]].count("1") == len(FLIPPED)


def test_one_class_or_bad_scores_are_refused():
    with pytest.raises(ValueError, match="no row is labelled 0; an audit needs both classes"):
        find_label_issues([0.2, 0.9, 0.7], [1, 1, 1])
    with pytest.raises(ValueError, match=r"scores must be probabilities in \[0, 1\]"):
        find_label_issues([0.2, 1.5], [0, 1])


def test_wilson_interval_matches_the_published_values():
    # Brown, Cai & DasGupta (2001): 3 of 10 -> (0.1078, 0.6032); 0 of 30 -> upper z^2 / (n + z^2)
    assert wilson_interval(3, 10) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    low, high = wilson_interval(0, 30)
    assert low == 0.0 and high == pytest.approx(1.959964**2 / (30 + 1.959964**2), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_label_noise_per_slice():
    # 10 rows with OCR text, 3 of them flagged; 30 without text, none flagged
    texts = ["50% OFF today"] * 10 + [""] * 30
    flagged = np.zeros(40, dtype=bool)
    flagged[[0, 4, 9]] = True
    noise = label_noise_by_slice(flagged, slice_keys(texts))
    assert noise["text"] == [
        {"slice": "text present", "n": 10, "issues": 3, "rate": 0.3, "low": 0.107791, "high": 0.603222},
        {"slice": "text empty", "n": 30, "issues": 0, "rate": 0.0, "low": 0.0, "high": 0.113513},
    ]
    assert [r["slice"] for r in noise["ocr_length"]] == ["0 chars (empty)", "1-20 chars"]
    with pytest.raises(ValueError, match="slice family 'text' names 40 rows, the audit has 3"):
        label_noise_by_slice([True, False, False], slice_keys(texts))
