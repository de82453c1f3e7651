"""``mmcore select``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.cli.options import device_option
from mmcore.commands.select import DEFAULT_OUT, select
from mmcore.progress import progress_for


@click.command("select")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("pool_csv", metavar="POOL.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--budget", required=True, type=click.IntRange(min=1), help="How many rows to choose.")
@click.option("--strategy", type=click.Choice(["both", "uncertainty", "diversity"]), default="both", show_default=True,
              help="uncertainty: nearest the threshold; diversity: k-center on the embeddings; both: k-center among "
                   "the 10 x budget most uncertain.")
@click.option("--exclude", "exclude", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A CSV of rows already chosen (an earlier round's selected.csv); repeatable.")
@click.option("--seed", type=int, default=0, show_default=True, help="Breaks ties.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="The CSV to write, in labelling order.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that relative image paths start from [default: the CSV's folder].")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def select_command(run_dir, pool_csv, budget, strategy, exclude, seed, out, base_dir, device, quiet):
    """Choose the rows of POOL.csv (local_image_path[,text_info]) to label next, in labelling order, with a reason each.

    \b
    mmcore select runs/demo/20261128-101500 pool.csv --budget 200
    mmcore select runs/demo/20261128-101500 pool.csv --budget 200 --exclude round1.csv --out round2.csv

    Rows already labelled (the run's train and val, by content) or listed in an --exclude CSV are never chosen.
    """
    select(run_dir, pool_csv, budget=budget, strategy=strategy, exclude=exclude, seed=seed, out=out, base_dir=base_dir,
           device=device, progress=progress_for(quiet), echo=click.echo)
