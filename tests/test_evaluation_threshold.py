"""Threshold rules on small hand-checked examples, and recipe value validation."""

import pytest

from mmcore.evaluation import binary_metrics, parse_threshold_rule, tune_threshold

# P = 5 positives, N = 3 negatives. Predicting positive when score >= t:
#   t     tp fp  precision  recall  F1 = 2tp/(tp+fp+P)  J = TPR - FPR
#   0.9    1  0    1.000    0.2       2/6  = 0.333        0.200
#   0.8    2  0    1.000    0.4       4/7  = 0.571        0.400
#   0.7    2  1    0.667    0.4       4/8  = 0.500        0.067
#   0.6    3  1    0.750    0.6       6/9  = 0.667        0.267
#   0.55   4  1    0.800    0.8       8/10 = 0.800        0.467   <- max J
#   0.4    4  2    0.667    0.8       8/11 = 0.727        0.133
#   0.3    5  2    0.714    1.0      10/12 = 0.833        0.333   <- max F1
#   0.2    5  3    0.625    1.0      10/13 = 0.769        0.000
SCORES = [0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3, 0.2]
LABELS = [1, 1, 0, 1, 1, 0, 1, 0]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("f1", 0.3),
        ("youden", 0.55),
        ({"precision": 0.75}, 0.55),  # precision >= 0.75 at 0.9, 0.8, 0.6, 0.55: the lowest
        ({"precision": 0.95}, 0.8),  # only 0.9 and 0.8 reach it
        ({"recall": 0.6}, 0.6),  # recall >= 0.6 from 0.6 down: the highest
        ({"recall": 0.9}, 0.3),
        ({"recall": 1.0}, 0.3),
        (0.42, 0.42),
    ],
)
def test_rule_picks_hand_checked_threshold(rule, expected):
    threshold, description = tune_threshold(SCORES, LABELS, rule)
    assert threshold == expected
    assert isinstance(threshold, float) and description


def test_descriptions_report_the_achieved_values():
    assert tune_threshold(SCORES, LABELS, "f1")[1] == (
        "max F1 on validation (F1=0.833, precision=0.714, recall=1.000)"
    )
    assert "J=0.467" in tune_threshold(SCORES, LABELS, "youden")[1]
    assert tune_threshold(SCORES, LABELS, 0.42)[1] == "fixed threshold 0.42 from the recipe"


def test_tuned_threshold_agrees_with_metrics_at_that_threshold():
    threshold, _ = tune_threshold(SCORES, LABELS, {"precision": 0.75})
    got = binary_metrics(SCORES, LABELS, threshold)
    assert (got["precision"], got["recall"]) == (0.8, 0.8)


def test_unreachable_precision_falls_back_to_best_precision_and_says_so():
    # t=0.9: precision 0/1; t=0.8: 1/2; t=0.7: 1/3 -> best is 0.5 at 0.8
    threshold, description = tune_threshold([0.9, 0.8, 0.7], [0, 1, 0], {"precision": 0.95})
    assert threshold == 0.8
    assert "unreachable" in description and "precision=0.500" in description


def test_f1_tie_goes_to_the_highest_threshold():
    # P = 2: t=0.9 -> F1 = 2/3; t=0.7 -> 2/4; t=0.6 -> 2/5; t=0.4 -> tp 2, fp 2 -> 4/6 = 2/3 (tie)
    threshold, _ = tune_threshold([0.9, 0.7, 0.6, 0.4], [1, 0, 0, 1], "f1")
    assert threshold == 0.9


def test_tied_scores_form_one_candidate():
    # 0.7 is shared by a positive and a negative: both flip together, so F1 at 0.7 is 2/4
    # and at 0.2 it is 4/5; there is no threshold between the two 0.7 scores
    threshold, description = tune_threshold([0.7, 0.7, 0.2], [1, 0, 1], "f1")
    assert threshold == 0.2 and "F1=0.800" in description


def test_single_class_keeps_half():
    threshold, description = tune_threshold([0.2, 0.9], [1, 1], "f1")
    assert threshold == 0.5 and "single class" in description


@pytest.mark.parametrize(
    "value, expected",
    [
        ("f1", "f1"),
        ("youden", "youden"),
        ("F1", "f1"),
        ({"precision": 0.95}, {"precision": 0.95}),
        ({"recall": 1}, {"recall": 1.0}),
        (0.42, 0.42),
    ],
)
def test_parse_accepts_valid_rules(value, expected):
    assert parse_threshold_rule(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("youdn", "(got 'youdn') (did you mean youden?)"),
        ("f2", "(got 'f2')"),
        ({"precison": 0.9}, "unknown target 'precison' (did you mean precision?)"),
        ({"precision": 1.5}, "precision target must be a number in (0, 1] (got 1.5)"),
        ({"recall": "high"}, "recall target must be a number in (0, 1] (got 'high')"),
        ({"precision": 0.9, "recall": 0.9}, "exactly one key"),
        (1.2, "or a number in (0, 1) (got 1.2)"),
        (0, "(got 0)"),
        (True, "(got True)"),
        (None, "(got None)"),
    ],
)
def test_parse_rejects_bad_rules_with_clear_message(value, message):
    with pytest.raises(ValueError) as error:
        parse_threshold_rule(value)
    assert message in str(error.value)
    assert str(error.value).count("\n") == 0
