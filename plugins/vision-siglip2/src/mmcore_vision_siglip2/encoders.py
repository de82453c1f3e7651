"""The SigLIP 2 encoders: transformers' vision towers without their attention-pooling head.

mmcore's pooling replaces the head, so every model is built or loaded with
``vision_use_head=False``: the head's weights are neither loaded, trained nor counted.
"""

import torch
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmcore import Preprocessing, TokenOutput, VisionEncoder, load_pretrained

from . import FIXED_NAMES, HUB_IDS
from .naflex import NaflexPreprocessing

#: transformer sizes of the checkpoints (their config.json's vision_config)
ARCHITECTURES = {
    "so400m": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
    },
    "base": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    # test-only miniature of either
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
}

#: name -> (architecture, patch size, image size); fixed-resolution checkpoints
FIXED = {
    "siglip2_so400m": ("so400m", 14, 384),
    "siglip2_base": ("base", 16, 224),
}
TINY_FIXED = (8, 32)  # patch, image: 16 tokens

#: name -> (architecture, patch size, position grid patches); NaFlex checkpoints learn a 16x16
#: grid of position embeddings, resized to each image's patch grid
NAFLEX = {
    "siglip2_naflex_so400m": ("so400m", 16, 256),
    "siglip2_naflex_base": ("base", 16, 256),
}
TINY_NAFLEX = (4, 16)  # patch, 4x4 position grid


def vision_config(name, tiny=False):
    """The transformers config of ``name``'s vision tower (``tiny``: the test miniature)."""
    if name in FIXED:
        arch, patch, image = FIXED[name]
        if tiny:
            arch, (patch, image) = "tiny", TINY_FIXED
        return SiglipVisionConfig(
            **ARCHITECTURES[arch], patch_size=patch, image_size=image, vision_use_head=False
        )
    arch, patch, grid = NAFLEX[name]
    if tiny:
        arch, (patch, grid) = "tiny", TINY_NAFLEX
    return Siglip2VisionConfig(
        **ARCHITECTURES[arch], patch_size=patch, num_patches=grid, vision_use_head=False
    )


class Siglip2Encoder(VisionEncoder):
    """A SigLIP 2 vision tower; tokens are its ``last_hidden_state`` (after the final norm)."""

    has_cls_token = False
    lora_target_modules = ("q_proj", "k_proj", "v_proj")

    def __init__(self, model, *, name, weights, revision, preprocessing):
        super().__init__()
        self.model = model
        self.name = name
        self.out_dim = model.config.hidden_size
        self.weights = weights
        self.revision = revision
        self.preprocessing = preprocessing

    def blocks(self):
        return list(self.model.encoder.layers)

    def final_norm(self):
        return self.model.post_layernorm


class Siglip2FixedEncoder(Siglip2Encoder):
    """Fixed resolution: (image / patch)^2 tokens, all real."""

    def forward(self, pixel_values):
        tokens = self.model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TokenOutput(tokens, mask)


class Siglip2NaflexEncoder(Siglip2Encoder):
    """NaFlex: one token per patch of each image; padding patches are masked out everywhere."""

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):
        mask = pixel_attention_mask.bool()
        tokens = self.model(
            pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=spatial_shapes
        ).last_hidden_state
        return TokenOutput(tokens, mask)


def load_vision_tower(model_id, *, model_cls, revision):
    """The vision tower of a SigLIP (2) checkpoint (hub id or directory), without its head.

    The hub checkpoints hold the text tower too; transformers' report listing those tensors as
    unexpected is silenced. Vision tensors missing from the checkpoint are an error (they would
    silently stay random).
    """
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(
            model_id, revision=revision, vision_use_head=False, output_loading_info=True
        )
    finally:
        logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} {model_cls.__name__} tensors "
            f"(e.g. {missing[0]}): not a checkpoint of this architecture"
        )
    return model


def build_encoder(name, params):
    """The encoder ``name`` for its params (see :func:`vision_config` for the architectures)."""
    fixed = name in FIXED_NAMES
    model_cls = SiglipVisionModel if fixed else Siglip2VisionModel
    if params.pretrained and not params.tiny:
        weights = params.weights or HUB_IDS[name]
        model = load_pretrained(
            load_vision_tower,
            weights,
            component=f"vision encoder {name!r}",
            model_cls=model_cls,
            revision=params.revision,
        )
    else:
        weights = "random"
        model = model_cls(vision_config(name, tiny=params.tiny))
    config = model.config
    if fixed:
        preprocessing = Preprocessing(
            size=(config.image_size, config.image_size),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            resize="squash",
            interpolation="bicubic",
        )
        encoder_cls = Siglip2FixedEncoder
    else:
        preprocessing = NaflexPreprocessing(
            patch_size=config.patch_size, max_num_patches=params.max_num_patches
        )
        encoder_cls = Siglip2NaflexEncoder
    return encoder_cls(
        model,
        name=name,
        weights=weights,
        revision=params.revision if weights != "random" else None,
        preprocessing=preprocessing,
    )
