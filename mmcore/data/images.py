"""Decoding images robustly: any mode Pillow reads becomes RGB, big JPEGs decode at reduced scale.

Every image mmcore reads (training, cache fill, eval, predict, OCR, the header scan, the
report's thumbnails) is opened here, so the same rules hold everywhere:

- only the formats of an allow-list (``data.image_formats``, default JPEG, PNG, GIF, WebP,
  BMP, TIFF) are handed to Pillow (``Image.open(fp, formats=...)``), so a file that is
  really EPS never reaches the plugin that would start Ghostscript on it;
- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo taken upright
  reaches the encoders and OCR upright;
- a path that is not a regular file (a directory, a FIFO, a device) is refused before it is
  opened (opening a FIFO would block), and so is a file larger than ``data.max_image_bytes``
  (default 50 MB): the ``stat`` that finds it also gives its size, so its bytes are never read.

A bad image raises :class:`BadImageError` with a short reason ("empty file (0 bytes)", "not an
image Pillow can read", "corrupt or truncated image (...)", "image too large (...)"); the
dataset prefixes it with the CSV, row and path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from typing import NamedTuple

from mmcore.errors import DataError, os_error_reason

#: Pillow's own default limit; ``data.max_image_pixels`` replaces Pillow's check.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: ``data.max_image_bytes``: an ad image is well under a few MB; a larger file is refused unread
DEFAULT_MAX_IMAGE_BYTES = 50_000_000
#: bump when decoding changes what pixels an image gives (cached features depend on it);
#: 2: 16-bit images on a fixed 0..65535 scale (was: each image's own maximum)
#: 3: EXIF orientation applied
DECODE_VERSION = 3
#: the formats handed to Pillow unless ``data.image_formats`` says otherwise
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: formats whose Pillow plugin starts an external program (EPS: Ghostscript) — never allowed
FORBIDDEN_FORMATS = frozenset({"EPS"})
_ORIENTATION = 0x0112
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(DataError):
    """An image that cannot be used (missing, corrupt, truncated, not an image, too big)."""


class ImageSample:
    """An image that is not a file of its own, standing where a split has an image path: a sample
    of a WebDataset shard (:class:`mmcore.data.webdataset.ShardMember`) or an image held in memory
    (:class:`mmcore.data.frames.MemoryImage`).

    It opens its bytes (:meth:`open_bytes`, a context manager giving a binary file object) and
    carries its :class:`~mmcore.data.memo.ImageFacts` as ``facts`` (content hash, header facts),
    so the checks, the OCR cache and the feature cache key it by content, as they key files.
    ``str()`` names it in messages.
    """

    def open_bytes(self):
        raise NotImplementedError


def load_rgb(path, *, target_size=None, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, formats=DEFAULT_FORMATS):
    """Open ``path`` (a path or a binary file object) as an upright RGB PIL image.

    The size is checked against ``max_pixels`` from the header, before anything is decoded;
    only ``formats`` are tried. ``target_size`` (h, w): a JPEG larger than it is decoded at a
    reduced scale with ``Image.draft`` (never smaller than the target). EXIF orientation is
    applied; palette/alpha images are flattened on white, CMYK and 16-bit images converted,
    animated images give their first frame.
    """
    with open_image_file(path) as handle:
        image = open_checked(handle, max_pixels=max_pixels, formats=formats)
        return _decode(image, target_size)


def open_checked(handle, *, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, formats=DEFAULT_FORMATS):
    """Read only the header of an open binary file -> a lazy PIL image within ``max_pixels``.

    Only the plugins of ``formats`` see the bytes; a file of another format Pillow knows is
    refused by name ("image format EPS is not allowed ...").
    """
    from PIL import Image, UnidentifiedImageError

    if _remaining_bytes(handle) == 0:
        raise BadImageError("empty file (0 bytes)")
    allowed = [f for f in (name.upper() for name in formats) if f not in FORBIDDEN_FORMATS]
    try:
        with _pillow_size_guard_lifted():  # no DecompressionBombWarning either: checked below
            image = Image.open(handle, formats=allowed)
    except UnidentifiedImageError:
        found = _sniff_format(handle)
        if found is not None and found not in allowed:
            raise BadImageError(
                f"image format {found} is not allowed (data.image_formats: {', '.join(allowed)})"
            ) from None
        raise BadImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise BadImageError(f"corrupt or truncated image ({_reason(exc)})") from None
    check_size(*image.size, max_pixels=max_pixels)
    return image


def check_size(width, height, *, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Raise :class:`BadImageError` for a header size above ``max_pixels`` (or not positive)."""
    if width * height > max_pixels:
        raise BadImageError(
            f"image too large ({width}x{height} = {width * height} pixels > "
            f"data.max_image_pixels = {max_pixels})"
        )
    if width <= 0 or height <= 0:
        raise BadImageError(f"corrupt image (size {width}x{height})")


