"""``mmcore ocr``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmcore.commands.ocr import interrupted_line, ocr_csv
from mmcore.errors import MmcoreError


class _CommandError(click.ClickException):
    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(self.format_message(), err=True)


@click.command("ocr")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--output", "output_path", required=True, type=click.Path(path_type=Path),
    help="CSV to write (never the input).",
)
@click.option("--engine", default="tesseract", show_default=True, help="OCR engine plugin name.")
@click.option(
    "--lang", default="kor+eng", show_default=True,
    help="Languages, '+'-separated (Tesseract codes).",
)
@click.option(
    "--only-missing/--all", "only_missing", default=True, show_default=True,
    help="Read only rows whose text_info is empty, or every row.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None,
    help="Parallel OCR processes [default: CPU count].",
)
@click.option(
    "--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder that relative image paths start from [default: the CSV's folder].",
)
@click.option(
    "--engine-param", "engine_params", multiple=True, metavar="KEY=VALUE",
    help="Engine parameter, e.g. --engine-param psm=6 (repeatable); values are read as --set reads them.",
)
def ocr_command(
    input_path, output_path, engine, lang, only_missing, workers, base_dir, engine_params
):
    """Fill text_info by OCR for a CSV (local_image_path,label,text_info) or a folder of images.

    \b
    mmcore ocr data/train.csv -o data/train.ocr.csv --lang kor+eng
    mmcore ocr images/ -o images.csv --lang eng

    A killed run continues where it stopped when run again with the same arguments.
    """
    try:
        ocr_csv(input_path, output_path, engine=engine, lang=lang, only_missing=only_missing, workers=workers,
                base_dir=base_dir, engine_params=engine_params, echo=click.echo)
    except MmcoreError as exc:
        raise _CommandError(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        click.echo(interrupted_line(output_path), err=True)
        sys.exit(130)
