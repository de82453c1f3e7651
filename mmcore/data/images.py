"""Decoding images robustly: any mode Pillow reads becomes RGB, big JPEGs decode at reduced scale."""

from __future__ import annotations

import warnings

from ..errors import DataError


class BadImageError(DataError):
    """An image that cannot be used (missing, corrupt, truncated, not an image, too big)."""


def load_rgb(path, *, target_size=None, max_pixels=89_478_485):
    """Open ``path`` as an RGB PIL image.

    ``target_size`` (h, w): a JPEG larger than it is decoded at a reduced scale with
    ``Image.draft`` (never smaller than the target). Palette/alpha images are flattened on
    white, CMYK and 16-bit images converted, animated images give their first frame.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"image too large ({width}x{height} = {width * height} pixels > "
                    f"data.max_image_pixels = {max_pixels})"
                )
            if target_size is not None and image.format == "JPEG":
                th, tw = target_size
                image.draft("RGB", (tw, th))
            image.seek(0)
            image.load()
            return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("image not found") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as exc:
        raise BadImageError(f"corrupt or truncated image ({exc})") from None


def to_rgb(image):
    """Any Pillow mode -> RGB; transparency flattened onto white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        array = np.asarray(image, dtype=np.float32)
        peak = array.max() or 1.0
        return Image.fromarray((array / peak * 255).astype("uint8")).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")
