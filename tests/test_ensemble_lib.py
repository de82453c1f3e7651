"""Greedy ensemble selection (mmcore.evaluation.ensemble) on hand-made members whose paths are
worked out in the comments, and the combined score and logit."""

import math

import numpy as np
import pytest

from mmcore.evaluation.ensemble import COMBINED_EPS, combine_scores, combined_logit, select_ensemble
from mmcore.evaluation.metrics import rank_auroc

# three positives then three negatives; AUROC counts the 9 (positive, negative) pairs ordered right
LABELS = [1, 1, 1, 0, 0, 0]
# member 0: only 0.3 < 0.4 is wrong                                    -> 8/9
M0 = [0.9, 0.8, 0.3, 0.4, 0.2, 0.1]
# member 1: 0.7 beats 0.3 and 0.5; 0.1 and 0.2 beat nothing            -> 2/9
M1 = [0.7, 0.1, 0.2, 0.8, 0.3, 0.5]
# member 2: 0.5 beats 0.3, 0.1; 0.2 beats 0.1; 0.9 beats all three    -> 6/9
M2 = [0.5, 0.2, 0.9, 0.3, 0.6, 0.1]


def test_greedy_path_and_weights_on_a_hand_made_case():
    # step 1: member 0 is best alone (8/9 > 6/9 > 2/9).
    # step 2: 0+0 = member 0 -> 8/9; (0+1)/2 = [.8 .45 .25 | .6 .25 .3] -> 3 + 2 + 0.5 (tie .25) = 5.5/9;
    #         (0+2)/2 = [.7 .5 .6 | .35 .4 .1]: every positive above every negative -> 9/9: pick 2.
    # step 3: (2*0+2)/3 = [.77 .6 .5 | .37 .33 .1] -> 9/9 (pick 0, the best);
    #         (0+2*2)/3 = [.63 .4 .7 | .33 .47 .1] -> 8/9; (0+1+2)/3 -> 6.5/9.
    # steps 4, 5 cannot beat 1.0; the kept path ends at the first 1.0: [0, 2], weights 1/2, 0, 1/2.
    result = select_ensemble([M0, M1, M2], LABELS, iterations=5)
    assert result.trajectory[:3] == pytest.approx((8 / 9, 1.0, 1.0))
    assert len(result.trajectory) == 5
    assert result.path == (0, 2)
    assert result.counts == (1, 0, 1)
    assert result.weights == (0.5, 0.0, 0.5)
    assert result.score == 1.0
    assert result.to_json()["weights"] == [0.5, 0.0, 0.5]
    np.testing.assert_allclose(combine_scores([M0, M1, M2], result.weights), [0.7, 0.5, 0.6, 0.35, 0.4, 0.1])


