"""How noisy the labels are in each slice of the data: the share of rows the audit flagged, with a
Wilson score interval (Wilson 1927; Brown, Cai and DasGupta 2001 recommend it over the normal
approximation for small slices and rates near 0, which label-noise rates are).

Slices are those of the run's report (:func:`mmcore.evaluation.explain.slice_keys`): OCR text
present or empty, OCR text length, and, given image sizes, aspect ratio and longest side.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from mmcore.evaluation.explain import _family_order

NOISE_LEVEL = 0.95


def wilson_interval(successes, n, level=NOISE_LEVEL):
    """``(low, high)`` of the Wilson score interval of a proportion ``successes / n``; ``(0, 1)`` for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def label_noise_by_slice(is_issue, keys, *, level=NOISE_LEVEL):
    """Estimated label-noise rate of each slice: ``{family: [{"slice", "n", "issues", "rate", "low", "high"}]}``.

    ``is_issue``: a bool per row (:meth:`mmcore.quality.label_issues.LabelIssues.mask`); ``keys``:
    ``{family: [slice name per row]}`` from :func:`mmcore.evaluation.explain.slice_keys`. Slices keep
    the order of their bucket definitions; empty ones are left out. ``rate`` is ``issues / n``,
    ``low``/``high`` its Wilson interval at ``level``.
    """
    flagged = np.asarray(is_issue, dtype=bool).reshape(-1)
    out = {}
    for family, names in keys.items():
        names = np.asarray(names, dtype=object)
        if names.size != flagged.size:
            raise ValueError(f"slice family {family!r} names {names.size} rows, the audit has {flagged.size}")
        rows = []
        for name in dict.fromkeys(_family_order(family) + sorted(set(names.tolist()))):
            members = names == name
            n = int(members.sum())
            if not n:
                continue
            issues = int(flagged[members].sum())
            low, high = wilson_interval(issues, n, level)
            rows.append({"slice": name, "n": n, "issues": issues, "rate": round(issues / n, 6),
                         "low": round(low, 6), "high": round(high, 6)})
        out[family] = rows
    return out
