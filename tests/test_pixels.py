"""Preprocessing without torchvision gives torchvision's pixels: every resize policy x interpolation
over small, odd, large, up- and down-scaled images and aspect ratios, compared with ``torch.equal``."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mmcore.interfaces import RESIZE_POLICIES, Preprocessing
from mmcore.kit import pixels
from mmcore.kit.vision import ResizeCropPreprocessing

#: (width, height) of the source images: 1 pixel, odd, tall, wide, square, large, a strip
IMAGE_SIZES = [(1, 1), (7, 5), (17, 31), (97, 300), (300, 97), (32, 32), (643, 481), (1000, 3)]
#: (height, width) of the outputs: up and down from the images above, square and not
TARGET_SIZES = [(32, 32), (24, 40), (225, 224)]


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _torchvision_resized(prep, image):
    """Preprocessing.resized as it was written on torchvision's v2 functional."""
    interpolation = getattr(v2.InterpolationMode, prep.interpolation.upper())
    h, w = prep.size
    img = TF.pil_to_tensor(image)
    if prep.resize == "squash":
        return TF.resize(img, [h, w], interpolation=interpolation, antialias=True)
    if prep.resize == "shorter_center_crop":
        return TF.center_crop(TF.resize(img, min(h, w), interpolation=interpolation, antialias=True), [h, w])
    ih, iw = img.shape[-2:]
    scale = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
    img = TF.resize(img, [nh, nw], interpolation=interpolation, antialias=True)
    top, left = (h - nh) // 2, (w - nw) // 2
    return TF.pad(img, [left, top, w - nw - left, h - nh - top], fill=0)


@pytest.mark.parametrize("interpolation", list(pixels.INTERPOLATIONS))
@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_resized_equals_torchvision_for_every_policy_and_interpolation(policy, interpolation):
    for target in TARGET_SIZES:
        prep = Preprocessing(size=target, resize=policy, interpolation=interpolation)
        for seed, (width, height) in enumerate(IMAGE_SIZES):
            image = _image(width, height, seed)
            ours, theirs = prep.resized(image), _torchvision_resized(prep, image)
            assert ours.dtype == torch.uint8 and ours.shape == (3, *target), (width, height, target)
            assert torch.equal(ours, theirs), (policy, interpolation, (width, height), target)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_crop_preprocessing_equals_torchvision(interpolation):
    prep = ResizeCropPreprocessing(size=(224, 224), resize_size=232, interpolation=interpolation)
    mode = getattr(v2.InterpolationMode, interpolation.upper())
    for seed, (width, height) in enumerate(IMAGE_SIZES):
        image = _image(width, height, seed)
        theirs = TF.center_crop(TF.resize(TF.pil_to_tensor(image), 232, interpolation=mode, antialias=True), [224, 224])
        assert torch.equal(prep.resized(image), theirs), (interpolation, (width, height))


def test_normalize_equals_torchvision():
    prep = Preprocessing(size=(32, 32), mean=(0.48, 0.45, 0.41), std=(0.23, 0.22, 0.26))
    uint8 = prep.resized(_image(50, 40, 0))
    theirs = TF.normalize(TF.to_dtype(uint8, torch.float32, scale=True), list(prep.mean), list(prep.std))
    assert torch.equal(prep.normalize(uint8), theirs)
    assert torch.equal(prep(_image(50, 40, 0))["pixel_values"], theirs)


def test_resize_names_the_interpolations_it_has():
    with pytest.raises(ValueError, match="interpolation 'box' is not one of nearest, nearest_exact, bilinear, bicubic, lanczos"):
        pixels.resize(torch.zeros(3, 4, 4, dtype=torch.uint8), [2, 2], "box")
