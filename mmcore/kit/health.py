"""Is an encoder alive? Features that are not finite, near zero or the same for distinct inputs.

A randomly initialised MobileNetV3 or EfficientNet in eval mode shrinks its input block by
block (BatchNorm with default running statistics after depthwise convolutions): its features
end near 1e-8, every image gets the same score, and a multimodal run quietly learns from the
text alone. :mod:`mmcore.testing`'s contract checks fail on such an encoder, and a run warns
about it on its first batch of features (:func:`warn_if_degenerate`).
"""

from __future__ import annotations

import torch

#: pooled features whose largest root-mean-square is below this are "near zero" (a trained
#: encoder's are around 0.01-10; a dead random MobileNetV3-Small's about 1e-8)
NEAR_ZERO_RMS = 1e-6
#: largest distance from the batch mean, relative to the mean norm, below which features are
#: "near-constant" (an encoder built to output constants: 0)
NEAR_CONSTANT_SPREAD = 1e-4
#: inputs the run-start check looks at
FIRST_BATCH = 8


def feature_problem(features, *, inputs="inputs"):
    """What is wrong with ``features`` [B, D] of B distinct inputs, or ``None`` when they look alive.

    ``"not finite (NaN or inf for 1 of 8 images)"``, ``"near zero (largest RMS 1.7e-08 over 8
    images)"`` or ``"near-constant across 8 distinct images (relative spread 0.0e+00)"``;
    ``inputs`` names what the rows are ("images", "texts").
    """
    features = features.detach().float().reshape(features.shape[0], -1)
    count = features.shape[0]
    bad = int((~torch.isfinite(features).all(dim=1)).sum())
    if bad:
        return f"not finite (NaN or inf for {bad} of {count} {inputs})"
    largest = float(features.pow(2).mean(dim=1).sqrt().max())
    if largest < NEAR_ZERO_RMS:
        return f"near zero (largest RMS {largest:.1e} over {count} {inputs})"
    if count >= 2:
        spread = float((features - features.mean(dim=0)).norm(dim=1).max() / features.norm(dim=1).mean())
        if spread < NEAR_CONSTANT_SPREAD:
            return f"near-constant across {count} distinct {inputs} (relative spread {spread:.1e})"
    return None


def _distinct(values, limit):
    """Positions of the first ``limit`` distinct, non-empty values."""
    seen, positions = set(), []
    for i, value in enumerate(values):
        key = str(value).strip()
        if key and key not in seen:
            seen.add(key)
            positions.append(i)
            if len(positions) == limit:
                break
    return positions


@torch.no_grad()
def first_batch_problems(model, dataset, collate, *, prepare=None, limit=FIRST_BATCH):
    """One line per modality whose features look dead on up to ``limit`` distinct inputs of ``dataset``.

    ``dataset`` is a split's :class:`~mmcore.data.dataset.SampleDataset` without augmentation
    (validation), ``collate`` its loader's collate function, ``prepare`` what the engine does to
    a batch before the model sees it (device, dtypes); features come the way training gets them
    (cached or computed), in eval mode, without touching the random state. The whole model then
    scores the first of these batches once, so every component has run before training starts.
    """
    split = dataset.split
    checks = []
    if model.uses_vision and model.vision is not None:
        checks.append(("vision", model.vision, _distinct(split.paths, limit), "images", model.vision_features))
    if model.uses_text and model.text is not None:
        checks.append(("text", model.text, _distinct(split.texts, limit), "texts", model.text_features))
    lines = []
    scored = False
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for kind, encoder, positions, inputs, features_of in checks:
                if len(positions) < 2:
                    continue
                batch = collate([dataset[i] for i in positions])
                if not batch["size"]:
                    continue
                if prepare is not None:
                    batch = prepare(batch)
                problem = feature_problem(features_of(batch), inputs=inputs)
                if problem:
                    lines.append(
                        f"warning: {kind} features are {problem} on the first batch ({kind} encoder "
                        f"{encoder.name!r}, weights {encoder.weights}); the model cannot learn from them: "
                        f"check the encoder's weights before trusting its results"
                    )
                if not scored:
                    model(batch)
                    scored = True
    finally:
        model.train(was_training)
    return lines
