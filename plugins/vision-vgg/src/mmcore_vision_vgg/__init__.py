"""The VGG16 vision encoder for mmcore, through torchvision.

The convolutional features ([B, 512, 7, 7] at 224 px, after the fifth max-pool) become 49
tokens; the 120M-parameter classifier is never built or loaded. ``blocks()`` are the five
conv blocks (each ends with its max-pool), so ``finetune_layers = 1`` trains the last three
convolutions. LoRA is not offered (``lora_target_modules`` is empty): use ``finetune_layers``.
torchvision is imported by the factory.
"""

from functools import partial

import attrs
from torch import nn

from mmcore import (
    EncoderParams,
    FeatureMapEncoder,
    VisionTraits,
    build_torchvision_model,
    hookimpl,
    square_preprocessing,
    torchvision_preprocessing,
    torchvision_weights,
)

#: mmcore name -> the torchvision weights it loads when ``pretrained = true``
WEIGHTS = {"vgg16": "VGG16_Weights.IMAGENET1K_V1"}
#: test miniature: VGG's five blocks, one thin conv each, still 512-d out
TINY_CONFIG = [8, "M", 16, "M", 32, "M", 64, "M", 512, "M"]
TINY_IMAGE_SIZE = 64  # 2x2 feature map -> 4 tokens


@attrs.frozen(kw_only=True)
class VggParams(EncoderParams):
    """torchvision VGG16; ``weights`` may be another torchvision weights id or a local file/dir."""


class VggEncoder(FeatureMapEncoder):
    """VGG's conv features, regrouped into one ``nn.Sequential`` per block."""

    def __init__(self, features, **kwargs):
        convs = [layer for layer in features if isinstance(layer, nn.Conv2d)]
        super().__init__(out_dim=convs[-1].out_channels, **kwargs)
        blocks, current = [], []
        for layer in features:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(nn.Sequential(*current))
                current = []
        self.features = nn.Sequential(*blocks)

    def feature_map(self, pixel_values):
        return self.features(pixel_values)

    def blocks(self):
        return list(self.features)


def vgg_features(config):
    """VGG without its classifier: only ``features`` (the state-dict keys torchvision uses)."""
    from torchvision.models.vgg import make_layers

    return nn.ModuleDict({"features": make_layers(config)})


def build_vgg16(params):
    """Build the vgg16 encoder from its params."""
    from torchvision.models.vgg import cfgs

    name = "vgg16"
    model, weights = build_torchvision_model(
        name,
        WEIGHTS[name],
        params,
        component=f"vision encoder {name!r}",
        tiny=lambda: vgg_features(TINY_CONFIG),
        architecture=lambda: vgg_features(cfgs["D"]),
        head_prefixes=("classifier.",),
    )
    if params.tiny:
        preprocessing = square_preprocessing(TINY_IMAGE_SIZE)
    else:
        preprocessing = torchvision_preprocessing(WEIGHTS[name])
    return VggEncoder(model.features, name=name, weights=weights, preprocessing=preprocessing)


@hookimpl
def register_vision_encoders(register):
    register("vgg16", build_vgg16, VggParams, traits=VisionTraits(has_cls_token=False),
             weights=partial(torchvision_weights, weights_id=WEIGHTS["vgg16"]))
