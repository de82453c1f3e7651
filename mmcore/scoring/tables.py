"""The CSV a scoring command reads (validated rows plus its own columns, kept to be written back)
and the one it writes: the input with ``score``, ``calibrated_score`` and ``prediction`` added.
"""

from __future__ import annotations

from mmcore.data.csvs import REQUIRED_COLUMNS, read_table, split_from_table
from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.io import atomic_open

OUTPUT_COLUMNS = ("score", "calibrated_score", "prediction")


def read_input(input_csv, base_dir=None, *, require_text=True, check_images=True, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The CSV to score, read once: ``(frame, split)`` — its columns as given, to be written back
    out with the scores, and the validated :class:`~mmcore.data.split.Split` to score."""
    needed = {"local_image_path": True, "label": False, "text_info": require_text}
    frame = read_table(
        input_csv,
        required=[c for c in REQUIRED_COLUMNS if needed[c]],
        optional=[c for c in REQUIRED_COLUMNS if not needed[c]],
    )
    split = split_from_table(frame, input_csv, base_dir, require_label=False, check_images=check_images,
                             max_image_bytes=max_image_bytes)
    return frame, split


def write_scored_csv(output, frame, rows, raw, calibrated, predicted):
    """``frame`` (the input CSV) with score, calibrated_score and prediction, written atomically.

    ``rows`` are the CSV rows (numbered from 1) that were scored, in the order of the scores;
    a row left out (an unreadable image, skipped) keeps those columns empty.
    """
    columns = {name: [""] * len(frame) for name in OUTPUT_COLUMNS}
    for k, row in enumerate(rows):
        columns["score"][row - 1] = repr(float(raw[k]))
        columns["calibrated_score"][row - 1] = repr(float(calibrated[k]))
        columns["prediction"][row - 1] = str(bool(predicted[k]))
    for name in OUTPUT_COLUMNS:
        frame[name] = columns[name]
    with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)
