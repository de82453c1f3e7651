"""torchvision's v2 image functions that preprocessing uses, on torch alone.

Importing ``torchvision.transforms.v2`` costs a scoring process about a second (it pulls in
``torch._dynamo`` through its kernel registry); a bundle's preprocessing needs only a resize,
a centre crop, a pad and a cast. These are torchvision 0.29's ``pil_to_tensor``, ``resize``
(``antialias=True``), ``center_crop``, ``pad`` (constant) and ``to_dtype(..., scale=True)``
for uint8 tensors [..., C, H, W], operation for operation, so that every pixel is the same
(tests/test_pixels.py compares them with ``torch.equal``).
"""

from __future__ import annotations

import platform

import numpy as np
import torch
from torch.nn import functional as F

#: ``Preprocessing.interpolation`` (torchvision's ``InterpolationMode`` member, lower case) ->
#: ``torch.nn.functional.interpolate``'s mode (box and hamming have no tensor kernel)
INTERPOLATIONS = {
    "nearest": "nearest",
    "nearest_exact": "nearest-exact",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos",
}
_SMOOTH = ("bilinear", "bicubic", "lanczos")


def pil_to_uint8(image):
    """PIL image -> uint8 tensor [C, H, W] (a channels-last view of a copy, as torchvision's)."""
    array = np.array(image, copy=True)
    return torch.as_tensor(array).view(image.size[1], image.size[0], -1).permute((2, 0, 1))


def resized_size(height, width, size):
    """The output (height, width) of :func:`resize`: ``size`` [h, w], or an int for the shorter side
    (the longer side scaled and truncated, as torchvision computes it)."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _native_uint8(mode, pixels):
    """Whether torch resamples uint8 pixels itself in this mode (else through float32, rounded)."""
    if mode in ("nearest", "nearest-exact"):
        return True
    if pixels.device.type != "cpu":
        return False
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return True  # bicubic, lanczos


def resize(pixels, size, interpolation):
    """uint8 pixels [..., C, H, W] -> resized to ``size`` (see :func:`resized_size`), antialiased.

    ``interpolation``: a key of :data:`INTERPOLATIONS` (a ValueError names the others).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]
    shape = pixels.shape
    channels, height, width = shape[-3:]
    new_height, new_width = resized_size(height, width, size)
    if (new_height, new_width) == (height, width):
        return pixels
    if pixels.numel() == 0:
        return pixels.reshape(shape[:-2] + (new_height, new_width))
    dtype = pixels.dtype
    batch = pixels.reshape(-1, channels, height, width)
    strides = batch.stride()
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.shape[0] == 1 and pixels.numel() != strides[0]:
        # torch allocates a contiguous output for a 1CHW channels-last input unless the batch
        # stride says otherwise (pytorch#68430); torchvision restrides so, and the uint8 kernels
        # it then picks are the ones whose pixels we must equal
        batch = batch.as_strided((1, channels, height, width), (pixels.numel(), *strides[1:]))
    cast = dtype == torch.uint8 and not _native_uint8(mode, batch)
    if cast:
        batch = batch.to(torch.float32)
    smooth = mode in _SMOOTH
    batch = F.interpolate(batch, size=[new_height, new_width], mode=mode,
                          align_corners=False if smooth else None, antialias=smooth)
    if cast:
        if mode in ("bicubic", "lanczos"):
            batch = batch.clamp_(min=0, max=255)
        batch = batch.round_().to(dtype)
    return batch.reshape(shape[:-3] + (channels, new_height, new_width))


def center_crop(pixels, size):
    """The centre ``size`` (height, width) of pixels [..., H, W], zero-padded where it is larger."""
    crop_height, crop_width = size
    height, width = pixels.shape[-2:]
    if crop_height > height or crop_width > width:
        left = (crop_width - width) // 2 if crop_width > width else 0
        top = (crop_height - height) // 2 if crop_height > height else 0
        right = (crop_width - width + 1) // 2 if crop_width > width else 0
        bottom = (crop_height - height + 1) // 2 if crop_height > height else 0
        pixels = F.pad(pixels, [left, right, top, bottom], value=0.0)
        height, width = pixels.shape[-2:]
        if (crop_height, crop_width) == (height, width):
            return pixels
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return pixels[..., top:top + crop_height, left:left + crop_width]


def pad(pixels, *, left, top, right, bottom, fill=0):
    """Pixels [..., C, H, W] with constant ``fill`` borders of the given widths."""
    shape = pixels.shape
    batch = pixels.reshape(-1, *shape[-3:])
    batch = F.pad(batch, [left, right, top, bottom], mode="constant", value=float(fill))
    return batch.reshape(shape[:-2] + batch.shape[-2:])


def uint8_to_float(pixels):
    """uint8 pixels -> float32 in [0, 1] (``to_dtype(pixels, torch.float32, scale=True)``)."""
    return pixels.to(torch.float32).mul_(1.0 / 255)
