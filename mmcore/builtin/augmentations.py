"""Image augmentations for ad images that carry text: ``none``, ``weak``, ``strong``.

They run in data-loader workers on the decoded PIL image, before the encoder's
preprocessing, so every object here must pickle. No horizontal flips: mirrored text is not
text any more. Randomness comes from torch's generator, which the loader seeds per worker.
"""

import math

import attrs
import torch

from mmcore.interfaces import NoParams
from mmcore.plugins.traits import AugmentationTraits
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import in_range


class ResizedCropKeepSize:
    """Crop a random region (area fraction in ``[min_scale, 1]``, aspect within ``max_stretch``
    of the image's own) and resize it back to the image's size.

    Unlike ``RandomResizedCrop``, the aspect range is relative to the image, so a 4:1 banner
    is never cut down to a 4:3 centre.
    """

    def __init__(self, min_scale, max_stretch=1.1):
        self.min_scale = min_scale
        self.max_stretch = max_stretch

    def __call__(self, image):
        from torchvision.transforms.v2 import functional as F

        width, height = image.size
        area = torch.empty(1).uniform_(self.min_scale, 1.0).item()
        log_stretch = math.log(self.max_stretch)
        stretch = math.exp(torch.empty(1).uniform_(-log_stretch, log_stretch).item())
        crop_w = min(width, max(1, round(width * math.sqrt(area * stretch))))
        crop_h = min(height, max(1, round(height * math.sqrt(area / stretch))))
        top = int(torch.randint(0, height - crop_h + 1, (1,)))
        left = int(torch.randint(0, width - crop_w + 1, (1,)))
        return F.resized_crop(image, top, left, crop_h, crop_w, [height, width], antialias=True)

    def __repr__(self):
        return f"ResizedCropKeepSize(min_scale={self.min_scale}, max_stretch={self.max_stretch})"


class Augmentation:
    """A picklable ``PIL.Image -> PIL.Image`` (RGB) wrapper around a transforms.v2 pipeline."""

    def __init__(self, transforms):
        from torchvision.transforms import v2

        self.pipeline = v2.Compose(list(transforms))

    def __call__(self, image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.pipeline(image)

    def __repr__(self):
        return f"Augmentation({self.pipeline!r})"


def build_none(params):
    return None


@attrs.frozen(kw_only=True)
class WeakParams:
    """A slight crop (keeping at least ``crop_scale`` of the area) and mild colour jitter."""

    crop_scale: float = attrs.field(default=0.85, validator=in_range(0.1, 1.0, high_inclusive=True))
    jitter: float = attrs.field(default=0.2, validator=in_range(0.0, 1.0, high_inclusive=True))


def build_weak(params):
    from torchvision.transforms import v2

    return Augmentation(
        [
            ResizedCropKeepSize(params.crop_scale),
            v2.ColorJitter(
                brightness=params.jitter, contrast=params.jitter, saturation=params.jitter
            ),
        ]
    )


@attrs.frozen(kw_only=True)
class StrongParams:
    """A larger crop, small rotations, stronger jitter, random grayscale and blur."""

    crop_scale: float = attrs.field(default=0.6, validator=in_range(0.1, 1.0, high_inclusive=True))
    jitter: float = attrs.field(default=0.4, validator=in_range(0.0, 1.0, high_inclusive=True))
    hue: float = attrs.field(default=0.05, validator=in_range(0.0, 0.5, high_inclusive=True))
    rotation: float = attrs.field(default=10.0, validator=in_range(0.0, 180.0, high_inclusive=True))
    grayscale_p: float = attrs.field(default=0.1, validator=in_range(0.0, 1.0, high_inclusive=True))
    blur_p: float = attrs.field(default=0.2, validator=in_range(0.0, 1.0, high_inclusive=True))


def build_strong(params):
    from torchvision.transforms import v2

    return Augmentation(
        [
            ResizedCropKeepSize(params.crop_scale, max_stretch=1.2),
            v2.RandomRotation(params.rotation, interpolation=v2.InterpolationMode.BILINEAR),
            v2.ColorJitter(
                brightness=params.jitter,
                contrast=params.jitter,
                saturation=params.jitter,
                hue=params.hue,
            ),
            v2.RandomGrayscale(p=params.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=params.blur_p),
        ]
    )


@hookimpl
def register_augmentations(register):
    # weak and strong crop and resize back: the output keeps the input's size
    register("none", build_none, NoParams)
    register("weak", build_weak, WeakParams, traits=AugmentationTraits(keeps_size=True))
    register("strong", build_strong, StrongParams, traits=AugmentationTraits(keeps_size=True))
