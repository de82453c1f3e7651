"""Model + inputs for a recipe: shared by training, ``eval`` and ``predict``.

The same decision (cached encoder outputs or raw inputs) is taken for every split, so a
run's test predictions and a later ``mmcore eval`` of the same CSV go through the very same
computation.
"""

from __future__ import annotations

import torch

from ..data.dataset import SampleDataset, make_loader
from ..model import build_classifier, build_component
from ..trainability import apply_trainability
from .features import compute_text_features, compute_vision_features, is_frozen
from .runtime import autocast_dtype, resolve_device, seed_everything


class Pipeline:
    """The classifier built from a recipe, on its device, and how each split is fed to it."""

    def __init__(self, recipe, registry, *, source="recipe", progress=True):
        self.recipe = recipe
        self.registry = registry
        self.progress = progress
        self.device = resolve_device(recipe.train.device)
        self.dtype = autocast_dtype(recipe.train.precision, self.device)
        # Encoders built with random weights must come out the same in `run` and `eval`.
        seed_everything(recipe.seed, recipe.train.deterministic)
        model = build_classifier(recipe, registry, source=source)
        if model.vision is not None:
            train = recipe.train
            apply_trainability(
                model.vision,
                freeze_backbone=train.freeze_backbone,
                finetune_layers=train.finetune_layers,
                lora=train.lora,
            )
        self.model = model.to(self.device)
        self.channels_last = bool(model.vision is not None and model.vision.channels_last)
        if self.channels_last:
            model.vision.to(memory_format=torch.channels_last)
        self.augmentation = None
        if model.vision is not None:
            self.augmentation = build_component(registry, "augmentation", recipe.augmentation)
        self._feature_cache = {}

    # -- what is cached -------------------------------------------------------------------

    @property
    def cache_vision(self):
        """A frozen vision encoder with deterministic input: compute its outputs once."""
        return (
            self.recipe.cache.enabled
            and self.model.vision is not None
            and is_frozen(self.model.vision)
            and self.augmentation is None
        )

    @property
    def cache_text(self):
        return self.recipe.cache.enabled and self.model.text is not None

    def _vision_features(self, split):
        key = ("vision", split.csv, len(split))
        if key not in self._feature_cache:
            self._feature_cache[key] = compute_vision_features(
                self.model,
                split,
                batch_size=self.eval_batch_size,
                device=self.device,
                dtype=self.dtype,
                num_workers=self.recipe.data.num_workers,
                max_image_pixels=self.recipe.data.max_image_pixels,
                progress=self.progress,
            )
        return self._feature_cache[key]

    @property
    def eval_batch_size(self):
        return self.recipe.eval.batch_size or self.recipe.train.batch_size

    def dataset(self, split, *, train=False):
        """A dataset for ``split``; bad images found by the feature pass go through ``bad``.

        Returns ``(dataset, split, errors)``: with cached vision features, images that could
        not be read are left out of the returned split and reported in ``errors``.
        """
        vision_features = lengths = text_features = None
        errors = []
        if self.cache_vision:
            (vision_features, lengths), errors, bad = self._vision_features(split)
            if bad:
                keep = [i for i in range(len(split)) if i not in set(bad)]
                split = split.subset(keep)
                vision_features = vision_features[keep]
                lengths = lengths[keep] if lengths is not None else None
        if self.cache_text:
            text_features = compute_text_features(
                self.model.text, split.texts, device=self.device, progress=self.progress,
                desc=f"text features {split.csv.name}",
            )
        dataset = SampleDataset(
            split,
            preprocessing=self.model.vision.preprocessing if self.model.vision is not None else None,
            augmentation=self.augmentation if train else None,
            vision_features=vision_features,
            vision_lengths=lengths,
            text_features=text_features,
            needs_image=self.model.vision is not None,
            max_image_pixels=self.recipe.data.max_image_pixels,
        )
        return dataset, split, errors

    def loader(self, dataset, *, train=False, sampler=None, seed=None):
        batch_size = self.recipe.train.batch_size if train else self.eval_batch_size
        return make_loader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            seed=self.recipe.seed if seed is None else seed,
            num_workers=self.recipe.data.num_workers,
            sampler=sampler,
            pin_memory=self.device.type == "cuda",
        )
