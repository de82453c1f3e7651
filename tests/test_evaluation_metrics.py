"""binary_metrics against scikit-learn on the same scores, and a hand-computed ECE."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from mmcore.evaluation import binary_metrics, calibration_bins, metrics_report


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    scores[:40] = np.round(scores[:40], 1)  # some tied scores, and some exactly at a threshold
    return scores, labels


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.7])
def test_metrics_match_sklearn(scored, threshold):
    scores, labels = scored
    got = binary_metrics(scores, labels, threshold)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted).ravel()

    assert got["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-6)
    assert got["auprc"] == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-6)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=1e-12)
    assert got["precision"] == pytest.approx(skm.precision_score(labels, predicted), abs=1e-12)
    assert got["recall"] == pytest.approx(skm.recall_score(labels, predicted), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(labels, predicted), abs=1e-12)
    assert got["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-12)
    assert got["brier"] == pytest.approx(skm.brier_score_loss(labels, scores), abs=1e-12)
    assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (tn, fp, fn, tp)
    assert got["n"] == len(labels) and got["positives"] == labels.sum()
    assert got["threshold"] == threshold


def test_score_equal_to_threshold_counts_as_positive():
    got = binary_metrics([0.2, 0.6, 0.6, 0.9], [0, 0, 1, 1], threshold=0.6)
    assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (1, 1, 0, 2)


def test_ece_matches_hand_computation(scored):
    scores, labels = scored
    # 15 equal-width bins [k/15, (k+1)/15); ECE = sum over bins of |positive rate - mean score| * share
    expected = 0.0
    for k in range(15):
        members = (scores >= k / 15) & (scores < (k + 1) / 15)
        if k == 14:
            members |= scores == 1.0
        if members.any():
            expected += abs(labels[members].mean() - scores[members].mean()) * members.mean()
    assert binary_metrics(scores, labels)["ece"] == pytest.approx(expected, abs=1e-9)


def test_ece_is_zero_for_perfectly_calibrated_bins():
    # each bin's scores average exactly to its positive rate
    scores = np.array([0.1] * 10 + [0.8] * 10)
    labels = np.array([1] + [0] * 9 + [1] * 8 + [0] * 2)
    assert binary_metrics(scores, labels)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_calibration_bins_count_every_sample(scored):
    scores, labels = scored
    bins = calibration_bins(scores, labels)
    assert len(bins) == 15
    assert sum(b["count"] for b in bins) == len(scores)
    for b in bins:
        if b["count"]:
            assert b["lower"] <= b["mean_score"] <= b["upper"]
    # the plotted bins are the ones the ECE is computed on
    ece = sum(abs(b["positive_rate"] - b["mean_score"]) * b["count"] for b in bins if b["count"]) / len(scores)
    assert ece == pytest.approx(binary_metrics(scores, labels)["ece"], abs=1e-9)


def test_single_class_gives_none_not_nan_and_is_json_safe():
    got = binary_metrics([0.1, 0.7, 0.9], [1, 1, 1], 0.5)
    assert got["auroc"] is None and got["auprc"] is None
    assert got["specificity"] == 0.0  # no negatives: 0/0 counts as 0, like sklearn's zero_division=0
    assert got["recall"] == pytest.approx(2 / 3)
    json.dumps(got, allow_nan=False)


def test_no_predicted_positive_gives_zero_precision():
    got = binary_metrics([0.1, 0.2, 0.3], [0, 1, 0], 0.9)
    assert got["precision"] == 0.0 and got["f1"] == 0.0 and got["tp"] == 0


def test_values_are_plain_python_types(scored):
    got = binary_metrics(*scored)
    for key, value in got.items():
        assert type(value) in (int, float), key
    json.dumps(got, allow_nan=False)


def test_metrics_report_has_both_thresholds(scored):
    report = metrics_report(*scored, 0.3)
    assert report["at_0.5"]["threshold"] == 0.5 and report["at_threshold"]["threshold"] == 0.3
    assert report["at_0.5"]["tp"] <= report["at_threshold"]["tp"]


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([0.1, 0.2], [0, 1, 1], "differ in length"),
        ([], [], "no samples"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([-2.0, 3.0], [0, 1], "probabilities in [0, 1]"),
        ([0.1, 0.2], [0, 2], "labels must be 0 or 1"),
    ],
)
def test_bad_input_is_a_clear_error(scores, labels, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        binary_metrics(scores, labels)
