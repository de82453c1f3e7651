"""Near-duplicate rows by embedding similarity, across and within splits.

The data checks already catch byte-identical files (one content hash per image); a re-encoded,
resized or re-cropped copy of an ad has other bytes but nearly the same embedding. Pairs whose
cosine similarity (of L2-normalised embeddings) reaches ``threshold`` are reported with their
splits; a pair with equal content hashes is reported as ``exact`` whatever its similarity.

Every pair is compared once, tile by tile (:mod:`mmcore.quality.similarity`): memory is a few
tiles plus the pairs kept, whatever the number of rows; time grows with ``rows**2 * dims / 2``.
At most ``max_pairs`` pairs are kept (the most similar); ``found`` counts them all, so a
threshold too low for the data shows as ``truncated`` instead of filling the memory.
"""

from __future__ import annotations

import attrs
import numpy as np

from mmcore.quality.similarity import BLOCK_ROWS, as_matrix, blocks, normalized_block

#: cosine similarity from which two rows count as copies of one ad (documented in docs/data-quality.md)
DEFAULT_THRESHOLD = 0.95
MAX_PAIRS = 100_000


@attrs.frozen(kw_only=True)
class DuplicatePair:
    """Two rows (positions ``first < second``) that look like one ad."""

    first: int
    second: int
    first_split: str
    second_split: str
    similarity: float  # cosine similarity of the two embeddings
    exact: bool  # equal content hashes: the same file bytes

    @property
    def cross_split(self):
        """True when the two rows are in different splits (a leak between them)."""
        return self.first_split != self.second_split


@attrs.frozen(kw_only=True)
class DuplicateSearch:
    """The pairs kept (most similar first), how many qualified, and the threshold used."""

    pairs: tuple[DuplicatePair, ...]
    found: int
    threshold: float

    @property
    def truncated(self):
        """True when more pairs qualified than were kept."""
        return self.found > len(self.pairs)


class _PairBuffer:
    """The qualifying pairs so far; past ``2 * limit`` only the ``limit`` most similar are kept."""

    def __init__(self, limit):
        self.limit = int(limit)
        self.parts = []
        self.size = 0
        self.found = 0

    def add(self, first, second, similarity):
        self.found += first.size
        self.parts.append((first, second, similarity))
        self.size += first.size
        if self.size > 2 * self.limit:
            self.parts = [self.top(self.limit)]
            self.size = self.limit

    def top(self, limit):
        if not self.parts:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.float32)
        first, second, similarity = (np.concatenate(column) for column in zip(*self.parts))
        # most similar first, then by position: the same pairs whatever the block size
        order = np.lexsort((second, first, -similarity))[:limit]
        return first[order], second[order], similarity[order]


def near_duplicate_pairs(embeddings, splits, *, threshold=DEFAULT_THRESHOLD, hashes=None, across_only=False,
                         block_rows=BLOCK_ROWS, max_pairs=MAX_PAIRS):
    """Pairs of rows whose embeddings' cosine similarity is ``>= threshold``, or whose hashes match.

    ``embeddings``: rows x dims (a memory map is fine: it is read block by block); ``splits``: the
    split name of each row (``"train"``, ``"val"``, ``"test"``, ``"pool"``...); ``hashes``: an
    optional content key per row (None where unknown) marking exact copies; ``across_only``
    keeps only pairs from different splits. Returns a :class:`DuplicateSearch`.
    """
    embeddings = as_matrix(embeddings)
    n = len(embeddings)
    splits = [str(s) for s in splits]
    if len(splits) != n:
        raise ValueError(f"splits ({len(splits)}) must name the split of each embedding row ({n})")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (got {threshold})")
    split_ids = np.unique(splits, return_inverse=True)[1]
    found = _PairBuffer(max_pairs)
    spans = blocks(n, block_rows)
    for a, (a_start, a_stop) in enumerate(spans):
        left = normalized_block(embeddings, a_start, a_stop)
        for b_start, b_stop in spans[a:]:
            right = left if b_start == a_start else normalized_block(embeddings, b_start, b_stop)
            tile = left @ right.T
            rows, cols = np.nonzero(tile >= threshold)
            first, second = rows + a_start, cols + b_start
            keep = first < second  # each pair once, never a row with itself
            if across_only:
                keep &= split_ids[first] != split_ids[second]
            found.add(first[keep], second[keep], tile[rows[keep], cols[keep]])
    pairs = {(int(i), int(j)): float(s) for i, j, s in zip(*found.top(max_pairs))}
    exact = _exact_pairs(hashes, n, split_ids if across_only else None, max_pairs)
    below = {}  # exact copies under the threshold (an encoder that is not deterministic): listed all the same
    for i, j in exact:
        similarity = float(normalized_block(embeddings, i, i + 1)[0] @ normalized_block(embeddings, j, j + 1)[0])
        if similarity < threshold:
            below[i, j] = similarity
    ordered = sorted({**pairs, **below}.items(), key=lambda item: (-item[1], item[0]))[:max_pairs]
    return DuplicateSearch(
        pairs=tuple(DuplicatePair(first=i, second=j, first_split=splits[i], second_split=splits[j],
                                  similarity=round(s, 6), exact=(i, j) in exact) for (i, j), s in ordered),
        found=found.found + len(below),
        threshold=float(threshold),
    )


def _exact_pairs(hashes, n, split_ids, limit):
    """``{(i, j)}`` of rows with equal content hashes (None: unknown, never equal), at most ``limit``."""
    if hashes is None:
        return set()
    hashes = list(hashes)
    if len(hashes) != n:
        raise ValueError(f"hashes ({len(hashes)}) must give one content key per embedding row ({n})")
    groups = {}
    for position, key in enumerate(hashes):
        if key is not None:
            groups.setdefault(key, []).append(position)
    pairs = set()
    for members in groups.values():
        for k, i in enumerate(members):
            for j in members[k + 1:]:
                if split_ids is None or split_ids[i] != split_ids[j]:
                    pairs.add((i, j))
                    if len(pairs) >= limit:
                        return pairs
    return pairs


def duplicate_groups(n, pairs):
    """A group id per row (int64 [n], numbered by first row) joining every pair transitively: one
    more key column for :func:`mmcore.data.folds.group_rows`, so copies of one ad share a fold."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    first = np.array([p.first for p in pairs], dtype=np.int64)
    second = np.array([p.second for p in pairs], dtype=np.int64)
    graph = coo_matrix((np.ones(first.size, dtype=np.int8), (first, second)), shape=(int(n), int(n)))
    return connected_components(graph, directed=False)[1].astype(np.int64)


#: the columns of ``audit/near_duplicates.csv``, in order
DUPLICATE_COLUMNS = ("first_row", "first_file", "first_split", "second_row", "second_file", "second_split",
                     "similarity", "exact")


def write_near_duplicates_csv(path, search, *, row_ids, files):
    """Write ``near_duplicates.csv`` (:data:`DUPLICATE_COLUMNS`, most similar first) atomically; return its path.

    ``row_ids`` and ``files``: the row id and image file of each position the pairs name.
    """
    import csv

    from mmcore.io import atomic_open

    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(DUPLICATE_COLUMNS)
        for p in search.pairs:
            writer.writerow([row_ids[p.first], files[p.first], p.first_split, row_ids[p.second], files[p.second],
                             p.second_split, f"{p.similarity:.6f}", int(p.exact)])
    return path
