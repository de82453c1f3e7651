"""ResNet vision encoders for mmcore, through torchvision.

The feature map after ``layer4`` ([B, C, 7, 7] at 224 px) becomes 49 tokens. ``blocks()`` are
the residual blocks of layer1..layer4 in order (resnet18: 8, resnet50: 16, resnet101: 33), so
``finetune_layers = 3`` trains resnet50's whole last stage. LoRA wraps the convolutions of
the top blocks (peft supports ``Conv2d``). torchvision is imported by the factory.
"""

from functools import partial

import attrs

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
WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
}
TINY_IMAGE_SIZE = 64  # 2x2 feature map -> 4 tokens


@attrs.frozen(kw_only=True)
class ResNetParams(EncoderParams):
    """torchvision ResNet; ``weights`` may be another torchvision weights id or a local file/dir."""


class ResNetEncoder(FeatureMapEncoder):
    """A torchvision ResNet without its pooling and classifier."""

    def __init__(self, model, **kwargs):
        super().__init__(out_dim=model.fc.in_features, **kwargs)
        model.avgpool = model.fc = None  # unused: mmcore's pooling and head replace them
        self.model = model
        # BasicBlock (resnet18) has conv1, conv2; Bottleneck adds conv3
        block = model.layer1[0]
        convs = ("conv1", "conv2", "conv3")
        self.lora_target_modules = tuple(n for n in convs if hasattr(block, n))

    def feature_map(self, pixel_values):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixel_values))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def blocks(self):
        m = self.model
        return [block for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for block in layer]


def tiny_resnet(name):
    """The test miniature: one block per stage; resnet50/101 keep Bottleneck and 2048-d output."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if name == "resnet18":
        return ResNet(BasicBlock, [1, 1, 1, 1])
    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8)  # thin 3x3 convs


def build_resnet(name, params):
    """The encoder ``name`` for its params."""
    model, weights = build_torchvision_model(
        name,
        WEIGHTS[name],
        params,
        component=f"vision encoder {name!r}",
        tiny=lambda: tiny_resnet(name),
        head_prefixes=("fc.",),
    )
    if params.tiny:
        preprocessing = square_preprocessing(TINY_IMAGE_SIZE)
    else:
        preprocessing = torchvision_preprocessing(WEIGHTS[name])
    return ResNetEncoder(model, name=name, weights=weights, preprocessing=preprocessing)


def _factory(name):
    def factory(params):
        return build_resnet(name, params)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = f"Build the {name} encoder from its params."
    return factory


@hookimpl
def register_vision_encoders(register):
    for name in WEIGHTS:
        register(name, _factory(name), ResNetParams, traits=VisionTraits(has_cls_token=False),
                 weights=partial(torchvision_weights, weights_id=WEIGHTS[name]))