def _pairs_auroc(scores, labels):
    """AUROC by counting pairs, independently of the module: ties count half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_a_tie_goes_to_a_member_already_picked():
    labels = [1, 1, 0, 0]
    m0, m1 = [0.6, 0.6, 0.9, 0.3], [0.3, 0.9, 0.1, 0.4]
    # step 1: member 1 alone 3/4 beats member 0 alone 2/4.
    # step 2: 1+1 -> 3/4, (0+1)/2 = [.45 .75 | .5 .35] -> 3/4: a tie, kept by member 1 (already in).
    # step 3: (0+2*1)/3 = [.4 .8 | .37 .37] -> 4/4: pick 0. Lowest index first would give (1, 0, 1).
    assert _pairs_auroc(m1, labels) == 0.75 and _pairs_auroc(m0, labels) == 0.5
    assert _pairs_auroc([(a + b) / 2 for a, b in zip(m0, m1)], labels) == 0.75
    assert _pairs_auroc([(a + 2 * b) / 3 for a, b in zip(m0, m1)], labels) == 1.0
    result = select_ensemble([m0, m1], labels, iterations=3)
    assert result.path == (1, 1, 0)
    assert result.weights == pytest.approx((1 / 3, 2 / 3))
    assert result.trajectory == pytest.approx((0.75, 0.75, 1.0))


def test_identical_members_tie_to_the_lowest_index():
    result = select_ensemble([M1, M0, M0], LABELS, iterations=4)
    assert result.path == (1,)
    assert result.weights == (0.0, 1.0, 0.0)


def _mean_log_loss(p_positive_row, p_negative_row):
    return (-math.log(p_positive_row) - math.log(1 - p_negative_row)) / 2


def test_log_loss_selects_with_replacement_and_keeps_the_first_best():
    # row 0 is a positive, row 1 a negative; a weight w on member 0 scores [0.3 + 0.6 w, 0.05 + 0.55 w]
    m0, m1 = [0.9, 0.6], [0.3, 0.05]

    def loss(w):
        return _mean_log_loss(0.3 + 0.6 * w, 0.05 + 0.55 * w)

    # step 1: w=1 (0.5108) beats w=0 (0.6276): member 0.  step 2: w=1/2 (0.4518) beats 1: member 1.
    # step 3: w=2/3 (0.4479) beats 1/3 (0.4794): member 0. step 4: w=2/4 (0.4518) beats 3/4 (0.4543): member 1.
    # step 5: w=3/5 (0.4468) beats 2/5 (0.4657): member 0, the best of all -> weights 3/5, 2/5.
    assert loss(1) < loss(0) and loss(1 / 2) < loss(1) and loss(2 / 3) < loss(1 / 3)
    assert loss(2 / 4) < loss(3 / 4) and loss(3 / 5) < loss(2 / 5) and loss(3 / 5) < loss(2 / 3)
    result = select_ensemble([m0, m1], [1, 0], metric="log_loss", iterations=5)
    assert result.path == (0, 1, 0, 1, 0)
    assert result.weights == pytest.approx((0.6, 0.4))
    assert result.trajectory == pytest.approx([loss(1), loss(1 / 2), loss(2 / 3), loss(2 / 4), loss(3 / 5)])
    # four iterations: step 4 (0.4518) is worse than step 3 (0.4479), so the kept path is [0, 1, 0]
    shorter = select_ensemble([m0, m1], [1, 0], metric="log_loss", iterations=4)
    assert shorter.path == (0, 1, 0)
    assert shorter.weights == pytest.approx((2 / 3, 1 / 3))
    assert shorter.score == pytest.approx(loss(2 / 3))


def test_initial_best_starts_with_the_best_members_once_each():
    # sorted by AUROC alone: member 0 (8/9), member 2 (6/9), member 1 (2/9); with the two best
    # forced first, [0, 2] already reaches 1.0, which nothing later beats
    result = select_ensemble([M0, M1, M2], LABELS, iterations=6, initial_best=2)
    assert result.path == (0, 2)
    # all three forced in: the kept path cannot end inside them, however good [0, 2] was
    forced = select_ensemble([M0, M1, M2], LABELS, iterations=3, initial_best=3)
    assert forced.path == (0, 2, 1)
    assert forced.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert forced.score == pytest.approx(_pairs_auroc(combine_scores([M0, M1, M2], forced.weights), LABELS))


def test_one_member_gets_all_the_weight():
    result = select_ensemble([M1], LABELS, iterations=25)
    assert result.path == (0,)
    assert result.weights == (1.0,)
    assert result.score == pytest.approx(2 / 9)


def test_selection_is_deterministic_and_independent_of_the_order_of_sums():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    members = [np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1) for _ in range(6)]
    first = select_ensemble(members, labels, iterations=25)
    assert select_ensemble(members, labels, iterations=25) == first
    assert sum(first.weights) == pytest.approx(1.0)
    assert first.score == pytest.approx(rank_auroc(combine_scores(members, first.weights), labels))
    # the ensemble is at least as good as its best member on the selection rows
    assert first.score >= max(rank_auroc(m, labels) for m in members)


def test_combined_logit_inverts_the_sigmoid_and_stays_finite():
    p = np.array([0.5, 0.8807970779778823, 0.0, 1.0])
    logits = combined_logit(p)
    assert logits[:2] == pytest.approx([0.0, 2.0])
    bound = math.log((1 - COMBINED_EPS) / COMBINED_EPS)
    assert logits[2:] == pytest.approx([-bound, bound])
    assert bound == pytest.approx(15.942385, abs=1e-6)
    assert np.float32(1 - COMBINED_EPS) < 1  # the clip is representable in float32, as in a graph


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "accuracy"}, "unknown selection metric 'accuracy'; one of auroc, log_loss"),
        ({"iterations": 0}, "iterations must be an integer >= 1 (got 0)"),
        ({"iterations": 2, "initial_best": 3}, "initial_best must be an integer in [0, iterations] (got 3)"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError) as error:
        select_ensemble([M0], LABELS, **kwargs)
    assert str(error.value) == message


def test_bad_member_scores_name_the_member():
    with pytest.raises(ValueError) as error:
        select_ensemble([M0, [0.1] * 5], LABELS)
    assert str(error.value) == "member 1's scores and labels differ in length (5 vs 6)"
    with pytest.raises(ValueError) as error:
        select_ensemble([M0, [2.0] * 6], LABELS)
    assert str(error.value).startswith("scores must be probabilities in [0, 1]")
    with pytest.raises(ValueError) as error:
        select_ensemble([M0], [1] * 6)
    assert str(error.value) == "selecting on AUROC needs both classes in the labels"
    with pytest.raises(ValueError) as error:
        combine_scores([M0, M1], [0.7, 0.7])
    assert str(error.value) == "weights must be >= 0 and sum to 1 (got [0.7, 0.7])"


def test_rows_with_the_same_mean_tie_whatever_the_order_of_the_sum():
    # row 0 (positive) averages 0.1 + 0.2 + 0.3, row 1 (negative) 0.3 + 0.2 + 0.1: the same mean,
    # though in float64 the first sum is 0.6000000000000001 and the second 0.6; a tie is half a pair.
    # Forced in by AUROC alone: member 2 (1.0), member 1 (0.5, a tie), member 0 (0.0).
    assert 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1
    result = select_ensemble([[0.1, 0.3], [0.2, 0.2], [0.3, 0.1]], [1, 0], iterations=3, initial_best=3)
    assert result.path == (2, 1, 0)
    assert result.trajectory == (1.0, 1.0, 0.5)


def test_rank_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) * 0.5 + labels * 0.2, 2)  # two decimals: many ties
    assert rank_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert rank_auroc(scores, np.ones(500, dtype=np.int64)) is None
