"""The model of a recipe, built and placed: the classifier with its trainability applied, on its
device, in its memory format, with the run's precision and augmentation.

:func:`build_model` is what training, a restored run (:mod:`mmcore.engine.restore`) and the
scorers share; how each split is fed to the model (what the feature cache holds, datasets,
loaders) is :class:`~mmcore.engine.pipeline.Pipeline`'s, a separate decision over this model.
"""

from __future__ import annotations

import sys

import attrs
import torch

from mmcore.dist import rank, world_size
from mmcore.engine.runtime import autocast_dtype, resolve_device, seed_everything
from mmcore.engine.sampling import derive_seed
from mmcore.errors import RecipeError
from mmcore.model.classifier import build_classifier
from mmcore.model.components import build_with_traits
from mmcore.model.trainability import TrainabilityError, apply_trainability, distributed_batchnorm, is_frozen
from mmcore.store.root import warn


@attrs.define(eq=False)
class RunModel:
    """A recipe's classifier, built and placed (see :func:`build_model`)."""

    recipe: object
    registry: object
    #: the :class:`~mmcore.model.classifier.Classifier`, on :attr:`device`
    model: torch.nn.Module
    device: torch.device
    #: the autocast dtype of ``train.precision`` on this device (None: float32)
    dtype: torch.dtype | None
    #: the vision encoder takes channels-last pixels
    channels_last: bool
    #: "synced" (SyncBatchNorm), "frozen" (running statistics fixed) or "none"
    batchnorm: str = "none"
    #: the recipe's augmentation (None: none, or a model without vision) and its declared traits
    augmentation: object = None
    augmentation_traits: object = None
    #: encoders moved off the device (:meth:`offload`); :meth:`encoder_on_device` brings one back
    offloaded: set = attrs.field(factory=set)

    def offload(self, names):
        """Move the encoders ``names`` (``vision``/``text``) to the CPU on a GPU run and release
        the memory they held -> the names moved (none on a CPU run: nothing to free)."""
        if self.device.type == "cpu":
            return []
        moved = [name for name in names if name not in self.offloaded]
        for name in moved:
            getattr(self.model, name).to("cpu")
            self.offloaded.add(name)
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return moved

    def encoder_on_device(self, name):
        """Encoder ``name`` (``vision``/``text``) back on the run's device if it was offloaded
        (a split not cached yet, the report's saliency, scoring raw rows) -> the encoder."""
        encoder = getattr(self.model, name)
        if name in self.offloaded:
            encoder.to(self.device)
            self.offloaded.discard(name)
        return encoder

    def all_on_device(self):
        """Every encoder of the model on the run's device (what scoring raw rows runs) -> the model."""
        for name in tuple(self.offloaded):
            self.encoder_on_device(name)
        return self.model


def build_model(recipe, registry, *, source="recipe", progress=True):
    """Build the recipe's classifier and place it: a :class:`RunModel`.

    Encoders built with random weights come out the same in ``run``, ``eval`` and ``predict``
    (the recipe's seed is set first); the text encoder is frozen; the vision encoder's
    trainability (``freeze_backbone``, ``finetune_layers``, ``lora``) is applied, batch norm made
    safe for DDP, gradient checkpointing turned on where asked, and the model moved to its device.
    """
    device = resolve_device(recipe.train.device)
    dtype = autocast_dtype(recipe.train.precision, device)
    seed_everything(recipe.seed, recipe.train.deterministic)
    model = build_classifier(recipe, registry, source=source)
    if model.text is not None:
        freeze_text_encoder(model.text)
    batchnorm = "none"
    if model.vision is not None:
        train = recipe.train
        try:
            apply_trainability(
                model.vision, freeze_backbone=train.freeze_backbone, finetune_layers=train.finetune_layers, lora=train.lora,
            )
        except TrainabilityError as exc:  # it names the key path; say which file too
            raise RecipeError(f"{source}: {exc}") from None
        batchnorm = distributed_batchnorm(model.vision, device=device, world_size=world_size())
        if batchnorm == "frozen" and rank() == 0 and progress:
            print("note: trainable BatchNorm under DDP without CUDA: its running statistics are frozen "
                  "(SyncBatchNorm needs GPUs; see docs/distributed.md)", file=sys.stderr, flush=True)
    apply_backend_settings(recipe.train, device)
    if recipe.train.gradient_checkpointing and model.vision is not None and not is_frozen(model.vision):
        enable_gradient_checkpointing(model.vision)
    model = model.to(device)
    channels_last = bool(model.vision is not None and model.vision.channels_last)
    if channels_last:
        model.vision.to(memory_format=torch.channels_last)
    augmentation = traits = None
    if model.vision is not None:
        augmentation, traits = build_with_traits(registry, "augmentation", recipe.augmentation, source=source)
    fold_rank_into_seed(recipe.seed, recipe.train.deterministic)
    return RunModel(recipe=recipe, registry=registry, model=model, device=device, dtype=dtype, channels_last=channels_last,
                    batchnorm=batchnorm, augmentation=augmentation, augmentation_traits=traits)


def apply_backend_settings(train, device):
    """``train.tf32`` and ``train.cudnn_benchmark`` (off under ``deterministic``), set where the
    engine picks its device: they only matter on CUDA, and are the documented defaults there."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)
    torch.backends.cudnn.allow_tf32 = bool(train.tf32)
    torch.backends.cudnn.benchmark = bool(train.cudnn_benchmark and not train.deterministic)


def enable_gradient_checkpointing(encoder):
    """Turn on activation checkpointing in a trainable vision encoder -> whether it could
    (:meth:`~mmcore.interfaces.VisionEncoder.enable_gradient_checkpointing`); an encoder that
    cannot gets one warning line and trains without it."""
    if encoder.enable_gradient_checkpointing():
        return True
    warn(
        f"warning: train.gradient_checkpointing = true: vision encoder {encoder.name!r} supports neither "
        "gradient_checkpointing_enable (HF) nor set_grad_checkpointing (timm); training without it"
    )
    return False


def freeze_text_encoder(encoder):
    """The one place text encoders are frozen: no gradients, eval mode (the engine's
    ``set_train_mode`` keeps frozen encoders in eval mode after every ``model.train()``)."""
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


def fold_rank_into_seed(seed, deterministic=False):
    """After the model is built (identically on every rank): give each rank its own random
    stream, so dropout and modality-dropout masks differ across ranks.

    Rank 0 keeps the stream it has, so a one-process run is unchanged by this.
    """
    if rank() > 0:
        seed_everything(derive_seed(seed, 0, rank()), deterministic)