def _sniff_format(handle):
    """The format a file's first bytes claim, by Pillow's own signature checks (no plugin opens it).

    Only for the message: the ``_accept`` functions compare magic bytes and run nothing.
    """
    from PIL import Image

    try:
        handle.seek(0)
        prefix = handle.read(16)
    except (OSError, ValueError):
        return None
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):
            if accept is not None and accept(prefix):
                return name
    return None


def orientation(image):
    """The EXIF orientation (1..8) of an opened image; 1 when it has none or it cannot be read."""
    try:
        value = int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def upright(image):
    """``image`` turned as its EXIF orientation says (``ImageOps.exif_transpose``); as is when upright."""
    from PIL import ImageOps

    if orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - unreadable orientation data: use the pixels as stored
        return image


def _decode(image, target_size):
    from PIL import Image

    try:
        if target_size is not None and image.format == "JPEG":
            th, tw = target_size
            if orientation(image) >= 5:  # turned by 90 degrees: the stored image is (th, tw) wide
                th, tw = tw, th
            image.draft("RGB", (tw, th))
        image.seek(0)
        with _pillow_size_guard_lifted():
            image.load()
        return to_rgb(upright(image))
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


def image_file_problem(path, max_bytes=None):
    """Why ``path`` cannot be read as an image file (None when it is a regular file within ``max_bytes``).

    ``os.stat`` only: a missing file, a directory, a FIFO or device, a file over ``max_bytes``,
    a name too long, a permission problem become a reason, never an exception.
    """
    return image_file_stat(path, max_bytes)[1]


def too_many_bytes(size, max_bytes):
    """The reason for an image file (or shard member) of ``size`` bytes over ``max_bytes``."""
    return f"image file too large ({size} bytes > data.max_image_bytes = {max_bytes})"


class FileStat(NamedTuple):
    """The part of an ``os.stat_result`` the checks and the cache's stat key use: about 200 bytes
    kept per row instead of 640."""

    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int


def image_file_stat(path, max_bytes=None):
    """``(FileStat or None, problem or None)``: :func:`image_file_problem` that also hands back
    the one ``stat`` it took, so a caller can reuse it (the warm-start checks do)."""
    try:
        full = os.stat(path)
        st = FileStat(full.st_mode, full.st_size, full.st_mtime_ns, full.st_ctime_ns)
    except OSError as exc:
        return None, _os_reason(exc)
    except ValueError:  # an embedded NUL byte
        return None, "not a valid file name"
    if stat.S_ISDIR(st.st_mode):
        return st, "is a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return st, "not a regular file (a device, FIFO or socket)"
    if max_bytes is not None and st.st_size > max_bytes:
        return st, too_many_bytes(st.st_size, max_bytes)
    return st, None


def _os_reason(exc):
    if exc.errno == errno.ENOENT:
        return "image not found"
    if exc.errno == errno.EISDIR:
        return "is a directory, not an image file"
    return f"cannot read file ({os_error_reason(exc)[0]})"


@contextlib.contextmanager
def open_image_file(path, max_bytes=None):
    """Open an image path for reading (a file object passes through, an :class:`ImageSample` opens
    its bytes); problems are :class:`BadImageError`. ``max_bytes``: a larger file is refused
    unopened."""
    if hasattr(path, "read"):
        yield path
        return
    if isinstance(path, ImageSample):
        with path.open_bytes() as handle:
            yield handle
        return
    problem = image_file_problem(path, max_bytes)
    if problem is not None:
        raise BadImageError(problem)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise BadImageError(_os_reason(exc)) from None
    with handle:
        yield handle


def read_image_bytes(path, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The bytes of an image file of at most ``max_bytes`` (:class:`BadImageError` otherwise).

    Refused before it is opened when its ``stat`` says it is not a regular file or too large;
    at most ``max_bytes + 1`` bytes are read, so a file that grew since is refused too.
    """
    with open_image_file(path, max_bytes) as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise BadImageError(_os_reason(exc)) from None
    if len(data) > max_bytes:
        raise BadImageError(f"image file too large (over data.max_image_bytes = {max_bytes} bytes)")
    return data


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
