"""The EfficientNetV2-L vision encoder for mmcore, through torchvision.

The weights were trained at 480 px, so the preprocessing is 480 px (mean/std 0.5, bicubic):
the final 1280-channel feature map is 15x15 = 225 tokens. ``blocks()`` are the seven stages;
``final_norm()`` is the 1x1 conv + BatchNorm that widens the last stage to 1280 channels,
trained together with any top-N stages. LoRA is not offered (``lora_target_modules`` is
empty; the blocks are depthwise convolutions): use ``finetune_layers``. torchvision is
imported by the factory.
"""

from functools import partial

import attrs

from mmcore import (
    EncoderParams,
    FeatureMapEncoder,
    VisionTraits,
    build_torchvision_model,
    calibrate_batchnorm,
    hookimpl,
    square_preprocessing,
    torchvision_preprocessing,
    torchvision_weights,
)

#: mmcore name -> the torchvision weights it loads when ``pretrained = true``
WEIGHTS = {"efficientnet": "EfficientNet_V2_L_Weights.IMAGENET1K_V1"}
ARCHITECTURE = "efficientnet_v2_l"  # the torchvision builder
TINY_IMAGE_SIZE = 64  # 2x2 feature map -> 4 tokens


@attrs.frozen(kw_only=True)
class EfficientNetParams(EncoderParams):
    """torchvision EfficientNetV2-L; ``weights``: another torchvision weights id or a local file/dir."""


class EfficientNetEncoder(FeatureMapEncoder):
    """torchvision EfficientNet ``features``: stem, stages, final 1x1 conv."""

    def __init__(self, model, **kwargs):
        super().__init__(out_dim=model.features[-1][0].out_channels, **kwargs)
        self.features = model.features

    def feature_map(self, pixel_values):
        return self.features(pixel_values)

    def blocks(self):
        return list(self.features[1:-1])

    def final_norm(self):
        return self.features[-1]


def tiny_efficientnet():
    """The test miniature: V2-L's seven stages (Fused-MBConv then MBConv), one thin block each."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    stages = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 1),
        FusedMBConvConfig(4, 3, 2, 16, 24, 1),
        MBConvConfig(4, 3, 2, 24, 32, 1),
        MBConvConfig(6, 3, 1, 32, 40, 1),
        MBConvConfig(6, 3, 2, 40, 48, 1),
        MBConvConfig(6, 3, 1, 48, 64, 1),
    ]
    # default BatchNorm statistics would leave a random EfficientNet's features near zero
    return calibrate_batchnorm(EfficientNet(stages, dropout=0.0, last_channel=1280), TINY_IMAGE_SIZE)


def build_efficientnet(params):
    """Build the efficientnet (EfficientNetV2-L) encoder from its params."""
    name = "efficientnet"
    model, weights = build_torchvision_model(
        ARCHITECTURE,
        WEIGHTS[name],
        params,
        component=f"vision encoder {name!r}",
        tiny=tiny_efficientnet,
        head_prefixes=("classifier.",),
    )
    if params.tiny:
        preprocessing = square_preprocessing(TINY_IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    else:
        preprocessing = torchvision_preprocessing(WEIGHTS[name])
    return EfficientNetEncoder(model, name=name, weights=weights, preprocessing=preprocessing)


@hookimpl
def register_vision_encoders(register):
    register("efficientnet", build_efficientnet, EfficientNetParams, traits=VisionTraits(has_cls_token=False),
             weights=partial(torchvision_weights, weights_id=WEIGHTS["efficientnet"]))
