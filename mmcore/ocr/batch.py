"""``mmcore ocr INPUT -o OUTPUT.csv``: fill ``text_info`` for a CSV or a folder of images.

Parallel (a process pool over images), resumable (each finished row is appended to
``OUTPUT.csv.partial.jsonl`` and not read again) and atomic (the CSV is written through
:func:`mmcore.io.write_text`; the input is never overwritten). The CSV is read by the one CSV
reader, :func:`mmcore.data.csvs.read_table`; images are keyed by the sha1 of their bytes
(:func:`mmcore.data.checks.hash_files`), the feature cache's content key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import attrs

from mmcore.data.checks import hash_files
from mmcore.data.csvs import read_table
from mmcore.errors import DataError, MmcoreError
from mmcore.io import write_text
from mmcore.ocr.engines import ImageReader, build_engine, check_engine, parse_engine_params, read_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
COLUMNS = ("local_image_path", "label", "text_info")


def _same_file(a, b):
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def load_table(input_path, output_path, base_dir=None):
    """``(frame, base_dir)`` for a CSV or a folder of images; every column read as text."""
    import pandas as pd

    input_path = Path(input_path)
    if input_path.is_dir():
        images = sorted(
            p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(f"{input_path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        out_dir = Path(output_path).resolve().parent
        rows = []
        for image in images:
            image = image.resolve()
            # relative to the output CSV when inside its folder, so the CSV moves with the images
            shown = image.relative_to(out_dir) if image.is_relative_to(out_dir) else image
            rows.append({"local_image_path": shown.as_posix(), "label": "", "text_info": ""})
        return pd.DataFrame(rows, columns=list(COLUMNS)), out_dir
    frame = read_table(input_path, required=("local_image_path",), optional=("label", "text_info"))
    if "text_info" not in frame.columns:
        frame["text_info"] = ""
    return frame, Path(base_dir) if base_dir is not None else input_path.resolve().parent


def resolve_image(base_dir, value):
    """An image path from a CSV cell: absolute as is, relative against ``base_dir``."""
    path = Path(value)
    return path if path.is_absolute() else Path(base_dir) / path


def partial_path(output_path):
    """Where finished rows of an unfinished run are kept: ``OUTPUT.csv.partial.jsonl``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".partial.jsonl")


def load_partial(path, engine_identity, lang):
    """``{row: (image sha1 hex, text)}`` from a partial file, ignoring other engines/languages.

    A line cut short by a kill is skipped, and so are records of older versions (keyed by a
    sha256): their rows are simply read again.
    """
    done = {}
    if not Path(path).exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                if record["engine"] == engine_identity and record["lang"] == lang:
                    done[int(record["row"])] = (record["sha1"], record["text"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


@attrs.frozen
class OcrSummary:
    """What a run did (row numbers are 0-based positions in the table)."""

    rows: int
    read: int
    resumed: int
    skipped: int
    failed: tuple[str, ...]


def run_ocr(
    input_path,
    output_path,
    *,
    engine="tesseract",
    lang="kor+eng",
    only_missing=True,
    workers=None,
    base_dir=None,
    engine_params=(),
    registry=None,
    progress=True,
    echo=None,
):
    """Read the images of ``input_path`` (CSV or folder), write ``output_path`` with ``text_info``.

    ``engine_params``: ``KEY=VALUE`` strings, read as ``--set`` reads values. Resumable: each
    finished row is appended to ``OUTPUT.csv.partial.jsonl`` (row, image sha1, engine identity,
    lang, text) and skipped on the next run; the CSV is written atomically and the partial
    file removed only at the end. ``echo(line)`` gets one line per unreadable image.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    echo = echo or (lambda line: print(line, file=sys.stderr))
    if not input_path.exists():
        raise DataError(f"{input_path}: no such file or folder")
    if _same_file(input_path, output_path):
        raise MmcoreError(
            f"-o {output_path} is the input file; mmcore ocr never overwrites its input, "
            f"choose another output path"
        )
    if output_path.is_dir():
        raise MmcoreError(f"-o {output_path} is a folder; give a CSV file name")
    if not output_path.parent.exists():
        raise MmcoreError(f"-o {output_path}: folder {output_path.parent} does not exist")

    ocr_engine = build_engine(engine, parse_engine_params(engine_params), registry=registry)
    check_engine(ocr_engine, lang)
    identity = ocr_engine.identity

    frame, base_dir = load_table(input_path, output_path, base_dir)
    texts = list(frame["text_info"])
    paths = list(frame["local_image_path"])
    wanted = [i for i, text in enumerate(texts) if not only_missing or not text.strip()]
    images = {row: resolve_image(base_dir, paths[row]) for row in wanted}
    keys = dict(zip(wanted, hash_files([images[row] for row in wanted])))

    partial = partial_path(output_path)
    done = load_partial(partial, identity, lang)
    jobs, resumed, failed = [], 0, []
    for row in wanted:
        key = keys[row]
        if row in done and key is not None and key.hex() == done[row][0]:
            texts[row] = done[row][1]
            resumed += 1
        else:
            jobs.append((row, images[row]))

    workers = workers or os.cpu_count() or 1
    read = 0
    results = read_images(jobs, ImageReader(ocr_engine, lang), workers, progress=progress)
    with open(partial, "a", encoding="utf-8") as log, contextlib.closing(results):
        for result in results:
            if result.fatal:
                raise MmcoreError(result.error)
            row = result.key
            if result.error is not None:
                line = f"{paths[row]} (row {row + 1}): {result.error}"
                failed.append(line)
                echo(line)
                continue
            texts[row] = result.text
            read += 1
            if keys[row] is not None:  # a file unreadable when hashed is read again next time
                record = {"row": row, "sha1": keys[row].hex(), "engine": identity, "lang": lang, "text": result.text}
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()

    frame["text_info"] = texts
    write_text(output_path, frame.to_csv(index=False))
    partial.unlink(missing_ok=True)
    return OcrSummary(
        rows=len(frame),
        read=read,
        resumed=resumed,
        skipped=len(frame) - len(wanted),
        failed=tuple(failed),
    )
