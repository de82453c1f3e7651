"""Inference: a model's logits over a loader, with no optimizer in sight (validation each epoch, and
``eval --cache`` / ``predict --cache``, which score as validation does: through the feature cache).

Scoring raw rows in float32 (``eval``, ``predict``, a run's test split, the parity gate) is the
scoring path's (:mod:`mmcore.scoring`).
"""

from __future__ import annotations

import numpy as np
import torch

from mmcore.dist import all_gather_objects
from mmcore.engine.policies import BadImages
from mmcore.engine.runtime import autocast
from mmcore.engine.step import prepare_batch
from mmcore.evaluation.calibration import sigmoid  # noqa: F401 - imported from here by the engine and commands
from mmcore.progress import progress_bar


@torch.no_grad()
def predict(model, loader, *, device, dtype, bad_images, split_name="eval", desc=None, progress=True,
            channels_last=False):
    """Logits, labels and dataset indices for every sample, gathered on the CPU in index order.

    Each rank scores its own shard; every rank gets all of them. Bad images go through
    ``bad_images`` (a :class:`~mmcore.engine.policies.BadImages`).
    """
    model.eval()
    indices, logits, labels = [], [], []
    bar = progress_bar(progress, total=len(loader), desc=desc or split_name, unit="batch")
    for batch in loader:
        bar.update(1)
        bad_images.check(batch, split_name)
        if not batch["size"]:
            continue
        index, label = batch["index"], batch["label"]
        batch = prepare_batch(batch, device, channels_last)
        with autocast(device, dtype):
            logit = model(batch).logit
        logits.append(logit.float())  # stays on the device: one copy to the host at the end
        indices.append(index)
        labels.append(label)
    bar.close()
    local = (
        torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64),
        torch.cat(logits).cpu().double().numpy() if logits else np.zeros(0),
        torch.cat(labels).numpy() if labels else np.zeros(0),
    )
    parts = all_gather_objects(local)
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    return index[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def predict_through_pipeline(pipeline, split, name, *, progress=True, desc=None):
    """Logits for every usable row of ``split`` through ``pipeline``'s datasets (its feature cache,
    when the pipeline uses one), as validation scores: ``(split, indices, logits, labels, bad_images)``.

    ``split`` may come back without rows whose images could not be read (with
    ``data.on_bad_image = "skip"``); empty texts are the caller's to fill first (the OCR stage).
    """
    bad_images = BadImages(pipeline.recipe.data.on_bad_image)
    dataset, split, errors = pipeline.dataset(split)
    if errors:
        bad_images.check({"errors": errors}, name)
    indices, logits, labels = predict(
        pipeline.model, pipeline.loader(dataset), device=pipeline.device, dtype=pipeline.dtype,
        bad_images=bad_images, split_name=name, desc=desc, progress=progress, channels_last=pipeline.channels_last,
    )
    return split, indices, logits, labels, bad_images
