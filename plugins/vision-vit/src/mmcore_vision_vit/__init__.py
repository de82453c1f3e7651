"""ViT vision encoders for mmcore, through timm.

``vit`` is ViT-B/16 (768-d): the original project's table says "ViT Large, 768", which
cannot both be true (ViT-L is 1024-d); we keep the dimension, so ``vit`` = ``vit_base``, and
ViT-L/16 is ``vit_large``. Tokens are timm's ``forward_features`` (after the final norm):
the CLS token first, then 14x14 = 196 patch tokens at 224 px. ``blocks()`` are the
transformer blocks (12 / 24), ``final_norm()`` the final LayerNorm, and LoRA wraps each
block's attention linears ``attn.qkv`` and ``attn.proj`` (``lora_target_modules`` is
``("qkv", "proj")``). timm is imported by the factory.
"""

from functools import partial

import attrs

from mmcore import EncoderParams, VisionTraits, build_timm_encoder, hookimpl, timm_weights

#: mmcore name -> the timm model (with its pretrained tag) loaded from the Hugging Face hub
#: (``timm/<name>``) when ``pretrained = true``
WEIGHTS = {
    "vit": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
}


@attrs.frozen(kw_only=True)
class VitParams(EncoderParams):
    """timm ViT; ``weights`` may be another timm name (``hf-hub:...`` too) or a local file/dir."""


def _factory(name):
    def factory(params):
        return build_timm_encoder(name, WEIGHTS[name], params)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = f"Build the {name} encoder ({WEIGHTS[name]}) from its params."
    return factory


@hookimpl
def register_vision_encoders(register):
    for name in WEIGHTS:
        register(name, _factory(name), VitParams, traits=VisionTraits(has_cls_token=True),
                 weights=partial(timm_weights, model_name=WEIGHTS[name]))
