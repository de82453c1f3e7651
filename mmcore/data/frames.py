"""pandas DataFrames as splits: the Python API's rows, validated as a CSV's rows are.

A frame has a split CSV's columns (``local_image_path``, ``label``, ``text_info``; other names
through ``columns=``). An image cell holds

- a path (``str`` or ``os.PathLike``; a relative one starts from ``base_dir``, by default the
  current directory): the row is a CSV row, checked by the same ``stat`` (regular file, at most
  ``data.max_image_bytes``);
- the image file's bytes (``bytes``, ``bytearray``, ``memoryview``): at most
  ``data.max_image_bytes``, decoded by the one decoder (:func:`mmcore.data.images.load_rgb`:
  the format allow-list, ``data.max_image_pixels``, EXIF orientation), so the same file's path
  and bytes give the same pixels;
- a ``PIL.Image.Image``: its size checked against ``data.max_image_pixels``, then taken in as
  the decoder would give it (EXIF orientation applied, converted to RGB) and kept as lossless
  PNG bytes that the same decoder reads back. A JPEG file's path may be decoded at a reduced
  scale (``Image.draft``, when it is larger than the model reads); the PIL image the user opened
  was not, so its scores may differ slightly from the file's.

An image in memory becomes a :class:`MemoryImage`: it stands where a CSV row has a path, carries
its content hash (sha1 of its bytes, the feature cache's and OCR cache's key, as a file's is) and
opens its bytes for the decoder. Problems are :class:`~mmcore.errors.DataError` lines naming the
frame and the row by the frame's index (``train DataFrame: row 7: bad label 'maybe' ...``).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import attrs

from mmcore.data.csvs import REQUIRED_COLUMNS, split_from_table
from mmcore.data.images import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    ImageSample,
    check_size,
    to_rgb,
    too_many_bytes,
    upright,
)
from mmcore.data.memo import ImageFacts, examine_bytes
from mmcore.data.split import limited
from mmcore.errors import DataError

IMAGE_COLUMN, LABEL_COLUMN, TEXT_COLUMN = REQUIRED_COLUMNS
#: zlib level of the PNG a PIL image is kept as: lossless whatever the level; 1 is the fastest
PNG_LEVEL = 1


def frame_split_name(split):
    """What a split given as a DataFrame is called in messages and in the run's recipe (``<train DataFrame>``)."""
    return f"<{split} DataFrame>"


def require_split_file(name, split, *, hint):
    """Refuse, in one line, to re-read a split that was given as a DataFrame: a run keeps no copy of its rows."""
    if str(name) == frame_split_name(split):
        raise DataError(f"{name}: the run's {split} split was a DataFrame (mmcore.train), which the run keeps no copy "
                        f"of; {hint}")


@attrs.frozen(eq=False)
class MemoryImage(ImageSample):
    """An image held in memory (bytes, or a PIL image kept as PNG bytes) standing where a split has a path."""

    data: bytes = attrs.field(repr=False)
    facts: ImageFacts = attrs.field(repr=False)

    def __str__(self):
        # unique per content: the checks remember facts by name, and messages name the row besides
        return f"<image in memory sha1:{self.facts.sha1.hex()[:12]}>"

    @contextlib.contextmanager
    def open_bytes(self):
        yield io.BytesIO(self.data)


