"""Checks across splits and images before a run: leakage (the same image in two splits) and
image headers (empty, not an image, too large) — cheap enough to run on every ``mmcore run``.

The files are hashed (sha1 of their bytes, the feature cache's content key) by the ``hashes``
a run passes in, so the duplicate check, the OCR fill and the feature cache hash each file once
per run; alone, :func:`hash_files` reads the whole dataset once (a few thousand ad images take
well under a second from a warm disk).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import attrs

from mmcore.data.images import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    image_file_problem,
    open_checked,
    open_image_file,
)
from mmcore.io import file_sha1

#: later splits are compared with earlier ones: test with val and train, val with train
SPLIT_ORDER = ("train", "val", "test")
_THREADS = 8


@attrs.frozen
class Overlap:
    """Rows of ``split`` whose image content also appears in ``other`` (an earlier split)."""

    split: str
    other: str
    csv: str
    other_csv: str
    #: (row in split, path in split, row in other, path in other), in row order
    rows: tuple[tuple[int, str, int, str], ...]

    @property
    def count(self):
        return len(self.rows)

    def warning(self):
        """``warning: 3 images of test.csv also appear in train.csv (same file content): ...``"""
        noun = "image" if self.count == 1 else "images"
        verb = "appears" if self.count == 1 else "appear"
        return (
            f"warning: {self.count} {noun} of {self.csv} also {verb} in {self.other_csv} "
            f"(same file content): leakage inflates {self.split} metrics"
        )


@attrs.frozen
class DuplicateReport:
    """Every split pair, with the rows they share (pairs without overlap have no rows)."""

    overlaps: tuple[Overlap, ...]

    def warnings(self):
        """One line per split pair that shares images (empty when there is no leakage)."""
        return [overlap.warning() for overlap in self.overlaps if overlap.count]

    def counts(self):
        """``{"val_in_train": 0, "test_in_train": 3, "test_in_val": 0}`` for results.json."""
        return {f"{o.split}_in_{o.other}": o.count for o in self.overlaps}

    @property
    def total(self):
        return sum(o.count for o in self.overlaps)


def hash_files(paths, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The sha1 of each file's bytes, read by a few threads; None where unreadable, and unread
    where its ``stat`` says it is not a regular file (a FIFO would block) or over ``max_bytes``."""
    paths = list(paths)

    def digest(path):
        return None if image_file_problem(path, max_bytes) is not None else file_sha1(path)

    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(digest, paths))


def find_duplicates(splits, hashes=hash_files):
    """Images whose content appears in two splits (``{"train": Split, "val": ..., "test": ...}``).

    ``hashes(paths)`` gives the files' content keys (a run's shared
    :class:`~mmcore.data.memo.ImageHashes`, or :func:`hash_files`).

    Each later split is compared with each earlier one (order: train, val, test, then any other
    names in the order given). Rows are counted in the later split; the same file listed twice
    and two copies of one file both count. Missing or unreadable files are ignored here.
    """
    names = [n for n in SPLIT_ORDER if n in splits] + [n for n in splits if n not in SPLIT_ORDER]
    paths = sorted({str(p) for name in names for p in splits[name].paths})
    digests = dict(zip(paths, hashes(paths)))
    labels = _csv_labels(splits, names)
    first_row = {}  # per split: digest -> (row, raw path) of its first occurrence
    for name in names:
        split = splits[name]
        seen = first_row.setdefault(name, {})
        for path, row, raw in zip(split.paths, split.rows, split.raw_paths):
            digest = digests[str(path)]
            if digest is not None and digest not in seen:
                seen[digest] = (row, raw)
    overlaps = []
    for i, name in enumerate(names):
        split = splits[name]
        for other in names[:i]:
            known = first_row[other]
            shared = []
            for path, row, raw in zip(split.paths, split.rows, split.raw_paths):
                digest = digests[str(path)]
                if digest is not None and digest in known:
                    shared.append((row, raw, *known[digest]))
            overlaps.append(
                Overlap(
                    split=name,
                    other=other,
                    csv=labels[name],
                    other_csv=labels[other],
                    rows=tuple(shared),
                )
            )
    return DuplicateReport(overlaps=tuple(overlaps))


def _csv_labels(splits, names):
    """How a split's CSV is named in messages: its file name, or its path when names clash."""
    short = {name: splits[name].csv.name for name in names}
    if len(set(short.values())) == len(short):
        return short
    return {name: str(splits[name].csv) for name in names}


def scan_images(split, *, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, formats=DEFAULT_FORMATS, facts=None):
    """Header-only check of every image of ``split`` -> problem lines ``<csv>: row N: <path>: <reason>``
    (``<shard>: sample <key>: <reason>`` for WebDataset samples).

    Finds missing, empty, non-image, not-allowed-format and too-large files without decoding
    pixels (a corrupt or truncated body is only found when decoding, during the run). Files
    are opened exactly as the run opens them (:func:`~mmcore.data.images.open_image_file`).
    ``facts``: a run's :class:`~mmcore.data.memo.FileFacts` (``facts(paths)``), whose
    remembered header facts make a warm scan read no file.
    """
    if facts is not None:
        found = facts(split.paths)
        return [
            where(split, i) + f": {reason}"
            for i, fact in enumerate(found)
            if (reason := fact.reason(max_pixels)) is not None
        ]

    def check(index):
        try:
            with open_image_file(split.paths[index]) as handle:
                open_checked(handle, max_pixels=max_pixels, formats=formats)
        except BadImageError as exc:
            reason = str(exc)
        else:
            return None
        return where(split, index) + f": {reason}"

    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(split)))) as pool:
        return [line for line in pool.map(check, range(len(split))) if line is not None]


def where(split, index):
    """How a problem line names a sample: ``<csv>: row N: <path>``, or ``<shard>: sample <key>``."""
    path = split.paths[index]
    if hasattr(path, "shard"):  # a WebDataset sample names itself (shard and key)
        return str(path)
    return f"{split.csv}: row {split.rows[index]}: {path}"
