"""Key names of the original (Hydra) system and where each lives in an mmcore recipe.

Used only for the hint of an "unknown key" error: ``train.loss_type: unknown key (in mmcore:
loss.name)``. Names from the original README (conf/train/default.yaml and its CLI overrides).
"""

from __future__ import annotations

LEGACY_KEYS = {
    "train.loss_type": "loss.name",
    "train.scheduler_type": "scheduler.name",
    "train.lora_lr": "train.lora.learning_rate",
    "vision_encoder": "vision.name",
    "text_encoder": 'text.name (text_encoder=none: train.modality = "vision_only")',
    "fusion_type": "fusion.name",
    "pooling_type": "pooling.name",
    "train.pooling": "pooling.name",
    "train.fusion": "fusion.name",
    "experiment_name": "experiment",
    "train.label_smoothing": "loss.params.label_smoothing",
    "train.warmup_ratio": "scheduler.params.warmup_ratio",
}


def legacy_hint(path):
    """`` (in mmcore: loss.name)`` for a key path of the original system, else ``""``."""
    new = LEGACY_KEYS.get(path)
    return f" (the original system's key; in mmcore: {new})" if new else ""
