"""``mmcore ocr INPUT -o OUTPUT.csv``: fill ``text_info`` by OCR for a CSV or a folder of images
(parallel, resumable, atomic: :mod:`mmcore.ocr.batch`)."""

from __future__ import annotations

from mmcore.io import check_output_path
from mmcore.ocr.batch import partial_path, run_ocr


def ocr_csv(input_path, output_path, *, engine="tesseract", lang="kor+eng", only_missing=True, workers=None,
            base_dir=None, engine_params=(), echo=print):
    """Read the text of every image of ``input_path`` that needs it into ``output_path``; returns the
    :class:`~mmcore.ocr.batch.OcrSummary` and says it in one line. A killed run continues where it stopped
    when run again with the same arguments (:func:`interrupted_line` says so)."""
    check_output_path(output_path, "OCR output CSV", option="-o")  # before any image is read
    summary = run_ocr(input_path, output_path, engine=engine, lang=lang, only_missing=only_missing, workers=workers,
                      base_dir=base_dir, engine_params=engine_params)
    parts = [f"{summary.read} read"]
    if summary.resumed:
        parts.append(f"{summary.resumed} resumed")
    if summary.skipped:
        parts.append(f"{summary.skipped} already had text")
    if summary.failed:
        parts.append(f"{len(summary.failed)} unreadable (text left as it was)")
    echo(f"wrote {output_path}: {summary.rows} rows; " + ", ".join(parts))
    return summary


def interrupted_line(output_path):
    """What to say when ``mmcore ocr`` is interrupted: where the finished rows are, and how to go on."""
    return (f"interrupted; finished rows are kept in {partial_path(output_path)}: "
            f"run the same command again to continue")
