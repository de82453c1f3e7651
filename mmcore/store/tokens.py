"""Compact forms of cached token sequences (``cache.token_storage``): int8 with a per-token scale, or 2x2 pooled."""

from __future__ import annotations

import math

import numpy as np

#: ``cache.token_storage``: how token sequences (attention pooling) are stored
TOKEN_STORAGES = ("fp16", "int8", "pooled")
#: int8 rows carry their float16 scale in two extra int8 columns
INT8_EXTRA = 2


def quantize_int8(tokens):
    """[T, D] floats -> [T, D + 2] int8: per token, ``round(x / scale)`` with ``scale = max|x| / 127``,
    the scale stored as float16 in the last two columns. Error per value <= max|x| / 254 (+ the
    scale's float16 rounding, 1/2048 relative)."""
    tokens = np.asarray(tokens, dtype=np.float32)
    peak = np.abs(tokens).max(axis=1, keepdims=True) if tokens.size else np.zeros((len(tokens), 1), np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float16)
    quantized = np.clip(np.rint(tokens / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return np.ascontiguousarray(np.concatenate([quantized, scale.view(np.int8)], axis=1))


def dequantize_int8(rows):
    """[T, D + 2] int8 rows of :func:`quantize_int8` -> [T, D] float32."""
    rows = np.asarray(rows)
    scale = np.ascontiguousarray(rows[:, -INT8_EXTRA:]).view(np.float16).astype(np.float32)
    return rows[:, :-INT8_EXTRA].astype(np.float32) * scale


def pool_tokens(tokens, *, has_cls_token):
    """[T, D] tokens -> about 4x fewer: a square grid of patch tokens is 2x2 mean-pooled (an odd side
    keeps its last row/column as smaller windows); any other length is pooled in groups of 4 in order.

    ``has_cls_token`` (the encoder declares it): the first token is a CLS token, kept as it is.
    """
    tokens = np.asarray(tokens, dtype=np.float32)
    count, dim = tokens.shape
    cls = 1 if has_cls_token and count > 1 else 0
    grid = tokens[cls:]
    side = math.isqrt(len(grid))
    if side >= 2 and side * side == len(grid):
        half = (side + 1) // 2
        sums = np.zeros((half * 2, half * 2, dim), np.float32)
        counts = np.zeros((half * 2, half * 2, 1), np.float32)
        sums[:side, :side] = grid.reshape(side, side, dim)
        counts[:side, :side] = 1
        sums = sums.reshape(half, 2, half, 2, dim).sum(axis=(1, 3))
        counts = counts.reshape(half, 2, half, 2, 1).sum(axis=(1, 3))
        pooled = (sums / counts).reshape(half * half, dim)
    else:
        groups = (len(grid) + 3) // 4
        pooled = np.stack([grid[4 * g : 4 * g + 4].mean(axis=0) for g in range(groups)]) if groups else grid
    return np.concatenate([tokens[:cls], pooled], axis=0)
