"""NaFlex preprocessing: aspect-preserving resize to a patch budget, patchified in the workers."""

import math

import attrs
import torch

from mmcore import Preprocessing, channel_constants


@attrs.frozen(kw_only=True)
class NaflexPreprocessing(Preprocessing):
    """``Siglip2ImageProcessor``, one image at a time, the padding left to :meth:`collate`.

    The image is resized, keeping its aspect ratio, to the largest size whose sides are
    multiples of ``patch_size`` and that holds at most ``max_num_patches`` patches; then it is
    normalized and cut into patches. ``__call__`` returns this image's own patches only
    (``pixel_values`` [n, patch*patch*3], ``pixel_attention_mask`` [n], ``spatial_shapes`` [2]
    as (rows, columns) of patches); :meth:`collate` pads to the longest image of the batch.

    Loader workers hand over the patches as uint8 (:meth:`uint8_item`, a quarter of float32's
    bytes) and the model normalises them on the device (:meth:`normalize`), as for a fixed
    resolution; the patch axis varies from batch to batch (:attr:`variable_axes`).
    """

    patch_size: int
    max_num_patches: int
    # transformers' Siglip2ImageProcessor resamples bilinearly (antialiased)
    interpolation: str = "bilinear"
    # ``size`` and ``resize`` of the base class do not apply: ``size`` is the draft() bound below
    resize: str = attrs.field(default="naflex", init=False)
    size: tuple[int, int] = attrs.field(init=False)

    #: the patch axis: one length per batch (its longest image), marked dynamic for torch.compile
    variable_axes = (("pixel_values", 1), ("pixel_attention_mask", 1))

    @size.default
    def _draft_bound(self):
        # A JPEG draft()ed to at least this square still covers the resize: with at most
        # `budget` patches the short side has at most isqrt(budget) patches, and one patch of
        # margin absorbs the long side's rounding up to a whole patch.
        side = (math.isqrt(self.max_num_patches) + 1) * self.patch_size
        return (side, side)

    def uint8_item(self, image):
        """PIL RGB image -> this image's uint8 patches, their (all True) mask and its patch grid."""
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F
        from transformers.models.siglip2.image_processing_siglip2 import (
            convert_image_to_patches,
            get_image_size_for_max_num_patches,
        )

        img = F.pil_to_tensor(image)
        height, width = get_image_size_for_max_num_patches(
            image_height=img.shape[-2],
            image_width=img.shape[-1],
            patch_size=self.patch_size,
            max_num_patches=self.max_num_patches,
        )
        interpolation = getattr(v2.InterpolationMode, self.interpolation.upper())
        img = F.resize(img, [height, width], interpolation=interpolation, antialias=True)
        patches = convert_image_to_patches(img, self.patch_size)
        return {
            "pixel_values": patches,
            "pixel_attention_mask": torch.ones(patches.shape[0], dtype=torch.bool),
            "spatial_shapes": torch.tensor(
                [height // self.patch_size, width // self.patch_size], dtype=torch.long
            ),
        }

    def normalize(self, pixels):
        """uint8 patches [..., n, patch*patch*3] (channels last in each patch, any device) ->
        float32 normalized, as :meth:`__call__` gives (padding patches included)."""
        from torchvision.transforms.v2 import functional as F

        mean, std = channel_constants(self.mean, self.std, pixels.device, shape=(-1,))
        values = F.to_dtype(pixels, torch.float32, scale=True)
        channels = values.reshape(*values.shape[:-1], -1, len(self.mean))
        return channels.sub(mean).div_(std).reshape(values.shape)

    @property
    def uint8_pixels(self):
        """NaFlex loads uint8 patches: ``normalize(uint8_item(image))`` is ``__call__``'s output."""
        return True

    def __call__(self, image):
        """PIL RGB image -> this image's normalized patches, their (all True) mask and its patch grid."""
        item = self.uint8_item(image)
        return {**item, "pixel_values": self.normalize(item["pixel_values"])}

    def collate(self, items):
        """Pad every image's patches to the batch's longest; the mask marks the real ones."""
        longest = max(item["pixel_values"].shape[0] for item in items)
        first = items[0]["pixel_values"]
        pixel_values = first.new_zeros(len(items), longest, first.shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, item in enumerate(items):
            count = item["pixel_values"].shape[0]
            pixel_values[row, :count] = item["pixel_values"]
            mask[row, :count] = item["pixel_attention_mask"]
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": mask,
            "spatial_shapes": torch.stack([item["spatial_shapes"] for item in items]),
        }
