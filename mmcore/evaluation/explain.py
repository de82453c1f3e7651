"""Why the model decided what it did, from arrays: margins, bootstrap intervals, slice metrics,
and the summary of per-sample modality contributions.

Pure functions on scores, labels and per-sample facts (text, image size); what needs the model
itself (scores with a modality removed, saliency) is computed by :mod:`mmcore.engine.explain`.
"""

from __future__ import annotations

import math

import numpy as np

from mmcore.evaluation.metrics import binary_metrics, check_scores_labels, rank_auroc

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
# slice edges; a value v falls in the first bucket whose upper edge is > v
OCR_LENGTH_BUCKETS = ((1, "0 chars (empty)"), (21, "1-20 chars"), (101, "21-100 chars"), (math.inf, "> 100 chars"))
ASPECT_BUCKETS = ((0.75, "tall (w/h < 0.75)"), (1.34, "squarish (0.75-1.33)"), (math.inf, "wide (w/h > 1.33)"))
SIZE_BUCKETS = ((256, "small (longest side < 256 px)"), (1024, "medium (256-1023 px)"), (math.inf, "large (>= 1024 px)"))
_EPS = 1e-12


def logit(p):
    """``log(p / (1 - p))``, with p clipped away from 0 and 1 so the result stays finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def margin(calibrated_scores, threshold):
    """Signed distance of each decision from the threshold, in logit space.

    ``logit(calibrated_score) - logit(threshold)``: positive means predicted 1, negative
    predicted 0; its absolute value is how far the sample is from flipping (a score of 0.2522
    against a threshold of 0.2529 has margin -0.0037, a score of 0.7128 has margin +2.0).
    """
    return logit(calibrated_scores) - logit(float(threshold))


# ---------------------------------------------------------------------------- bootstrap


def _average_precision(scores, labels):
    """Average precision (area under the PR step curve), one point per distinct score."""
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        return None
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(scores, labels, threshold):
    hard = scores >= threshold
    tp = int(np.sum(hard & (labels == 1)))
    wrong = int(np.sum(hard != (labels == 1)))
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def bootstrap_intervals(scores, labels, threshold, *, samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED, level=0.95):
    """Percentile bootstrap intervals of AUROC, AUPRC and F1 (at ``threshold``) over the samples.

    Resamples the rows with replacement ``samples`` times (seeded, so a run's intervals are
    reproducible). Returns ``{"auroc": [low, high], "auprc": [...], "f1": [...], "level": 0.95,
    "samples": n}``; a metric undefined in every resample (one class) is None.
    """
    scores, labels = check_scores_labels(scores, labels)
    rng = np.random.default_rng(seed)
    values = {"auroc": [], "auprc": [], "f1": []}
    for _ in range(int(samples)):
        pick = rng.integers(0, scores.size, scores.size)
        s, y = scores[pick], labels[pick]
        for name, value in (("auroc", rank_auroc(s, y)), ("auprc", _average_precision(s, y)), ("f1", _f1(s, y, threshold))):
            if value is not None:
                values[name].append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for name, drawn in values.items():
        out[name] = None if not drawn else [round(float(v), 6) for v in np.percentile(drawn, [tail, 100 - tail])]
    out.update(level=level, samples=int(samples))
    return out


# ---------------------------------------------------------------------------- slices


def _bucket(value, buckets):
    for upper, name in buckets:
        if value < upper:
            return name
    return buckets[-1][1]


def slice_keys(texts, image_sizes=None):
    """Every sample's slice in each family: ``{family: [slice name per sample]}``.

    Families: ``text`` (present / empty), ``ocr_length`` (characters of the OCR text),
    and, when ``image_sizes`` (``(width, height)`` or None per sample) is given,
    ``aspect_ratio`` and ``image_size`` (longest side); an unknown size is ``"unknown"``.
    """
    texts = ["" if t is None else str(t).strip() for t in texts]
    keys = {
        "text": ["text present" if t else "text empty" for t in texts],
        "ocr_length": [_bucket(len(t), OCR_LENGTH_BUCKETS) for t in texts],
    }
    if image_sizes is not None:
        keys["aspect_ratio"] = [_bucket(s[0] / s[1], ASPECT_BUCKETS) if s and s[1] else "unknown" for s in image_sizes]
        keys["image_size"] = [_bucket(max(s), SIZE_BUCKETS) if s else "unknown" for s in image_sizes]
    return keys


def slice_metrics(scores, labels, threshold, keys):
    """Metrics of each slice: ``{family: [{"slice", "n", "positives", "errors", "accuracy", "f1", "auroc"}]}``.

    ``scores`` are the calibrated scores the decision uses; ``keys`` comes from :func:`slice_keys`.
    Slices keep the order of their bucket definitions; empty ones are left out.
    """
    scores, labels = check_scores_labels(scores, labels)
    out = {}
    for family, names in keys.items():
        names = np.asarray(names, dtype=object)
        rows = []
        for name in dict.fromkeys(_family_order(family) + sorted(set(names.tolist()))):
            members = names == name
            if not members.any():
                continue
            m = binary_metrics(scores[members], labels[members], threshold)
            rows.append(
                {
                    "slice": name,
                    "n": m["n"],
                    "positives": m["positives"],
                    "errors": m["fp"] + m["fn"],
                    "accuracy": round(m["accuracy"], 6),
                    "f1": round(m["f1"], 6),
                    "auroc": m["auroc"],
                }
            )
        out[family] = rows
    return out


def _family_order(family):
    buckets = {"ocr_length": OCR_LENGTH_BUCKETS, "aspect_ratio": ASPECT_BUCKETS, "image_size": SIZE_BUCKETS}
    if family == "text":
        return ["text present", "text empty"]
    return [name for _, name in buckets.get(family, ())]


def image_sizes(paths):
    """``(width, height)`` of each image from its header (no decoding), None where unreadable."""
    from PIL import Image

    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(tuple(image.size))
        except Exception:  # a missing or broken image only leaves its slice unknown
            sizes.append(None)
    return sizes


# ---------------------------------------------------------------------------- modality contribution


def modality_summary(calibrated, without_text, without_image, labels=None, gate_mean=None, threshold=0.5):
    """Averages of the per-sample modality contributions, for results.json and the report.

    ``without_text`` / ``without_image`` are the calibrated scores with that modality's features
    zeroed (what ``train.modality_dropout`` trains the model to cope with). The contribution of
    text is ``score - score without text``; ``flips_without_*`` counts the decisions that change.
    """
    calibrated = np.asarray(calibrated, dtype=np.float64)
    without_text = np.asarray(without_text, dtype=np.float64)
    without_image = np.asarray(without_image, dtype=np.float64)
    decided = calibrated >= threshold
    summary = {
        "mean_abs_text_contribution": round(float(np.mean(np.abs(calibrated - without_text))), 6),
        "mean_abs_image_contribution": round(float(np.mean(np.abs(calibrated - without_image))), 6),
        "flips_without_text": int(np.sum((without_text >= threshold) != decided)),
        "flips_without_image": int(np.sum((without_image >= threshold) != decided)),
        "score": "calibrated_score",
    }
    if gate_mean is not None:
        summary["mean_gate"] = round(float(np.mean(gate_mean)), 6)
        summary["gate_meaning"] = "GMU gate z: 1 = all image, 0 = all text (h = z*h_image + (1-z)*h_text)"
    if labels is not None:
        labels = np.asarray(labels).astype(int)
        for name, scores in (("text_only_auroc", without_image), ("image_only_auroc", without_text)):
            summary[name] = rank_auroc(scores, labels)
    return summary
