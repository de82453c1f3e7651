"""Cosine similarities and distances between embedding rows, computed in tiles of bounded memory.

Rows are L2-normalised block by block as they are read, so ``embeddings`` may be a memory-mapped
array of any length (the feature cache's ``.npy`` files) and is never copied whole: one
``block_rows x block_rows`` float32 tile and two ``block_rows x dim`` float32 blocks are alive at a
time (2048 rows: a 16 MiB tile plus 2 x 6 MiB blocks for 768-dim features), whatever the number
of rows. A row of zeros stays zeros: its similarity to everything is 0.
"""

from __future__ import annotations

import numpy as np

#: rows per block: a 2048 x 2048 float32 tile is 16 MiB
BLOCK_ROWS = 2048


def as_matrix(embeddings, what="embeddings"):
    """``embeddings`` as a 2-D array (not copied), or ValueError saying why not."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (rows x dims), got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be numbers, got dtype {array.dtype}")
    return array


def blocks(n, size=BLOCK_ROWS):
    """``(start, stop)`` of consecutive blocks of at most ``size`` rows covering ``range(n)``."""
    size = max(1, int(size))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def normalized_block(embeddings, start, stop):
    """Rows ``start:stop`` as float32, each scaled to unit length (zero rows stay zero)."""
    block = np.asarray(embeddings[start:stop], dtype=np.float32)
    if not np.all(np.isfinite(block)):
        raise ValueError(f"embeddings rows {start}-{stop - 1} contain NaN or infinite values")
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)


def normalized(embeddings, block_rows=BLOCK_ROWS):
    """All rows L2-normalised (float32): for the few thousand rows k-center works on."""
    embeddings = as_matrix(embeddings)
    out = np.empty(embeddings.shape, dtype=np.float32)
    for start, stop in blocks(len(embeddings), block_rows):
        out[start:stop] = normalized_block(embeddings, start, stop)
    return out


def unit_distance(a, b):
    """Euclidean distances between unit rows of ``a`` and ``b`` (``sqrt(2 - 2 cos)``, in [0, 2]);
    a zero row is at distance 1 from everything, as if orthogonal."""
    squared = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0))


def min_distances(points, centers, block_rows=BLOCK_ROWS):
    """For each row of ``points`` (unit rows, in memory), its distance to the nearest row of
    ``centers`` (any 2-D array, normalised block by block); ``inf`` when ``centers`` is empty."""
    nearest = np.full(len(points), np.inf, dtype=np.float64)
    centers = as_matrix(centers, "labelled embeddings")
    for c_start, c_stop in blocks(len(centers), block_rows):
        center_block = normalized_block(centers, c_start, c_stop)
        for p_start, p_stop in blocks(len(points), block_rows):
            tile = unit_distance(points[p_start:p_stop], center_block)
            np.minimum(nearest[p_start:p_stop], tile.min(axis=1), out=nearest[p_start:p_stop])
    return nearest
