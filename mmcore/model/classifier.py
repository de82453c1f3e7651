"""Assemble the classifier from a recipe, for the three modalities of MISSION.md.

```
multimodal:  image -> vision -> pooling -+-> fusion -> head -> logit
             text  -> text (frozen) -----+
vision_only: image -> vision -> pooling -> [projection] -> L2 norm -> head -> logit
text_only:   text  -> text -> [projection] -> L2 norm -> head -> logit
```

The forward takes a batch that carries either raw inputs (``vision``: the encoder's
preprocessed pixels; ``text``: strings) or cached encoder outputs (``vision_feature`` =
a pooled vector, ``vision_tokens``/``vision_mask`` = a token sequence, ``text_feature``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mmcore.builtin.projection import UnimodalProjection
from mmcore.data.dataset import device_pixels
from mmcore.errors import RecipeError


class Classifier(nn.Module):
    """Encoders + pooling + fusion/projection + head -> one logit per sample."""

    def __init__(self, *, modality, vision, pooling, text, fusion, head, projection, modality_dropout=0.0):
        super().__init__()
        self.modality = modality
        self.vision = vision
        self.pooling = pooling
        self.text = text
        self.fusion = fusion
        self.projection = projection
        self.head = head
        self.modality_dropout = modality_dropout
        self._auxiliary = None

    @property
    def uses_vision(self):
        return self.modality in ("multimodal", "vision_only")

    @property
    def uses_text(self):
        return self.modality in ("multimodal", "text_only")

    def vision_features(self, batch):
        """Pooled vision vector [B, D] from pixels, cached tokens or a cached vector."""
        if "vision_feature" in batch:
            return batch["vision_feature"]
        if "vision_tokens" in batch:
            return self.pooling(batch["vision_tokens"], batch["vision_mask"])
        out = self.vision(**device_pixels(batch["vision"], self.vision.preprocessing))
        return self.pooling(out.tokens, out.mask)

    def text_features(self, batch):
        if "text_feature" in batch:
            return batch["text_feature"]
        return self.text(batch["text"])

    def forward(self, batch):
        if self.modality == "text_only":
            return self.head(self.projection(self.text_features(batch)))
        vision = self.vision_features(batch)
        if self.modality == "vision_only":
            return self.head(self.projection(vision))
        text = self.text_features(batch).to(vision.dtype)
        if self.training and self.modality_dropout > 0:
            vision, text = _drop_modality(vision, text, self.modality_dropout)
        fused = self.fusion(vision, text)
        aux_weight = getattr(self.fusion, "aux_weight", 0.0)
        if self.training and aux_weight > 0:  # late fusion: each modality's logit gets its own loss
            self._auxiliary = (aux_weight, fused.unbind(-1))
        if self.training and getattr(self.fusion, "detach_combination", False):
            fused = fused.detach()  # the fused logit's loss trains the combining head only (saliency needs the graph)
        return self.head(fused)

    def auxiliary_logits(self):
        """``(weight, per-modality logits)`` of the last training forward (then forgotten), or None.

        Set by a fusion with an ``aux_weight`` (``late``): the training step adds
        ``weight * loss(logits_m)`` for each modality ``m`` to the loss of the fused logit.
        """
        auxiliary, self._auxiliary = self._auxiliary, None
        return auxiliary


def _drop_modality(vision, text, p):
    """Per sample with probability p, zero one modality (chosen at random) — never both."""
    drop = torch.rand(vision.shape[0], device=vision.device) < p
    drop_text = torch.rand(vision.shape[0], device=vision.device) < 0.5
    keep_v = (~(drop & ~drop_text)).to(vision.dtype).unsqueeze(1)
    keep_t = (~(drop & drop_text)).to(text.dtype).unsqueeze(1)
    return vision * keep_v, text * keep_t


def build_component(registry, kind, component, *args, **kwargs):
    """Call a registered factory with the component's structured params."""
    registration = registry.get(kind, component.name)
    if _takes_registry(registration.factory):
        kwargs["registry"] = registry  # composite components build their parts through it
    return registration.factory(component.params, *args, **kwargs)


def _takes_registry(factory):
    try:
        return "registry" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_encoders(recipe, registry):
    """(vision encoder or None, text encoder or None) for the recipe's modality."""
    modality = recipe.train.modality
    vision = build_component(registry, "vision", recipe.vision) if modality != "text_only" else None
    text = build_component(registry, "text", recipe.text) if modality != "vision_only" else None
    return vision, text  # the engine's Pipeline freezes the text encoder


def build_classifier(recipe, registry, *, source="recipe", encoders=None):
    """The whole model (trainability of the vision encoder applied by the engine)."""
    vision, text = encoders if encoders is not None else build_encoders(recipe, registry)
    modality = recipe.train.modality
    pooling = fusion = None
    if vision is not None:
        try:
            pooling = build_component(
                registry, "pooling", recipe.pooling, vision.out_dim, vision.has_cls_token
            )
        except ValueError as exc:
            raise RecipeError(f"{source}: pooling.name: {exc}") from None
    if modality == "multimodal":
        fusion = build_component(registry, "fusion", recipe.fusion, vision.out_dim, text.out_dim)
        projection = None
        head_in = fusion.out_dim
    else:
        in_dim = vision.out_dim if modality == "vision_only" else text.out_dim
        projection = UnimodalProjection(in_dim, recipe.train.projection_dim or None)
        head_in = projection.out_dim
    head = build_component(registry, "head", recipe.head, head_in)
    if hasattr(fusion, "initialize_head"):  # late fusion: the combining head starts as the plain sum
        fusion.initialize_head(head)
    return Classifier(
        modality=modality,
        vision=vision,
        pooling=pooling,
        text=text,
        fusion=fusion,
        head=head,
        projection=projection,
        modality_dropout=recipe.train.modality_dropout,
    )
