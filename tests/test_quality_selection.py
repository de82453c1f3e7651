"""Active selection: margin order, greedy k-center picks known by hand, the uncertain-then-diverse
default, exclusion of what is already labelled or chosen, and determinism for a seed."""

import numpy as np
import pytest

from mmcore.quality import select_rows

# pool rows on the unit circle (degrees); lengths differ on purpose: distances are taken after L2 normalisation
ANGLES = (10, 85, 100, 180, 250, 200)
LENGTHS = (1.0, 3.0, 0.5, 2.0, 1.0, 4.0)
LABELLED = np.array([[1.0, 0.0]])  # one labelled row at 0 degrees


def circle(angles=ANGLES, lengths=LENGTHS):
    radians = np.deg2rad(angles)
    return np.column_stack([np.cos(radians), np.sin(radians)]) * np.asarray(lengths)[:, None]


def chord(degrees):
    return 2 * np.sin(np.deg2rad(degrees) / 2)


def test_k_center_picks_the_farthest_row_each_time():
    picks = select_rows(None, 0.5, circle(), 4, strategy="diversity", labelled_embeddings=LABELLED)
    # 180 is farthest from 0; then 85 (1.351 from 0), 250 (1.147 from 180), 200 (0.347 from 180)
    assert [ANGLES[p.position] for p in picks] == [180, 85, 250, 200]
    assert [p.distance for p in picks] == pytest.approx([chord(180), chord(85), chord(70), chord(20)], abs=1e-6)
    assert picks[1].reason == "farthest from the labelled rows and earlier picks: distance 1.351"
    assert all(p.margin is None for p in picks)


def test_excluded_rows_count_as_labelled_and_are_never_returned():
    # 180 was chosen in an earlier round: it is not returned and the picks avoid its neighbourhood
    picks = select_rows(None, 0.5, circle(), 3, strategy="diversity", labelled_embeddings=LABELLED, exclude=[3])
    assert [ANGLES[p.position] for p in picks] == [85, 250, 200]
    rng = np.random.default_rng(0)
    scores, embeddings = rng.uniform(size=200), rng.normal(size=(200, 8))
    excluded = rng.choice(200, size=150, replace=False)
    for strategy in ("uncertainty", "diversity", "both"):
        chosen = select_rows(scores, 0.4, embeddings, 500, strategy=strategy, exclude=excluded)
        positions = [p.position for p in chosen]
        assert sorted(positions) == sorted(set(range(200)) - set(excluded.tolist()))  # all the rest, once


def test_uncertainty_is_the_margin_to_the_threshold_in_logit_space():
    scores = np.array([0.9, 0.35, 0.41, 0.5, 0.02])
    picks = select_rows(scores, 0.4, None, 3, strategy="uncertainty")
    assert [p.position for p in picks] == [2, 1, 3]
    logit = np.log(scores / (1 - scores))
    assert [p.margin for p in picks] == pytest.approx(abs(logit[[2, 1, 3]] - np.log(0.4 / 0.6)))
    assert picks[0].reason == "margin 0.041 to the threshold"


def test_both_runs_k_center_among_the_most_uncertain():
    # 180 is the farthest row but the model is sure of it: not among the 2 x 2 most uncertain candidates
    scores = np.array([0.45, 0.52, 0.56, 0.999, 0.41, 0.9])  # 10, 85, 100, 180, 250, 200 degrees
    picks = select_rows(scores, 0.5, circle(), 2, labelled_embeddings=LABELLED, candidate_multiple=2)
    # candidates 85, 10, 100, 250 (margins 0.08, 0.20, 0.24, 0.36); k-center: 250 (1.638 from 0), then 100
    assert [ANGLES[p.position] for p in picks] == [250, 100]
    assert picks[0].reason == ("margin 0.364 to the threshold (among the 4 most uncertain); farthest from the labelled"
                               " rows and earlier picks: distance 1.638")
    assert picks[1].distance == pytest.approx(chord(100))
    # with nothing labelled the first pick is the most uncertain row
    first = select_rows(scores, 0.5, circle(), 1, candidate_multiple=2)[0]
    assert ANGLES[first.position] == 85 and first.reason.endswith("the most uncertain (no labelled rows to start from)")


def test_diversity_without_a_labelled_set_starts_from_the_most_typical_row():
    embeddings = circle((0, 10, 40, 200), (1, 1, 1, 1))
    picks = select_rows(None, 0.5, embeddings, 2, strategy="diversity")
    assert [p.position for p in picks] == [1, 3]  # the mean points at 14.7 degrees: 10 is nearest, 200 farthest
    assert picks[0].reason == "nearest the pool's mean (no labelled rows to start from)" and picks[0].distance is None


def test_deterministic_for_a_seed_and_the_seed_breaks_ties():
    scores = np.full(50, 0.3)  # every margin ties
    embeddings = np.random.default_rng(1).normal(size=(50, 4))

    def chosen(seed, strategy):
        return [p.position for p in select_rows(scores, 0.5, embeddings, 10, strategy=strategy, seed=seed)]

    assert chosen(0, "uncertainty") == chosen(0, "uncertainty") != chosen(1, "uncertainty")
    assert chosen(0, "both") == chosen(0, "both")
    assert chosen(3, "diversity") == chosen(3, "diversity")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown strategy 'random'; choose one of uncertainty, diversity, both"):
        select_rows([0.5], 0.5, None, 1, strategy="random")
    with pytest.raises(ValueError, match="budget must be at least 1 "):
        select_rows([0.5], 0.5, None, 0, strategy="uncertainty")
    with pytest.raises(ValueError, match="strategy 'both' needs the pool's embeddings"):
        select_rows([0.5], 0.5, None, 1)
    with pytest.raises(ValueError, match="exclude holds positions outside the pool of 1 rows"):
        select_rows([0.5], 0.5, None, 1, strategy="uncertainty", exclude=[3])
