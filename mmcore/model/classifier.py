"""Assemble the classifier from a recipe, for the three modalities of MISSION.md.

```
multimodal:  image -> vision -> pooling -+-> fusion -> FusionOutput.fused -> head -> logit
             text  -> text (frozen) -----+
vision_only: image -> vision -> pooling -> [projection] -> L2 norm -> head -> logit
text_only:   text  -> text -> [projection] -> L2 norm -> head -> logit
```

The forward takes a batch that carries either raw inputs (``vision``: the encoder's
preprocessed pixels; ``text``: strings) or cached encoder outputs (``vision_feature`` =
a pooled vector, ``vision_tokens``/``vision_mask`` = a token sequence, ``text_feature``),
and returns a :class:`~mmcore.interfaces.ModelOutput`.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcore.errors import RecipeError
from mmcore.interfaces import Fusion, FusionOutput, ModelOutput
from mmcore.model.components import build_encoders, build_top
from mmcore.model.size import size_problem


def device_pixels(vision, preprocessing):
    """The encoder's inputs with uint8 ``pixel_values`` normalised (where they are: on the
    device after the copy); float pixels (a NaFlex preprocessing, explain's gradients) pass."""
    pixels = vision.get("pixel_values")
    if pixels is None or pixels.dtype != torch.uint8:
        return vision
    return {**vision, "pixel_values": preprocessing.normalize(pixels)}


class Classifier(nn.Module):
    """Encoders + pooling + fusion/projection + head -> :class:`~mmcore.interfaces.ModelOutput`.

    ``model(batch).logit`` is one logit per sample; ``.aux`` carries what the fusion wants trained
    by losses of its own (late fusion's per-modality logits, in training), which the training
    step adds to the loss.
    """

    def __init__(self, *, modality, vision, pooling, text, fusion, head, projection, modality_dropout=0.0, component_labels=None):
        super().__init__()
        self.modality = modality
        self.vision = vision
        self.pooling = pooling
        self.text = text
        self.fusion = fusion
        self.projection = projection
        self.head = head
        self.modality_dropout = modality_dropout
        #: a fusion written before FusionOutput (a plain module returning the fused tensor)
        self._fusion_returns_tensor = fusion is not None and not isinstance(fusion, Fusion)
        #: part name -> how messages name the registered component (``pooling 'x' (package p)``)
        self.component_labels = dict(component_labels or {})

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

    def plugin_parts(self):
        """``{module: label}`` of the registered components inside (the plugins' code)."""
        parts = {"vision": self.vision, "pooling": self.pooling, "text": self.text, "fusion": self.fusion, "head": self.head}
        labels = self.component_labels
        return {module: labels[name] for name, module in parts.items() if module is not None and name in labels}

    def fuse(self, vision, text):
        """The fusion's :class:`~mmcore.interfaces.FusionOutput` for pooled vision and text vectors."""
        out = self.fusion(vision, text)
        return FusionOutput(out) if self._fusion_returns_tensor else out

    def forward(self, batch):
        if self.modality == "text_only":
            return ModelOutput(self.head(self.projection(self.text_features(batch))))
        vision = self.vision_features(batch)
        if self.modality == "vision_only":
            return ModelOutput(self.head(self.projection(vision)))
        text = self.text_features(batch).to(vision.dtype)
        if self.training and self.modality_dropout > 0:
            vision, text = _drop_modality(vision, text, self.modality_dropout)
        fused = self.fuse(vision, text)
        return ModelOutput(self.head(fused.fused), fused.aux_logits)


def _drop_modality(vision, text, p):
    """Per sample with probability p, zero one modality (chosen at random) — never both."""
    drop = torch.rand(vision.shape[0], device=vision.device) < p
    drop_text = torch.rand(vision.shape[0], device=vision.device) < 0.5
    keep_v = (~(drop & ~drop_text)).to(vision.dtype).unsqueeze(1)
    keep_t = (~(drop & drop_text)).to(text.dtype).unsqueeze(1)
    return vision * keep_v, text * keep_t


def build_classifier(recipe, registry, *, source="recipe"):
    """The whole model (trainability of the vision encoder applied by the engine).

    The parts after the encoders are measured first (on the meta device): parameters that cannot
    fit in memory are a recipe error naming the key, not an allocator's traceback.
    """
    vision, text = build_encoders(recipe, registry, source=source)
    dims = {
        "vision_dim": vision.out_dim if vision is not None else None,
        "text_dim": text.out_dim if text is not None else None,
        "has_cls_token": vision.has_cls_token if vision is not None else False,
    }
    problem = size_problem(recipe, registry, source=source, **dims)
    if problem:
        raise RecipeError(problem)
    top = build_top(recipe, registry, source=source, **dims)
    parts = {"vision": (recipe.vision, vision), "pooling": (recipe.pooling, top["pooling"]), "text": (recipe.text, text),
             "fusion": (recipe.fusion, top["fusion"]), "head": (recipe.head, top["head"])}
    return Classifier(
        modality=recipe.train.modality,
        vision=vision,
        text=text,
        **top,
        modality_dropout=recipe.train.modality_dropout,
        component_labels={kind: registry.get(kind, table.name).label for kind, (table, part) in parts.items() if part is not None},
    )
