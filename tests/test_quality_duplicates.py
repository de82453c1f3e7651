"""Near-duplicate pairs by embedding similarity, tile by tile: perturbed copies found across and
within splits, exact copies marked, the same pairs for any block size, a bounded result.

The embeddings are constructed: a copy is its original plus a little noise (what a re-encoded or
resized image does to a good encoder's embedding), distinct ads are independent directions.
A randomly initialised CNN does not separate real copies reliably (see docs/data-quality.md).
"""

import numpy as np
import pytest

from mmcore.quality import duplicate_groups, near_duplicate_pairs

DIMS = 64


@pytest.fixture(scope="module")
def rows():
    """100 train rows, 20 test rows; test 5 is a perturbed copy of train 7, test 12 an exact
    copy (same bytes) of train 30, train 99 a perturbed copy of train 2; train 50 and 51 share
    a theme (cosine 0.85: alike, not copies)."""
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(120, DIMS)).astype(np.float32)
    splits = ["train"] * 100 + ["test"] * 20
    hashes = [f"h{i}" for i in range(120)]

    def copy_of(source, noise=0.1):
        return embeddings[source] + noise * rng.normal(size=DIMS) * np.linalg.norm(embeddings[source]) / np.sqrt(DIMS)

    embeddings[105] = copy_of(7)
    embeddings[112] = embeddings[30]
    hashes[112] = hashes[30]
    embeddings[99] = copy_of(2)
    embeddings[51] = 0.8 * embeddings[50] + 0.6 * rng.normal(size=DIMS)
    return embeddings, splits, hashes


def as_tuples(search):
    return [(p.first, p.second, p.first_split, p.second_split, p.exact) for p in search.pairs]


def test_copies_are_found_with_their_splits_and_alike_ads_are_not(rows):
    embeddings, splits, hashes = rows
    search = near_duplicate_pairs(embeddings, splits, hashes=hashes)
    assert as_tuples(search) == [(30, 112, "train", "test", True), (7, 105, "train", "test", False),
                                 (2, 99, "train", "train", False)]
    assert search.found == 3 and not search.truncated and search.threshold == 0.95
    assert search.pairs[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert all(0.95 <= p.similarity < 0.999 for p in search.pairs[1:])
    assert [p.cross_split for p in search.pairs] == [True, True, False]
    similarities = [p.similarity for p in search.pairs]
    assert similarities == sorted(similarities, reverse=True)
    # the themed pair is 0.85 alike: found only at a lower threshold
    assert (50, 51) not in {(p.first, p.second) for p in search.pairs}
    assert (50, 51) in {(p.first, p.second) for p in near_duplicate_pairs(embeddings, splits, threshold=0.7).pairs}


def test_across_only_and_block_size(rows):
    embeddings, splits, hashes = rows
    across = near_duplicate_pairs(embeddings, splits, hashes=hashes, across_only=True)
    assert sorted((p.first, p.second) for p in across.pairs) == [(7, 105), (30, 112)]
    # tiles of 7 rows (blocks that cut through the copies) find exactly what one tile finds
    whole = near_duplicate_pairs(embeddings, splits, hashes=hashes, block_rows=4096)
    tiled = near_duplicate_pairs(embeddings, splits, hashes=hashes, block_rows=7)
    assert as_tuples(tiled) == as_tuples(whole)
    assert [p.similarity for p in tiled.pairs] == pytest.approx([p.similarity for p in whole.pairs], abs=1e-6)


def test_an_exact_copy_is_listed_even_below_the_threshold():
    # a non-deterministic encoder: same bytes, embeddings only 0.5 alike
    embeddings = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [0.0, 1.0]], dtype=np.float32)
    search = near_duplicate_pairs(embeddings, ["train", "val", "test"], hashes=[b"a", b"a", None])
    assert as_tuples(search) == [(0, 1, "train", "val", True)]
    assert search.pairs[0].similarity == pytest.approx(0.5) and search.found == 1


def test_the_result_is_bounded_and_says_so():
    # 60 copies of one ad: 1770 pairs qualify, 100 are kept
    embeddings = np.ones((60, 8), dtype=np.float32)
    search = near_duplicate_pairs(embeddings, ["train"] * 60, max_pairs=100, block_rows=16)
    assert search.found == 60 * 59 // 2 and len(search.pairs) == 100 and search.truncated
    assert as_tuples(search)[:3] == [(0, 1, "train", "train", False), (0, 2, "train", "train", False),
                                     (0, 3, "train", "train", False)]


def test_groups_join_pairs_transitively(rows):
    embeddings, splits, hashes = rows
    pairs = near_duplicate_pairs(embeddings, splits, hashes=hashes).pairs
    groups = duplicate_groups(120, pairs)
    assert groups[7] == groups[105] and groups[30] == groups[112] and groups[2] == groups[99]
    assert len(set(groups.tolist())) == 120 - 3
    chain = near_duplicate_pairs(np.array([[1, 0], [1, 0.1], [1, 0.2], [0, 1]], dtype=np.float32), ["a"] * 4,
                                 threshold=0.99).pairs
    assert duplicate_groups(4, chain).tolist() == [0, 0, 0, 1]


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match=r"splits \(2\) must name the split of each embedding row \(3\)"):
        near_duplicate_pairs(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\] \(got 1.5\)"):
        near_duplicate_pairs(np.ones((3, 2)), ["a"] * 3, threshold=1.5)
    with pytest.raises(ValueError, match=r"embeddings rows 0-2 contain NaN or infinite values"):
        near_duplicate_pairs(np.full((3, 2), np.nan), ["a"] * 3)
