"""``mmcore shard CSV --out DIR --size 1GB``: WebDataset shards from a split CSV."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmcore.commands.shard import read_sizes, shard_csv
from mmcore.errors import MmcoreError


@click.command("shard")
@click.argument("csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the shards and their manifest (<csv stem>.shards.json).")
@click.option("--size", default="1GB", show_default=True, help="Largest shard: 1GB, 500MB, 2GiB, or bytes.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that relative image paths start from [default: the CSV's folder].")
@click.option("--max-image-bytes", "max_image", default="50MB", show_default=True,
              help="Largest image file (a recipe's data.max_image_bytes); a larger one is refused unread.")
def shard_command(csv, out_dir, size, base_dir, max_image):
    """Write the rows of CSV (local_image_path[,label][,text_info]) as WebDataset tar shards.

    \b
    mmcore shard data/train.csv --out shards --size 1GB
    # then in the recipe: data.format = "webdataset", data.train = "shards/train-{000000..000012}.tar"

    Atomic (each shard renamed into place once verified), verified (read back, every image's
    sha1 compared) and resumable (run it again after an interruption).
    """
    for option, name, text in (("--size", "size", size), ("--max-image-bytes", "max_image", max_image)):
        try:
            read_sizes(**{name: text})
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    try:
        shard_csv(csv, out_dir, size=size, base_dir=base_dir, max_image=max_image, echo=click.echo)
    except MmcoreError as exc:
        for line in str(exc).splitlines():
            click.echo(line, err=True)
        sys.exit(exc.exit_code)
