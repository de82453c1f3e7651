"""Decoding images robustly: any mode Pillow reads becomes RGB, big JPEGs decode at reduced scale.

A bad image raises :class:`BadImageError` with a short reason ("empty file (0 bytes)", "not an
image Pillow can read", "corrupt or truncated image (...)", "image too large (...)"); the
dataset prefixes it with the CSV, row and path.
"""

from __future__ import annotations

import contextlib
import os
import threading

from mmcore.errors import DataError

#: Pillow's own default limit; ``data.max_image_pixels`` replaces Pillow's check.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: bump when decoding changes what pixels an image gives (cached features depend on it);
#: 2: 16-bit images on a fixed 0..65535 scale (was: each image's own maximum)
DECODE_VERSION = 2
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(DataError):
    """An image that cannot be used (missing, corrupt, truncated, not an image, too big)."""


def load_rgb(path, *, target_size=None, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Open ``path`` (a path or a binary file object) as an RGB PIL image.

    The size is checked against ``max_pixels`` from the header, before anything is decoded.
    ``target_size`` (h, w): a JPEG larger than it is decoded at a reduced scale with
    ``Image.draft`` (never smaller than the target). Palette/alpha images are flattened on
    white, CMYK and 16-bit images converted, animated images give their first frame.
    """
    with _open_file(path) as handle:
        image = open_checked(handle, max_pixels=max_pixels)
        return _decode(image, target_size)


def open_checked(handle, *, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Read only the header of an open binary file -> a lazy PIL image within ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    if _remaining_bytes(handle) == 0:
        raise BadImageError("empty file (0 bytes)")
    try:
        with _pillow_size_guard_lifted():  # no DecompressionBombWarning either: checked below
            image = Image.open(handle)
    except UnidentifiedImageError:
        raise BadImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise BadImageError(f"corrupt or truncated image ({_reason(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(
            f"image too large ({width}x{height} = {width * height} pixels > "
            f"data.max_image_pixels = {max_pixels})"
        )
    if width <= 0 or height <= 0:
        raise BadImageError(f"corrupt image (size {width}x{height})")
    return image


def _decode(image, target_size):
    from PIL import Image

    try:
        if target_size is not None and image.format == "JPEG":
            th, tw = target_size
            image.draft("RGB", (tw, th))
        image.seek(0)
        with _pillow_size_guard_lifted():
            image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as exc:  # a frame larger than the header said
        raise BadImageError(f"image too large ({_reason(exc)})") from None
    except MemoryError:
        raise BadImageError(f"image too large to decode ({image.size[0]}x{image.size[1]})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise BadImageError(f"corrupt or truncated image ({_reason(exc)})") from None


def to_rgb(image):
    """Any Pillow mode -> RGB; transparency flattened onto white, 16-bit scaled to 8-bit."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in _INT_MODES or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise BadImageError(f"unsupported image mode {image.mode!r}") from None


def _high_depth_to_rgb(image):
    """16-bit (and 32-bit int / float) grayscale -> 8-bit RGB on a fixed scale.

    A fixed scale keeps a dark image dark (scaling each image by its own maximum would not):
    16-bit modes use 0..65535, integers that fit 0..255 stay as they are, floats in 0..1
    are taken as fractions.
    """
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "F":
        scale = 1.0 if peak <= 1.0 else max(peak, 1.0)
    else:
        scale = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
    gray = np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


@contextlib.contextmanager
def _open_file(path):
    if hasattr(path, "read"):
        yield path
        return
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise BadImageError("image not found") from None
    except IsADirectoryError:
        raise BadImageError("is a directory, not an image file") from None
    except OSError as exc:
        raise BadImageError(f"cannot read file ({exc.strerror or exc})") from None
    with handle:
        yield handle


def _remaining_bytes(handle):
    """Bytes from the current position to the end (None when the stream cannot tell)."""
    try:
        if hasattr(handle, "fileno"):
            with contextlib.suppress(OSError, ValueError):  # BytesIO has fileno() but no fd
                return os.fstat(handle.fileno()).st_size - handle.tell()
        position = handle.tell()
        end = handle.seek(0, os.SEEK_END)
        handle.seek(position)
        return end - position
    except (OSError, ValueError, AttributeError):
        return None


def _reason(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved = None


@contextlib.contextmanager
def _pillow_size_guard_lifted():
    """Turn Pillow's global decompression-bomb check off while reading a header.

    Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` in ``Image.open`` with a message
    that hides the size; ``data.max_image_pixels`` is checked instead, from the header, before
    decoding. The global is restored when the last concurrent reader leaves.
    """
    global _guard_depth, _guard_saved
    from PIL import Image

    with _guard_lock:
        if _guard_depth == 0:
            _guard_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                Image.MAX_IMAGE_PIXELS = _guard_saved