def is_memory_image(value):
    """Whether ``value`` is an image in memory a frame's image cell may hold (bytes or a PIL image)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    from PIL import Image

    return isinstance(value, Image.Image)


def memory_image(value, *, formats=DEFAULT_FORMATS, max_bytes=DEFAULT_MAX_IMAGE_BYTES,
                 max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Bytes or a PIL image -> a :class:`MemoryImage` (hashed, header read); :class:`BadImageError`
    for bytes over ``max_bytes`` (unhashed) or a PIL image over ``max_pixels`` (unencoded)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        size = memoryview(value).nbytes
        if size > max_bytes:
            raise BadImageError(too_many_bytes(size, max_bytes))
        data = value if isinstance(value, bytes) else bytes(value)
    else:
        check_size(*value.size, max_pixels=max_pixels)
        buffer = io.BytesIO()
        to_rgb(upright(value)).save(buffer, format="PNG", compress_level=PNG_LEVEL)
        data = buffer.getvalue()
    return MemoryImage(data=data, facts=examine_bytes(data, formats))


def split_from_frame(frame, *, name="DataFrame", base_dir=None, columns=None, require_label=True, require_text=True,
                     check_images=True, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                     image_formats=DEFAULT_FORMATS):
    """A :class:`~mmcore.data.split.Split` of ``frame``'s rows (see the module docstring), or a
    :class:`DataError` listing every problem.

    ``columns``: ``{"image": ..., "label": ..., "text": ...}``, the frame's names for the split
    columns (by default the CSV's). ``name`` starts every message. Rows are named by the frame's
    index when it holds integers, else by position (from 0).
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{name}: expected a pandas DataFrame or a CSV path (got {type(frame).__name__})")
    names = {"image": IMAGE_COLUMN, "label": LABEL_COLUMN, "text": TEXT_COLUMN, **(columns or {})}
    wanted = {IMAGE_COLUMN: (names["image"], True), LABEL_COLUMN: (names["label"], require_label),
              TEXT_COLUMN: (names["text"], require_text)}
    missing = [f"{name}: missing column {given!r} (found: {', '.join(map(str, frame.columns)) or '(none)'})"
               for given, required in wanted.values() if required and given not in frame.columns]
    if missing:
        raise DataError(missing)
    if len(frame) == 0:
        raise DataError(f"{name}: no rows")
    numbers = _row_numbers(frame)
    images, problems = [], []
    for number, cell in zip(numbers, frame[names["image"]].tolist()):
        image, problem = _image_cell(cell, image_formats, max_image_bytes, max_image_pixels)
        images.append(_REFUSED if problem is not None else image)  # its line below; the other columns checked on
        if problem is not None:
            problems.append(f"{name}: row {number}: {names['image']}: {problem}")
    table = {IMAGE_COLUMN: images}
    for column in (LABEL_COLUMN, TEXT_COLUMN):
        given = wanted[column][0]
        if given in frame.columns:
            table[column] = [_text_cell(value) for value in frame[given].tolist()]
    try:
        split = split_from_table(pd.DataFrame(table), Path(name), base_dir or os.getcwd(), require_label=require_label,
                                 check_images=check_images, max_image_bytes=max_image_bytes, row_numbers=numbers)
    except DataError as exc:
        raise DataError(limited(problems, "unusable images", name) + exc.problems) from None
    if problems:
        raise DataError(limited(problems, "unusable images", name))
    return split


class _Refused(ImageSample):
    """Stands in a table for an image cell already refused, so the row's other columns are still checked."""

    def __str__(self):
        return "-"


_REFUSED = _Refused()


def _row_numbers(frame):
    """The frame's index when it holds integers (what the user sees), else positions from 0."""
    import pandas as pd

    if pd.api.types.is_integer_dtype(frame.index.dtype):
        return [int(i) for i in frame.index]
    return list(range(len(frame)))


def _image_cell(cell, formats, max_bytes, max_pixels):
    """``(what the split holds: a path string or a MemoryImage, problem or None)``."""
    if _is_missing(cell):
        return "", None  # the split names it: "empty local_image_path"
    if isinstance(cell, (str, os.PathLike)):
        return os.fspath(cell), None
    if is_memory_image(cell):
        try:
            return memory_image(cell, formats=formats, max_bytes=max_bytes, max_pixels=max_pixels), None
        except BadImageError as exc:
            return None, str(exc)
    return None, f"expected a path, the image's bytes or a PIL image (got {type(cell).__name__})"


def _text_cell(value):
    """A label or text cell as the CSV would hold it: missing (None, NaN) is empty."""
    return "" if _is_missing(value) else str(value)


def _is_missing(value):
    """None, NaN, ``pd.NA``, ``NaT``: what pandas puts in an empty cell."""
    import pandas as pd

    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # an array-like cell: not missing, and not a path either
        return False
